"""Reproduction of 2407.02678: more heads and more context raise the attention's intrinsic dimension, and
the intrinsic dimension goes with reasoning accuracy.

Task: modular arithmetic learned in context. Each sequence draws a hidden operation
$\\circ \\in \\{+, -, \\times\\}$ mod p (p = 7) and shows K = 6 solved examples
``(a, b) c`` with c = a \\circ b mod p, the operand pair one token; the j-th example's
pair token is a query answered with j - 1 solved examples before it. With none the model
can only guess from (a, b); each example narrows the operation down. Tiny two-layer transformers of width 64 are trained
from scratch with 1, 2, 4 and 8 heads (one run each, the same steps and data), so the
example count is varied at test time on the trained models: the j-th query of a held-out
sequence has j - 1 examples in context.

Measured, on 512 held-out sequences: whether each query is answered right (greedy), and
the paper's intrinsic dimension (ID) of the last layer's MLP input at the query token,
$\\sum_h \\max(k_h - 1, 0)$ with $k_h$ the attention weights of head h above $\\tau$
(`paperzoo.phenomena.attention_intrinsic_dimension`). The last layer is the one the paper
ties to reasoning; the first layer is reported beside it.

tau: the paper gives none. The checks read tau = 0.1, fixed before any run: it is the
cut-off the authors' earlier code for the same count uses (there relative to the row's
maximum); it lies above the uniform weight at the longest context here (1/12), so diffuse
attention does not count as edges; and it leaves room for up to 9 edges per head. A sweep
over tau (0.02-0.5) and the relative cut-off (0.1 x row maximum) are reported, not checked.

Margins: every comparison is over the same held-out sequences within a seed. ID
differences use the paired bootstrap interval over sequences (`core.margins.beats`); the
rank correlation (Spearman, over the heads x example-count cells) gets a percentile
bootstrap interval from resampling sequences and recomputing every cell. A check passes
where the interval clears 0, fails where it lies wholly below, and is otherwise undecided.

Set-up: width 64, heads {1, 2, 4, 8} and one training run per head count come from the
issue; depth 2, so that one layer can bring an example's operands to its answer and a
second can read the operation found there at the query; p = 7, K = 6 and the three
operations were fixed with the task. The rest was chosen on the preconditions alone (the
accuracy per example count, never the checks), seed 0, 8 heads unless said, 512 held-out
sequences, accuracy with 0 -> 5 examples:

- format: with four tokens per example, ``a b = c`` (800 steps of 64 sequences, lr 3e-3),
  every model learned the operations' mixture but hardly learned from its examples
  (0.47 -> 0.52, not beyond the interval; the first calibration, whose checks were read
  too and are in its record). Variants of that format: p = 5, 0.48 -> 0.91 (1 head
  0.49 -> 0.57; seed 1, 0.49 -> 0.61); p = 7 with + and - only, 0.57 -> 0.60
  (undecided); a hidden shift (c = a + b + s) stayed at chance after 1,000 steps. With the operand pair as one token
  every model learns from its examples: 0.47 -> 1.00 (1 head 0.48 -> 0.97, 2 heads
  0.48 -> 0.98; seed 1, 0.47 -> 0.84), at a third of the cost per step. The pair token
  keeps p = 7 and the three operations.
- steps 800, batch 64, lr 3e-3: the first trial's, kept, as they pass the preconditions
  with a wide margin on two seeds.

Status (calibrated, not yet swept). Seed 0 at `small`: 84 s wall, 80 s of CPU on one thread
(a loaded machine; about 20 s of training per model). Every head count learns from its
examples alike (first query 0.47-0.48, five examples 1.00), so the heads differ in ID, not
in accuracy. Verdict `reproduced`: last-layer ID at tau = 0.1 with 0 -> 5 examples is
0.97 -> 1.41 (1 head), 1.85 -> 4.16 (2), 3.77 -> 7.05 (4), 6.86 -> 15.92 (8; it peaks at
19.8 with three examples); Spearman 0.31 [0.22, 0.38], carried by the example count, as
accuracy does not vary with heads. Beside the checks: the rank correlation falls with tau
(0.54 at 0.02, 0.31 at 0.1, -0.10 at 0.2, -0.28 at 0.3), and with the relative cut-off the
8-head ID rises throughout (7.0 -> 55.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata

from paperzoo.core.experiment import Claim, Outcome, RunContext
from paperzoo.core.margins import LEVEL, RESAMPLES, Interval, all_of, beats, bootstrap_mean, decided
from paperzoo.core.tasks import TaskBatch, TaskModelConfig, TaskTraining, train_on_task
from paperzoo.phenomena.attention_intrinsic_dimension import attention_intrinsic_dimension

TAU = 0.1  # the cut-off the checks read (see the docstring for why)
OPERATIONS = ("+", "-", "*")


@dataclass(frozen=True)
class HiddenModularOperation:
    """BOS, then K solved examples ``(a, b) c`` with c = a o b mod p, o one hidden operation per sequence.

    An example is two tokens: one for the operand pair (a, b), the query, and the answer c.
    Tokens 0..p-1 are numbers, p + a p + b is the pair (a, b) and p + p^2 is BOS. Every
    answer is scored: the j-th is predicted at its pair token with j - 1 solved examples before it.
    """

    p: int
    K: int

    @property
    def bos(self) -> int:
        return self.p + self.p ** 2

    @property
    def vocab_size(self) -> int:
        return self.bos + 1

    @property
    def length(self) -> int:
        return 2 * self.K + 1

    @property
    def query_positions(self) -> list[int]:
        """The pair token of every example: the token whose next-token prediction is the answer."""
        return [2 * j + 1 for j in range(self.K)]

    def sample(self, n: int, seed: int) -> TaskBatch:
        g = torch.Generator().manual_seed(int(seed))
        a = torch.randint(0, self.p, (n, self.K), generator=g)
        b = torch.randint(0, self.p, (n, self.K), generator=g)
        op = torch.randint(0, len(OPERATIONS), (n, 1), generator=g)
        c = torch.where(op == 0, a + b, torch.where(op == 1, a - b, a * b)) % self.p
        examples = torch.stack([self.p + a * self.p + b, c], dim=2).reshape(n, 2 * self.K)
        tokens = torch.cat([torch.full((n, 1), self.bos), examples], dim=1)
        scored = torch.zeros_like(tokens, dtype=torch.bool)
        scored[:, 2::2] = True
        return TaskBatch(tokens, scored)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); 0 where either side is constant."""
    rx, ry = rankdata(x), rankdata(y)
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def cell_correlation(ids: np.ndarray, right: np.ndarray, seed: int = 0) -> Interval:
    """Bootstrap interval of Spearman(cell mean ID, cell accuracy) over cells, resampling items.

    `ids` and `right` are [cells, items]: every cell was measured on the same items.
    """
    rng = np.random.default_rng(seed)
    n = ids.shape[1]
    draws = [spearman(ids[:, i].mean(1), right[:, i].mean(1)) for i in rng.integers(0, n, size=(RESAMPLES, n))]
    alpha = (1 - LEVEL) / 2
    return Interval(float(np.quantile(draws, alpha)), spearman(ids.mean(1), right.mean(1)),
                    float(np.quantile(draws, 1 - alpha)))


