"""An illustration of 2412.03782: one model, trained on mixed sequences, learns in context in every form they hold.

The paper is a position paper and makes no quantitative claim; this experiment illustrates its
definition and says so in its claim. Its definition (section 1): in-context learning is any drop in
next-token loss that earlier tokens of the same sequence buy, and it arises, in many forms at once, as
the inner loop of a meta-learner whose outer loop is training on sequences with that structure
(sections 1-3); in meta-ICL, later tasks in a sequence need fewer examples (section 2).

Set-up: one two-layer Llama (width 64, four heads) trained from scratch on `ContextForms`, an even
mixture of six sequence forms (key-value maps, repeated names, topics, periodic-plus-trend series,
four key-value tasks in a row sharing a label set, and i.i.d. tokens as the control; see
`paperzoo.phenomena.broader_icl`), 97 tokens each, loss on every token. On 2,400 held-out sequences
(400 per form):

- the context benefit of each form: per sequence, the mean loss over its informative positions in the
  first quarter (positions 1-24) minus that in the last quarter (73-96), with a 95% bootstrap
  interval over sequences;
- meta-ICL: per sequence of the `tasks` form, the mean loss on the values of its fourth task minus
  that on the values of its first task (same number of pairs, same key-value structure; only the
  label set is known by then), with its interval; and the loss at each key's first value in each task.

Preconditions (the set-up can show the claim; a failure gives `inconclusive`):
1. the outer loop was learned: on the i.i.d. control the model's loss is within 0.05 nats of the
   entropy of the Zipf law that drew it (it learned the marginal and no more can be learned there);
2. the measure does not invent context use: on the i.i.d. control, where no context helps, the
   benefit's interval does not lie above +0.05 nats.

Checks: (1) every one of the five forms shows a benefit beyond the control's: the interval of (form's
benefit - control's benefit) lies above 0, so a drift with position alone cannot pass it; (2) later
tasks need fewer examples: the fourth task's value loss lies below the first's (interval of first
minus fourth above 0). The bars (0.05 nats) and the windows are ours; the paper gives none.

Earlier precondition 2 (before any seed's verdict was recorded): the control's interval inside
[-0.05, 0.05], and check 1 against 0 rather than against the control. At seed 0 the control read
-0.034 nats (interval [-0.071, 0.004]): the model's late i.i.d. positions cost slightly *more*, a drift
that works against the claim, not for it, while the band also failed sequences that show no context
use at all. The precondition now guards only the direction that could fake a benefit, and check 1
subtracts the control, which handles a drift of either sign. Check values at seed 0 did not change
with this (every form's benefit was 0.08-1.33 nats at 400 sequences a form, its interval above 0 and above the
control's).

Set-up choices were made on the preconditions alone: the steps are the first of 1,500 / 3,000 at lr 3e-3
that met precondition 1 at seed 0 (i.i.d. loss 3.380 against the entropy 3.371); with 200 held-out
sequences per form the control's benefit interval, [-0.053, 0.044], was wider than precondition 2's
band ([-0.05, 0.05] then), so the held-out set was doubled to 400 per form, where the control read
-0.034 and the band was restated (above). Width, depth, forms, windows and bars were fixed before any run. The seed
varies the model's initialisation, its training sequences and the held-out sequences (the four topics
are fixed).

What it does not show: the paper's instructional, role-based and explanation forms (they need
natural language), and anything about pretrained LLMs. Each form was built to reward the inner loop
it names, so a benefit shows that one outer loop learns all of them at once, not that they arise
unbidden in natural text.
"""

from __future__ import annotations

import numpy as np
import torch

from paperzoo.core.experiment import Claim, Outcome, RunContext
from paperzoo.core.margins import all_of, bootstrap_mean, unpaired_difference
from paperzoo.core.tasks import TaskModelConfig, TaskTraining, train_on_task
from paperzoo.phenomena.broader_icl import (CONTENT, FORMS, TASKS_PER_SEQUENCE, ContextForms, zipf,
                                            context_benefit, token_losses, window_means)

BAR = 0.05  # nats: precondition tolerances
EARLY, LATE = slice(1, 25), slice(73, 97)
ICL_FORMS = tuple(f for f in FORMS if f != "iid")


def zipf_entropy() -> float:
    p = zipf(CONTENT)
    return float(-(p * p.log()).sum())


def preconditions(m: dict) -> dict[str, bool | None]:
    return {
        f"the outer loop was learned: i.i.d. loss within {BAR} nats of the Zipf entropy":
            abs(m["iid_loss"] - m["zipf_entropy"]) <= BAR,
        f"the measure does not invent context use: the i.i.d. control's benefit interval does not lie above {BAR}":
            m["benefit"]["iid"]["interval"][0] <= BAR,
    }


def _above_zero(interval) -> bool | None:
    lo, hi = interval
    return True if lo > 0 else False if hi < 0 else None


def checks(m: dict) -> dict[str, bool | None]:
    return {
        "every form shows in-context learning: informative-position loss falls from the first to the last quarter "
        "by more than on the i.i.d. control (interval above 0) for key-value maps, names, topics, series and "
        "multi-task sequences":
            all_of(_above_zero(m["benefit"][f]["over_control"]) for f in ICL_FORMS),
        "later tasks need fewer examples: the fourth task's value loss lies below the first task's (interval above 0)":
            _above_zero(m["meta"]["first_minus_last"]["interval"]),
    }


