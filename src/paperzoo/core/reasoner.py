"""The shared tiny reasoner (version 5): a difficulty ladder, two solution paths, two trace styles, re-checks.

Test-time-compute, RL and fine-tuning papers make claims about models that reason step
by step, are right on easy problems and wrong on hard ones, sometimes catch their own
mistakes, and improve when sampled more. This module builds such a model once: the
problems (`problems`), the traces it trains on (`trace`, `training_texts`), the recipe
(`REASONERS`, `DRAFTS`) and the cached models (`reasoner`, `draft_reasoner`), on the
prompt format, verifier and tokenizer of `paperzoo.core.reasoning`.
`paperzoo.core.reasoner_card` measures a trained model against issue 10's targets; the
card is measured when the model is built and kept in its training record.

**The ladder.** Each problem has a tier, from easiest to hardest (`TIERS`, data that a
recipe search may change):

====  ==========  =================================================================
tier  kind        problem
====  ==========  =================================================================
0     chain       two ``+``/``-`` operations on two-digit numbers: ``37+48-19``
1     bracket     ``a(x +- d) = c`` (a one digit, x and d two): ``7(x+12)=742``
2     bracket     the same with x and d of three digits and a right side that is a chain of two
                  more operations: ``9(x-349)=7319-708+402``
3     bracket     the same with four digits, values up to 99,999: ``8(x-7629)=46384-3110-8378``
====  ==========  =================================================================

How the ladder was chosen (on the card, issue 10 A.1, A.2 and A.5, never on a paper's
verdict): a first version had a chain of 4-5 operations on two- and three-digit numbers
as its top tier. Trained for 830 steps the reasoner solved it 4% of the time (greedy),
below the equations (16%); trained for 1600 steps, 92%, far above the equations (42%):
column addition is one algorithm repeated, which a small transformer learns, while long
division is not. So the top tiers became equations (version 2: ``7x+25=683``, and the same
with a chain on its right side). Version 2 met every target but two: overall greedy
accuracy 0.764 (target at most 0.75) and majority@16 no better than greedy (+0.2 points,
target +5). Its errors were all in the long division, and a problem's samples followed the
one path greedy decoding took, so they shared its errors and a vote could not outvote
them. Version 3 gives the equation tiers **two solution paths**, as a problem solved by a
person or a reasoning LLM has several: *divide first* (``x+12=742/7``, ``x=106-12``) or
*expand first* (``12*7``, ``7x=742-84``, ``x=658/7``); each training trace takes one, half
the time each, and the paths divide different numbers. On the v2 ladder's shape (one- and
two-operation chains, then the bracket equations of tiers 1 and 2 above) that lifted
majority@16 over greedy from +0.2 to +4.6 points (tier by tier: 0, 0, +12.8, +5.6), but
the equations became easier (greedy [1.00, 1.00, 0.78, 0.68], overall 0.866), so the
one-operation tier was dropped and the four-digit tier added. Questions keep the v1 rule
for held-out problems (`Problem.held_out` on the question).

**The scratchpad** writes one operation per line, digit by digit in the order a small
transformer can compute them, then the plain result:

- addition, least-significant column first, the carry written into the next column:
  ``37+48: 7+8=15 3+4+1=8 so 85``;
- subtraction, least-significant first; a column that borrows adds ``+10`` and the
  next column subtracts the borrow: ``85-19: 5-9+10=6 8-1-1=6 so 66``;
- multiplication by one digit, least-significant first, the carry added into the next
  column: ``12*7: 2*7=14 1*7+1=8 so 84``;
- division by one digit, long division most-significant first, ``cur/a=q r rem``:
  ``x=684/9: 6/9=0r6 68/9=7r5 54/9=6r0 so 76``.

Missing digits of the shorter operand are written as 0. A bracket equation's right-side
chain comes first, then its path: ``x+12=742/7: ... so 106`` and ``x=106-12: ... so 94``, or
``12*7: ... so 84``, ``7x=742-84: ... so 658`` and ``x=658/7: ... so 94``. (`equation`, the
v2 kind ``a x +- b = c``, has one path: ``7x=683-25``, then ``x=658/7``.) After ``</think>``
the answer is plain: ``Answer: 94``.

**Styles.** *terse* is the scratchpad alone. *verbose* restates the state before each
step (``Step 2 of 3: 85-19+23``) and verifies each result by the inverse operation
(``Check: 66+19=85, right.``), about 2.5x longer. Training data draws the style per
trace with a stated share (default 20% verbose); nothing in the prompt says which.

**Re-checks.** A *reflective* trace holds one wrong step, always really wrong, followed
by a line that starts with ``Wait``, redoes the step right and says the first result was
not it; later steps continue from the right value:
``37+48: 7+8=15 3+4=7 so 75`` / ``Wait, 37+48: 7+8=15 3+4+1=8 so 85, not 75.``
The error is one a column-wise reasoner makes: a dropped carry, borrow or remainder, or
a column result off by one. A *confirming* trace re-checks one right step the same way and
finds it right: ``37+48: 7+8=15 3+4+1=8 so 85`` / ``Wait, 37+48: 7+8=15 3+4+1=8 so 85, right.``
Training data draws each per trace with a stated share (default 15% each, independently;
a trace with both may re-check its correction). The wrong line itself is left out of the
loss (`TraceMix.mask_wrong_step`, labels -100): the model learns to re-check after an
error, not to make errors on purpose. Trained on the wrong line too (the first recipe),
sampled traces at temperature 1 wrote a wrong step in about 12% of samples and fixed only
a fifth of them, so samples were much worse than greedy decoding and majority voting could
not beat it. Validation loss still scores the wrong lines.

Why version 4 (issue 10, A.3). In version 3 a re-check named the wrong column first
(``Wait, 3+4+1=8, not 3+4=7. 37+48: ...``) and only ever followed a wrong step, as in
that recipe's 15% of reflective traces. A ``Wait`` forced after right work (budget
forcing, 2501.19393) was then read as "the last step was wrong": the model re-checked
72-76% of the time but rewrote right answers, and one forced ``Wait`` took accuracy from
0.69-0.77 to 0.47-0.48. The reasoning traces s1 and its peers train on use "Wait" both
to correct and to confirm, so version 4 adds confirming re-checks, and every re-check
first redoes the step and only then judges it, so that the judgement can rest on the redo.
Nothing else changed: ladder, paths, styles, model and training run are version 3's.

Why version 5 (issue 10, A.1 and A.6). Version 4 trained for 2400 steps and was too capable
for its ladder (greedy accuracy 0.52 on the hardest tier, 0.846 overall) and over the
15-minute budget (999 s). Version 5 is the same data and model trained for 2000 steps
(851 s): greedy 0.97, 0.86, 0.55, 0.28 by tier, 0.666 overall, the whole ladder met. Its
samples are weaker, so a vote over 16 no longer beats greedy decoding (-1.8 points; version
4: +7.4). Harder top tiers (a five-operation bracket) made greedy decoding sharper and
samples no better; see the recipe notes beside `REASONERS`.

**Its attention span.** Every recipe so far trains on 256-token blocks of packed traces, so
the model has never attended across more than 255 tokens, and past that its text degrades:
a fine-tune that taught it four solution rounds (300-580 tokens) turned it to digit soup
until it was trained on 512-token blocks (`experiments.decoding.overthinking_efficiency`),
and long samples (re-checks, the verbose style) lose to greedy decoding partly for this
reason (candidate L beside `REASONERS`). An experiment that makes it write longer trains
on longer blocks.

**Training.** `ReasonerSpec` holds the model, the training run, the style and
reflection shares and the tier mix; `train_reasoner` trains one and returns (model,
record). `reasoner(scale)` and `draft_reasoner(scale)` train on first use (with a
progress bar) and cache the result keyed by the spec and the tokenizer; the target's
record carries its card (`reasoner_card.card`). How the `small` recipe was chosen is
written beside `REASONERS`.
"""

