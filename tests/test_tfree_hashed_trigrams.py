import math
import os
import subprocess
import sys

import torch
from transformers import LlamaConfig, LlamaModel

from paperzoo.architectures.tfree_hashed_trigrams import (
    TFreeConfig, TFreeLM, TrigramEmbedding, decode, dictionary_matrix, multi_hot, split_words, tfree_loss,
    trigram_buckets, trigrams, word_pattern, word_patterns)

WORDS = ["hello", "Hello", "world", "hell", "help", "yellow"]


def test_hello_is_five_boundary_padded_trigrams():
    assert [t.replace(" ", "_") for t in trigrams("hello")] == ["_he", "hel", "ell", "llo", "lo_"]
    assert [t.replace(" ", "_") for t in trigrams("a")] == ["_a_"]
    assert split_words("Hello, world 42!") == ["Hello", ",", "world", "4", "2", "!"]


def test_each_trigram_has_m_distinct_buckets_and_k_shared_with_its_lowercase():
    c = TFreeConfig(v=1_000_000, m=10, k_lower=2)
    upper, lower = trigram_buckets("HEL", c.v, c.m, c.k_lower), trigram_buckets("hel", c.v, c.m, c.k_lower)
    assert len(upper) == len(lower) == 10
    assert len(set(upper) & set(lower)) == 2  # only the lowercase-hashed buckets coincide
    # "Hello" and "hello" differ in two trigrams (_He, Hel): 3 shared trigrams x 10 + 2 x 2 lowercase buckets
    assert len(set(word_pattern("Hello", c)) & set(word_pattern("hello", c))) == 34


def test_patterns_are_identical_across_processes():
    c = TFreeConfig(v=8000)
    code = ("from paperzoo.architectures.tfree_hashed_trigrams import TFreeConfig, word_pattern;"
            f"print([word_pattern(w, TFreeConfig(v=8000)) for w in {WORDS!r}])")
    outputs = set()
    for salt in ("1", "2"):  # different PYTHONHASHSEEDs: a salted `hash` would give different patterns
        env = {**os.environ, "PYTHONHASHSEED": salt}
        outputs.add(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                   check=True).stdout.strip())
    assert outputs == {str([word_pattern(w, c) for w in WORDS])}


def test_embedding_is_the_sum_of_the_active_rows():
    c = TFreeConfig(v=500)
    table = word_patterns(WORDS, c)
    torch.manual_seed(0)
    emb = TrigramEmbedding(table, c.v, 8)
    out = emb(torch.tensor([[0, 3], [5, 1]]))
    W = emb.bag.weight
    for (b, t), i in {(0, 0): 0, (0, 1): 3, (1, 0): 5, (1, 1): 1}.items():
        torch.testing.assert_close(out[b, t], W[word_pattern(WORDS[i], c)].sum(0))


def test_a_planted_pattern_decodes_to_its_word_even_inside_a_larger_one():
    c = TFreeConfig(v=200, m=3, k_lower=0)
    table = word_patterns(WORDS, c)
    dictionary = dictionary_matrix(table, c.v)
    for i, w in enumerate(WORDS):
        logits = torch.full((1, c.v), -8.0)
        logits[0, word_pattern(w, c)] = 8.0
        best, p = decode(logits, dictionary)
        assert WORDS[best.item()] == w
        torch.testing.assert_close(p.sum(-1), torch.ones(1))
    # a pattern strictly inside another, the larger one planted less sharply on its extra buckets: its mean
    # on-pattern activation is below the smaller word's, and only the off-pattern term decodes it right
    nested = dictionary_matrix(torch.tensor([[0, 1, 2, c.v, c.v], [0, 1, 2, 3, 4]]), c.v)
    logits = torch.full((1, c.v), -8.0)
    logits[0, :3] = 8.0
    assert decode(logits, nested)[0].item() == 0
    logits[0, 3:5] = 4.0
    assert decode(logits, nested)[0].item() == 1


def test_the_loss_is_bce_on_the_next_words_pattern_with_the_positive_weight():
    c = TFreeConfig(v=300, m=4, k_lower=1, pos_weight=7.0)
    words = ["a", "supercalifragilistic"]  # pattern sizes differ, so the shift to the next word matters
    table = word_patterns(words, c)
    decoder = LlamaModel(LlamaConfig(vocab_size=2, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2))
    model = TFreeLM(decoder, table, c)
    torch.nn.init.zeros_(model.head.weight)  # every logit 0: BCE is log 2 per bucket, times p on the positives
    out = model(input_ids=torch.tensor([[0, 1]]), labels=torch.tensor([[0, 1]]))
    size = len(word_pattern(words[1], c))
    expected = (c.pos_weight * size + (c.v - size)) * math.log(2) / c.v
    assert out.logits.shape == (1, 2, c.v)
    assert abs(out.loss.item() - expected) < 1e-5
    # the same positive weight by hand on random logits
    z = torch.randn(3, c.v)
    y = multi_hot(table[[0, 1, 1]], c.v)
    by_hand = -(c.pos_weight * y * torch.nn.functional.logsigmoid(z)
                + (1 - y) * torch.nn.functional.logsigmoid(-z)).mean()
    torch.testing.assert_close(tfree_loss(z, y, c.pos_weight), by_hand)
