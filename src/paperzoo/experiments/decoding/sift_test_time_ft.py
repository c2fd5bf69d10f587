"""Reproduction of 2410.08020: SIFT against nearest-neighbour retrieval for test-time fine-tuning.

On the small base LM, validation blocks of 128 tokens are the test prompts and training blocks of
128 tokens the candidate pool. For every prompt, each selector picks K = 8 pool blocks; a copy of the
model takes one Adam step on each, in the order picked, and the prompt's bits per byte are measured
before and after every step (so the curve over k = 1..K comes from one pass). Two pools of the same
size: a clean one (2,000 distinct blocks), and a duplicated one (1,000 distinct blocks, each present
twice), which is the paper's failure mode for NN: it spends half its picks on information it already
has.

The oracle control. Test-time fine-tuning can only help if a step on *relevant* text lowers the
prompt's loss at all. The control takes the K steps on the prompt's own text (an oracle neighbour,
the best any selector could retrieve). If even the oracle does not lower the prompt's bits per byte,
the comparison of SIFT and NN compares two harms and says nothing about the paper.

How the set-up's hyper-parameters were chosen:

- The Adam step size is chosen by a rule in code (`choose_learning_rate`) on the oracle control
  only: the rate in `lr_grid` with the largest mean bits-per-byte reduction after K oracle steps on
  `calibration_prompts` validation blocks that are not test prompts. SIFT and NN are never run in
  the choice. (The paper's rate is for billion-parameter models and does not transfer.)
- lambda' = 0.01 is the official default; embeddings are the LM's unit-normalised mean-pooled
  last-layer states; K = 8 and 20 prompts were fixed before the first run.

Preconditions (not met: verdict inconclusive): at the chosen step size, (1) the oracle control lowers
the test prompts' bits per byte, and (2) fine-tuning on retrieved neighbours helps at all: on the clean
pool SIFT's or NN's reduction has its bootstrap interval over prompts above zero. Both intervals are
over prompts.

Precondition (2) was added after the sweep on base LM v2 (commit 7d4f72c): there the oracle lowered
the prompts' bits per byte but SIFT and NN both raised it in every seed (clean pool: -0.17 to -0.19
and -0.12 to -0.15 bits per byte), and the shipped verdict `not-reproduced` compared two harms, the
very thing the oracle precondition was meant to rule out (issue 9). The checks are unchanged.

Earlier predicate (the first version, lr 2e-4 fixed; verdict `not-reproduced`, seed 0, small: no
selector ever lowered the prompt's bits per byte; SIFT did far less harm than NN on the duplicated pool,
-0.003 against -0.019 bits per byte, but more on the clean pool): "(1) on the duplicated pool the
mean reduction after K steps is larger with SIFT than with NN; (2) on the clean pool it is at least as
large with SIFT; (3) SIFT selects no duplicate while at least 25% of NN's picks are duplicates", with
bare comparisons of means. Why it changed: (a) every step harmed, so the checks compared two harms;
the oracle precondition and the step size chosen on it make the comparison one the paper makes;
(b) comparisons now need the paired bootstrap interval over prompts to clear zero (an interval
straddling zero leaves a check undecided); (c) check 2 now states the paper's claim, that SIFT beats
NN on the plain Pile (no duplicates inserted), rather than "at least as large".
"""

from __future__ import annotations

import math

import numpy as np

from paperzoo.core.experiment import Claim, Outcome, RunContext
from paperzoo.core.margins import bootstrap_mean, decided, paired_difference
from paperzoo.decoding.sift_test_time_ft import (
    embed,
    nearest_neighbours,
    sift_select,
    test_time_finetune,
)

SELECTORS = ("sift", "nn")
POOLS = ("clean", "duplicated")



def preconditions(m: dict) -> dict[str, bool | None]:
    oracle = bootstrap_mean(m["oracle_per_prompt"])
    clean = m["final_per_prompt"]["clean"]
    return {
        "fine-tuning on the prompt's own text (oracle neighbour, at the chosen step size) lowers its bits per byte "
        "(bootstrap interval over prompts above zero)": oracle.low > 0,
        "fine-tuning on retrieved neighbours helps at all: on the clean pool SIFT or NN lowers the prompt's bits "
        "per byte (bootstrap interval over prompts above zero)":
            any(bootstrap_mean(clean[sel]).low > 0 for sel in ("sift", "nn")),
    }


