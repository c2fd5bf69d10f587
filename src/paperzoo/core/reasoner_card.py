"""The v2 reasoner's card: measures on completions, and the properties issue 10 (A) asks for.

Every measure takes completions as strings (what `core.sampling.sample` returns in
`Sample.text`: the text after the prompt, special tokens kept), so each is checked by
hand on completions with known answers (tests/test_reasoning_v2.py).

- **Accuracy per tier**: the exact verifier (`reasoning.is_correct`: the integer after
  the last ``Answer:``), averaged within each tier of `reasoning_tasks.TIERS`.
- **pass@k**: the unbiased estimator of Chen et al. (2107.03374, eq. 1) from n samples of
  which c are right, $1 - \\binom{n-c}{k} / \\binom{n}{k}$.
- **Majority vote**: the most frequent extracted answer among a problem's samples
  (samples without an answer do not vote; a tie goes to the answer seen first).
- **Re-checks**: a thinking line that starts with ``Wait``; version 4 writes it
  ``Wait, <the step redone>, right.`` or ``..., not <the first result>.``. A re-check
  *fixed* a step when the work line before it is arithmetically wrong and the step it
  redoes (same operands) is right; it *kept* a step when the line before it is right and
  the redo is too. A work line is ``[lead]a op b: columns so r``; it is right when r = a+b,
  a-b, a*b, or a/b exactly, whatever its columns say.
- **Style**: *verbose* when a thinking line starts with ``Check:`` or ``Step ``, else *terse*.
- **Thinking length**: the completion before ``</think>`` (or before EOS, or all of it),
  in characters and in tokens of the given tokenizer.

`card(model, tokenizer, n)` samples greedy and at temperature 1 on `n` held-out ladder
problems and returns these figures with pass/fail against the targets of issue 10 A.1,
A.2 and A.5 (`TARGETS`); A.3 and A.4 are recorded without a target.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from paperzoo.core.reasoning import END_THINK, EOS, extract_answer, is_correct
from paperzoo.core.reasoner import CHECK, STEP, TIERS, WAIT, TierSpec, ladder_problems, trace
from paperzoo.core.sampling import check_positions, max_positions, sample
from paperzoo.core.training import progress

_WORK = re.compile(r"(?:\d*x(?:[+-]\d+)?=)?(\d+)([+\-*/])(\d+): (.*?) ?so (-?\d+)")
_WAIT = re.compile(re.escape(WAIT) + r",? *(.*?)(?:, (right|not)(?: -?\d+)?\.?)?")  # fullmatch: redo, verdict


# ---------------------------------------------------------------------------------------------
# Reading a completion


def thinking(completion: str) -> str:
    """The thinking part of a completion: everything before the first ``</think>`` (EOS removed)."""
    return completion.split(END_THINK, 1)[0].split(EOS, 1)[0]


def thinking_length(completion: str, tokenizer=None) -> int:
    """Length of the thinking part in characters, or in `tokenizer`'s tokens when one is given."""
    text = thinking(completion)
    if tokenizer is None:
        return len(text)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class WorkLine:
    a: int
    op: str
    b: int
    stated: int

    @property
    def right(self) -> bool:
        if self.op == "+":
            return self.a + self.b == self.stated
        if self.op == "-":
            return self.a - self.b == self.stated
        if self.op == "*":
            return self.a * self.b == self.stated
        return self.b != 0 and self.b * self.stated == self.a

    @property
    def operands(self) -> tuple[int, str, int]:
        return self.a, self.op, self.b


def parse_work(line: str) -> WorkLine | None:
    """The step a scratchpad line does (``37+48: 7+8=15 3+4+1=8 so 85``), or None if it is not one."""
    m = _WORK.fullmatch(line.strip())
    return None if m is None else WorkLine(int(m[1]), m[2], int(m[3]), int(m[5]))


