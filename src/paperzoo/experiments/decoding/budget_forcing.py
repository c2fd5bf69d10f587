"""Reproduction of 2501.19393 (budget forcing): accuracy against the thinking budget, forced both ways.

On the cached small reasoner and held-out problems, greedy decoding as in the paper:
(a) forced early stops -- the end-of-thinking delimiter is appended once the
thinking budget is used up -- at several budgets, and no cap; (b) forced extensions
-- the delimiter is suppressed and "Wait" appended, N = 0 .. 4 times (a generous cap
of thinking tokens keeps runaway traces finite). As an ablation from the paper
(its "no string" row), extensions that only suppress the delimiter.

The reasoner was trained on correct traces only and never saw "Wait": whether an
extension makes it re-check its work, as s1-32B does, is exactly what is measured.
"""

from __future__ import annotations

import numpy as np

from paperzoo.core.experiment import Claim, ExperimentError, Outcome, RunContext
from paperzoo.core.reasoning import END_THINK, extract_answer, problems, reasoner
from paperzoo.decoding.budget_forcing import budget_force_batch, scaling


def _points(rows: list[dict], kind: str) -> list[tuple[float, float]]:
    return [(r["thinking_tokens"], r["accuracy"]) for r in rows if r["kind"] == kind]


def checks(m: dict) -> dict[str, bool | None]:
    by_n = {r["N"]: r["accuracy"] for r in m["rows"] if r["kind"] == "wait"}
    extension_scaling = m["scaling_wait"]
    flattening = None
    if extension_scaling is not None and extension_scaling > 0 and {0, 2, 4} <= set(by_n):
        flattening = by_n[4] - by_n[2] <= by_n[2] - by_n[0]
    return {
        "budget forcing keeps every capped run within its thinking budget (Control = 100%)": m["control"] == 1.0,
        "accuracy rises with the forced-stop thinking budget (Scaling > 0)":
            None if m["scaling_cap"] is None else m["scaling_cap"] > 0,
        "forced 'Wait' extensions raise accuracy (Scaling over N = 0..4 > 0)":
            None if extension_scaling is None else extension_scaling > 0,
        "gains flatten: N = 2 -> 4 adds no more than N = 0 -> 2": flattening,
    }


CLAIM = Claim(
    statement=(
        "Budget forcing -- appending the end-of-thinking delimiter once a thinking budget is spent, or "
        "suppressing it and appending 'Wait' to make the model think longer -- controls test-time "
        "compute exactly (Control 100%) and scales accuracy with it: s1-32B goes from 50% to 57% on AIME24 "
        "when the end of thinking is suppressed, with gains flattening after a few (about four to six) "
        "extensions; capping thinking lower lowers accuracy."
    ),
    predicate=(
        "Greedy decoding with the small reasoner on held-out problems: (1) every capped run stays within "
        "its budget; (2) the paper's Scaling metric (mean pairwise slope of accuracy against mean thinking "
        "tokens) is positive over forced early stops at budgets 0 .. 48 tokens plus no cap; (3) it is "
        "positive over N = 0 .. 4 forced 'Wait' extensions; (4) if extensions help, the gain from N = 2 "
        "to 4 is at most the gain from N = 0 to 2 (undecided otherwise)."
    ),
    checks=checks,
)

# What a user may swap in (--model / --corpus), and the shared cached models this runs on.
INPUTS = ()
SUBSTRATE = ('reasoner',)

