"""Reproduction of 2406.19223 (T-FREE) at tiny scale: next-word accuracy against a BPE LM.

Two language models with the same decoder (``core.blocks.standard_model``: same width,
depth and heads, so equal non-embedding parameters) are trained on the embedded
corpus (``core.corpus.load_corpus``, the stdlib docstrings) for the same steps and
batch size, on rows that hold about the same amount of text:

- **BPE**: the cached byte-level BPE tokenizer (``core.tokenizer.train_tokenizer``,
  `bpe_vocab` tokens), an untied embedding and softmax head, cross-entropy.
- **T-FREE**: words -> hashed trigram patterns (m = 10, 2 lowercase, as the official
  config), a summed ``EmbeddingBag`` and $v$ sigmoids with positive-weighted BCE. $v$ is
  the largest value whose embedding plus head hold at most 15% of BPE's (the paper's
  "more than 85% fewer"); the decoding dictionary is every word of the training split.

Both are scored on the same held-out items (a position in a validation document, the
previous `context` words as input): a prediction is right when the whole next word is
exactly right. T-FREE decodes by softmax over the dictionary; BPE greedily generates
`new_tokens` tokens after the context text and its first word is taken. Each item is
also scored with its context's case randomly changed (each context word, with
probability 1/2, gets every letter's case redrawn), the target word unchanged.

Set-up choices, all made before the T-FREE arm ran and from the BPE control only:
`bpe_vocab` 4096 (a small vocabulary the tiny model can fill on 2 MB of text),
`hidden` 128 x 2 layers, `lr` 3e-3, 64-token rows and the step counts (the largest
that fit the time budget), checked only by the BPE precondition. The T-FREE row
length is 64 tokens' worth of words (the corpus's words-per-token ratio). The positive
weight follows the official config (300 at v = 32k), scaled with v so the positives
keep the same share of the total loss weight: p = 300 * v / 32000. Nothing was tuned
on T-FREE's accuracy.

Steps at `small`: 1,200, chosen on the BPE control after the first calibration (600 steps,
seed 0) failed its precondition: BPE was right on 11.5% of items against 6.0% for the
most-frequent word, an interval whose low end sat under the 5-point bar. That run's T-FREE
figures were printed too (15.3% clean, 13.7% cased); the change is to the control's budget
only, the same for both arms, and the predicate is unchanged. With 1,200 steps BPE alone
(seed 0, the same items) reaches 17.7% against 6.0% (interval of the difference 8.5-15.0
points) at a final training loss of 4.06, in 129 s of CPU on one thread.

Margins: every comparison is on paired items, with a bootstrap interval over items
within a seed (``core.margins``).
"""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import torch

from paperzoo.architectures.tfree_hashed_trigrams import (
    WORD, TFreeConfig, TFreeLM, decode, dictionary_matrix, split_words, word_patterns)
from paperzoo.core.blocks import parameter_count, standard_model
from paperzoo.core.corpus import load_corpus
from paperzoo.core.experiment import Claim, Outcome, RunContext
from paperzoo.core.margins import decided, paired_difference
from paperzoo.core.tokenizer import train_tokenizer
from paperzoo.core.training import TrainConfig, single_thread, token_blocks, train

COMPETITIVE = 0.9  # the reading of "competitive": at least 90% of BPE's accuracy
PARAMETER_SHARE = 0.15  # "more than 85% fewer" embedding and head parameters
WELL_ABOVE = 0.05  # the BPE control must beat the most-frequent-word guess by 5 points


def _interval(a, b, scale_b: float = 1.0, seed: int = 0):
    return paired_difference(np.asarray(a, float), scale_b * np.asarray(b, float), seed=seed)


def preconditions(m: dict) -> dict[str, bool | None]:
    learns = _interval(m["items"]["bpe_clean"], m["items"]["most_frequent"], seed=m["seed"])
    return {
        "the BPE model learns (next-word accuracy well above the most-frequent-word guess)":
            learns.low > WELL_ABOVE,
        "T-FREE's embedding and head hold at most 15% of BPE's": m["parameter_share"] <= PARAMETER_SHARE,
    }


def checks(m: dict) -> dict[str, bool | None]:
    it = m["items"]
    drop_t = np.asarray(it["tfree_clean"], float) - np.asarray(it["tfree_cased"], float)
    drop_b = np.asarray(it["bpe_clean"], float) - np.asarray(it["bpe_cased"], float)
    return {
        "T-FREE reaches at least 90% of BPE's next-word accuracy":
            decided(_interval(it["tfree_clean"], it["bpe_clean"], COMPETITIVE, m["seed"])),
        "T-FREE loses less accuracy than BPE under random case changes":
            decided(paired_difference(drop_b, drop_t, seed=m["seed"])),
    }