@dataclass(frozen=True)
class Recheck:
    """One ``Wait`` line: the work it follows (`before`), the work it redoes (`after`) and its verdict.

    Each is None when absent; `verdict` is "right" or "not".
    """

    before: WorkLine | None
    after: WorkLine | None
    verdict: str | None = None

    @property
    def on_wrong_step(self) -> bool:
        return self.before is not None and not self.before.right

    @property
    def fixed(self) -> bool:
        """The re-check turned a wrong step into a right one on the same operands."""
        return (self.on_wrong_step and self.after is not None and self.after.right
                and self.after.operands == self.before.operands)

    @property
    def on_right_step(self) -> bool:
        return self.before is not None and self.before.right

    @property
    def kept(self) -> bool:
        """The re-check redid a right step right (same operands)."""
        return (self.on_right_step and self.after is not None and self.after.right
                and self.after.operands == self.before.operands)


def rechecks(completion: str) -> list[Recheck]:
    """Every re-check in the thinking part, in order."""
    out, last = [], None
    for line in thinking(completion).split("\n"):
        if line.startswith(WAIT):
            m = _WAIT.fullmatch(line)
            after = parse_work(m[1]) if m else None
            out.append(Recheck(last, after, m[2] if m else None))
            last = after if after is not None else last
        elif (work := parse_work(line)) is not None:
            last = work
    return out


def style_of(completion: str) -> str:
    """"verbose" when the thinking restates or checks a step (a line starting ``Step `` or ``Check:``), else "terse"."""
    lines = thinking(completion).split("\n")
    return "verbose" if any(line.startswith((f"{STEP} ", CHECK)) for line in lines) else "terse"