SCALES = {
    "smoke": {"reasoner": "smoke", "problems": 6, "caps": [0, 4, 8], "extensions": [0, 1, 2, 4],
              "thinking_cap": 32, "max_answer_tokens": 12, "continuation": "Wait"},
    "small": {"reasoner": "small", "problems": 256, "caps": [0, 4, 8, 12, 16, 24, 32, 48],
              "extensions": [0, 1, 2, 3, 4], "thinking_cap": 128, "max_answer_tokens": 16, "continuation": "Wait"},
}


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    if ctx.model is not None:
        raise ExperimentError("budget-forcing runs on paperzoo's reasoner and its tasks; --model is not supported")
    r = reasoner(s["reasoner"], seed=0)
    qs = problems(s["problems"], "test", seed=ctx.seed)
    prompts = [q.prompt for q in qs]
    cap_all = s["thinking_cap"]

    def measure(kind: str, cap: int | None, N: int, continuation: str) -> dict:
        gens = budget_force_batch(r.model, r.tokenizer, prompts, max_thinking_tokens=cap, num_extensions=N,
                                  continuation=continuation, end_of_thinking=END_THINK,
                                  max_answer_tokens=s["max_answer_tokens"],
                                  max_new_tokens=(cap if cap is not None else cap_all) + s["max_answer_tokens"] + 2)
        thinking = [g.stats["thinking_tokens"] for g in gens]
        return {
            "kind": kind, "cap": cap, "N": N,
            "accuracy": float(np.mean([extract_answer(g.text) == q.answer for g, q in zip(gens, qs)])),
            "thinking_tokens": float(np.mean(thinking)),
            "within_cap": None if cap is None else float(np.mean([t <= cap for t in thinking])),
            "forced_stop_share": float(np.mean([g.stats["forced_stop"] for g in gens])),
            "extensions_used": float(np.mean([g.stats["extensions"] for g in gens])),
            "answered_share": float(np.mean([extract_answer(g.text) is not None for g in gens])),
            "forward_passes": gens[0].forward_passes,
            "example": gens[0].text,
        }

    rows = [measure("cap", c, 0, s["continuation"]) for c in s["caps"]]
    rows.append(measure("cap", None, 0, s["continuation"]))  # no cap: the model stops when it likes
    rows += [measure("wait", cap_all, N, s["continuation"]) for N in s["extensions"]]
    rows += [measure("no-string", cap_all, N, "") for N in s["extensions"] if N > 0]
    capped = [row["within_cap"] for row in rows if row["kind"] == "cap" and row["cap"] is not None]
    metrics = {
        "model": r.name,
        "problems": len(qs),
        "rows": rows,
        "control": float(np.mean(capped)),
        "scaling_cap": scaling(_points(rows, "cap")),
        "scaling_wait": scaling(_points(rows, "wait")),
        "scaling_no_string": scaling(_points(rows, "no-string") + _points(rows, "wait")[:1]),
    }
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def plot(fig, m: dict) -> None:
    ax, ext = fig.subplots(1, 2)
    caps = [r for r in m["rows"] if r["kind"] == "cap"]
    ax.plot([r["thinking_tokens"] for r in caps], [r["accuracy"] for r in caps], "-o", color="tab:blue")
    labels: dict[tuple[float, float], list[str]] = {}  # budgets the model never reaches share a point
    for r in caps:
        labels.setdefault((r["thinking_tokens"], r["accuracy"]), []).append(
            "no cap" if r["cap"] is None else f"cap {r['cap']}")
    for xy, names in labels.items():
        ax.annotate(", ".join(names), xy, fontsize=7, textcoords="offset points", xytext=(3, -10))
    ax.set(xlabel="mean thinking tokens", ylabel="accuracy",
           title=f"Forced early stops (Scaling {m['scaling_cap']:.4f}/token)" if m["scaling_cap"] is not None
           else "Forced early stops")
    wait0 = [r for r in m["rows"] if r["kind"] == "wait" and r["N"] == 0]
    for kind, colour, label in (("wait", "tab:red", "append 'Wait'"), ("no-string", "tab:grey", "suppress only")):
        pts = ([] if kind == "wait" else wait0) + [r for r in m["rows"] if r["kind"] == kind]
        ext.plot([r["N"] for r in pts], [r["accuracy"] for r in pts], "-o", color=colour, label=label)
        for r in pts:
            ext.annotate(f"{r['thinking_tokens']:.0f} tok", (r["N"], r["accuracy"]), fontsize=7, color=colour,
                         textcoords="offset points", xytext=(3, 4))
    ext.set(xlabel="forced extensions N (end of thinking suppressed N times)", ylabel="accuracy",
            title="Forced extensions")
    ext.legend(fontsize=8)