from __future__ import annotations

import random
import re
import time
from itertools import zip_longest
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from paperzoo.core import store
from paperzoo.core.models import TinyLMConfig, load_trained, save_trained
from paperzoo.core.reasoning import ANSWER, CHARACTERS, END_THINK, SPECIAL_TOKENS, Problem, reasoning_tokenizer
from paperzoo.core.training import TrainConfig, token_blocks, train, training_device

STYLES = ("terse", "verbose")
WAIT = "Wait"
CHECK = "Check:"
STEP = "Step"


CHAIN_CAP = 9999  # by default a chain adds only while the running value stays at most this


@dataclass(frozen=True)
class TierSpec:
    """One rung of the ladder.

    `kind` "chain": `ops` (low, high) operations whose operands have `digits` (low, high) digits.
    `kind` "equation": ``a x +- b = c`` with a in 2..9 and x, b of `digits` digits, solved in two steps; with
    `ops` above (2, 2), the right side is a chain of `ops - 2` more operations (``7x+25=683-19+244``), worked
    out first.
    `kind` "bracket": ``a(x +- d) = c`` with a in 2..9 and x, d of `digits` digits, and a right side like an
    equation's; it has two solution paths (`LadderProblem.paths`): divide first (two steps) or expand first
    (three steps).
    """

    kind: str
    ops: tuple[int, int]
    digits: tuple[int, int]
    cap: int = CHAIN_CAP  # a chain's values, and an equation's right side, stay at most this

    def __post_init__(self):
        if self.kind not in ("chain", "equation", "bracket"):
            raise ValueError(f"kind must be 'chain', 'equation' or 'bracket', not {self.kind!r}")
        lo, hi = self.ops
        if not 1 <= lo <= hi or (self.kind != "chain" and lo < 2):
            raise ValueError(f"ops must be (low, high) with 1 <= low <= high (2 <= low for an equation), not {self.ops}")
        if not 1 <= self.digits[0] <= self.digits[1] <= 4:
            raise ValueError(f"digits must be (low, high) with 1 <= low <= high <= 4, not {self.digits}")


TIERS: tuple[TierSpec, ...] = (
    TierSpec("chain", (2, 2), (2, 2)),
    TierSpec("bracket", (2, 2), (2, 2)),
    TierSpec("bracket", (4, 4), (3, 3)),
    TierSpec("bracket", (4, 4), (4, 4), cap=99_999),
)


@dataclass(frozen=True)
class Step:
    """One line of work: `a op b`, written after `lead` (``7x=``, ``x=`` in equations)."""

    a: int
    op: str  # "+", "-", "*" (by one digit) or "/" (by one digit)
    b: int
    lead: str = ""

    @property
    def result(self) -> int:
        if self.op == "+":
            return self.a + self.b
        if self.op == "-":
            return self.a - self.b
        if self.op == "*":
            return self.a * self.b
        return self.a // self.b

    @property
    def expression(self) -> str:
        return f"{self.lead}{self.a}{self.op}{self.b}"


@dataclass(frozen=True)
class LadderProblem(Problem):
    """A v1 `Problem` (same prompt, verifier and held-out rule) with its tier and its steps as data.

    `steps` holds the terse scratchpad lines, so `solution` and `reasoning.training_text`
    give the terse trace without reflection.
    """

    tier: int = 0
    work: tuple[Step, ...] = ()
    states: tuple[str, ...] = ()  # the problem as it stands before each step (restated by the verbose style)
    others: tuple[tuple[tuple[Step, ...], tuple[str, ...]], ...] = ()  # other solution paths: (work, states) each

    @property
    def paths(self) -> tuple[tuple[tuple[Step, ...], tuple[str, ...]], ...]:
        """Every solution path as (work, states); the first is `work`, `states` (what `steps` and `solution` give)."""
        return ((self.work, self.states), *self.others)


# ---------------------------------------------------------------------------------------------
# Column work: one operation written digit by digit, optionally with one injected error.


@dataclass(frozen=True)
class ColumnError:
    """An error in one column of a step: "drop" its incoming carry, borrow or remainder, or "slip" its result by `delta`."""

    kind: str
    column: int
    delta: int = 0


