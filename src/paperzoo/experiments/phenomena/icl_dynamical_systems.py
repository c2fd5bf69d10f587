r"""Reproduction (from-scratch analogue) of 2402.00795: the in-context estimate of a Markov chain's
transition kernel improves as a power law in context length.

The paper prompts pretrained LLaMA-2 models with series of stochastic, chaotic and continuous
systems, reads the next value's density with Hierarchy-PDF, and finds that its distance to the true
transition kernel falls as a power law in the number of observed steps (its "in-context neural
scaling law" section and the loss-against-context-length figures; the section and figure numbers
were not checked against a copy of the paper). LLaMA is out of reach here, so a tiny digit-level
Llama is meta-trained from scratch on random Markov chains and then read out with the same algorithm
(`paperzoo.phenomena.icl_dynamical_systems.hierarchy_pdf`).

Data: a chain of S = 4 states, each state written as a fixed 2-digit value (the seed draws the four
codes out of 00..99, the same for every sequence of that seed), a fresh transition matrix per sequence
with rows drawn from Dirichlet(0.3) (sparse rows), a uniform initial state, 64 steps:
``BOS 37 , 05 , 37 , 81 , ...`` with one token per digit and separator. The loss is on every digit.
Hierarchy-PDF at depth 2 (resolution 0.01, the full tree of 11 next-digit distributions per prompt)
gives the model's density of the next value after n observed values; the truth is $P[x_n, \cdot]$
placed on the four codes. Per test chain and n, the error is the Bhattacharyya distance (KL and JSD
reported beside it).

Claim and margin: the mean error over test chains at n in a geometric grid (2 .. 63) is fitted with
$D_B \approx a n^b$ by least squares in log-log space; the check passes when the 95% bootstrap interval
of $b$ (resampling test chains, refitting) lies below 0, fails when it lies at or above 0, and is
undecided otherwise. Beside it: the count estimator (empirical transition frequencies of the current
state in the context, add-one smoothing over the four states; it is told which four values are
states), and its exponent.

Preconditions (the model learned the in-context task): at the longest context the model's error is
below that of (1) the context-free prediction, uniform over the four state values, and (2) the
in-context unigram (next-state frequencies in the context with add-one smoothing, blind to the current
state), each by a paired 95% bootstrap interval over test chains above 0. (2) is what shows the model
reads the transition kernel rather than state frequencies.

Pruning: the same prompts are also read with ``min_mass=0.01`` (bins under 1% not refined) and with
the official code's locality rule (the observed next value's first digit and its neighbours); their
query counts and errors are reported against the full tree.

Set-up, chosen on the preconditions only (never looking at the exponent), in short prototype runs
at seed 0 (a plain fp32 loop, 128 test chains, the model's error at n = 63 against the unigram's):
width 64, 2 layers, 4 heads, AdamW lr 3e-3 with cosine decay, batches of 16 sequences. With
Dirichlet(1) rows the model stayed at the unigram's error after 2,000 steps (no in-context transition
reading); sparse rows (Dirichlet(0.3)) make the transition far more informative than the unigram, and
after 1,500 steps the model read it (error 0.027 against the unigram's 0.15). Codes drawn afresh per
sequence (so that the state values too must be read from the context) did not learn in 1,500 steps
(error 0.47 against the unigram's 0.12), so the codes are fixed per seed. 1,500 steps is the one
budget tried that passed; the harness's run (bf16 autocast, its own data pool, other codes) passed
both preconditions at seed 0 with a weaker model (0.12 against 0.16). The grid, the fit over the
whole grid and the pruning threshold were fixed before any run.

What it does not show: the paper's claim is about pretrained LLMs that were never trained on such
series; here the in-context learner is meta-trained on exactly this family. The predicate asks only
for a falling power law: at seed 0 the model's exponent (-0.22, r^2 0.84) is far shallower than the
count estimator's (-0.60) and its curve flattens after about 20 values, so this small model is a
weak in-context learner, not a near-Bayesian one. The continuous systems (logistic map, Brownian
motion) are not run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from paperzoo.core.experiment import Claim, Outcome, RunContext
from paperzoo.core.margins import Interval, beats
from paperzoo.core.measures import power_law_fit
from paperzoo.core.tasks import TaskBatch, TaskModelConfig, TaskTraining, train_on_task
from paperzoo.phenomena.icl_dynamical_systems import (
    LOSSES, DigitFormat, bhattacharyya_distance, full_tree_queries, hierarchy_pdf)

SEPARATOR, BOS = 10, 11  # token ids; the digits are 0..9
PRUNE_BELOW = 0.01


@dataclass(frozen=True)
class DigitMarkovChains:
    """Random Markov chains over fixed state values, written digit by digit.

    `codes` are the states' values (integers below 10^digits, written with `digits` digits); every
    sequence draws its own transition matrix (rows Dirichlet(`concentration`)) and a uniform
    initial state, and runs `steps` values: ``BOS c(x_1) sep c(x_2) sep ...``.
    """

    codes: tuple[int, ...]
    steps: int = 64
    digits: int = 2
    concentration: float = 0.3

    @property
    def fmt(self) -> DigitFormat:
        return DigitFormat(tuple(range(10)), SEPARATOR, self.digits, bos_id=BOS)

    @property
    def vocab_size(self) -> int:
        return BOS + 1

    @property
    def length(self) -> int:
        return 1 + self.steps * (self.digits + 1)

    def chains(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Transition matrices [n, S, S] and state sequences [n, steps] (indices into `codes`)."""
        rng = np.random.default_rng(int(seed))
        S = len(self.codes)
        P = rng.dirichlet(np.full(S, self.concentration), size=(n, S))  # one row per (chain, state)
        x = np.empty((n, self.steps), dtype=np.int64)
        x[:, 0] = rng.integers(0, S, n)
        u = rng.random((n, self.steps))
        for t in range(1, self.steps):  # inverse-CDF draw of x_t from the row of x_{t-1}
            cdf = P[np.arange(n), x[:, t - 1]].cumsum(-1)
            x[:, t] = np.minimum((cdf < u[:, t : t + 1]).sum(-1), S - 1)
        P, x = torch.from_numpy(P), torch.from_numpy(x)
        return P, x

    def sample(self, n: int, seed: int) -> TaskBatch:
        _, x = self.chains(n, seed)
        tokens = self.fmt.encode(torch.tensor(self.codes)[x])
        return TaskBatch(tokens, tokens < SEPARATOR)  # every digit is scored


