"""Reproduction of 2412.09871 (Byte Latent Transformer) at tiny scale: bits per byte at matched training FLOPs.

Four models are trained from scratch on the embedded corpus (``core.corpus.load_corpus``,
the stdlib docstrings, documents joined by a blank line), and scored on the same held-out
chunks of the validation text:

- **BPE**: the cached byte-level BPE tokenizer (``core.tokenizer.train_tokenizer``,
  `bpe_vocab` tokens) and ``core.blocks.standard_model`` (width `hidden`, `layers`), rows
  of `tokens_per_row` tokens.
- **entropy model**: a causal byte LM (``standard_model`` with 256 ids, width
  `entropy_hidden`) trained on byte rows; its next-byte entropies place the patches.
- **BLT, entropy patches**: `paperzoo.architectures.byte_latent_transformer` with the
  global rule $H(x_i) > \\theta_g$; $\\theta_g$ is the quantile of the entropy model's
  entropies on training rows at which a share 1/L of bytes start a patch (mean patch
  length L), fixed before any BLT is trained.
- **BLT, fixed strides**: the same model with a patch every L bytes.

The BLT's latent transformer has the BPE model's width and depth, so at L close to BPE's
bytes per token both spend about the same on the large model per byte; its local models
are narrow (`local`). Rows hold the same text for every arm: a BLT row is
`tokens_per_row` x (BPE's mean bytes per token) bytes.

FLOPs: `inference_flops_per_byte` / `token_lm_flops_per_token` (analytic forward matmul
counts, attention included, dense as executed; see the method). Training FLOPs are 3x the
forward (forward + backward). The BPE model trains `steps` steps; each BLT arm trains for
as many steps (same batch, same row bytes) as give it BPE's training FLOPs, using the
mean patch length measured on training rows. The entropy model's training and inference
FLOPs are reported but counted in neither budget: patching is data pre-processing, as the
paper's data loader does it.

Scoring: each held-out chunk is `row` bytes of validation text (cut at character
boundaries). The BPE model scores every token after the first; every byte model scores
exactly those bytes (the bytes after the first BPE token), so all bits per byte are over
the same bytes. Bits per byte of a chunk = total bits / scored bytes. Unigram baselines
(add-one token and byte frequencies from training) give the preconditions.

Set-up choices, from the controls only: `bpe_vocab` 4096, width 128 x 2 layers and lr
3e-3 as in the T-FREE experiment's BPE control; `steps` is the largest that keeps a seed
near the time budget; the entropy model's width and steps were set by its precondition
(held-out bits per byte clearly below a unigram byte model) and time; the BLT's local
width 32 with 1 encoder and 2 decoder layers was set from the FLOP arithmetic alone, so
that its analytic inference FLOPs per byte (latent + local) stay below BPE's at L = 4.
L = 4 at `small` is near BPE's bytes per token on this corpus; `large` adds L = 3 and 6
(the issue's three thresholds do not fit one seed's ~3 CPU-minutes at `small`). Nothing
was tuned on a BLT arm's bits per byte.

Calibration (seed 0, `small`, one thread on a shared 2-core machine with load 3-5, so wall
times are inflated): BPE 2.21 bits per byte (unigram tokens 2.70), the entropy model 3.42
(unigram bytes 4.67), BLT fixed stride 4: 2.617, BLT entropy (theta_g = 2.83 nats, mean
patch length 3.94 on training rows, 3.99 held out, std 2.97): 2.622. Stride - entropy:
-0.0045 bits per byte, interval [-0.0071, -0.0017]; BLT is 19% above BPE. Analytic
inference FLOPs per byte: BLT 5.06e5, BPE 6.23e5 (entropy model 2.21e5, apart). Verdict
`not-reproduced`; 400 s wall (BPE 75 s, entropy model 27 s, BLT arms 98 s and 185 s).
An earlier calibration left the byte and hash embeddings at torch's N(0, 1) init, which
drowned the layers' residual updates (BLT 3.55 / 3.53 bits per byte, worse than the
entropy model); the method was changed to the official d^-1/2 init, a fidelity fix made
without touching the set-up, and the numbers above are from the run after it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from paperzoo.architectures.byte_latent_transformer import (
    BLTConfig, ByteLatentTransformer, EntropyPatcher, StridePatcher, entropy_patch_starts, inference_flops_per_byte,
    patch_ids, token_lm_flops_per_token)
from paperzoo.core.blocks import standard_model
from paperzoo.core.corpus import load_corpus
from paperzoo.core.experiment import Claim, Outcome, RunContext
from paperzoo.core.margins import decided, paired_difference
from paperzoo.core.tokenizer import train_tokenizer
from paperzoo.core.training import TrainConfig, single_thread, train

WITHIN = 0.05  # "matches BPE": BLT's bits per byte at most 5% above BPE's
LEARNS = 0.9  # a control learns when its bits per byte are below 90% of its unigram baseline's
LENGTH_TOLERANCE = 0.2  # entropy patches' held-out mean length within 20% of the stride
LN2 = math.log(2)


def _interval(a, b, seed: int = 0):
    return paired_difference(np.asarray(a, float), np.asarray(b, float), seed=seed)


def preconditions(m: dict) -> dict[str, bool | None]:
    bits, seed = m["chunk_bpb"], m["seed"]
    main = m["arms"][str(m["main_length"])]
    return {
        "the BPE model learns (bits per byte clearly below a unigram token model's)":
            _interval(LEARNS * np.asarray(bits["unigram_token"]), bits["bpe"], seed).low > 0,
        "the entropy model learns (bits per byte clearly below a unigram byte model's, far below 8)":
            _interval(LEARNS * np.asarray(bits["unigram_byte"]), bits["entropy_model"], seed).low > 0,
        "the BLT learns (fixed-stride BLT's bits per byte clearly below a unigram byte model's)":
            _interval(LEARNS * np.asarray(bits["unigram_byte"]), bits[f"blt_stride_{m['main_length']}"], seed).low > 0,
        "entropies vary: entropy patch lengths are not all equal":
            main["entropy_patch_length_std"] > 0.5,
        "entropy patches have about the stride's mean length on held-out text":
            abs(main["entropy_mean_patch_length"] / m["main_length"] - 1) <= LENGTH_TOLERANCE,
    }


def checks(m: dict) -> dict[str, bool | None]:
    bits, seed, L = m["chunk_bpb"], m["seed"], m["main_length"]
    entropy, stride = bits[f"blt_entropy_{L}"], bits[f"blt_stride_{L}"]
    return {
        "entropy patching beats fixed strides of the same mean length": decided(_interval(stride, entropy, seed)),
        "BLT with entropy patches is within 5% of BPE's bits per byte":
            decided(_interval((1 + WITHIN) * np.asarray(bits["bpe"]), entropy, seed)),
        "BLT needs no more inference FLOPs per byte than BPE":
            m["arms"][str(L)]["entropy_inference_flops_per_byte"] <= m["bpe_inference_flops_per_byte"],
    }


CLAIM = Claim(
    statement=(
        "BLT groups bytes into patches whose boundaries a small byte LM places where the next byte's entropy is "
        "high, and runs its large latent transformer over patches: in FLOP-controlled training it matches "
        "(or beats) a BPE Llama 3 model in bits per byte at compute-optimal budgets, with entropy patching ahead of "
        "the static schemes (fixed strides as in MegaByte, Sec. 2.1; space patching, Sec. 5.1, Fig. 6); "
        "longer patches cut the latent model's steps per byte, so at equal model quality it needs fewer "
        "inference FLOPs (Sec. 5.3, Fig. 1: 'up to 50% fewer inference FLOPs')."
    ),
    predicate=(
        "On the embedded corpus at approximately equal training FLOPs (analytic, forward x 3): (1) BLT with "
        "global-threshold entropy patches (theta_g set for mean patch length L = 4 on training text) has lower "
        "held-out bits per byte than BLT with a patch every 4 bytes (paired bootstrap interval over held-out "
        "chunks of stride - entropy above 0; below 0 fails: the negative result); (2) BLT (entropy) is within 5% "
        "of the BPE model's bits per byte (interval of 1.05 x BPE - BLT above 0); (3) at no more analytic "
        "inference FLOPs per byte than BPE (entropy model counted apart, as pre-processing). Undecided when an "
        "interval straddles."
    ),
    checks=checks,
    preconditions=preconditions,
    source=("arXiv:2412.09871: Sec. 2.3 (entropy patching, global and approximate monotonic constraints), "
            "Sec. 3 (hash n-gram embeddings, encoder/decoder cross-attention), Sec. 5.1 / Fig. 6 (compute-optimal "
            "BLT matches BPE Llama 3, entropy beats space patching), Sec. 5.3 / Fig. 1 (fixed inference budgets, "
            "longer patches). Official code facebookresearch/blt: bytelatent/data/patcher.py, "
            "bytelatent/model/blt.py, local_models.py."),
)

BASE = dict(bpe_vocab=4096, hidden=128, layers=2, heads=2, lr=3e-3, batch=16, tokens_per_row=64,
            entropy_hidden=64, entropy_layers=1, local=32, encoder_layers=1, decoder_layers=2,
            hash_buckets=4096, entropy_sample_rows=64)
SCALES = {
    "smoke": {**BASE, "steps": 6, "entropy_steps": 6, "chunks": 12, "lengths": (4,), "main_length": 4,
              "train_docs": 300},
    "small": {**BASE, "steps": 400, "entropy_steps": 300, "chunks": 256, "lengths": (4,), "main_length": 4,
              "train_docs": None},
    "large": {**BASE, "steps": 1500, "entropy_steps": 1000, "chunks": 1024, "lengths": (3, 4, 6), "main_length": 4,
              "train_docs": None},
}
INPUTS = ("corpus",)
SUBSTRATE = ()
SEED_VARIES = "the initialisation of every model and their batch order (the held-out chunks are fixed)"


def _chunks(text: str, row: int, count: int) -> list[str]:
    """Consecutive pieces of `text`, each at most `row` UTF-8 bytes and cut between characters."""
    out, start = [], 0
    while len(out) < count and start < len(text):
        end, size = start, 0
        while end < len(text) and size + len(text[end].encode()) <= row:
            size += len(text[end].encode())
            end += 1
        out.append(text[start:end])
        start = end
    return out


def _byte_rows(data: bytes, row: int) -> torch.Tensor:
    n = len(data) // row
    return torch.frombuffer(bytearray(data[: n * row]), dtype=torch.uint8).long().view(n, row)


@torch.no_grad()
def _byte_bits(model, ids: torch.Tensor, first: int) -> float:
    """Bits of bytes first..T-1 of one row under a byte model (position t predicts byte t+1)."""
    logits = model(input_ids=ids[None]).logits[0].float()
    return F.cross_entropy(logits[first - 1:-1], ids[first:], reduction="sum").item() / LN2


@torch.no_grad()
def _token_bits(model, ids: list[int]) -> float:
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0].float()
    return F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").item() / LN2


def _unigram_bits(counts: torch.Tensor) -> torch.Tensor:
    p = (counts.double() + 1) / (counts.sum() + len(counts))
    return -p.log2()


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    corpus = load_corpus(ctx.corpus)
    docs = corpus.train if s["train_docs"] is None else corpus.train[: s["train_docs"]]
    tokenizer = train_tokenizer(corpus, s["bpe_vocab"])
    V = len(tokenizer)
    text = "\n\n".join(docs)
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    data = text.encode()
    bytes_per_token = len(data) / len(token_ids)
    T_tok = s["tokens_per_row"]
    row = int(T_tok * bytes_per_token)
    n = len(token_ids) // T_tok
    token_rows = torch.tensor(token_ids[: n * T_tok]).view(n, T_tok)
    byte_rows = _byte_rows(data, row)

    # held-out chunks and the bytes every arm scores: those after the first BPE token
    chunks = _chunks("\n\n".join(corpus.validation), row, s["chunks"])
    encoded = [tokenizer(c, add_special_tokens=False, return_offsets_mapping=True) for c in chunks]
    chunk_tokens = [e["input_ids"] for e in encoded]
    chunk_bytes = [torch.tensor(list(c.encode())) for c in chunks]
    first = [len(c[: e["offset_mapping"][0][1]].encode()) for c, e in zip(chunks, encoded)]
    scored = [len(b) - f for b, f in zip(chunk_bytes, first)]

    cfg = dict(batch_size=s["batch"], lr=s["lr"])
    schedule = lambda steps: dict(steps=steps, warmup_steps=max(1, steps // 20), **cfg)
    metrics: dict = {"seed": ctx.seed, "bpe_vocab": V, "bytes_per_token": bytes_per_token, "row_bytes": row,
                     "main_length": s["main_length"], "arms": {}, "chunks": len(chunks),
                     "scored_bytes": int(sum(scored))}
    bits: dict[str, list[float]] = {}

    with single_thread():
        # BPE control, and the training budget every BLT arm gets
        bpe = standard_model(V, 2 * T_tok, s["hidden"], s["layers"], s["heads"], seed=ctx.seed)
        bpe_history = train(bpe, token_rows, TrainConfig(seq_len=T_tok, **schedule(s["steps"])), seed=ctx.seed,
                            desc="BPE")
        bpe_flops_token = token_lm_flops_per_token(s["hidden"], s["layers"], V, T_tok)
        budget = 3 * bpe_flops_token * T_tok * s["batch"] * s["steps"]
        bpe.eval()
        bits["bpe"] = [_token_bits(bpe, t) for t in chunk_tokens]

        # the entropy model
        byte_lm = standard_model(256, 2 * row, s["entropy_hidden"], s["entropy_layers"], s["heads"], seed=ctx.seed)
        entropy_history = train(byte_lm, byte_rows, TrainConfig(seq_len=row, **schedule(s["entropy_steps"])),
                                seed=ctx.seed, desc="entropy model")
        byte_lm.eval()
        bits["entropy_model"] = [_byte_bits(byte_lm, b, f) for b, f in zip(chunk_bytes, first)]
        probe = EntropyPatcher(byte_lm, theta=0.0)
        sample = byte_rows[torch.randperm(len(byte_rows), generator=torch.Generator().manual_seed(0))
                           [: s["entropy_sample_rows"]]]
        train_H = probe.byte_entropies(sample)[:, 1:-1]  # H(x_1) .. H(x_{T-1}) of training rows
        held_H = [probe.byte_entropies(b[None]) for b in chunk_bytes]

        config = BLTConfig(d_local=s["local"], d_global=s["hidden"], encoder_layers=s["encoder_layers"],
                           decoder_layers=s["decoder_layers"], global_layers=s["layers"], global_heads=s["heads"],
                           hash_buckets=s["hash_buckets"], max_bytes=2 * row)
        for L in s["lengths"]:
            theta = torch.quantile(train_H.flatten(), 1 - 1 / L).item()  # a share 1/L of bytes open a patch
            train_length = 1 / entropy_patch_starts(train_H, theta).float().mean().item()
            lengths = torch.cat([_patch_lengths(entropy_patch_starts(H[:, :-1], theta)) for H in held_H]).float()
            arm = {"theta": theta, "entropy_train_mean_patch_length": train_length,
                   "entropy_mean_patch_length": lengths.mean().item(),
                   "entropy_patch_length_std": lengths.std().item(),
                   "entropy_patch_length_histogram": torch.bincount(lengths.long().clamp(max=16)).tolist()}
            for name, patcher, mean_length in (("entropy", EntropyPatcher(byte_lm, theta), train_length),
                                               ("stride", StridePatcher(L), float(L))):
                per_row = 3 * inference_flops_per_byte(config, row, mean_length) * row * s["batch"]
                steps = max(1, round(budget / per_row))
                torch.manual_seed(ctx.seed)
                blt = ByteLatentTransformer(config, patcher)
                history = train(blt, byte_rows, TrainConfig(seq_len=row, **schedule(steps)), seed=ctx.seed,
                                desc=f"BLT {name} L={L}")
                blt.eval()
                bits[f"blt_{name}_{L}"] = [_byte_bits(blt, b, f) for b, f in zip(chunk_bytes, first)]
                held_length = arm["entropy_mean_patch_length"] if name == "entropy" else float(L)
                arm.update({f"{name}_steps": steps, f"{name}_final_loss": float(np.mean(history["train_loss"][-20:])),
                            f"{name}_training_flops": 3 * inference_flops_per_byte(config, row, mean_length)
                            * row * s["batch"] * steps,
                            f"{name}_inference_flops_per_byte": inference_flops_per_byte(config, row, held_length),
                            f"{name}_seconds": history["seconds"]})
            metrics["arms"][str(L)] = arm

    # unigram baselines on the same scored bytes
    token_unigram = _unigram_bits(torch.bincount(torch.tensor(token_ids), minlength=V))
    byte_unigram = _unigram_bits(torch.bincount(torch.frombuffer(bytearray(data), dtype=torch.uint8).long(),
                                                minlength=256))
    bits["unigram_token"] = [token_unigram[t[1:]].sum().item() for t in chunk_tokens]
    bits["unigram_byte"] = [byte_unigram[b[f:]].sum().item() for b, f in zip(chunk_bytes, first)]
    chunk_bpb = {k: [v / c for v, c in zip(vs, scored)] for k, vs in bits.items()}
    metrics.update({
        "bpb": {k: float(sum(vs) / sum(scored)) for k, vs in bits.items()},
        "bpe_inference_flops_per_byte": bpe_flops_token / bytes_per_token,
        "bpe_training_flops": budget,
        "entropy_model_inference_flops_per_byte": token_lm_flops_per_token(s["entropy_hidden"], s["entropy_layers"],
                                                                           256, row),
        "bpe_final_loss": float(np.mean(bpe_history["train_loss"][-20:])),
        "entropy_model_final_loss": float(np.mean(entropy_history["train_loss"][-20:])),
        "bpe_seconds": bpe_history["seconds"], "entropy_model_seconds": entropy_history["seconds"],
        "chunk_bpb": chunk_bpb,
    })
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def _patch_lengths(starts: torch.Tensor) -> torch.Tensor:
    """Lengths of the patches of one row (the last runs to the row's end)."""
    return torch.bincount(patch_ids(starts)[0])


def plot(fig, m: dict) -> None:
    left, right = fig.subplots(1, 2)
    L = m["main_length"]
    arms = ["unigram_byte", "entropy_model", "bpe", f"blt_stride_{L}", f"blt_entropy_{L}"]
    left.bar(range(len(arms)), [m["bpb"][a] for a in arms], color=["grey", "grey", "C0", "C1", "C2"])
    left.set(xticks=range(len(arms)), ylabel="held-out bits per byte",
             title=f"matched training FLOPs, mean patch length {L}")
    left.set_xticklabels(["unigram byte", "entropy LM", "BPE", f"BLT stride {L}", f"BLT entropy {L}"],
                         rotation=20, fontsize=8)
    right.scatter([m["bpe_inference_flops_per_byte"]], [m["bpb"]["bpe"]], color="C0", label="BPE")
    for name, color in (("stride", "C1"), ("entropy", "C2")):
        xs = [m["arms"][k][f"{name}_inference_flops_per_byte"] for k in m["arms"]]
        ys = [m["bpb"][f"blt_{name}_{k}"] for k in m["arms"]]
        right.plot(xs, ys, "o-", color=color, label=f"BLT {name}")
        for k, x, y in zip(m["arms"], xs, ys):
            right.annotate(f"L={k}", (x, y), fontsize=7)
    right.set(xlabel="inference FLOPs per byte (analytic, forward)", ylabel="held-out bits per byte",
              title="inference cost against quality")
    right.legend(fontsize=8)