def _digits_lsb(n: int, width: int) -> list[int]:
    return [(n // 10 ** i) % 10 for i in range(width)]


def column_work(step: Step, error: ColumnError | None = None) -> tuple[list[str], int]:
    """The column statements of `step` and the result they add up to (wrong when `error` is given)."""
    cols, value, _ = _columns(step, error)
    return cols, value


def _columns(step: Step, error: ColumnError | None) -> tuple[list[str], int, list[bool]]:
    """Column statements, their result, and whether each column receives a carry, borrow or remainder."""
    def hit(kind: str, i: int) -> bool:
        return error is not None and error.kind == kind and error.column == i

    cols: list[str] = []
    incoming_flags: list[bool] = []
    if step.op in "+-":
        width = max(len(str(step.a)), len(str(step.b)))
        xs, ys = _digits_lsb(step.a, width), _digits_lsb(step.b, width)
        carry, value = 0, 0
        for i, (x, y) in enumerate(zip(xs, ys)):
            incoming_flags.append(bool(carry))
            incoming = 0 if hit("drop", i) else carry
            slip = error.delta if hit("slip", i) else 0
            if step.op == "+":
                s = x + y + incoming + slip
                cols.append(f"{x}+{y}{'+1' if incoming else ''}={s}")
                value += (s % 10) * 10 ** i
                carry = s // 10
            else:
                v = x - y - incoming
                borrow = v < 0
                d = v + 10 * borrow + slip
                cols.append(f"{x}-{y}{'-1' if incoming else ''}{'+10' if borrow else ''}={d}")
                value += d * 10 ** i
                carry = int(borrow)
        if step.op == "+":
            value += carry * 10 ** width
        elif carry:
            raise ValueError(f"{step.expression} borrows past its last column (a negative result)")
        return cols, value, incoming_flags
    if step.op == "*":  # by one digit, least-significant column first, the carry written into the next column
        xs, carry, value = _digits_lsb(step.a, len(str(step.a))), 0, 0
        for i, x in enumerate(xs):
            incoming_flags.append(bool(carry))
            incoming = 0 if hit("drop", i) else carry
            s = x * step.b + incoming + (error.delta if hit("slip", i) else 0)
            cols.append(f"{x}*{step.b}{f'+{incoming}' if incoming else ''}={s}")
            value += (s % 10) * 10 ** i
            carry = s // 10
        return cols, value + carry * 10 ** len(xs), incoming_flags
    if step.op == "/":
        rem, quotient = 0, 0
        for i, d in enumerate(int(c) for c in str(step.a)):
            incoming_flags.append(rem != 0)
            cur = d if hit("drop", i) else rem * 10 + d
            q = cur // step.b
            rem = cur - q * step.b
            q += error.delta if hit("slip", i) else 0
            cols.append(f"{cur}/{step.b}={q}r{rem}")
            quotient = quotient * 10 + q
        return cols, quotient, incoming_flags
    raise ValueError(f"op must be '+', '-', '*' or '/', not {step.op!r}")


def work_line(step: Step, error: ColumnError | None = None) -> str:
    cols, value = column_work(step, error)
    return f"{step.expression}: {' '.join(cols)} so {value}"


def possible_errors(step: Step) -> list[ColumnError]:
    """Every single-column error that makes `step` really wrong.

    "drop" where a column receives a carry, borrow or remainder; "slip" by -1 or +1 where
    the column's stated result stays a valid one (a digit, or 0..19 for an addition column).
    The result must change and stay >= 0.
    """
    right_cols, right, incoming = _columns(step, None)
    top = {"+": 19, "*": 89}.get(step.op, 9)
    out = []
    for i in range(len(right_cols)):
        candidates = [ColumnError("slip", i, -1), ColumnError("slip", i, 1)] + [ColumnError("drop", i)] * incoming[i]
        for e in candidates:
            try:
                cols, value = column_work(step, e)
            except ValueError:
                continue
            stated = int(cols[i].split("=")[1].split("r")[0])
            if value != right and value >= 0 and 0 <= stated <= top:
                out.append(e)
    return out


def reflection_lines(step: Step, error: ColumnError) -> tuple[str, str]:
    """(the wrong line, the ``Wait`` line that redoes the step right and says the first result was not it)."""
    _, wrong = column_work(step, error)
    if wrong == step.result:
        raise ValueError(f"the error {error} leaves {step.expression} right; it must make the step wrong")
    return work_line(step, error), f"{WAIT}, {work_line(step)}, not {wrong}."


def confirmation_line(step: Step) -> str:
    """The ``Wait`` line that redoes a right step and finds the same result."""
    return f"{WAIT}, {work_line(step)}, right."


def check_line(step: Step) -> str:
    """The verbose style's verification of a step by its inverse operation (always a true statement)."""
    r = step.result
    inverse = {"+": f"{r}-{step.b}", "-": f"{r}+{step.b}", "*": f"{r}/{step.b}", "/": f"{step.b}*{r}"}[step.op]
    return f"{CHECK} {inverse}={step.a}, right."


# ---------------------------------------------------------------------------------------------
# Problems


def _operand(rng: random.Random, digits: tuple[int, int]) -> int:
    d = rng.randint(*digits)
    return rng.randint(10 ** (d - 1) if d > 1 else 1, 10 ** d - 1)


def chain(rng: random.Random, spec: TierSpec, tier: int) -> LadderProblem:
    value = _operand(rng, spec.digits)
    question, work, states = str(value), [], []
    for _ in range(rng.randint(*spec.ops)):
        b = _operand(rng, spec.digits)
        op = "-" if value - b >= 0 and rng.random() < 0.5 else "+"
        if value + b > spec.cap:
            op = "-"
        work.append(Step(value, op, b))
        question += f"{op}{b}"
        value = work[-1].result
    rest = question
    for s in work:  # the remaining expression before each step: its running value, then the operations left
        states.append(rest)
        rest = str(s.result) + rest[len(f"{s.a}{s.op}{s.b}"):]
    return _problem("arithmetic", question, value, work, states, tier)


def equation(rng: random.Random, spec: TierSpec, tier: int) -> LadderProblem:
    a, x, b = rng.randint(2, 9), _operand(rng, spec.digits), _operand(rng, spec.digits)
    plus = rng.random() < 0.5 or a * x - b < 0
    c = a * x + b if plus else a * x - b
    left = f"{a}x{'+' if plus else '-'}{b}="
    rhs, work, states = _chain_to(rng, c, rng.randint(*spec.ops) - 2, spec.digits, spec.cap), [], []
    expression = rhs[0]
    value = int(expression)
    for op, operand in rhs[1:]:  # the right side's chain first, each step restating what is left
        states.append(left + str(value) + "".join(f"{o}{v}" for o, v in rhs[1 + len(work):]))
        work.append(Step(value, op, operand))
        value = work[-1].result
    question = left + expression + "".join(f"{o}{v}" for o, v in rhs[1:])
    states += [f"{left}{c}", f"{a}x={a * x}"]
    work += [Step(c, "-" if plus else "+", b, lead=f"{a}x="), Step(a * x, "/", a, lead="x=")]
    return _problem("linear_equation", question, x, work, states, tier)


def bracket(rng: random.Random, spec: TierSpec, tier: int) -> LadderProblem:
    """``a(x +- d) = c``: divide first (``x+12=742/7``, ``x=106-12``) or expand first (``12*7``, ``7x=742-84``,
    ``x=658/7``), after working out the right side's chain."""
    while True:  # c stays within the chains' range
        a, d, plus = rng.randint(2, 9), _operand(rng, spec.digits), rng.random() < 0.5
        x = _operand(rng, spec.digits) if plus else d + _operand(rng, spec.digits)  # so that x - d >= 1
        inner = x + d if plus else x - d
        if a * inner <= spec.cap:
            break
    c, sign = a * inner, "+" if plus else "-"
    left = f"{a}(x{sign}{d})="
    rhs = _chain_to(rng, c, rng.randint(*spec.ops) - 2, spec.digits, spec.cap)
    chain_work, chain_states, value = [], [], int(rhs[0])
    for op, operand in rhs[1:]:
        chain_states.append(left + str(value) + "".join(f"{o}{v}" for o, v in rhs[1 + len(chain_work):]))
        chain_work.append(Step(value, op, operand))
        value = chain_work[-1].result
    question = left + rhs[0] + "".join(f"{o}{v}" for o, v in rhs[1:])
    divide_first = ((*chain_work, Step(c, "/", a, lead=f"x{sign}{d}="), Step(inner, "-" if plus else "+", d, lead="x=")),
                    (*chain_states, f"{left}{c}", f"x{sign}{d}={inner}"))
    expand_first = ((*chain_work, Step(d, "*", a), Step(c, "-" if plus else "+", a * d, lead=f"{a}x="),
                     Step(a * x, "/", a, lead="x=")),
                    (*chain_states, f"{left}{c}", f"{a}x{sign}{a * d}={c}", f"{a}x={a * x}"))
    first, other = (divide_first, expand_first) if rng.random() < 0.5 else (expand_first, divide_first)
    problem = _problem("linear_equation", question, x, list(first[0]), list(first[1]), tier)
    return replace(problem, others=(other,))


def _chain_to(rng: random.Random, target: int, n: int, digits: tuple[int, int], cap: int = CHAIN_CAP) -> list:
    """[start, (op, operand), ...]: `n` operations of `digits`-digit operands whose running value ends at `target`.

    Drawn backwards from `target`, redrawing an operation that would make a value negative or above `cap`.
    """
    ops, value = [], target
    while len(ops) < n:
        b = _operand(rng, digits)
        op = "+" if value - b >= 1 and rng.random() < 0.5 else "-"
        before = value - b if op == "+" else value + b
        if 1 <= before <= cap:
            ops.append((op, b))
            value = before
    return [str(value)] + ops[::-1]


def _problem(kind, question, answer, work, states, tier) -> LadderProblem:
    return LadderProblem(kind, question, answer, tuple(work_line(s) for s in work), len(work),
                         tier=tier, work=tuple(work), states=tuple(states))


def ladder_problem(rng: random.Random, tier: int, tiers: Sequence[TierSpec] = TIERS) -> LadderProblem:
    if not 0 <= tier < len(tiers):
        raise ValueError(f"tier must be in 0..{len(tiers) - 1}, not {tier}")
    spec = tiers[tier]
    return {"chain": chain, "equation": equation, "bracket": bracket}[spec.kind](rng, spec, tier)


def ladder_problems(n: int, split: str = "test", seed: int = 0, tiers: Sequence[TierSpec] = TIERS,
                    mix: Sequence[float] | None = None, distinct: bool = True) -> list[LadderProblem]:
    """`n` problems of `split`; with no `mix`, tiers in turn (equal counts), else each tier drawn with weight `mix[t]`.

    Held out by the v1 rule on the question (1 in `reasoning.HELD_OUT_ONE_IN` by a stable hash), so
    no test question is ever trained on, here or in v1 data.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    if mix is not None and (len(mix) != len(tiers) or min(mix) < 0 or sum(mix) <= 0):
        raise ValueError(f"mix must hold {len(tiers)} non-negative weights with a positive sum, not {mix}")
    rng = random.Random(f"ladder-{split}-{seed}")
    out, seen, misses = [], set(), 0
    while len(out) < n:
        tier = len(out) % len(tiers) if mix is None else rng.choices(range(len(tiers)), weights=mix)[0]
        p = ladder_problem(rng, tier, tiers)
        if p.held_out == (split == "test") and not (distinct and p.question in seen):
            seen.add(p.question)
            out.append(p)
            misses = 0
        elif (misses := misses + 1) > 100_000:
            raise ValueError(f"could not draw {n} distinct {split} problems (tier {tier} is exhausted)")
    return out


# ---------------------------------------------------------------------------------------------
# Traces


def trace_segments(problem: LadderProblem, style: str = "terse", rng: random.Random | None = None,
                   reflect: bool = False, path: int | None = None, confirm: bool = False) -> list[tuple[str, bool]]:
    """`trace` as (text, is the injected wrong step) pieces, so training can leave the wrong step out of the loss."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, not {style!r}")
    if (reflect or confirm) and rng is None:
        raise ValueError("rng is required when reflect or confirm is True (it draws the re-checked steps)")
    if path is not None and not 0 <= path < len(problem.paths):
        raise ValueError(f"path must be in 0..{len(problem.paths) - 1} for this problem, not {path}")
    if path is None:
        path = rng.randrange(len(problem.paths)) if rng is not None and len(problem.paths) > 1 else 0
    work, states = problem.paths[path]
    wrong_at = rng.randrange(len(work)) if reflect else None
    confirm_at = rng.randrange(len(work)) if confirm else None
    pieces: list[tuple[str, bool]] = []
    for k, step in enumerate(work):
        if style == "verbose":
            pieces.append((f"{STEP} {k + 1} of {len(work)}: {states[k]}\n", False))
        if k == wrong_at:
            wrong, recheck = reflection_lines(step, rng.choice(possible_errors(step)))
            pieces += [(f"{wrong}\n", True), (f"{recheck}\n", False)]
        else:
            pieces.append((f"{work_line(step)}\n", False))
        if k == confirm_at:  # after a correction too: the corrected line is checked again
            pieces.append((f"{confirmation_line(step)}\n", False))
        if style == "verbose":
            pieces.append((f"{check_line(step)}\n", False))
    pieces.append((f"{END_THINK}{ANSWER} {problem.answer}", False))
    merged: list[tuple[str, bool]] = []  # neighbouring pieces of the same kind joined
    for text, wrong in pieces:
        if merged and merged[-1][1] == wrong:
            merged[-1] = (merged[-1][0] + text, wrong)
        else:
            merged.append((text, wrong))
    return merged


def trace(problem: LadderProblem, style: str = "terse", rng: random.Random | None = None,
          reflect: bool = False, path: int | None = None, confirm: bool = False) -> str:
    """What a reasoner writes after the prompt: the thinking, ``</think>``, ``Answer: N`` (EOS follows).

    A problem with several solution paths follows `path`; with none given, one drawn by
    `rng`, or the first without an `rng`. With `reflect`, one step (drawn by `rng`) is written
    wrong with a drawn column error, then re-checked after ``Wait`` and redone right; later
    steps continue from the right value. With `confirm`, one step (drawn by `rng`
    independently) is re-checked after ``Wait`` and found right.
    """
    return "".join(text for text, _ in trace_segments(problem, style, rng, reflect, path, confirm))


@dataclass(frozen=True)
class TraceMix:
    """How training traces are drawn: the verbose share and the reflective share (each per trace, independently).

    `mask_wrong_step`: the injected wrong step is context but not a training target, so the
    model learns to re-check after an error without learning to make the error.
    """

    verbose_share: float = 0.2
    reflect_share: float = 0.15
    mask_wrong_step: bool = True
    confirm_share: float = 0.15

    def __post_init__(self):
        for name in ("verbose_share", "reflect_share", "confirm_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], not {getattr(self, name)}")


def training_examples(problems: Sequence[LadderProblem], mix: TraceMix = TraceMix(),
                      seed: int = 0) -> list[list[tuple[str, bool]]]:
    """Prompt + trace for each problem as (text, leave out of the loss) pieces; style and reflection drawn per trace."""
    rng = random.Random(f"traces-{seed}")
    out = []
    for p in problems:
        style = "verbose" if rng.random() < mix.verbose_share else "terse"
        reflect = rng.random() < mix.reflect_share
        confirm = rng.random() < mix.confirm_share if mix.confirm_share else False  # v3's draws without it
        pieces = [(p.prompt, False)] + trace_segments(p, style, rng, reflect, confirm=confirm)
        out.append([(text, wrong and mix.mask_wrong_step) for text, wrong in pieces])
    return out


def training_texts(problems: Sequence[LadderProblem], mix: TraceMix = TraceMix(), seed: int = 0) -> list[str]:
    """Prompt + trace for each problem, style and reflection drawn per trace with `mix`'s shares."""
    return ["".join(text for text, _ in pieces) for pieces in training_examples(problems, mix, seed)]


def example_blocks(tokenizer, examples: Sequence[Sequence[tuple[str, bool]]],
                   seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) [N, seq_len] like `training.token_blocks`, with label -100 on the pieces left out of the loss."""
    ids: list[int] = []
    labels: list[int] = []
    for pieces in examples:
        for text, left_out in pieces:
            row = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += row
            labels += [-100] * len(row) if left_out else row
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return (torch.tensor(ids[: n * seq_len]).view(n, seq_len), torch.tensor(labels[: n * seq_len]).view(n, seq_len))


def unknown_characters(text: str) -> set[str]:
    """Characters of `text` that `reasoning_tokenizer()` has no token for (outside the special tokens)."""
    for special in SPECIAL_TOKENS:
        text = text.replace(special, "")
    return set(text) - set(CHARACTERS)


# ---------------------------------------------------------------------------------------------
# The v2 reasoner's recipe


@dataclass(frozen=True)
class ReasonerSpec:
    """Everything that sets a v2 reasoner's weights: model, training run, data size, trace mix, tiers, seed."""

    model: TinyLMConfig
    train: TrainConfig
    train_problems: int
    traces: TraceMix = TraceMix()
    tier_mix: tuple[float, ...] = (0.15, 0.2, 0.3, 0.35)
    tiers: tuple[TierSpec, ...] = TIERS
    val_problems: int = 400
    seed: int = 0

    def __post_init__(self):
        if len(self.tier_mix) != len(self.tiers):
            raise ValueError(f"tier_mix must have one weight per tier ({len(self.tiers)}), not {self.tier_mix}")
        if self.train_problems < 1:
            raise ValueError(f"train_problems must be >= 1, not {self.train_problems}")


def forward_flops_per_token(config: TinyLMConfig, context: int) -> float:
    """Multiply-adds x2 of one token's forward pass: projections, SwiGLU, attention over `context`, and the head."""
    d, f, L = config.hidden_size, config.intermediate_size, config.num_layers
    per_layer = 4 * d * d + 3 * d * f + 2 * d * context  # q,k,v,o; gate, up, down; scores and mixing
    return 2.0 * (L * per_layer + d * config.vocab_size)


_VOCAB = len(SPECIAL_TOKENS) + len(CHARACTERS)
# `small`, chosen on validation loss and the card (issue 10: never on a paper's verdict). Width 160 x 6 layers
# (1.9M parameters), 1024 positions (the longest trace, tier 3 verbose with both re-checks, is ~830 tokens with
# its prompt). Runs on this project's 2-core CPU (AMD EPYC, AVX512-bf16, 2 threads), with the card on held-out
# problems (greedy accuracy by tier; majority@16 minus greedy):
#   A. first ladder (top tier a 4-5 operation chain), wrong steps trained on, 830 steps x 16 x 256 (3.4M tokens):
#      356 s, val loss 0.277; card (100 problems): [1.00, 0.68, 0.16, 0.04], majority -1 point;
#   B. the same, 1600 steps (6.6M tokens), 80k problems: val loss 0.254; card (500): [1.00, 1.00, 0.42, 0.92]
#      (the long chain became easy, the equation did not), majority -1 point;
#   C. (v2) top tier a four-step equation, the wrong step left out of the loss, 1600 steps: 727 s
#      (9.3k tokens/s), val loss 0.236; card (500): [1.00, 0.98, 0.74, 0.34], overall 0.764 (target <= 0.75),
#      majority +0.2 points (target +5);
#   D. (v3) C with bracket equations and two solution paths (tiers: one and two operations, brackets of two and
#      three digits), 1600 steps: val loss 0.224; card (500): [1.00, 1.00, 0.78, 0.68], overall 0.866,
#      majority +4.6 points (+12.8 and +5.6 on the equations);
#   E. (v3) D's ladder without the one-operation tier, with a four-digit bracket tier on top, 1600 steps
#      (1,042 s on one thread beside other work): val loss 0.253; card (500): [0.93, 0.73, 0.70, 0.44],
#      overall 0.698, majority +5.4 points; six of the seven targets (the hardest tier is above 0.40);
#   F. (v4) E with confirming re-checks and re-checks that redo the step first, 1600 steps (1,129 s on one
#      thread): val loss 0.260 (0.756 at step 400, where E had 0.527); card (500): [0.96, 0.88, 0.00, 0.00]:
#      on the three- and four-digit brackets it never copies the question's d into ``x-d=...`` (greedy and
#      sampled, it writes other numbers, often 1992), though its training traces copy d right every time;
#   G. this recipe: F for 2400 steps on 120,000 problems (the same number of epochs), for the copying to emerge
#      (999 s on 2 threads): val loss 0.241; card (500): [1.00, 0.976, 0.888, 0.52], overall 0.846, majority
#      +7.4 points; five of the seven targets (too capable: the hardest tier and overall are above them).
#      Kept for its validation loss and its sampling and re-check properties; a harder top tier is next.
#   H. G on a harder ladder: G's tiers 0, 2 and 3 and, on top, the four-digit bracket with a right side of three
#      more operations (``6(x+3687)=67235+6074-4205-7178``; mix 0.15/0.2/0.3/0.35), 2400 steps (1,072 s): val
#      loss 0.270 (the harder mix); card (200): greedy [0.98, 0.96, 0.94, 0.04], overall 0.73, but pass@1 0.35
#      (0.26 on the three-digit bracket, where greedy decoding is right 96% of the time) and majority -4.5 points;
#   I. H on 1024-token blocks (4 x 1024, the same tokens per step), so that no trace is cut and every distance
#      up to 1023 is trained, 1700 steps (970 s; 4 x 1024 runs ~0.85x the tokens/s of 16 x 256): val loss
#      0.194 (on 1024-token blocks, not comparable); card (200): [0.96, 0.32, 0.08, 0.14], overall 0.375,
#      majority -11 points: too few steps for the brackets, as F;
#   J. G's four tiers and H's on top (mix 0.1/0.15/0.2/0.25/0.3), 2400 steps (1,057 s): val loss 0.262; card
#      (500): [1.00, 0.91, 0.95, 0.84, 0.02], overall 0.744, majority -1.6 points; the top tier's greedy
#      traces run on (836 thinking characters) and pass@16 is 0.05. In H, I and J the more steps train a
#      bracket tier, the sharper greedy decoding gets on it while samples at temperature 1 stay poor (J's
#      four-digit bracket: greedy 0.84, pass@1 0.20, majority 0.70), so a vote loses to greedy decoding;
#   K. this recipe (v5): G for 2000 steps on 100,000 problems (the same number of epochs; 851 s on 2 threads):
#      val loss 0.248; card (500): [0.968, 0.864, 0.552, 0.28], overall 0.666, pass@16 / pass@1 on the hardest
#      tier 6.4, but majority -1.8 points (pass@1 by tier [0.71, 0.58, 0.16, 0.08]: samples are worse than
#      G's, and a vote loses to greedy decoding on the three-digit bracket, 0.44 against 0.552): six of the
#      seven targets, one more than G (the whole ladder and the cost; G met the vote instead). Kept because it
#      meets more targets and leaves search and sampling the headroom G did not (G's hardest tier was
#      solved within 6 samples three times in four); a recipe meeting all seven is still open.
#   L. (not adopted) K on 512-token blocks (8 x 512, the same tokens per step), after the overthinking experiment
#      showed the reasoner breaking past its trained 255-token attention span: val loss 0.193 (512-token blocks, not
#      comparable); card (500): [1.00, 0.696, 0.464, 0.496], overall 0.664, pass@1 [0.93, 0.54, 0.32, 0.27] (K: 0.71,
#      0.58, 0.16, 0.08), majority +11.4 points, re-checks keep a right step 89% of the time (K: 73%) and fix a wrong
#      one 25% (K: 15%). The vote is met, but the hardest tier is above 0.40 and above tier 2, and a step costs
#      ~1.2x K's (about 0.52 s against 0.43 on 2 threads; not timed alone), so 2000 steps would exceed 15 minutes.
#      Timed alone (2026-12-06): a step of 8 x 512 takes 0.525 s, of 16 x 256 0.43 s, of 6 x 512 0.40 s; CPU flash
#      attention is half the step at 512 tokens (the math and eager kernels are slower still: 0.83 and 0.80 s);
#   M. (not adopted) L for 1600 steps (818 s) with the mix moved from the four-digit tier to the three-digit one
#      (0.15/0.2/0.4/0.25): val loss 0.192; card (500): [0.928, 0.648, 0.536, 0.44], overall 0.638, pass@1 [0.77,
#      0.46, 0.30, 0.23], majority +3.8 points. Fewer steps weaken the samples before they lower the top tier,
#      which stays within two standard errors of tier 2 (0.063 for a difference on 125 problems each): the three-
#      and four-digit brackets of four operations are one problem at two lengths, so the ladder needs a real top rung;
#   N. (not adopted) a top rung with one more step: the four-digit bracket with three operations on its right
#      side (``6(x+5738)=99969-3231-6977-1147``, ~320 thinking tokens; H's top tier, now on blocks that hold it),
#      on 6 x 512 blocks for 2000 steps (790 s): val loss 0.207; card (500): [0.952, 0.408, 0.136, 0.112],
#      overall 0.402, majority +3.0 points: with a quarter fewer tokens than L every bracket is undertrained;
#   O. (not adopted) N's ladder on 8 x 512 blocks, the first 1650 of 2000 steps on half blocks (16 x 256: a
#      short-to-long curriculum; branch reasoner-v6), to fit L's tokens in 15 minutes (864 s): val loss
#      on 512-token blocks 1.09-1.49 at steps 400-1600 (attention past 255 tokens untrained), 0.198 at the end;
#      card (500): [1.00, 0.72, 0.496, 0.296], overall 0.628, pass@1 [0.82, 0.44, 0.22, 0.10], pass@16 / pass@1
#      on the hardest tier 5.4, majority +4.2 points (by tier 0, +8.8, +4.0, +4.0), re-checks keep a right step
#      87% of the time and fix a wrong one 14%: six of the seven, the vote 0.8 points short (one standard error
#      of the vote's gain is about 2 points on 500 paired problems when a fifth of them are discordant);
#   P. (not adopted) O with 500 steps on full blocks (1500 on half blocks; 902 s, over the 15 minutes): val loss
#      0.196; card (500): [1.00, 0.776, 0.512, 0.344], overall 0.658, pass@1 [0.86, 0.50, 0.22, 0.13], majority
#      +1.8 points (by tier 0, +6.4, -1.6, +2.4): more long steps sharpened greedy decoding, not the samples.
#      What L alone has is samples close to greedy decoding (pass@1 / greedy on the three-digit bracket 0.69,
#      against 0.44 in O and P and 0.29 in K) after every one of its steps on 512-token blocks;
#   Q. (not adopted) N's ladder on 8 x 512 blocks for every one of 1700 steps (881 s): val loss 0.204; card (500):
#      [1.00, 0.68, 0.264, 0.208], overall 0.538, pass@1 [0.82, 0.41, 0.13, 0.04], majority +0.4 points (by tier
#      0, +3.2, +8.0, -9.6): full-length blocks throughout do not bring L's samples back with 15% fewer tokens and
#      the five-step top rung. The vote stays the open target;
#   O's recipe with seeds 1 and 2 (2026-12-06; trained at one thread each, side by side, so their times are not
#      costs; cards on the same 500 problems): val loss 0.198 / 0.208 / 0.202 (seeds 0 / 1 / 2); greedy by tier
#      [1.00, 0.72, 0.496, 0.296] / [0.392, 0.568, 0.256, 0.072] / [0.872, 0.76, 0.536, 0.32]; majority +4.2 / +6.6 /
#      +18.8 points; targets met 6 / 4 / 6. The training seed moves the card more than any recipe change above: seeds
#      1 and 2 miscopy the question's operands on the easiest tier (seed 2 writes ``66-42`` after ``98-32`` for
#      ``Q: 98-32-43``; seed 1 writes ``89+50`` where ``54+35-50`` asks for ``89-50``): the copying that F lacked, which
#      emerges at a seed-dependent step within this budget. The one-seed comparisons A-R rank recipes within this
#      noise, so a recipe needs several seeds to be judged; the lowest validation loss is seed 0's, the one carded;
#   R. (not adopted) O with a 90/10 prior of styles (verbose share 0.1, seed 0; one thread beside O's seeds): val loss
#      0.203; card (500): [1.00, 0.776, 0.768, 0.592], overall 0.784, pass@1 [0.84, 0.56, 0.38, 0.19], majority +2.0
#      points: the terse traces' larger share of tokens lifts the brackets past the ladder's top (0.592 > 0.40).
REASONERS = {
    "smoke": ReasonerSpec(TinyLMConfig(_VOCAB, 32, 2, 2, 64, 1024),
                          TrainConfig(steps=4, batch_size=4, seq_len=128, lr=3e-3, warmup_steps=1), 200,
                          val_problems=16),
    "small": ReasonerSpec(TinyLMConfig(_VOCAB, 160, 6, 5, 448, 1024),
                          TrainConfig(steps=2000, batch_size=16, seq_len=256, lr=2e-3, warmup_steps=100,
                                      eval_every=400), 100_000),
    # `large` (a GPU): the same recipe, wider and deeper, on 10x the tokens. Not trained or measured here.
    "large": ReasonerSpec(TinyLMConfig(_VOCAB, 320, 8, 8, 896, 1024),
                          TrainConfig(steps=8000, batch_size=32, seq_len=512, lr=1e-3, warmup_steps=400,
                                      eval_every=1000), 800_000),
}
# The draft: 96 x 2 layers, ~7x fewer FLOPs per token than the target at 256 tokens of context
# (`forward_flops_per_token`; the issue asks for >= 4x), the same data and tokens.
DRAFTS = {
    "smoke": ReasonerSpec(TinyLMConfig(_VOCAB, 16, 1, 1, 32, 1024),
                          TrainConfig(steps=4, batch_size=4, seq_len=128, lr=3e-3, warmup_steps=1), 200,
                          val_problems=16),
    "small": ReasonerSpec(TinyLMConfig(_VOCAB, 96, 2, 2, 256, 1024),
                          TrainConfig(steps=1600, batch_size=16, seq_len=256, lr=3e-3, warmup_steps=100,
                                      eval_every=400), 80_000),
    "large": ReasonerSpec(TinyLMConfig(_VOCAB, 128, 3, 4, 352, 1024),
                          TrainConfig(steps=8000, batch_size=32, seq_len=512, lr=2e-3, warmup_steps=400,
                                      eval_every=1000), 800_000),
}


def train_reasoner(spec: ReasonerSpec, desc: str = "training a reasoner") -> tuple[torch.nn.Module, dict]:
    """Train a fresh v2 reasoner on `spec`'s traces with `core.training.train`; return (model on CPU, record).

    Validation: held-out problems of the same tier mix, traced with the same style and
    reflection shares, so the recipe can be chosen on validation loss. The record holds
    the spec, the data's realised shares and size, and the training history.
    """
    tokenizer = reasoning_tokenizer()
    train_set = ladder_problems(spec.train_problems, "train", seed=spec.seed, tiers=spec.tiers, mix=spec.tier_mix,
                                distinct=False)
    val_set = ladder_problems(spec.val_problems, "test", seed=spec.seed, tiers=spec.tiers, mix=spec.tier_mix)
    examples = training_examples(train_set, spec.traces, seed=spec.seed)
    texts = ["".join(text for text, _ in pieces) for pieces in examples]
    val_texts = training_texts(val_set, spec.traces, seed=spec.seed + 1)
    blocks, labels = example_blocks(tokenizer, examples, spec.train.seq_len)
    val_blocks = token_blocks(tokenizer, val_texts, spec.train.seq_len)
    if len(blocks) == 0 or len(val_blocks) == 0:
        raise ValueError(f"train_problems ({spec.train_problems}) and val_problems ({spec.val_problems}) must make "
                         f"at least one block of seq_len {spec.train.seq_len} tokens each")
    torch.manual_seed(spec.seed)
    model = spec.model.build().to(training_device())
    start = time.perf_counter()
    history = train(model, blocks, spec.train, val_blocks=val_blocks, desc=desc, seed=spec.seed, labels=labels)
    data_tokens = blocks.numel()
    record = {
        "spec": asdict(spec), "device": str(training_device()), "train_seconds": time.perf_counter() - start,
        "data": {"traces": len(texts), "tokens": data_tokens, "epochs": history["tokens"] / data_tokens,
                 "masked_tokens": int((labels == -100).sum()),
                 "verbose_share": sum(f"\n{CHECK} " in t for t in texts) / len(texts),
                 "reflect_share": sum(re.search(rf"\n{WAIT}, [^\n]*, not -?\d+\.\n", t) is not None
                                      for t in texts) / len(texts),
                 "confirm_share": sum(re.search(rf"\n{WAIT}, [^\n]*, right\.\n", t) is not None
                                      for t in texts) / len(texts),
                 "tier_share": [sum(p.tier == t for p in train_set) / len(train_set) for t in range(len(spec.tiers))]},
        **history,
    }
    return model.cpu(), record


# ---------------------------------------------------------------------------------------------
# The shared, cached reasoner and draft


def problems(n: int, split: str = "test", seed: int = 0, tiers: Sequence[int] | None = None,
             distinct: bool = True) -> list[LadderProblem]:
    """`n` ladder problems of `split`: every tier in turn, or only the tier indices in `tiers` (in turn).

    What experiments draw their problems from; `distinct=False` for training data, whose
    easiest tier holds only a few thousand questions.
    """
    chosen = range(len(TIERS)) if tiers is None else list(tiers)
    if not chosen or any(not 0 <= t < len(TIERS) for t in chosen) or len(set(chosen)) != len(chosen):
        raise ValueError(f"tiers must be distinct indices in 0..{len(TIERS) - 1}, not {tiers}")
    per_tier = [ladder_problems((n - k + len(chosen) - 1) // len(chosen), split, seed, mix=[t == tier for t in
                                range(len(TIERS))], distinct=distinct) for k, tier in enumerate(chosen)]
    return [p for group in zip_longest(*per_tier) for p in group if p is not None]


