"""Long-context ICL protocol (2405.00200): block attention, orderings, retrieval and label scoring."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from paperzoo.phenomena.long_context_icl import (
    Demo, block_attention_mask, label_log_probs, order_demos, prompt_ids, retrieve_demos)


def _tiny_lm(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=24, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))


def _demos(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Demo(torch.randint(1, 20, (3,), generator=g), label=i % 3) for i in range(n)]


def test_a_block_as_large_as_the_prompt_is_full_attention():
    lm = _tiny_lm()
    demos = _demos(6)
    ids, spans = prompt_ids(demos, torch.tensor([5, 6]), prefix=torch.tensor([0]))
    assert torch.equal(block_attention_mask(spans, len(ids), block=6), torch.tril(torch.ones(len(ids), len(ids))).bool())
    full = label_log_probs(lm, [ids], [20, 21, 22])
    blocked = label_log_probs(lm, [ids], [20, 21, 22], masks=[block_attention_mask(spans, len(ids), block=6)])
    assert torch.allclose(full, blocked, atol=1e-5)


def test_block_mask_keeps_demonstrations_in_their_block_and_lets_the_query_see_all():
    demos = _demos(4)  # 3 tokens each, after a 1-token prefix: demos at 1-3, 4-6, 7-9, 10-12; query 13-14
    ids, spans = prompt_ids(demos, torch.tensor([5, 6]), prefix=torch.tensor([0]))
    mask = block_attention_mask(spans, len(ids), block=2)
    assert spans == [(1, 4), (4, 7), (7, 10), (10, 13)]
    assert mask[8, 0] and mask[8, 7]  # demo 2 sees the prefix and its own block
    assert not mask[8, 5] and not mask[11, 3]  # ... but not block 0's demonstrations
    assert mask[11, 8] and mask[12, 10]  # demo 3 sees demo 2 (same block) and itself
    assert mask[14].sum() == 15 and mask[13, :14].all()  # the query attends to everything before it
    assert not mask.triu(1).any()  # causal


def test_blocks_change_what_a_demonstration_computes_but_not_the_query_when_demos_do_not_matter():
    lm = _tiny_lm(1)
    demos = _demos(4)
    ids, spans = prompt_ids(demos, torch.tensor([5, 6]), prefix=torch.tensor([0]))
    mask = block_attention_mask(spans, len(ids), block=1)
    out_full = lm(input_ids=ids[None]).logits[0]
    out_block = lm(input_ids=ids[None], attention_mask=mask[None, None]).logits[0]
    assert torch.allclose(out_full[:4], out_block[:4], atol=1e-5)  # the first block sees what it always saw
    assert not torch.allclose(out_full[4:7], out_block[4:7], atol=1e-4)  # demo 1 no longer sees demo 0


def test_grouped_order_puts_each_label_together_and_random_order_is_a_permutation():
    demos = _demos(12)
    g = torch.Generator().manual_seed(3)
    grouped = order_demos(demos, "grouped", g)
    runs = [d.label for d in grouped]
    assert sum(a != b for a, b in zip(runs, runs[1:])) == 2  # three labels, three runs
    shuffled = order_demos(demos, "random", g)
    assert sorted(id(d) for d in shuffled) == sorted(id(d) for d in demos)
    with pytest.raises(ValueError):
        order_demos(demos, "sorted", g)


def test_retrieval_takes_the_most_similar_and_puts_the_best_last():
    pool = [Demo(torch.tensor([i]), label=0) for i in range(10)]
    chosen = retrieve_demos(pool, torch.tensor([7]), 3, lambda q, d: -abs(int(q) - int(d.tokens)))
    assert [int(d.tokens) for d in chosen][-1] == 7 and {int(d.tokens) for d in chosen} == {6, 7, 8}
