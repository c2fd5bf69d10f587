"""Reproduction of 2403.17887: prune the most redundant layer block, then heal.

On the cached base LM (or ``--model``), for block sizes n from 1 to L - 1, remove n
layers chosen three ways -- the paper's minimum angular distance, its simple
"deepest layers before the last" heuristic, and uniformly random contiguous blocks --
and measure each validation sequence's loss. The angular and deepest blocks are
then healed with the same short LoRA fine-tune (random blocks are only measured
unhealed: the claim about them is the choice of block, before healing). The unpruned
model gets the same healing, so that the healed curve starts from a model that saw
the same extra training.

What the paper claims, and what is measured. The paper's QA accuracy holds until a
sharp, model-dependent transition, while "the healed loss" on C4 grows slowly and
smoothly with the fraction pruned, with no transition, where the unhealed loss rises
sharply (Fig. 1d, Sec. 4.2); after healing, dropping the deepest layers (but the last)
is nearly as good as the similarity-informed choice (Sec. 4.3). The base LM here has
no question-answering ability to probe, so the claim is tested on the loss curves:

- *sharpness* of a loss-vs-n curve: its largest per-layer increase between consecutive
  measured n, over its mean per-layer increase from n = 0 to the largest n (1 for a
  straight line, up to the number of steps for a single jump). As a per-sequence item:
  (slope of sequence i at the curve's steepest step - its mean slope) / the curve's
  total rise, whose mean is (S - 1) / N; the steepest step and the rise are taken from
  the whole curve, so the interval is conditional on them;
- the deepest heuristic's *extra loss* over the angular block, per sequence, averaged
  over the n where the two blocks differ, before and after healing.

Margins: every comparison is a paired bootstrap over validation sequences
(`paperzoo.core.margins`, 95%), decided three ways (`decided`): passed when the
interval clears zero, failed when it lies wholly on the wrong side, undecided
(inconclusive) when it straddles.

Set-up hyper-parameters: the healing recipe (LoRA on the feed-forward layers, rank,
alpha = rank, 40 steps of 8 sequences at lr 1e-3 at `small`) was fixed in the first
version from the paper's appendix and the run time; it is judged by the controls
only -- healing must lower the pruned model's loss and must not hurt the unpruned
model (preconditions) -- and was not changed for this predicate. Set by run time
alone, before any run of this predicate: the block sizes at `small` (n = 1, 2, 3, 4,
6, 8, 10 of 12 layers: up to 15 healings of about 20 s each on one thread), 64
validation sequences (the bootstrap items) and 2 random draws per n (measured only,
never healed).

Earlier predicate
-----------------
Until the issue-9 review: "for n = 1 .. 6 removed layers: (1) the angular-distance
block has lower validation perplexity than random contiguous blocks (mean of
log-perplexity over n) before healing, and (2) after the same LoRA healing; (3) with
half the layers removed and healed, perplexity is at most 1.2x the unpruned model
healed for the same number of steps", on point estimates. Verdict at `small`, seed 0:
not reproduced (1.27x at half the layers; (1) and (2) passed, though random draws won
at n = 4 and 6). It changed because the paper gives no 1.2x figure -- its claim is the
shape of the curves (a sharp QA transition; slow, smooth growth of the healed loss)
-- and does not claim that the angular choice beats arbitrary blocks after healing;
what it does claim after healing, that the deepest-layers heuristic is nearly as
good, was not tested at all.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from paperzoo.compression import item_list, measure
from paperzoo.compression.layer_pruning import (
    angular_distances, block_distances, deepest_block, drop_layers, heal, most_redundant_block)
from paperzoo.core.experiment import Claim, ExperimentError, Outcome, RunContext
from paperzoo.core.margins import bootstrap_mean, clearly_greater, decided, paired_difference
from paperzoo.core.models import decoder_layers
from paperzoo.core.training import TrainConfig

METHODS = ("angular", "deepest", "random")
MIN_LAYERS = 3  # the curves need n = 1 and 2 at least


def _rows(m: dict, method: str) -> list[dict]:
    return sorted((r for r in m["blocks"] if r["method"] == method), key=lambda r: r["n"])


def loss_curve(m: dict, stage: str) -> tuple[list[int], np.ndarray]:
    """n = 0, 1, ... and the angular block's per-sequence losses [len(n), sequences], unhealed or healed."""
    rows = _rows(m, "angular")
    start = m["unpruned_sequence_loss"] if stage == "pruned" else m["unpruned_healed_sequence_loss"]
    return [0] + [r["n"] for r in rows], np.array([start] + [r[f"{stage}_sequence_loss"] for r in rows])