CLAIM = Claim(
    statement=(
        "T-FREE embeds words by hashed character-trigram patterns and predicts the next word's pattern with "
        "multi-label sigmoids, so its embedding and head need no subword vocabulary: it reaches competitive "
        "downstream performance with more than 85% fewer parameters in these layers (abstract; Sec. 4, the 1B "
        "ablations against a 64k Unigram baseline and the 3B comparison), and case variants of a word share "
        "part of their pattern instead of being unrelated tokens (Sec. 2, F2: near-duplicate tokens)."
    ),
    predicate=(
        "Tiny decoders of equal non-embedding size trained on the embedded corpus, T-FREE with v set so its "
        "embedding+head hold <= 15% of the BPE model's: (1) T-FREE's next-word exact-match accuracy is at least "
        "90% of BPE's (paired bootstrap interval of mean(t - 0.9 b) over items above 0), and (2) with the context's "
        "case randomly changed, T-FREE's accuracy drops less than BPE's (interval of the difference in drops above "
        "0). Each fails when its interval lies below 0, and is undecided when it straddles. The 90% bar is the "
        "issue's reading of 'competitive'; the paper states no number for it."
    ),
    checks=checks,
    preconditions=preconditions,
    source=("arXiv:2406.19223: abstract ('competitive downstream performance with a parameter reduction of more "
            "than 85%'), Sec. 3 (encoding, loss, decoding), Sec. 4 (benchmark comparisons). Official code "
            "Aleph-Alpha/trigrams: configs/7b_fineweb_tokenizer.yaml (vocab_population 10, partial lowercase 2, "
            "loss_pos_weight 300), trigram_tokenizer.py (hashing, decode scores)."),
)

BASE = dict(bpe_vocab=4096, hidden=128, layers=2, heads=2, lr=3e-3, batch=16, tokens_per_row=64,
            m=10, k_lower=2, context=16, new_tokens=8, case_prob=0.5)
SCALES = {
    "smoke": {**BASE, "steps": 20, "items": 48, "train_docs": 400},
    "small": {**BASE, "steps": 1200, "items": 600, "train_docs": None},
    "large": {**BASE, "steps": 3000, "items": 2000, "train_docs": None, "hidden": 256, "layers": 4, "heads": 4},
}
INPUTS = ("corpus",)
SUBSTRATE = ()
SEED_VARIES = ("the initialisation of both models, their batch order, the held-out items drawn and their case "
               "changes")


def _random_case(word: str, rng: random.Random) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in word)


def _items(docs, count: int, context: int, case_prob: float, seed: int) -> list[dict]:
    """Held-out items: the context (words and exact text, clean and case-changed) and the next word."""
    rng = random.Random(seed)
    spans = [(d, list(WORD.finditer(d))) for d in docs]
    eligible = [(di, i) for di, (_, ws) in enumerate(spans) for i in range(context, len(ws))]
    out = []
    for di, i in rng.sample(eligible, min(count, len(eligible))):
        doc, ws = spans[di]
        ctx = ws[i - context:i]
        cased = [(_random_case(w.group(), rng) if rng.random() < case_prob else w.group()) for w in ctx]
        text, cased_text, pos = [], [], ctx[0].start()
        for w, c in zip(ctx, cased):
            text += [doc[pos:w.start()], w.group()]
            cased_text += [doc[pos:w.start()], c]
            pos = w.end()
        out.append({"words": [w.group() for w in ctx], "cased_words": cased, "text": "".join(text),
                    "cased_text": "".join(cased_text), "target": ws[i].group()})
    return out


@torch.no_grad()
def tfree_predictions(model: TFreeLM, rows: list[list[int]], dictionary, words: list[str]) -> list[str]:
    model.eval()
    ids = torch.tensor(rows)  # every context has the same number of words
    best, _ = decode(model(input_ids=ids).logits[:, -1], dictionary)
    return [words[i] for i in best.tolist()]