def checks(m: dict) -> dict[str, bool | None]:
    per = m["final_per_prompt"]
    redundant = m["redundant_share"]["duplicated"]
    return {
        "pool with duplicates: SIFT lowers the prompt's bits per byte more than NN after K steps (paired bootstrap)":
            decided(paired_difference(per["duplicated"]["sift"], per["duplicated"]["nn"])),
        "clean pool: SIFT lowers the prompt's bits per byte more than NN after K steps (paired bootstrap)":
            decided(paired_difference(per["clean"]["sift"], per["clean"]["nn"])),
        "pool with duplicates: SIFT picks no duplicate, NN spends at least a quarter of its picks on them":
            redundant["sift"] == 0.0 and redundant["nn"] >= 0.25,
    }


CLAIM = Claim(
    statement=(
        "Selecting test-time fine-tuning data with SIFT (greedy minimisation of a kernel surrogate's "
        "posterior variance of the prompt, lambda' = 0.01) beats nearest-neighbour retrieval robustly: on "
        "the Pile with GPT-2 and Phi-3, SIFT lowers bits per byte more than NN with the same 50 one-step "
        "updates, and NN, which retrieves redundant near-duplicates, can even do worse than no fine-tuning "
        "where the pool holds duplicates, while SIFT does not pick redundant examples."
    ),
    predicate=(
        "Small base LM, 20 validation blocks of 128 tokens as prompts, K = 8 one-step Adam updates on a copy, "
        "the step size chosen on the oracle control (steps on the prompt's own text): (1) on a pool of 1,000 "
        "training blocks each present twice, SIFT's reduction of the prompt's bits per byte after K steps is "
        "larger than NN's; (2) on a clean pool of 2,000 blocks likewise; both with the paired bootstrap interval "
        "over prompts above zero (straddling zero: undecided); (3) on the duplicated pool SIFT selects no duplicate "
        "of an earlier pick while at least 25% of NN's picks are such duplicates. Judged only if the oracle "
        "control lowers the prompts' bits per byte."
    ),
    checks=checks,
    preconditions=preconditions,
    source=("arXiv:2410.08020, §3 (SIFT's posterior-variance objective), §5 and its bits-per-byte figures on the "
            "Pile (SIFT against NN and NN-F with GPT-2 and Phi-3, NN's redundant retrievals); official code "
            "jonhue/activeft (activeft/sift.py, lambda_=0.01)"),
)

# What a user may swap in (--model / --corpus), and the shared cached models this runs on.
INPUTS = ('model', 'corpus')
SUBSTRATE = ('base-lm',)
SEED_VARIES = ("which validation blocks are the test and calibration prompts, which training blocks form the pool, "
               "and the order of the duplicated pool; the base LM is the shared cached one")

SCALES = {
    "smoke": {"prompts": 2, "calibration_prompts": 2, "pool": 64, "block": 32, "K": 3, "lam": 0.01,
              "lr_grid": [2e-4, 1e-3]},
    "small": {"prompts": 20, "calibration_prompts": 8, "pool": 2000, "block": 128, "K": 8, "lam": 0.01,
              "lr_grid": [1e-4, 2e-4, 5e-4, 1e-3, 2e-3]},
    "large": {"prompts": 100, "calibration_prompts": 16, "pool": 20000, "block": 256, "K": 16, "lam": 0.01,
              "lr_grid": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]},
}


def bits_per_byte(tok, target, nll: list[float]) -> list[float]:
    n_bytes = len(tok.decode(target.tolist()).encode("utf-8"))
    return [x / (math.log(2) * max(n_bytes, 1)) for x in nll]


def oracle_reduction(model, tok, target, K: int, lr: float) -> float:
    """Bits-per-byte reduction of `target` after K one-step updates on `target` itself."""
    bpb = bits_per_byte(tok, target, test_time_finetune(model, [target] * K, target, lr).nll)
    return bpb[0] - bpb[-1]


def choose_learning_rate(model, tok, calibration, K: int, grid) -> tuple[float, dict]:
    """The rate in `grid` whose oracle control lowers the calibration prompts' bits per byte the most."""
    gains = {lr: float(np.mean([oracle_reduction(model, tok, t, K, lr) for t in calibration])) for lr in grid}
    return max(grid, key=lambda lr: gains[lr]), {str(lr): g for lr, g in gains.items()}