CLAIM = Claim(
    statement=(
        "An illustration of a position paper: in-context learning is any drop in next-token loss bought by earlier "
        "context in the same sequence, and it arises in many forms at once (few-shot maps, coreference, topics, time "
        "series, several tasks in a row) as the inner loop of what training on such sequences learns; in meta-ICL "
        "later tasks need fewer examples."
    ),
    predicate=(
        "One two-layer transformer trained on an even mixture of six synthetic forms. Per form, the mean loss over "
        "informative positions in the first quarter minus the last (95% bootstrap interval over 400 held-out "
        "sequences). (1) Above the i.i.d. control's for all five ICL forms; (2) in four-task sequences, the first task's value loss "
        "minus the fourth's is above 0. Judged only if the i.i.d. control's loss is within 0.05 nats of its entropy "
        "and its benefit interval does not lie above 0.05 (preconditions)."
    ),
    checks=checks,
    preconditions=preconditions,
    source="arXiv:2412.03782, section 1 (the definition: loss lowered by earlier context), section 2 (forms of ICL "
           "beyond few-shot, including time series and meta-ICL) and section 3 (coreference, topics); the review "
           "(seed line 3566). The paper states no numbers; the bars are ours.",
)

INPUTS: tuple = ()
SUBSTRATE: tuple = ()
SEED_VARIES = "the model's initialisation, its training sequences and the held-out sequences (the topics are fixed)"

_COMMON = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "lr": 3e-3, "batch_size": 32}
SCALES = {
    "smoke": {**_COMMON, "steps": 20, "per_form": 20},
    "small": {**_COMMON, "steps": 1500, "per_form": 400},
    "large": {**_COMMON, "steps": 6000, "per_form": 1000},
}


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    task = ContextForms()
    model, history = train_on_task(task, TaskModelConfig(s["hidden_size"], s["num_layers"], s["num_heads"]),
                                   TaskTraining(s["steps"], s["batch_size"], s["lr"]), seed=ctx.seed)
    batch, meta = task.sample_with_meta(s["per_form"] * len(FORMS), seed=10**9 + 31 * ctx.seed + 7)
    losses = token_losses(model, batch.tokens)
    benefit, curves, per_sequence = {}, {}, {}
    for f, name in enumerate(FORMS[::-1]):  # the control first: every form is compared with it
        rows = meta.form == FORMS.index(name)
        interval, per_sequence[name] = context_benefit(model, batch.tokens[rows], meta.informative[rows], EARLY, LATE,
                                                       losses[rows])
        over = unpaired_difference(per_sequence[name], per_sequence["iid"])
        benefit[name] = {"mean": interval.mean, "interval": [interval.low, interval.high],
                         "over_control": [over.low, over.high]}
        info = meta.informative[rows]
        masked = torch.where(info, losses[rows], torch.full_like(losses[rows], float("nan")))
        counts = info.sum(0)
        means = masked.nan_to_num().sum(0) / counts.clamp(min=1)
        curves[name] = [float(v) if c else None for v, c in zip(means, counts)]
    rows = meta.form == FORMS.index("tasks")
    per_task = np.stack([window_means(losses[rows], meta.task[rows] == j, slice(None))
                         for j in range(TASKS_PER_SEQUENCE)])  # [task, sequence]
    gap = bootstrap_mean(per_task[0] - per_task[-1])
    first = first_presentations(batch.tokens[rows], meta.task[rows])
    iid = meta.form == FORMS.index("iid")
    metrics = {
        "benefit": benefit, "curves": curves,
        "iid_loss": float(losses[iid][:, 1:].mean()), "zipf_entropy": zipf_entropy(),
        "meta": {"task_value_loss": per_task.mean(axis=1).tolist(),
                 "first_value_loss": [float(losses[rows][first & (meta.task[rows] == j)].mean())
                                      for j in range(TASKS_PER_SEQUENCE)],
                 "first_minus_last": {"mean": gap.mean, "interval": [gap.low, gap.high]}},
        "final_train_loss": float(np.mean(history["train_loss"][-50:])), "train_seconds": history["seconds"],
    }
    for name in FORMS:
        metrics[f"benefit_{name}"] = benefit[name]["mean"]
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def first_presentations(tokens: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """[n, T] bool: value positions whose key appears for the first time in its task."""
    first = torch.zeros_like(task, dtype=torch.bool)
    for i in range(len(tokens)):
        seen: set[tuple[int, int]] = set()
        for t in (task[i] >= 0).nonzero().flatten().tolist():
            key = (int(task[i, t]), int(tokens[i, t - 1]))
            first[i, t] = key not in seen
            seen.add(key)
    return first


def plot(fig, m: dict) -> None:
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    for name in FORMS:
        y = np.array([np.nan if v is None else v for v in m["curves"][name]])
        x = np.arange(len(y))
        ok = ~np.isnan(y)
        k = 8  # a running mean over 8 informative positions, for legibility
        smooth = np.convolve(y[ok], np.ones(k) / k, mode="valid")
        left.plot(x[ok][k - 1:], smooth, label=name, ls=":" if name == "iid" else "-")
    for w in (EARLY, LATE):
        left.axvspan(w.start, w.stop - 1, color="grey", alpha=0.1)
    left.set(xlabel="position", ylabel="loss at informative positions (nats)", title="loss falls with context")
    left.legend(fontsize=7)
    j = np.arange(1, TASKS_PER_SEQUENCE + 1)
    right.plot(j, m["meta"]["task_value_loss"], "-o", label="all values")
    right.plot(j, m["meta"]["first_value_loss"], "-s", label="first value of each key")
    right.set(xlabel="task in the sequence", ylabel="loss (nats)", title="meta-ICL", xticks=j)
    right.legend(fontsize=7)