@torch.no_grad()
def bpe_predictions(model, tokenizer, texts: list[str], new_tokens: int) -> list[str]:
    """Greedy decoding of `new_tokens` tokens after each text; the first word of the continuation."""
    model.eval()
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    for _ in range(new_tokens):
        length = max(map(len, rows))
        ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])  # right padding: causal, read before it
        logits = model(input_ids=ids).logits
        nxt = logits[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])].argmax(-1).tolist()
        rows = [r + [t] for r, t in zip(rows, nxt)]
    out = []
    for r, t in zip(rows, texts):
        continuation = split_words(tokenizer.decode(r[len(tokenizer(t, add_special_tokens=False)["input_ids"]):]))
        out.append(continuation[0] if continuation else "")
    return out


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    corpus = load_corpus(ctx.corpus)
    train_docs = corpus.train if s["train_docs"] is None else corpus.train[: s["train_docs"]]
    tokenizer = train_tokenizer(corpus, s["bpe_vocab"])
    V = len(tokenizer)

    # T-FREE's word stream and table: every word of training, and of the items (clean and case-changed)
    train_words = [w for d in train_docs for w in split_words(d)]
    counts = Counter(train_words)
    items = _items(corpus.validation, s["items"], s["context"], s["case_prob"], ctx.seed)
    vocabulary = list(counts) + sorted({w for it in items for w in it["words"] + it["cased_words"]} - set(counts))
    index = {w: i for i, w in enumerate(vocabulary)}

    bpe_blocks = token_blocks(tokenizer, train_docs, s["tokens_per_row"])
    tokens_per_word = bpe_blocks.numel() / len(train_words)
    words_per_row = max(2, round(s["tokens_per_row"] / tokens_per_word))
    ids = torch.tensor([index[w] for w in train_words])
    n = len(ids) // words_per_row
    word_blocks = ids[: n * words_per_row].view(n, words_per_row)

    def backbone(vocab_size: int, length: int):
        return standard_model(vocab_size, length, s["hidden"], s["layers"], s["heads"], seed=ctx.seed)

    bpe = backbone(V, s["tokens_per_row"] + s["context"] * 4 + s["new_tokens"])
    bpe_share = 2 * V * s["hidden"]  # untied embedding and head
    v = math.floor((PARAMETER_SHARE * bpe_share / s["hidden"] - 1) / 2)  # (v + 1) embedding rows (padding) + v head rows
    config = TFreeConfig(v=v, m=s["m"], k_lower=s["k_lower"], pos_weight=300.0 * v / 32000)
    tfree = TFreeLM(backbone(2, max(words_per_row, s["context"])).get_decoder(), word_patterns(vocabulary, config),
                    config)

    cfg = dict(steps=s["steps"], batch_size=s["batch"], lr=s["lr"], warmup_steps=max(1, s["steps"] // 20))
    with single_thread():
        bpe_history = train(bpe, bpe_blocks, TrainConfig(seq_len=s["tokens_per_row"], **cfg), seed=ctx.seed,
                            desc="BPE")
        tfree_history = train(tfree, word_blocks, TrainConfig(seq_len=words_per_row, **cfg), seed=ctx.seed,
                              desc="T-FREE")
        dictionary_words = list(counts)
        dictionary = dictionary_matrix(tfree.embedding.patterns[: len(dictionary_words)], v)
        targets = [it["target"] for it in items]
        predicted = {
            "tfree_clean": tfree_predictions(tfree, [[index[w] for w in it["words"]] for it in items], dictionary,
                                             dictionary_words),
            "tfree_cased": tfree_predictions(tfree, [[index[w] for w in it["cased_words"]] for it in items],
                                             dictionary, dictionary_words),
            "bpe_clean": bpe_predictions(bpe, tokenizer, [it["text"] for it in items], s["new_tokens"]),
            "bpe_cased": bpe_predictions(bpe, tokenizer, [it["cased_text"] for it in items], s["new_tokens"]),
        }
    most_frequent = counts.most_common(1)[0][0]
    correct = {k: [float(p == t) for p, t in zip(ps, targets)] for k, ps in predicted.items()}
    correct["most_frequent"] = [float(t == most_frequent) for t in targets]
    tfree_share = parameter_count(tfree) - parameter_count(tfree, embeddings=False)
    metrics = {
        "seed": ctx.seed,
        "bpe_vocab": V, "v": v, "m": config.m, "k_lower": config.k_lower, "pos_weight": config.pos_weight,
        "bpe_embedding_head_params": parameter_count(bpe) - parameter_count(bpe, embeddings=False),
        "tfree_embedding_head_params": tfree_share,
        "bpe_body_params": parameter_count(bpe, embeddings=False),
        "tfree_body_params": parameter_count(tfree, embeddings=False),
        "words_per_row": words_per_row, "tokens_per_word": tokens_per_word,
        "dictionary_words": len(dictionary_words),
        "targets_in_dictionary": float(np.mean([t in counts for t in targets])),
        "accuracy": {k: float(np.mean(c)) for k, c in correct.items()},
        "bpe_final_loss": float(np.mean(bpe_history["train_loss"][-20:])),
        "tfree_final_loss": float(np.mean(tfree_history["train_loss"][-20:])),
        "examples": [{"target": t, **{k: predicted[k][i] for k in predicted}} for i, t in enumerate(targets[:12])],
        "items": correct,
    }
    metrics["parameter_share"] = metrics["tfree_embedding_head_params"] / metrics["bpe_embedding_head_params"]
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def plot(fig, m: dict) -> None:
    ax = fig.subplots(1, 1)
    acc = m["accuracy"]
    x = np.arange(2)
    ax.bar(x - 0.2, [acc["bpe_clean"], acc["bpe_cased"]], 0.4, label=f"BPE ({m['bpe_embedding_head_params']:,} emb+head)")
    ax.bar(x + 0.2, [acc["tfree_clean"], acc["tfree_cased"]], 0.4,
           label=f"T-FREE ({m['tfree_embedding_head_params']:,} emb+head, {m['parameter_share']:.0%})")
    ax.axhline(acc["most_frequent"], color="black", ls="--", lw=0.8, label="most frequent word")
    ax.set(xticks=x, xticklabels=["clean context", "random case changes"], ylabel="next-word exact accuracy",
           title="T-FREE vs BPE at equal non-embedding size")
    ax.legend(fontsize=8)