def sharpness(ns: list[int], X: np.ndarray) -> tuple[float, np.ndarray]:
    """(S, per-sequence items with mean (S - 1) / N) of a loss curve X [len(ns), sequences]; see the docstring."""
    ns = np.asarray(ns, dtype=np.float64)
    slopes = (X[1:] - X[:-1]) / np.diff(ns)[:, None]  # per-layer increase between measured n
    mean_slope = (X[-1] - X[0]) / (ns[-1] - ns[0])  # per sequence
    rise = float(mean_slope.mean())
    if rise <= 0:  # the curve does not rise: nothing sharp about it
        return 1.0, np.zeros(X.shape[1])
    k = int(slopes.mean(1).argmax())
    return float(slopes[k].mean() / rise), (slopes[k] - mean_slope) / rise / (ns[-1] - ns[0])


def deepest_gaps(m: dict) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Per sequence, the deepest block's extra loss over the angular one (before, after healing), over the n
    where they differ; None when they never differ."""
    angular = {r["n"]: r for r in _rows(m, "angular")}
    pairs = [(angular[r["n"]], r) for r in _rows(m, "deepest") if r["start"] != angular[r["n"]]["start"]]
    if not pairs:
        return None
    before = np.mean([np.subtract(d["pruned_sequence_loss"], a["pruned_sequence_loss"]) for a, d in pairs], 0)
    after = np.mean([np.subtract(d["healed_sequence_loss"], a["healed_sequence_loss"]) for a, d in pairs], 0)
    return before, after, len(pairs)


def preconditions(m: dict) -> dict[str, bool | None]:
    seed = m.get("bootstrap_seed", 0)
    angular = _rows(m, "angular")
    pruned = np.mean([r["pruned_sequence_loss"] for r in angular], 0)
    healed = np.mean([r["healed_sequence_loss"] for r in angular], 0)
    return {
        "the unpruned model has learned the text (loss clearly below a uniform guess)":
            bootstrap_mean(m["unpruned_sequence_loss"], seed=seed).below(m["uniform_loss"]),
        "removing the most layers raises the loss (there is damage to heal)":
            clearly_greater(angular[-1]["pruned_sequence_loss"], m["unpruned_sequence_loss"], seed=seed),
        "healing lowers the pruned models' loss (mean over n)": clearly_greater(pruned, healed, seed=seed),
        "the healing recipe does not hurt the unpruned model":
            not clearly_greater(m["unpruned_healed_sequence_loss"], m["unpruned_sequence_loss"], seed=seed),
    }


def checks(m: dict) -> dict[str, bool | None]:
    seed = m.get("bootstrap_seed", 0)
    random_rows = _rows(m, "random")
    angular = {r["n"]: r for r in _rows(m, "angular")}
    by_n: dict[int, list] = {}
    for r in random_rows:
        by_n.setdefault(r["n"], []).append(r["pruned_sequence_loss"])
    random_loss = np.mean([np.mean(v, 0) for v in by_n.values()], 0) if by_n else None
    angular_loss = np.mean([angular[n]["pruned_sequence_loss"] for n in by_n], 0) if by_n else None
    _, unhealed = sharpness(*loss_curve(m, "pruned"))
    _, healed = sharpness(*loss_curve(m, "healed"))
    gaps = deepest_gaps(m)
    if gaps is None:
        nearly = True  # the angular choice is the deepest block at every n
    elif bootstrap_mean(gaps[0], seed=seed).above(0):  # worse before healing: healing must close most of the gap
        nearly = decided(paired_difference(gaps[0], 2 * gaps[1], seed=seed))
    else:  # no worse even before healing: it must not be clearly worse after
        nearly = not bootstrap_mean(gaps[1], seed=seed).above(0)
    return {
        "angular blocks beat random blocks before healing (mean over n)":
            None if random_loss is None else decided(paired_difference(random_loss, angular_loss, seed=seed)),
        "the unhealed loss curve is sharper than the healed one": decided(paired_difference(unhealed, healed, seed=seed)),
        "after healing the deepest-layers heuristic is nearly as good (healing closes most of its gap)": nearly,
    }


CLAIM = Claim(
    statement=(
        "Removing the contiguous block of layers whose input and output residual streams have the smallest "
        "angular distance, then healing with a little QLoRA fine-tuning, removes a large fraction (up to about "
        "half) of an LLM's layers with little degradation: question-answering accuracy holds until a sharp, "
        "model-dependent transition (40-50% of the layers for Llama-2-70B on MMLU), while the healed C4 loss grows "
        "slowly and smoothly with the fraction removed, where the unhealed loss rises sharply. After healing, "
        "simply dropping the deepest layers before the last one is nearly as good as the similarity-informed choice."
    ),
    predicate=(
        "On a 12-layer base LM, for n = 1, 2, 3, 4, 6, 8, 10 removed layers, paired over validation sequences with 95% bootstrap "
        "intervals: (1) before healing, the minimum-angular-distance block has clearly lower loss than random "
        "contiguous blocks of the same size (mean over n); (2) the angular block's loss-vs-n curve is sharper "
        "without healing than with the same LoRA healing (sharpness = largest per-layer loss increase between "
        "consecutive n over the mean per-layer increase from the unpruned model; unhealed minus healed clearly "
        "above 0); (3) after healing the deepest-layers heuristic (remove L-n-1 .. L-2) is nearly as good as the "
        "angular block: where the two differ and the heuristic is clearly worse before healing, healing removes "
        "clearly more than half of its extra loss (if it is not worse before, it must not be clearly worse after)."
    ),
    checks=checks,
    preconditions=preconditions,
    source=("arXiv:2403.17887 abstract; Fig. 1(d) and Sec. 4.1 (sharp QA transition), Sec. 4.2 (healed C4 loss "
            "grows slowly and smoothly, unhealed loss sharply), Sec. 4.3 (the simpler deepest-layers heuristic is "
            "nearly as good after healing); healing recipe: appendix (QLoRA on the MLP layers)"),
)

# What a user may swap in (--model / --corpus), and the shared cached models this runs on.
INPUTS = ('model', 'corpus')
SUBSTRATE = ('base-lm',)
SEED_VARIES = ("which training sequences calibrate the angular distances, which random contiguous blocks are drawn, "
               "the healing runs' data order and LoRA initialisation, and the bootstrap resampling of the margins")

SCALES = {
    "smoke": dict(calibration_sequences=8, eval_sequences=8, block_sizes="smallest-and-half", random_draws=1,
                  heal_steps=2, heal_batch=4, heal_lr=1e-3, lora_rank=4),
    "small": dict(calibration_sequences=64, eval_sequences=64, block_sizes="spread",
                  random_draws=2, heal_steps=40, heal_batch=8, heal_lr=1e-3, lora_rank=8),
    "large": dict(calibration_sequences=256, eval_sequences=256, block_sizes="all", random_draws=4,
                  heal_steps=400, heal_batch=16, heal_lr=3e-4, lora_rank=64),
}


def block_sizes(spec: str, L: int) -> list[int]:
    """Which n to remove: every n (``all``), every n to a third of the depth and then every other one
    (``spread``: 1, 2, 3, 4, 6, 8, 10 of 12), or just 1 and L/2 (``smallest-and-half``)."""
    sizes = {"all": set(range(1, L)), "spread": set(range(1, L // 3 + 1)) | set(range(max(1, L // 3), L, 2)),
             "smallest-and-half": {1, L // 2}}[spec]
    return sorted(sizes if len(sizes) > 1 else sizes | {L - 1})  # a curve needs two steps


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    lm = ctx.language_model()
    model = lm.model
    L = len(decoder_layers(model)[1])
    if L < MIN_LAYERS:
        raise ExperimentError(f"layer-pruning needs a model with at least {MIN_LAYERS} decoder layers "
                              f"(it removes 1 .. L-1 of them); {lm.name} has {L}")
    train_blocks = lm.blocks("train")
    val_blocks = lm.blocks("validation")[: s["eval_sequences"]]
    rows_embedded = model.get_input_embeddings().num_embeddings
    if max(int(train_blocks.max()), int(val_blocks.max())) >= rows_embedded:
        raise ExperimentError(f"the tokenizer of {lm.name} produces token ids up to {max(int(train_blocks.max()), int(val_blocks.max()))}, "
                              f"but the model embeds only {rows_embedded} tokens: its vocabulary is smaller than the tokenizer's")
    g = torch.Generator().manual_seed(ctx.seed)
    calibration = train_blocks[torch.randperm(len(train_blocks), generator=g)[: s["calibration_sequences"]]].split(8)
    heal_config = TrainConfig(steps=s["heal_steps"], batch_size=s["heal_batch"], seq_len=lm.seq_len,
                              lr=s["heal_lr"], warmup_steps=max(1, s["heal_steps"] // 10))

    def healed(m) -> dict:
        return measure(heal(m, train_blocks, heal_config, rank=s["lora_rank"], seed=ctx.seed), val_blocks)

    D = angular_distances(model, calibration)
    sizes = block_sizes(s["block_sizes"], L)
    rng = random.Random(ctx.seed)
    unpruned, unpruned_healed = measure(model, val_blocks), healed(model)
    rows = []
    for n in sizes:
        starts = [("angular", most_redundant_block(D, n)), ("deepest", deepest_block(L, n))]
        starts += [("random", rng.randrange(L - n + 1)) for _ in range(s["random_draws"])]
        for method, start in starts:
            pruned = drop_layers(model, start, n)
            before = measure(pruned, val_blocks)
            row = {"n": n, "fraction": n / L, "method": method, "start": start,
                   "angular_distance": float(D[start, start + n]),
                   "pruned_perplexity": before["perplexity"], "pruned_sequence_loss": item_list(before["sequence_loss"])}
            if method == "deepest" and start == rows[-1]["start"]:  # the same block as the angular choice
                row.update({k: rows[-1][k] for k in ("healed_perplexity", "healed_sequence_loss")})
            elif method != "random":
                after = healed(pruned)
                row.update(healed_perplexity=after["perplexity"], healed_sequence_loss=item_list(after["sequence_loss"]))
            rows.append(row)
    metrics = {
        "num_layers": L,
        "block_sizes": sizes,
        "bootstrap_seed": ctx.seed,
        "uniform_loss": math.log(rows_embedded),
        "unpruned_perplexity": unpruned["perplexity"],
        "unpruned_accuracy": unpruned["accuracy"],
        "unpruned_sequence_loss": item_list(unpruned["sequence_loss"]),
        "unpruned_healed_perplexity": unpruned_healed["perplexity"],
        "unpruned_healed_sequence_loss": item_list(unpruned_healed["sequence_loss"]),
        "distances": D.tolist(),
        "blocks": rows,
    }
    metrics["sharpness_unhealed"] = sharpness(*loss_curve(metrics, "pruned"))[0]
    metrics["sharpness_healed"] = sharpness(*loss_curve(metrics, "healed"))[0]
    gaps = deepest_gaps(metrics)
    metrics["deepest_extra_loss_before_healing"] = None if gaps is None else float(gaps[0].mean())
    metrics["deepest_extra_loss_after_healing"] = None if gaps is None else float(gaps[1].mean())
    half = next((r for r in rows if r["method"] == "angular" and r["n"] == L // 2), None)
    # reported, no longer checked (see "Earlier predicate"): healed perplexity at half depth over the healed unpruned
    metrics["half_layers_healed_ratio"] = (None if half is None
                                           else half["healed_perplexity"] / metrics["unpruned_healed_perplexity"])
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def plot(fig, m: dict) -> None:
    ax, heat = fig.subplots(1, 2, width_ratios=[1.4, 1])
    colours = {"angular": "tab:blue", "deepest": "tab:orange", "random": "tab:grey"}
    for method in METHODS:
        for stage, style in (("pruned", "--"), ("healed", "-")):
            pts = {}
            for r in m["blocks"]:
                if r["method"] == method and r.get(f"{stage}_perplexity") is not None:
                    pts.setdefault(r["fraction"], []).append(r[f"{stage}_perplexity"])
            if not pts:
                continue
            xs = sorted(pts)
            ax.plot(xs, [float(np.exp(np.mean(np.log(pts[x])))) for x in xs], style, marker="o",
                    color=colours[method], label=f"{method}, {'healed' if stage == 'healed' else 'no healing'}")
    ax.axhline(m["unpruned_perplexity"], color="black", lw=0.8, label="unpruned")
    ax.axhline(m["unpruned_healed_perplexity"], color="black", lw=0.8, ls=":", label="unpruned + same healing")
    ax.set(xlabel="fraction of layers removed", ylabel="validation perplexity (log scale)", yscale="log",
           title=f"Perplexity after layer pruning (sharpness: unhealed {m['sharpness_unhealed']:.2f}, "
                 f"healed {m['sharpness_healed']:.2f})")
    ax.legend(fontsize=7)

    D = torch.tensor(m["distances"])
    L = m["num_layers"]
    grid = np.full((L - 1, L), np.nan)
    for n in range(1, L):
        grid[n - 1, : L - n + 1] = block_distances(D, n).numpy()
    # Blocks starting at the embedding (l = 0) are far from everything; cap the scale so the rest stays legible.
    im = heat.imshow(grid, aspect="auto", origin="lower", extent=(-0.5, L - 0.5, 0.5, L - 0.5), cmap="viridis",
                     vmax=float(np.nanpercentile(grid[:, 1:], 98)) if L > 2 else None)
    heat.set(xlabel="first removed layer l", ylabel="block size n", title="angular distance d(x^l, x^(l+n))")
    fig.colorbar(im, ax=heat)
