"""Reproduction of 2407.11062: EfficientQAT (Block-AP, then E2E-QP) against round-to-nearest.

On the cached base LM (or ``--model``), quantise every linear weight inside the
decoder blocks to 2, 3 and 4 bits (asymmetric, group size 64) three ways --
round-to-nearest with min-max ranges (RTN), Block-AP alone, and Block-AP followed
by E2E-QP (EfficientQAT) -- and compare validation perplexity against the
full-precision model, with the wall time of each phase. Block-AP starts from the
RTN quantisers, so its gain over RTN is what block-wise training bought, and
E2E-QP starts from Block-AP, so its gain is what end-to-end step-size training
added.

Margins. Every model is scored on the same validation sequences, and each
sequence's mean next-token NLL is kept (`sequence_nll` in the metrics). A check
that compares two arms is decided by the paired percentile-bootstrap interval over
sequences of their NLL difference (`paperzoo.core.margins.decided`): it passes when
the interval lies beyond zero, fails when it lies on the wrong side, and is
undecided (None, so `inconclusive`) when it straddles zero. A 0.06% difference no
longer counts either way.

Precondition: round-to-nearest at the lowest bit-width must raise the validation
NLL beyond that same interval. On a model that shrugs off 2-bit RTN there is no
quantisation damage for EfficientQAT to repair, and the claim cannot be tested
(the verdict is then `inconclusive`).

Learning rates. The paper trains each block for 4096 steps (2 epochs of 4096
samples, batch 2) and E2E-QP for 128 steps (4096 samples, batch 32); here a block
gets ``2 * calibration_sequences / 2`` steps and E2E-QP ``e2e_steps``. The
official learning rates are scaled by sqrt(paper steps / our steps), the rule that
keeps the random-walk displacement of Adam's updates the same (linear scaling
would move the 4-bit step sizes by more than their own size in one step). This
rule was fixed before any run. The group size (64) is the paper's for 2 bits; the
calibration and E2E-QP budgets were set by the time a `small` run may take, before
any run, and were not tuned on the checks.

Earlier predicate (until the margins of issue 9): the same four sub-predicates on
the perplexities as bare comparisons -- (1) ppl(EfficientQAT) < ppl(RTN) and
(2) ppl(EfficientQAT) < ppl(Block-AP) at every bit-width, (3) log(ppl_RTN /
ppl_EQAT) largest at 2 bits, (4) log(ppl_EQAT / ppl_fp) <= 0.5 log(ppl_RTN / ppl_fp)
at 2 bits -- on one seed, with no precondition. Verdict at `small`, seed 0:
reproduced, on differences as small as 0.06% (2-bit: RTN 167.2, Block-AP 165.4,
EfficientQAT 165.3 against 164.8 unquantised). It changed because a difference that
small is within the noise of 48 validation sequences, and because 2-bit RTN cost
only 1.5% here, so nothing showed the set-up could test the claim. What is compared
is unchanged. Check (4)'s "half the excess" is our floor for the paper's "far
better than post-training quantisation": on Llama-2-7B w2g64 EfficientQAT (6.86 vs
fp16 5.47) removes over 90% of the log-perplexity that round-to-nearest adds
(hundreds of perplexity in the w2g64 RTN rows the quantisation literature reports).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from paperzoo.compression import Compressed, measure
from paperzoo.compression.efficient_qat import (
    BlockAPConfig,
    E2EQPConfig,
    block_ap,
    e2e_qp,
    finish,
    quantization_report,
    rtn,
)
from paperzoo.core.experiment import Claim, Outcome, RunContext
from paperzoo.core.margins import all_of, beats, clearly_greater, decided, paired_difference

METHODS = ("rtn", "block_ap", "efficient_qat")
LABELS = {"rtn": "RTN", "block_ap": "Block-AP", "efficient_qat": "Block-AP + E2E-QP"}
# The official recipe (README and examples/ of OpenGVLab/EfficientQAT).
PAPER_BLOCK_AP_STEPS = 2 * 4096 // 2
PAPER_E2E_STEPS = 4096 // 32
PAPER_QUANT_LR = 1e-4


def paper_weight_lr(bits: int) -> float:
    """Block-AP weight lr and E2E-QP step-size lr: 2e-5 at 2 bits, 1e-5 at 3 and 4 bits (both phases)."""
    return 2e-5 if bits <= 2 else 1e-5


def _nll(m: dict, bits: int, method: str) -> np.ndarray:
    return np.asarray(m["sequence_nll"][str(bits)][method])


def _bits(m: dict) -> list[int]:
    return sorted(int(b) for b in m["sequence_nll"] if b != "fp")


def preconditions(m: dict) -> dict[str, bool | None]:
    low = min(_bits(m))
    return {
        f"round-to-nearest at {low} bits measurably hurts the model (validation NLL above full precision, "
        "beyond the bootstrap interval over sequences)": clearly_greater(_nll(m, low, "rtn"), m["sequence_nll"]["fp"]),
    }




def checks(m: dict) -> dict[str, bool | None]:
    bits = _bits(m)
    low = min(bits)
    fp = np.asarray(m["sequence_nll"]["fp"])

    def gain(b: int) -> np.ndarray:  # per-sequence log-perplexity EfficientQAT saves over RTN
        return _nll(m, b, "rtn") - _nll(m, b, "efficient_qat")

    # (4) mean(eqat - fp) <= 0.5 mean(rtn - fp), i.e. mean(0.5 rtn + 0.5 fp - eqat) >= 0, beyond noise
    half_way = 0.5 * (_nll(m, low, "rtn") + fp)
    return {
        "EfficientQAT beats RTN at every bit-width":
            all_of(beats(_nll(m, b, "rtn"), _nll(m, b, "efficient_qat")) for b in bits),
        "E2E-QP improves on Block-AP alone at every bit-width":
            all_of(beats(_nll(m, b, "block_ap"), _nll(m, b, "efficient_qat")) for b in bits),
        "the margin over RTN is largest at the lowest bit-width":
            all_of(beats(gain(low), gain(b)) for b in bits if b != low) if len(bits) > 1 else None,
        "at the lowest bit-width EfficientQAT removes at least half of RTN's excess log-perplexity":
            beats(half_way, _nll(m, low, "efficient_qat")),
    }


CLAIM = Claim(
    statement=(
        "EfficientQAT -- block-wise training of all parameters (Block-AP) followed by end-to-end training of "
        "the step sizes only (E2E-QP) -- gives uniform low-bit LLMs far better than post-training quantisation, "
        "most of all at 2 bits, and E2E-QP improves on Block-AP alone. Llama-2-7B WikiText2 perplexity "
        "(fp16 5.47): EfficientQAT 6.86 / 5.81 / 5.53 at w2g64 / w3g128 / w4g128, Block-AP alone "
        "7.65 / 5.89 / 5.56 (official model cards), while round-to-nearest collapses at 2 bits."
    ),
    predicate=(
        "On the 12-layer base LM, block linear weights quantised to 2, 3 and 4 bits with group size 64, "
        "scored by each validation sequence's mean NLL; every comparison holds when the 95% paired bootstrap "
        "interval over sequences lies beyond zero, fails when it lies on the other side, and is undecided "
        "otherwise: (1) Block-AP + E2E-QP has lower NLL than RTN at every bit-width; "
        "(2) lower than Block-AP alone at every bit-width; (3) its NLL gain over RTN is larger at 2 bits than "
        "at 3 and 4; (4) at 2 bits it removes at least half of RTN's excess NLL over the fp model, "
        "mean(NLL_EQAT - NLL_fp) <= 0.5 mean(NLL_RTN - NLL_fp). Precondition: 2-bit RTN raises the NLL "
        "beyond the same interval."
    ),
    checks=checks,
    preconditions=preconditions,
    source=("arXiv 2407.11062: abstract and §1 (EfficientQAT outperforms previous quantisation methods, "
            "most at 2 bits), §3.2-3.3 (Block-AP, E2E-QP), §4 (WikiText2 / C4 perplexity tables and the "
            "ablation of Block-AP and E2E-QP); model zoo of the official README, OpenGVLab/EfficientQAT"),
)

# small: 24 calibration sequences of 256 tokens in batches of 2 for 2 epochs = 24 Block-AP steps per
# block (12 blocks x 3 bit-widths = 864 block steps, ~0.1 s each), 16 E2E-QP steps of 8 x 256 tokens
# per bit-width (~1.5 s each), and 10 evaluations on 48 validation sequences: about 4 minutes on an
# idle 2-core machine.
# What a user may swap in (--model / --corpus), and the shared cached models this runs on.
INPUTS = ('model', 'corpus')
SUBSTRATE = ('base-lm',)
SEED_VARIES = ("which training sequences form the Block-AP calibration set and the order of E2E-QP's batches; "
               "the base LM and the validation sequences are the same for every seed")
MAX_ITEMS = 1000  # per-sequence lists in the record: longer ones are averaged in consecutive groups

SCALES = {
    "smoke": {"bits": [2, 4], "group_size": 16, "calibration_sequences": 4, "block_batch": 2,
              "block_epochs": 1, "e2e_steps": 2, "e2e_batch": 4, "eval_sequences": 8},
    "small": {"bits": [2, 3, 4], "group_size": 64, "calibration_sequences": 24, "block_batch": 2,
              "block_epochs": 2, "e2e_steps": 16, "e2e_batch": 8, "eval_sequences": 48},
    "large": {"bits": [2, 3, 4], "group_size": 64, "calibration_sequences": 512, "block_batch": 2,
              "block_epochs": 2, "e2e_steps": 256, "e2e_batch": 16, "eval_sequences": 10_000},
}


def learning_rates(bits: int, block_steps: int, e2e_steps: int) -> dict[str, float]:
    """The official learning rates scaled by sqrt(paper steps / our steps)."""
    block = math.sqrt(PAPER_BLOCK_AP_STEPS / block_steps)
    e2e = math.sqrt(PAPER_E2E_STEPS / e2e_steps)
    return {"weight_lr": paper_weight_lr(bits) * block, "quant_lr": PAPER_QUANT_LR * block,
            "e2e_lr": paper_weight_lr(bits) * e2e}


def _five(x: float) -> float:
    return float(f"{x:.5g}")


def _items(values: torch.Tensor) -> list[float]:
    """Per-item values for the record, to 5 digits: at most MAX_ITEMS, as means of k consecutive items beyond that.

    Every arm is grouped alike, so paired comparisons stay paired.
    """
    v = torch.as_tensor(values).double().numpy()
    if len(v) > MAX_ITEMS:
        k = -(-len(v) // MAX_ITEMS)
        v = np.array([v[i : i + k].mean() for i in range(0, len(v), k)])
    return [_five(x) for x in v]


def _row(bits: int, method: str, compressed: Compressed, scores: dict, original: dict, **extra) -> dict:
    return {"bits": bits, "method": method,
            "original_perplexity": original["perplexity"], "compressed_perplexity": scores["perplexity"],
            "perplexity_ratio": scores["perplexity"] / original["perplexity"],
            "original_accuracy": original["accuracy"], "compressed_accuracy": scores["accuracy"],
            "size_ratio": compressed.report["size_ratio"],
            "bits_per_quantized_weight": compressed.report["bits_per_quantized_weight"], **extra}


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    lm = ctx.language_model()
    model = lm.model
    train_blocks = lm.blocks("train")
    val_blocks = lm.blocks("validation")[: s["eval_sequences"]]
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(ctx.seed))
    calibration = train_blocks[order[: s["calibration_sequences"]]]
    block_steps = s["block_epochs"] * math.ceil(s["calibration_sequences"] / s["block_batch"])
    g = s["group_size"]

    original = measure(model, val_blocks)
    sequence_nll: dict = {"fp": _items(original["sequence_loss"])}
    rows, block_mse, rates = [], {}, {}
    for bits in s["bits"]:
        lr = rates[bits] = learning_rates(bits, block_steps, s["e2e_steps"])
        nll = sequence_nll[str(bits)] = {}
        base = rtn(model, bits, g)
        scores = measure(base.model, val_blocks)
        nll["rtn"] = _items(scores["sequence_loss"])
        rows.append(_row(bits, "rtn", base, scores, original, seconds=base.report["seconds"]))
        del base
        quantized, stats = block_ap(model, calibration, bits, g, BlockAPConfig(
            epochs=s["block_epochs"], batch_size=s["block_batch"], weight_lr=lr["weight_lr"],
            quant_lr=lr["quant_lr"]))
        block_mse[bits] = {"rtn": stats["rtn_mse"], "block_ap": stats["block_ap_mse"]}
        # evaluated as it stands (parametrised), before E2E-QP trains its step sizes in place
        alone = Compressed(quantized, quantization_report(quantized, model, bits, g, "Block-AP"))
        scores = measure(quantized, val_blocks)
        nll["block_ap"] = _items(scores["sequence_loss"])
        rows.append(_row(bits, "block_ap", alone, scores, original, seconds={"block_ap": stats["seconds"]}))
        history = e2e_qp(quantized, train_blocks, E2EQPConfig(
            steps=s["e2e_steps"], batch_size=s["e2e_batch"], seq_len=lm.seq_len, lr=lr["e2e_lr"]), seed=ctx.seed)
        both = finish(quantized, model, bits, g, "EfficientQAT")
        scores = measure(both.model, val_blocks)
        nll["efficient_qat"] = _items(scores["sequence_loss"])
        rows.append(_row(bits, "efficient_qat", both, scores, original,
                         seconds={"block_ap": stats["seconds"], "e2e_qp": history["seconds"]},
                         e2e_loss_first_last=[history["train_loss"][0], history["train_loss"][-1]]))
    metrics = {
        "original_perplexity": original["perplexity"],
        "original_accuracy": original["accuracy"],
        "group_size": g,
        "block_steps": block_steps,
        "eval_sequences": len(val_blocks),
        "learning_rates": {str(b): r for b, r in rates.items()},
        "rows": rows,
        "block_mse": {str(b): v for b, v in block_mse.items()},
        "sequence_nll": sequence_nll,
    }
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def plot(fig, m: dict) -> None:
    from matplotlib.ticker import ScalarFormatter

    ppl_ax, time_ax, mse_ax = fig.subplots(1, 3, width_ratios=[1.2, 1, 1.2])
    bits = sorted({r["bits"] for r in m["rows"]})
    colours = {"rtn": "tab:grey", "block_ap": "tab:orange", "efficient_qat": "tab:blue"}
    for method in METHODS:
        ppl = [next(r["compressed_perplexity"] for r in m["rows"] if r["bits"] == b and r["method"] == method) for b in bits]
        ppl_ax.plot(bits, ppl, marker="o", color=colours[method], label=LABELS[method])
    ppl_ax.axhline(m["original_perplexity"], color="black", lw=0.8, label="full precision")
    ppl_ax.set(xlabel="bits per weight (before group overhead)", ylabel="validation perplexity (log scale)",
               yscale="log", xticks=bits, title=f"Perplexity after quantisation (group size {m['group_size']})")
    ppl_ax.yaxis.set_major_formatter(ScalarFormatter())  # plain numbers on the log axis
    ppl_ax.yaxis.set_minor_formatter(ScalarFormatter())
    ppl_ax.legend(fontsize=7)

    x = np.arange(len(bits))
    phases = [("rtn", "rtn", "RTN"), ("block_ap", "block_ap", "Block-AP"), ("efficient_qat", "e2e_qp", "E2E-QP")]
    for i, (method, phase, label) in enumerate(phases):
        secs = [next(r["seconds"][phase] for r in m["rows"] if r["bits"] == b and r["method"] == method) for b in bits]
        time_ax.bar(x + (i - 1) * 0.27, secs, width=0.27, label=label, color=list(colours.values())[i])
    time_ax.set(xticks=x, xticklabels=[f"{b}-bit" for b in bits], ylabel="wall time (s, log scale)", yscale="log",
                title="Wall time per phase")
    time_ax.legend(fontsize=7)

    low = str(min(bits))
    mse = m["block_mse"][low]
    blocks = np.arange(len(mse["rtn"]))
    mse_ax.plot(blocks, mse["rtn"], marker="o", color=colours["rtn"], label="RTN (Block-AP's start)")
    mse_ax.plot(blocks, mse["block_ap"], marker="o", color=colours["block_ap"], label="after Block-AP")
    mse_ax.set(xlabel="decoder block", ylabel="reconstruction MSE (log scale)", yscale="log",
               title=f"{low}-bit block output error on calibration data")
    mse_ax.legend(fontsize=7)