@dataclass
class Reasoner:
    """A trained reasoning LM, its tokenizer, and the record of how it was trained (its card under "card")."""

    name: str
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    record: dict = field(default_factory=dict)

    def encode_prompts(self, prompts: Sequence[str]) -> dict:
        return self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)


def tiers_between(r: "Reasoner", low: float, high: float, statistic: str = "pass@1") -> list[int]:
    """The tiers on which a sampled accuracy from the reasoner's card (`statistic`: "pass@1" at temperature 1,
    or "pass@16") is in [low, high].

    How an experiment that needs a learning signal (some samples right, some wrong), or a best-of-N
    off its ceiling, picks its problems from the substrate alone, before any treatment runs. Every
    tier when none qualifies or the record has no card (the smoke model's figures mean nothing).
    """
    by_tier = (r.record.get("card") or {}).get(f"{statistic}_by_tier") or []
    chosen = [t for t, p in enumerate(by_tier) if p is not None and low <= p <= high]
    return chosen or list(range(len(TIERS)))


# The card's size per scale: (held-out problems, samples per problem, new-token budget or None for the longest
# trace and a quarter); issue 10 asks for >= 500 problems and 16 samples. The smoke model never stops on its own.
CARD_SIZE = {"smoke": (8, 2, 32), "small": (500, 16, None), "large": (500, 16, None)}