def _cells(m: dict, key: str) -> np.ndarray:
    """[heads x example counts, items] of a per-item metric."""
    return np.array([row for H in m["heads"] for row in m["models"][str(H)][key]], dtype=float)


def preconditions(m: dict) -> dict[str, bool | None]:
    largest = m["models"][str(max(m["heads"]))]
    last, first = np.array(largest["right"][-1]), np.array(largest["right"][0])
    return {
        "the largest model learned the task: right on its last query above chance (interval over sequences)":
            bootstrap_mean(last, seed=m["bootstrap_seed"]).above(m["chance"]),
        "the largest model uses its examples: right more often with the most examples than with none":
            beats(last, first) is True,
    }


def checks(m: dict) -> dict[str, bool | None]:
    models, heads = m["models"], m["heads"]
    lo, hi = models[str(min(heads))], models[str(max(heads))]
    return {
        "more heads raise the last layer's ID at the query (most heads vs one, mean over queries, paired interval)":
            beats(np.mean(hi["id_last"], axis=0), np.mean(lo["id_last"], axis=0)),
        "more examples in context raise the last layer's ID at the query, for every head count (paired interval)":
            all_of(beats(models[str(H)]["id_last"][-1], models[str(H)]["id_last"][0]) for H in heads),
        "the ID goes with accuracy: Spearman over heads x example counts, bootstrap interval above 0":
            decided(cell_correlation(_cells(m, "id_last"), _cells(m, "right"), seed=m["bootstrap_seed"])),
    }


CLAIM = Claim(
    statement=(
        "The output of multi-head attention lies in the Minkowski sum of per-head convex hulls, whose dimension, "
        "the intrinsic dimension (ID) of the MLP's input, is set by the density of the attention graph: the number "
        "of attention weights above a threshold. More heads or more context (e.g. more examples in the prompt) "
        "raise it, and a higher ID (at the last layer) goes with better reasoning."
    ),
    predicate=(
        "Two-layer width-64 transformers with 1, 2, 4 and 8 heads, trained from scratch on in-context modular "
        "arithmetic (hidden operation among +, -, x mod 7; six solved examples `(a, b) c`, the operand pair one "
        "token); on 512 held-out sequences, at the query token of the last layer with tau = 0.1: (1) the 8-head "
        "model's ID exceeds the 1-head model's (paired bootstrap interval over sequences above 0), (2) for every head count the ID with five examples "
        "in context exceeds the ID with none, and (3) the Spearman correlation between cell mean ID and cell "
        "accuracy over the 4 x 6 (heads x example count) cells has a bootstrap interval above 0. A tau sweep is "
        "reported. Preconditions: the 8-head model answers above chance and is more accurate with examples."
    ),
    checks=checks,
    preconditions=preconditions,
    source="arXiv:2407.02678 Sec. 4 (Minkowski-sum theorem, ID as attention-graph density) and Sec. 5 (more "
           "prompt examples raise the ID; a rise at the last layer goes with better reasoning)",
)

