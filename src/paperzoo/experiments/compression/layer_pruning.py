"""Reproduction of 2403.17887: prune the most redundant layer block, then heal.

On the cached base LM (or ``--model``), for block sizes n = 1 .. L/2, compare
validation perplexity after removing n layers chosen three ways -- the paper's
minimum angular distance, its simple "deepest layers before the last" heuristic,
and uniformly random contiguous blocks -- each before and after the same short
LoRA healing. The unpruned model gets the same healing, so that "little loss" is
measured against a model that saw the same extra training.
"""

from __future__ import annotations

import math
import random

import numpy as np

from paperzoo.compression.layer_pruning import (
    angular_distances, block_distances, deepest_block, drop_layers, heal, most_redundant_block)
from paperzoo.core.evaluation import evaluate
from paperzoo.core.experiment import Claim, Outcome, RunContext
from paperzoo.core.training import TrainConfig

METHODS = ("angular", "deepest", "random")


def checks(m: dict) -> dict[str, bool | None]:
    def mean_log(method: str, stage: str) -> float:
        return float(np.mean([math.log(r[f"{stage}_perplexity"]) for r in m["blocks"] if r["method"] == method]))

    return {
        "angular beats random blocks before healing": mean_log("angular", "pruned") < mean_log("random", "pruned"),
        "angular beats random blocks after healing": mean_log("angular", "healed") < mean_log("random", "healed"),
        "half the layers cost at most 20% perplexity after healing": m["half_layers_healed_ratio"] <= 1.2,
    }


CLAIM = Claim(
    statement=(
        "Removing the contiguous block of layers whose input and output residual streams have the "
        "smallest angular distance, then healing with a little QLoRA fine-tuning, removes up to about "
        "half of an LLM's layers (40-50% for Llama-2-70B on MMLU) without significant degradation; "
        "the choice beats arbitrary blocks, and after healing even dropping the deepest layers before "
        "the last one does nearly as well."
    ),
    predicate=(
        "On a 12-layer base LM, for n = 1 .. 6 removed layers: (1) the angular-distance block has lower "
        "validation perplexity than random contiguous blocks (mean of log-perplexity over n) before "
        "healing, and (2) after the same LoRA healing; (3) with half the layers removed and healed, "
        "perplexity is at most 1.2x the unpruned model healed for the same number of steps."
    ),
    checks=checks,
)

# What a user may swap in (--model / --corpus), and the shared cached models this runs on.
INPUTS = ('model', 'corpus')
SUBSTRATE = ('base-lm',)

SCALES = {
    "smoke": dict(calibration_sequences=8, eval_sequences=8, block_sizes="smallest-and-half", random_draws=1,
                  heal_steps=2, heal_batch=4, heal_lr=1e-3, lora_rank=4),
    "small": dict(calibration_sequences=64, eval_sequences=10_000, block_sizes="all",
                  random_draws=2, heal_steps=40, heal_batch=8, heal_lr=1e-3, lora_rank=8),
    "large": dict(calibration_sequences=256, eval_sequences=10_000, block_sizes="all", random_draws=4,
                  heal_steps=400, heal_batch=16, heal_lr=3e-4, lora_rank=64),
}


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    lm = ctx.language_model()
    model = lm.model
    train_blocks = lm.blocks("train")
    val_blocks = lm.blocks("validation")[: s["eval_sequences"]]
    calibration = train_blocks[: s["calibration_sequences"]].split(8)
    heal_config = TrainConfig(steps=s["heal_steps"], batch_size=s["heal_batch"], seq_len=lm.seq_len,
                              lr=s["heal_lr"], warmup_steps=max(1, s["heal_steps"] // 10))

    def healed_ppl(m) -> float:
        return evaluate(heal(m, train_blocks, heal_config, rank=s["lora_rank"], seed=ctx.seed), val_blocks)["perplexity"]

    D = angular_distances(model, calibration)
    L = D.shape[0] - 1
    sizes = {"all": range(1, L // 2 + 1), "smallest-and-half": [1, L // 2]}[s["block_sizes"]]
    rng = random.Random(ctx.seed)
    unpruned = evaluate(model, val_blocks)
    rows = []
    for n in sizes:
        starts = [("angular", most_redundant_block(D, n)), ("deepest", deepest_block(L, n))]
        starts += [("random", rng.randrange(L - n + 1)) for _ in range(s["random_draws"])]
        for method, start in starts:
            pruned = drop_layers(model, start, n)
            rows.append({"n": n, "fraction": n / L, "method": method, "start": start,
                         "angular_distance": float(D[start, start + n]),
                         "pruned_perplexity": evaluate(pruned, val_blocks)["perplexity"],
                         "healed_perplexity": healed_ppl(pruned)})
    metrics = {
        "num_layers": L,
        "unpruned_perplexity": unpruned["perplexity"],
        "unpruned_accuracy": unpruned["accuracy"],
        "unpruned_healed_perplexity": healed_ppl(model),
        "distances": D.tolist(),
        "blocks": rows,
    }
    half = next(r for r in rows if r["method"] == "angular" and r["n"] == L // 2)
    # healed perplexity with half the layers gone, relative to the unpruned model given the same healing
    metrics["half_layers_healed_ratio"] = half["healed_perplexity"] / metrics["unpruned_healed_perplexity"]
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def plot(fig, m: dict) -> None:
    ax, heat = fig.subplots(1, 2, width_ratios=[1.4, 1])
    colours = {"angular": "tab:blue", "deepest": "tab:orange", "random": "tab:grey"}
    for method in METHODS:
        for stage, style in (("pruned", "--"), ("healed", "-")):
            pts = {}
            for r in m["blocks"]:
                if r["method"] == method:
                    pts.setdefault(r["fraction"], []).append(r[f"{stage}_perplexity"])
            xs = sorted(pts)
            ax.plot(xs, [float(np.exp(np.mean(np.log(pts[x])))) for x in xs], style, marker="o",
                    color=colours[method], label=f"{method}, {'healed' if stage == 'healed' else 'no healing'}")
    ax.axhline(m["unpruned_perplexity"], color="black", lw=0.8, label="unpruned")
    ax.axhline(m["unpruned_healed_perplexity"], color="black", lw=0.8, ls=":", label="unpruned + same healing")
    ax.set(xlabel="fraction of layers removed", ylabel="validation perplexity (log scale)", yscale="log",
           title="Perplexity after layer pruning")
    ax.legend(fontsize=7)
    import torch

    D = torch.tensor(m["distances"])
    L = m["num_layers"]
    grid = np.full((L // 2 + 1, L), np.nan)
    for n in range(1, L // 2 + 1):
        grid[n, : L - n + 1] = block_distances(D, n).numpy()
    # Blocks starting at the embedding (l = 0) are far from everything; cap the scale so the rest stays legible.
    im = heat.imshow(grid[1:], aspect="auto", origin="lower", extent=(-0.5, L - 0.5, 0.5, L // 2 + 0.5), cmap="viridis",
                     vmax=float(np.nanpercentile(grid[1:, 1:], 98)))
    heat.set(xlabel="first removed layer l", ylabel="block size n", title="angular distance d(x^l, x^(l+n))")
    fig.colorbar(im, ax=heat)