def _r5(values) -> list[float]:
    return [float(f"{v:.5g}") for v in values]


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    lm = ctx.language_model()
    model, tok = lm.model, lm.tokenizer
    rng = np.random.default_rng(ctx.seed)
    block = min(s["block"], getattr(model.config, "max_position_embeddings", s["block"]) or s["block"])
    train, val = lm.blocks("train", block), lm.blocks("validation", block)
    pool_size = min(s["pool"], len(train)) // 2 * 2
    clean_rows = rng.choice(len(train), pool_size, replace=False)
    n_prompts = min(s["prompts"] + s["calibration_prompts"], len(val))
    rows = rng.choice(len(val), n_prompts, replace=False)
    n_cal = min(s["calibration_prompts"], max(n_prompts // 2, 1))
    calibration, prompts = val[rows[:n_cal]], val[rows[n_cal:]]
    K = s["K"]
    lr, lr_gains = choose_learning_rate(model, tok, calibration, K, s["lr_grid"])

    pool_blocks = train[clean_rows]  # [N, T]
    phi_pool = embed(model, pool_blocks)  # [N, d]
    phi_prompts = embed(model, prompts)  # [P, d]

    # duplicated pool: the first N/2 distinct blocks, each twice, in random order; source[i] = distinct id
    half = pool_size // 2
    dup_source = rng.permutation(np.concatenate([np.arange(half), np.arange(half)]))
    pools = {"clean": np.arange(pool_size), "duplicated": dup_source}

    curves = {p: {sel: [] for sel in SELECTORS} for p in POOLS}  # per prompt: bpb reduction at k = 0..K
    redundant = {p: {sel: [] for sel in SELECTORS} for p in POOLS}
    before_bpb, oracle = [], []
    for i, target in enumerate(prompts):
        oracle.append(oracle_reduction(model, tok, target, K, lr))
        for pool_name, source in pools.items():
            phi = phi_pool[source]
            picks = {"sift": sift_select(phi_prompts[i], phi, K, s["lam"]).indices,
                     "nn": nearest_neighbours(phi_prompts[i], phi, K)}
            for sel, idx in picks.items():
                ids = [int(source[j]) for j in idx]  # distinct block ids
                redundant[pool_name][sel].append(sum(ids[n] in ids[:n] for n in range(1, K)) / max(1, K - 1))
                bpb = bits_per_byte(tok, target, test_time_finetune(model, [pool_blocks[j] for j in ids], target, lr).nll)
                curves[pool_name][sel].append([bpb[0] - b for b in bpb])
                if pool_name == "clean" and sel == "sift":
                    before_bpb.append(bpb[0])

    mean_curves = {p: {sel: np.mean(curves[p][sel], 0).tolist() for sel in SELECTORS} for p in POOLS}
    metrics = {
        "model": lm.name,
        "prompts": len(prompts),
        "calibration_prompts": len(calibration),
        "pool_size": pool_size,
        "block": block,
        "K": K,
        "lambda": s["lam"],
        "lr": lr,
        "lr_calibration_oracle_gain": lr_gains,  # mean oracle bpb reduction on the calibration prompts, per rate
        "bpb_before": float(np.mean(before_bpb)),
        "oracle_reduction": float(np.mean(oracle)),
        "oracle_per_prompt": _r5(oracle),
        "reduction_curves": mean_curves,  # mean bpb reduction after k = 0..K steps
        "final": {p: {sel: mean_curves[p][sel][-1] for sel in SELECTORS} for p in POOLS},
        "sift_wins_share": {p: float(np.mean([a[-1] > b[-1] for a, b in zip(curves[p]["sift"], curves[p]["nn"])]))
                            for p in POOLS},
        "redundant_share": {p: {sel: float(np.mean(redundant[p][sel])) for sel in SELECTORS} for p in POOLS},
        "final_per_prompt": {p: {sel: _r5(c[-1] for c in curves[p][sel]) for sel in SELECTORS} for p in POOLS},
    }
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def plot(fig, m: dict) -> None:
    axes = fig.subplots(1, 2, sharey=True)
    colours = {"sift": "tab:blue", "nn": "tab:orange"}
    for ax, pool in zip(axes, POOLS):
        for sel in SELECTORS:
            curve = m["reduction_curves"][pool][sel]
            label = f"{sel.upper()} ({m['redundant_share'][pool][sel]:.0%} redundant picks)"
            ax.plot(range(len(curve)), curve, "-o", color=colours[sel], label=label)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhline(m["oracle_reduction"], color="tab:green", lw=0.8, ls="--", label="oracle (prompt's own text)")
        ax.set(xlabel="test-time steps k (one per selected block)", title=f"{pool} pool ({m['pool_size']} blocks)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("reduction of the prompt's bits per byte")
    fig.suptitle(f"Test-time fine-tuning, {m['prompts']} prompts, lr {m['lr']:g} (chosen on the oracle), "
                 f"base {m['bpb_before']:.3f} bpb", fontsize=9)