def on_grid(probs_over_states: torch.Tensor, codes, bins: int) -> torch.Tensor:
    """[B, S] probabilities of the states -> [B, bins] bin probabilities (mass at each state's code)."""
    out = torch.zeros(len(probs_over_states), bins, dtype=torch.float64)
    return out.index_add_(1, torch.tensor(codes), probs_over_states.double())


def count_estimates(x: torch.Tensor, n: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """After n observed states: add-one transition frequencies out of x_n, and add-one state frequencies
    of the transitions' targets (the unigram), both [B, S]."""
    prev, nxt = x[:, : n - 1], x[:, 1:n]
    from_current = (prev == x[:, n - 1 : n]).double()
    bigram = torch.ones(len(x), S, dtype=torch.float64).scatter_add_(1, nxt, from_current)
    unigram = torch.ones(len(x), S, dtype=torch.float64).scatter_add_(1, nxt, torch.ones_like(from_current))
    return bigram / bigram.sum(-1, keepdim=True), unigram / unigram.sum(-1, keepdim=True)


def exponent_interval(errors: np.ndarray, grid, resamples: int = 1000, seed: int = 0) -> Interval:
    """[chains, len(grid)] errors -> percentile-bootstrap 95% interval of the power-law exponent of the mean
    error over chains (chains resampled, the same resample at every n)."""
    rng = np.random.default_rng(seed)
    fit = power_law_fit(grid, errors.mean(0)).b
    idx = rng.integers(0, len(errors), size=(resamples, len(errors)))
    b = np.array([power_law_fit(grid, errors[i].mean(0)).b for i in idx])
    return Interval(float(np.quantile(b, 0.025)), float(fit), float(np.quantile(b, 0.975)))


def preconditions(m: dict) -> dict[str, bool | None]:
    model = m["errors"]["model"]["bhattacharyya"]
    return {
        "at the longest context the model's error is below the context-free (uniform over the states) error":
            beats(np.array(m["errors"]["uniform"]["bhattacharyya"])[:, -1], np.array(model)[:, -1]),
        "at the longest context the model's error is below the in-context unigram's (it reads the current state)":
            beats(np.array(m["errors"]["unigram"]["bhattacharyya"])[:, -1], np.array(model)[:, -1]),
    }


def checks(m: dict) -> dict[str, bool | None]:
    b = Interval(**m["exponent"]["model"]["bhattacharyya"])
    return {"the error falls as a power law in context length (exponent interval below 0)":
            True if b.high < 0 else (False if b.low >= 0 else None)}


CLAIM = Claim(
    statement=(
        "Pretrained LLaMA-2 models, prompted with time series of stochastic, chaotic and continuous dynamical "
        "systems (Markov chains, logistic map, Brownian motion, ...), learn their transition rules in context: the "
        "distance (Bhattacharyya, KL) between the density read out with Hierarchy-PDF and the true transition "
        "kernel falls as a power law in the number of observed steps, an in-context neural scaling law."
    ),
    predicate=(
        "A tiny digit-level Llama meta-trained from scratch on random 4-state Markov chains (fixed 2-digit state "
        "values per seed, Dirichlet(0.3) rows drawn per sequence); Hierarchy-PDF (depth 2, full tree) reads its "
        "next-value density after n = 2 .. 63 observed values on 128 held-out chains. The power-law exponent of the "
        "mean Bhattacharyya distance to the true row against n has a 95% bootstrap interval (over chains) below 0 "
        "(at or above 0: not reproduced). The count estimator (add-one transition frequencies) is reported beside "
        "it. Preconditions: at n = 63 the model beats the context-free uniform-over-states prediction and the "
        "in-context unigram (paired intervals over chains)."
    ),
    checks=checks,
    preconditions=preconditions,
    source=("arXiv:2402.00795: the Hierarchy-PDF section and the in-context neural scaling law section (loss "
            "against context length, log-log); official code AntonioLiu97/llmICL: models/ICL.py (recursive_refiner, "
            "BT_dist, KL_div), "
            "figures_analysis/experiment_plots.ipynb (Markov_BT_loss)"),
)

INPUTS: tuple = ()
SUBSTRATE: tuple = ()
SEED_VARIES = ("the four state values, the model's initialisation, the training chains and the test chains")

SMALL = {"states": 4, "steps": 64, "digits": 2, "concentration": 0.3, "hidden_size": 64, "num_layers": 2,
         "num_heads": 4, "train_steps": 1500, "batch_size": 16, "lr": 3e-3, "test_chains": 128,
         "grid": [2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 63]}
SCALES = {
    "smoke": {**SMALL, "steps": 16, "hidden_size": 16, "num_heads": 2, "train_steps": 10, "batch_size": 4,
              "test_chains": 8, "grid": [2, 4, 8, 15]},
    "small": SMALL,
    "large": {**SMALL, "steps": 128, "hidden_size": 128, "train_steps": 6000, "batch_size": 32, "test_chains": 512,
              "grid": [2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 90, 127]},
}


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    S, grid = s["states"], s["grid"]
    draw = torch.randperm(10 ** s["digits"], generator=torch.Generator().manual_seed(ctx.seed))
    codes = tuple(sorted(draw[:S].tolist()))  # the states' values, fixed for this seed
    task = DigitMarkovChains(codes, s["steps"], s["digits"], s["concentration"])
    model, history = train_on_task(task, TaskModelConfig(s["hidden_size"], s["num_layers"], s["num_heads"]),
                                   TaskTraining(s["train_steps"], s["batch_size"], lr=s["lr"]), seed=ctx.seed,
                                   eval_size=64)
    fmt, bins = task.fmt, task.fmt.bins
    P, x = task.chains(s["test_chains"], 10**6 + ctx.seed)
    tokens = fmt.encode(torch.tensor(codes)[x])
    rows = torch.arange(len(x))
    arms = ("model", "count", "unigram", "uniform", "pruned", "neighbour")
    errors = {a: {k: [] for k in LOSSES} for a in arms}
    queries = {"full": 0, "pruned": 0, "neighbour": 0}
    for n in grid:
        prefix = tokens[:, : 1 + n * (fmt.digits + 1)]
        truth = on_grid(P[rows, x[:, n - 1]], codes, bins)
        bigram, unigram = count_estimates(x, n, S)
        full = hierarchy_pdf(model, prefix, fmt)
        pruned = hierarchy_pdf(model, prefix, fmt, min_mass=PRUNE_BELOW)
        observed = torch.tensor(codes)[x[:, n]] if n < x.shape[1] else None
        neighbour = hierarchy_pdf(model, prefix, fmt, observed=observed) if observed is not None else full
        predictions = {"model": full.probs, "count": on_grid(bigram, codes, bins),
                       "unigram": on_grid(unigram, codes, bins),
                       "uniform": on_grid(torch.full((len(x), S), 1 / S), codes, bins), "pruned": pruned.probs,
                       "neighbour": neighbour.probs}
        for arm, q in predictions.items():
            for name, loss in LOSSES.items():
                errors[arm][name].append(loss(truth, q).tolist())
        queries["full"] += full.queries
        queries["pruned"] += pruned.queries
        queries["neighbour"] += neighbour.queries
    errors = {a: {k: np.array(v).T for k, v in e.items()} for a, e in errors.items()}  # [chains, len(grid)]
    exponent = {a: {k: exponent_interval(errors[a][k], grid, seed=ctx.seed).as_dict() for k in LOSSES}
                for a in ("model", "count")}
    metrics = {
        "codes": list(codes),
        "grid": grid,
        "train_seconds": history["seconds"],
        "final_train_loss": float(np.mean(history["train_loss"][-50:])),
        "mean_error": {a: {k: v.mean(0).tolist() for k, v in e.items()} for a, e in errors.items()},
        "exponent": exponent,
        "r2": {a: power_law_fit(grid, errors[a]["bhattacharyya"].mean(0)).r2 for a in ("model", "count")},
        "queries": {**queries, "full_tree_per_prompt": full_tree_queries(fmt.digits), "prompts": len(x) * len(grid)},
        "pruned_vs_full_bhattacharyya": float(bhattacharyya_distance(full.probs, pruned.probs).mean()),
        "errors": {a: {"bhattacharyya": errors[a]["bhattacharyya"].tolist()}
                   for a in ("model", "count", "unigram", "uniform")},
        "_plot": {"example_model": full.probs[0].tolist(), "example_truth": truth[0].tolist()},
    }
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def plot(fig, m: dict) -> None:
    curves, example = fig.subplots(1, 2)
    n = np.array(m["grid"], dtype=float)
    for arm, style in (("model", "o-"), ("count", "s--"), ("unigram", "^:"), ("uniform", "x:"), ("pruned", ".-")):
        curves.plot(n, m["mean_error"][arm]["bhattacharyya"], style, label=arm, ms=4)
    b = m["exponent"]["model"]["bhattacharyya"]
    fit = power_law_fit(n, m["mean_error"]["model"]["bhattacharyya"])
    curves.plot(n, fit.a * n**fit.b, "k-", lw=0.8, label=f"fit n^{b['mean']:.2f} [{b['low']:.2f}, {b['high']:.2f}]")
    curves.set(xscale="log", yscale="log", xlabel="observed values n", ylabel="Bhattacharyya distance to the truth",
               title="In-context estimate of the transition kernel")
    curves.legend(fontsize=7)
    bins = np.arange(len(m["_plot"]["example_model"])) / len(m["_plot"]["example_model"])
    width = bins[1] - bins[0]
    example.bar(bins, m["_plot"]["example_model"], width=width, align="edge", label="Hierarchy-PDF (model)")
    example.bar(bins, m["_plot"]["example_truth"], width=width, align="edge", alpha=0.5, color="r", label="truth")
    example.set(xlabel="next value", ylabel="bin probability", title=f"chain 0 after n = {m['grid'][-1]} values")
    example.legend(fontsize=7)