# ---------------------------------------------------------------------------------------------
# Sampling statistics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c right: 1 - C(n-c, k) / C(n, k)."""
    if not (1 <= k <= n and 0 <= c <= n):
        raise ValueError(f"need 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_answer(completions: Sequence[str]) -> int | None:
    """The most frequent answer among `completions` (those without one do not vote; ties: first seen)."""
    votes = Counter(a for a in map(extract_answer, completions) if a is not None)
    return votes.most_common(1)[0][0] if votes else None


def mean_by_tier(tiers: Sequence[int], values: Sequence[float], num_tiers: int) -> list[float | None]:
    """Mean of `values` within each tier 0..num_tiers-1 (None for a tier with no problem)."""
    if len(tiers) != len(values):
        raise ValueError(f"tiers and values must have the same length, not {len(tiers)} and {len(values)}")
    out = []
    for t in range(num_tiers):
        vs = [v for tier, v in zip(tiers, values) if tier == t]
        out.append(sum(vs) / len(vs) if vs else None)
    return out


# ---------------------------------------------------------------------------------------------
# Targets (issue 10, A.1, A.2, A.5); k is the number of samples per problem, 16 in the issue and in `card`.

TARGETS = {
    "easiest tier greedy accuracy": ">= 0.90",
    "hardest tier greedy accuracy": "<= 0.40",
    "overall greedy accuracy": "in [0.40, 0.75]",
    "greedy accuracy falls with tier": "non-increasing",
    "hardest tier pass@k / pass@1": ">= 1.5",
    "majority@k - greedy (points)": ">= 5",
    "thinking length grows with tier": "strictly increasing",
}


def judge(greedy_by_tier: Sequence[float], greedy_overall: float, hardest_pass1: float, hardest_passk: float,
          majority_overall: float, chars_by_tier: Sequence[float]) -> dict:
    """Each target of `TARGETS` with its measured value and whether it passes."""
    ratio = hardest_passk / hardest_pass1 if hardest_pass1 > 0 else (math.inf if hardest_passk > 0 else math.nan)
    pairs = list(zip(greedy_by_tier, greedy_by_tier[1:]))
    lengths = list(zip(chars_by_tier, chars_by_tier[1:]))
    eps = 1e-9  # bounds are inclusive; figures are ratios of counts, so allow for rounding at the bound
    points = 100 * (majority_overall - greedy_overall)
    values = {
        "easiest tier greedy accuracy": (greedy_by_tier[0], greedy_by_tier[0] >= 0.90 - eps),
        "hardest tier greedy accuracy": (greedy_by_tier[-1], greedy_by_tier[-1] <= 0.40 + eps),
        "overall greedy accuracy": (greedy_overall, 0.40 - eps <= greedy_overall <= 0.75 + eps),
        "greedy accuracy falls with tier": (list(greedy_by_tier), all(b <= a + eps for a, b in pairs)),
        "hardest tier pass@k / pass@1": (ratio, ratio >= 1.5 - eps),  # nan >= 1.5 is False
        "majority@k - greedy (points)": (points, points >= 5 - eps),
        "thinking length grows with tier": (list(chars_by_tier), all(b > a for a, b in lengths)),
    }
    return {name: {"value": v, "target": TARGETS[name], "pass": bool(ok)} for name, (v, ok) in values.items()}


# ---------------------------------------------------------------------------------------------
# The card


def _rounded(x):
    if isinstance(x, float):
        return round(x, 5)
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


def default_budget(model, tokenizer, problems) -> int:
    """New tokens for the longest trace of these problems (verbose, both re-checks) and a quarter more, within positions."""
    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    rng = random.Random(0)
    longest = max(count(trace(p, "verbose", rng, reflect=True, confirm=True)) for p in problems)
    budget = int(1.25 * longest) + 8
    limit = max_positions(model)
    if limit is not None:
        budget = min(budget, limit - max(count(p.prompt) for p in problems))
    return budget


def card(model, tokenizer, n: int = 500, samples: int = 16, temperature: float = 1.0,
         max_new_tokens: int | None = None, tiers: Sequence[TierSpec] = TIERS, seed: int = 0,
         batch_size: int = 128, desc: str = "measuring a reasoner's card") -> dict:
    """The measured properties of a reasoner on `n` held-out ladder problems (tiers in turn), with pass/fail.

    Greedy once per problem and `samples` samples at `temperature` (pass@1, pass@k with
    k = `samples`, majority@`samples`, re-checks and styles are read from the samples).
    A progress bar counts problems.
    """
    if n < len(tiers):
        raise ValueError(f"n must be at least the number of tiers ({len(tiers)}), not {n}")
    if samples < 1 or temperature <= 0:
        raise ValueError(f"need samples >= 1 and temperature > 0, got {samples} and {temperature}")
    problems = ladder_problems(n, "test", seed=seed, tiers=tiers)
    prompts = [p.prompt for p in problems]
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1 (or None for the default budget), not {max_new_tokens}")
    budget = max_new_tokens or default_budget(model, tokenizer, problems)
    if budget < 1:
        raise ValueError("the model has no positions left for a completion after the longest prompt")
    check_positions(model, max(len(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in prompts), budget)
    greedy, drawn = [], []
    chunk = max(1, batch_size // samples)
    with progress(desc) as bar:
        task = bar.add_task(desc, total=n, status="")
        for start in range(0, n, chunk):
            part = prompts[start:start + chunk]
            greedy += [s.text for s in sample(model, tokenizer, part, temperature=0, max_new_tokens=budget,
                                              batch_size=batch_size)]
            drawn += [s.text for s in sample(model, tokenizer, part, num_samples=samples, temperature=temperature,
                                             max_new_tokens=budget, seed=seed * 100_003 + start,
                                             batch_size=batch_size)]
            bar.update(task, advance=len(part))
    result = summarize(problems, greedy, drawn, samples, tokenizer, num_tiers=len(tiers))
    return _rounded({"problems": n, "samples": samples, "temperature": temperature, "max_new_tokens": budget,
                     "tiers": [asdict(t) for t in tiers], **result})


def compact(measured: dict) -> dict:
    """A card without its per-problem lists: what a model's record and every experiment's record keep."""
    return {k: v for k, v in measured.items() if k != "per_problem"}


def summarize(problems: Sequence, greedy: Sequence[str], drawn: Sequence[str], samples: int, tokenizer=None,
              num_tiers: int = len(TIERS)) -> dict:
    """The card's figures from completions: `greedy` one per problem, `drawn` `samples` per problem, grouped by problem.

    Thinking tokens are counted with `tokenizer` (characters when None).
    """
    n = len(problems)
    if n == 0 or len(greedy) != n or len(drawn) != n * samples:
        raise ValueError(f"need one greedy and {samples} drawn completions per problem ({n} problems), got "
                         f"{len(greedy)} and {len(drawn)}")
    per_problem = [drawn[i * samples:(i + 1) * samples] for i in range(n)]
    tier = [p.tier for p in problems]
    nt = num_tiers
    greedy_right = [float(is_correct(p, g)) for p, g in zip(problems, greedy)]
    right = [[is_correct(p, c) for c in cs] for p, cs in zip(problems, per_problem)]
    pass1 = [pass_at_k(samples, sum(r), 1) for r in right]
    passk = [pass_at_k(samples, sum(r), samples) for r in right]
    majority = [float(majority_answer(cs) == p.answer) for p, cs in zip(problems, per_problem)]
    chars = [float(thinking_length(g)) for g in greedy]
    tokens = [float(thinking_length(g, tokenizer)) for g in greedy]

    events = [rechecks(c) for c in drawn]
    all_events = [e for es in events for e in es]
    on_wrong = [e for e in all_events if e.on_wrong_step]
    on_right = [e for e in all_events if e.on_right_step]
    styles = [style_of(c) for c in drawn]
    flat_right = [r for rs in right for r in rs]
    style_figures = {}
    for style in ("terse", "verbose"):
        idx = [i for i, s in enumerate(styles) if s == style]
        style_figures[style] = {
            "share": len(idx) / len(drawn),
            "accuracy": sum(flat_right[i] for i in idx) / len(idx) if idx else None,
            "thinking_chars": sum(thinking_length(drawn[i]) for i in idx) / len(idx) if idx else None,
        }

    g_tier = mean_by_tier(tier, greedy_right, nt)
    p1_tier, pk_tier = mean_by_tier(tier, pass1, nt), mean_by_tier(tier, passk, nt)
    chars_tier = mean_by_tier(tier, chars, nt)
    g_all, maj_all = sum(greedy_right) / n, sum(majority) / n
    result = {
        "greedy_accuracy": g_all, "greedy_accuracy_by_tier": g_tier,
        "pass@1": sum(pass1) / n, "pass@1_by_tier": p1_tier,
        f"pass@{samples}": sum(passk) / n, f"pass@{samples}_by_tier": pk_tier,
        f"majority@{samples}": maj_all, f"majority@{samples}_by_tier": mean_by_tier(tier, majority, nt),
        "thinking_chars_by_tier": chars_tier, "thinking_tokens_by_tier": mean_by_tier(tier, tokens, nt),
        "recheck": {
            "greedy_rate": sum(bool(rechecks(g)) for g in greedy) / n,
            "sampled_rate": sum(bool(es) for es in events) / len(drawn),
            "rechecks": len(all_events), "on_wrong_step": len(on_wrong),
            "fixed": sum(e.fixed for e in on_wrong),
            "fix_rate": sum(e.fixed for e in on_wrong) / len(on_wrong) if on_wrong else None,
            "on_right_step": len(on_right), "kept": sum(e.kept for e in on_right),
            "keep_rate": sum(e.kept for e in on_right) / len(on_right) if on_right else None,
        },
        "style": style_figures,
        "per_problem": {"tier": tier, "greedy_correct": greedy_right, "pass@1": pass1},
    }
    result["targets"] = judge([x if x is not None else math.nan for x in g_tier], g_all,
                              p1_tier[-1] or 0.0, pk_tier[-1] or 0.0, maj_all,
                              [x if x is not None else math.nan for x in chars_tier])
    return result