def _cached(kind: str, spec: ReasonerSpec, scale: str) -> Reasoner:
    tokenizer = reasoning_tokenizer()
    key = store.stable_hash([f"{kind}-v5", asdict(spec), tokenizer.backend_tokenizer.to_str()])
    path = store.home() / "models" / f"{kind}-{scale}-{key}"

    def build(tmp: Path) -> None:
        model, record = train_reasoner(spec, f"training the {scale} {kind} (cached afterwards)")
        if kind == "reasoner":
            from paperzoo.core.reasoner_card import card, compact

            n, samples, budget = CARD_SIZE[scale]
            record["card"] = compact(card(model, tokenizer, n=n, samples=samples, max_new_tokens=budget,
                                          seed=spec.seed, desc=f"measuring the {scale} {kind}'s card"))
        save_trained(tmp, model, tokenizer, record)

    model, tokenizer, record = load_trained(store.cached_dir(path, build))
    return Reasoner(f"paperzoo {kind}-{scale} ({path.name})", model, tokenizer, record)


def reasoner(scale: str = "small", seed: int = 0) -> Reasoner:
    """The cached tiny reasoner for `scale`, trained (and its card measured) on first use, with a progress bar."""
    if scale not in REASONERS:
        raise ValueError(f"scale must be one of {', '.join(REASONERS)}, not {scale!r}")
    return _cached("reasoner", replace(REASONERS[scale], seed=seed), scale)


def draft_reasoner(scale: str = "small", seed: int = 0) -> Reasoner:
    """A smaller reasoner on the same tokenizer and data, for speculative decoding."""
    if scale not in DRAFTS:
        raise ValueError(f"scale must be one of {', '.join(DRAFTS)}, not {scale!r}")
    return _cached("draft", replace(DRAFTS[scale], seed=seed), scale)