INPUTS: tuple = ()
SUBSTRATE: tuple = ()
SEED_VARIES = "the models' initialisation, the training sequences and the held-out test sequences"

TAUS = [0.02, 0.05, 0.1, 0.2, 0.3, 0.5]
SCALES = {
    "smoke": {"p": 5, "K": 3, "heads": [1, 2], "hidden_size": 16, "num_layers": 2, "steps": 10, "batch_size": 16,
              "lr": 3e-3, "test_sequences": 32},
    "small": {"p": 7, "K": 6, "heads": [1, 2, 4, 8], "hidden_size": 64, "num_layers": 2, "steps": 800,
              "batch_size": 64, "lr": 3e-3, "test_sequences": 512},
    "large": {"p": 7, "K": 6, "heads": [1, 2, 4, 8], "hidden_size": 64, "num_layers": 2, "steps": 4000,
              "batch_size": 64, "lr": 3e-3, "test_sequences": 2048},
}


def measure(model, task: HiddenModularOperation, test: TaskBatch) -> dict:
    """Per query and held-out sequence: right or not, and the ID at the query (last and first layer, every tau)."""
    q = task.query_positions
    with torch.no_grad():
        predictions = model(input_ids=test.tokens).logits[:, q].argmax(-1)
    right = predictions == test.tokens[:, [i + 1 for i in q]]  # [items, K]
    out = {"right": right.T.int().tolist()}
    for tau in TAUS:
        bound = attention_intrinsic_dimension(model, test.tokens, tau).bound[:, :, q].float()  # [layers, items, K]
        out[f"tau={tau}"] = {"last": bound[-1].mean(0).tolist(), "first": bound[0].mean(0).tolist()}
        if tau == TAU:
            out["id_last"], out["id_first"] = bound[-1].T.tolist(), bound[0].T.tolist()
    relative = attention_intrinsic_dimension(model, test.tokens, TAU, relative=True).bound[-1][:, q].float()
    out["relative_last"] = relative.mean(0).tolist()
    return out


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    task = HiddenModularOperation(s["p"], s["K"])
    training = TaskTraining(steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"])
    test = task.sample(s["test_sequences"], seed=10**6 + ctx.seed)
    models = {}
    for H in s["heads"]:
        config = TaskModelConfig(hidden_size=s["hidden_size"], num_layers=s["num_layers"], num_heads=H)
        model, history = train_on_task(task, config, training, seed=ctx.seed)
        models[str(H)] = {**measure(model, task, test), "train_seconds": history["seconds"],
                          "final_train_loss": history["train_loss"][-1]}
    metrics = {"p": s["p"], "K": s["K"], "heads": s["heads"], "tau": TAU, "taus": TAUS, "chance": 1 / s["p"],
               "width": s["hidden_size"], "depth": s["num_layers"], "steps": s["steps"],
               "test_sequences": s["test_sequences"], "bootstrap_seed": ctx.seed, "models": models}
    for H in s["heads"]:
        r = models[str(H)]
        r["accuracy"] = np.mean(r["right"], axis=1).tolist()
        r["mean_id_last"] = np.mean(r["id_last"], axis=1).tolist()
    cells = [(str(H), j) for H in s["heads"] for j in range(s["K"])]
    metrics["spearman_by_tau"] = {
        str(tau): spearman(np.array([models[H][f"tau={tau}"]["last"][j] for H, j in cells]),
                           np.array([models[H]["accuracy"][j] for H, j in cells]))
        for tau in TAUS}
    metrics["spearman_interval"] = cell_correlation(_cells(metrics, "id_last"), _cells(metrics, "right"),
                                                    seed=ctx.seed).as_dict()
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def plot(fig, m: dict) -> None:
    ids, acc, sweep = fig.subplots(1, 3)
    examples = list(range(m["K"]))
    for H in m["heads"]:
        r = m["models"][str(H)]
        ids.plot(examples, r["mean_id_last"], "-o", label=f"{H} heads")
        acc.plot(examples, r["accuracy"], "-o", label=f"{H} heads")
        sweep.scatter(r["mean_id_last"], r["accuracy"], label=f"{H} heads")
    ids.set(xlabel="solved examples in context", ylabel=f"last-layer ID at the query (tau = {m['tau']})",
            title="ID vs context and heads")
    acc.axhline(m["chance"], color="grey", ls=":", label="chance")
    acc.set(xlabel="solved examples in context", ylabel="share of queries right", title="Accuracy")
    ci = m["spearman_interval"]
    sweep.set(xlabel="last-layer ID (cell mean)", ylabel="accuracy (cell)",
              title=f"Spearman {ci['mean']:.2f} [{ci['low']:.2f}, {ci['high']:.2f}]")
    for ax in (ids, acc, sweep):
        ax.legend(fontsize=7)
