"""Reasoner v2 groundwork (issue 10, A): the ladder's answers, reflective traces, styles, and the card's measures.

The measures are checked on hand-built completions with known answers; the card itself
only on the smoke reasoner (its figures there mean nothing, its shape does).
"""

import math
import random
import re
from itertools import combinations

import pytest
import torch
import sympy

from paperzoo.core import reasoner_card as C
from paperzoo.core import reasoning as R
from paperzoo.core import reasoner as T

COLUMN_ADD_SUB = re.compile(r"(\d)([+-])(\d)(?:([+-])1)?(\+10)?=(-?\d+)")
COLUMN_DIV = re.compile(r"(\d+)/(\d)=(-?\d+)r(\d+)")
COLUMN_MUL = re.compile(r"(\d)\*(\d)(?:\+(\d))?=(\d+)")
LINE = re.compile(r"(?:(\d)?x(?:[+-]\d+)?=)?(\d+)([-+*/])(\d+): (.*) so (\d+)")


def only(tier, n=150, split="train", seed=0):
    mix = [1.0 if t == tier else 0.0 for t in range(len(T.TIERS))]
    return T.ladder_problems(n, split, seed=seed, mix=mix)


def by_python(a, op, b):
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]


def solve(equation):
    """The solution of a question or state such as '7(x+12)=742', '7x+84=742' or 'x+12=106', by sympy."""
    lhs, rhs = equation.split("=")
    lhs = re.sub(r"(\d)([x(])", r"\1*\2", lhs)
    return sympy.solve(sympy.Eq(sympy.sympify(lhs), eval(rhs)), sympy.Symbol("x"))


def lines_of(text):
    return text.split(R.END_THINK)[0].split("\n")


def column_is_true(col):
    """A column statement as plain arithmetic: '3+4+1=8', '5-9+10=6', '0-9-1+10=0', '65/7=9r2'."""
    if m := COLUMN_DIV.fullmatch(col):
        cur, a, q, r = map(int, m.groups())
        return a * q + r == cur and 0 <= r < a and 0 <= q <= 9
    if m := COLUMN_MUL.fullmatch(col):
        x, b, carry, s = (int(g or 0) for g in m.groups())
        return x * b + carry == s
    m = COLUMN_ADD_SUB.fullmatch(col)
    assert m, col
    lhs, rhs = col.split("=")
    return eval(lhs) == int(rhs)


# --------------------------------------------------------------------------- tasks


def test_every_tier_answer_is_right_by_python_and_sympy():
    for tier, spec in enumerate(T.TIERS):
        for p in only(tier) + only(tier, 40, "test"):
            assert p.tier == tier and p.prompt == f"Q: {p.question}\n{R.THINK}"
            if spec.kind == "chain":
                assert eval(p.question) == p.answer >= 0  # a plain Python expression
                operands = re.findall(r"\d+", p.question)
                assert spec.ops[0] <= len(operands) - 1 <= spec.ops[1]
                assert all(spec.digits[0] <= len(o) <= spec.digits[1] for o in operands)
            else:
                assert solve(p.question) == [p.answer]
                ops = len(re.findall(r"[+-]", p.question))  # the right side's, and one on the left
                lengths = sorted(len(work) for work, _ in p.paths)  # bracket: divide first, or expand first
                assert lengths == ([ops + 1] if spec.kind == "equation" else [ops + 1, ops + 2])
                assert spec.ops[0] <= lengths[0] <= spec.ops[1]
            assert len(p.paths) == (2 if spec.kind == "bracket" else 1)
            for path in range(len(p.paths)):  # the verifier agrees with the task's own answer on every path
                assert R.is_correct(p, T.trace(p, path=path))
                assert R.extract_answer(T.trace(p, "verbose", path=path)) == p.answer


def test_scratchpad_is_right_line_by_line_and_column_by_column():
    for tier in range(len(T.TIERS)):
        for p, path in ((p, path) for p in only(tier, 100) for path in range(len(p.paths))):
            lines, work = lines_of(T.trace(p, path=path))[:-1], p.paths[path][0]
            assert len(lines) == len(work) and (path or tuple(lines) == p.steps)
            previous = None
            for line, step in zip(lines, work):
                m = LINE.fullmatch(line)
                a, op, b, cols, stated = int(m[2]), m[3], int(m[4]), m[5].split(" "), int(m[6])
                assert by_python(a, op, b) == stated
                assert all(column_is_true(c) for c in cols), line
                assert previous is None or p.kind != "arithmetic" or a == previous  # a chain continues its value
                previous = stated
                if op in "+-*":  # the column digits, least significant first, rebuild the result
                    digits = [int(c.split("=")[1]) % 10 for c in cols]
                    carry = int(cols[-1].split("=")[1]) // 10 if op in "+*" else 0
                    assert sum(d * 10 ** i for i, d in enumerate(digits)) + carry * 10 ** len(cols) == stated
                    width = len(str(a)) if op == "*" else max(len(str(a)), len(str(b)))
                    assert [c[0] for c in cols] == list(str(a).zfill(width)[::-1])
                else:  # long division, most significant digit first
                    assert int("".join(c.split("=")[1].split("r")[0] for c in cols)) == stated
            assert previous == p.answer


def test_held_out_by_the_v1_rule_and_splits_disjoint():
    test = T.ladder_problems(400, "test")
    train = T.ladder_problems(3000, "train", distinct=False)
    assert all(p.held_out for p in test) and not any(p.held_out for p in train)
    assert not {p.question for p in test} & {p.question for p in train}
    for p in test[:50] + train[:50]:  # the same hash as a v1 problem with that question
        assert p.held_out == R.Problem(p.kind, p.question, p.answer, p.steps, p.difficulty).held_out
    assert [p.question for p in T.ladder_problems(400, "test")] == [p.question for p in test]
    assert [p.tier for p in test[:8]] == [0, 1, 2, 3, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="mix"):
        T.ladder_problems(3, mix=[1.0, 1.0])
    with pytest.raises(ValueError, match="split"):
        T.ladder_problems(3, "dev")
    with pytest.raises(ValueError, match="tier"):
        T.ladder_problem(random.Random(0), 4)


# --------------------------------------------------------------------------- reflection


def test_every_possible_error_is_wrong_and_every_correction_right():
    steps = [s for tier in range(len(T.TIERS)) for p in only(tier, 60) for work, _ in p.paths for s in work]
    steps += [T.Step(999, "+", 1), T.Step(1000, "-", 1), T.Step(105, "-", 98), T.Step(99, "/", 9, "x="),
              T.Step(99, "*", 9)]
    kinds = set()
    for step in steps:
        errors = T.possible_errors(step)
        assert errors, step
        for e in errors:
            kinds.add(e.kind)
            wrong, wait = T.reflection_lines(step, e)
            m = LINE.fullmatch(wrong)
            assert by_python(int(m[2]), m[3], int(m[4])) != int(m[6]) and int(m[6]) >= 0  # really wrong
            redo, said = re.fullmatch(r"Wait, (.*), not (\d+)\.", wait).groups()  # redo first, then judge
            fixed = LINE.fullmatch(redo)
            assert by_python(int(fixed[2]), fixed[3], int(fixed[4])) == int(fixed[6]) == step.result  # right
            assert (fixed[2], fixed[3], fixed[4]) == (m[2], m[3], m[4])  # the same step, redone
            assert int(said) == int(m[6])  # names the result it replaces
            right_col, wrong_col = next((r, w) for r, w in zip(fixed[5].split(" "), m[5].split(" ")) if r != w)
            assert column_is_true(right_col)
            assert column_is_true(wrong_col) == (e.kind == "drop")  # a dropped carry is a true sum without it
            stated = int(wrong_col.split("=")[1].split("r")[0])  # a plausible slip: still a digit (0..19 adding)
            assert 0 <= stated <= {"+": 19, "*": 89}.get(step.op, 9)
    assert kinds == {"drop", "slip"}
    with pytest.raises(ValueError, match="right"):
        T.reflection_lines(T.Step(12, "+", 30), T.ColumnError("drop", 1))  # no carry to drop: not an error


def test_reflective_traces_have_one_wrong_step_then_a_fix_and_the_right_answer():
    rng = random.Random(3)
    for tier in range(len(T.TIERS)):
        for p in only(tier, 80):
            for style, path in ((style, path) for style in T.STYLES for path in range(len(p.paths))):
                text = T.trace(p, style, rng, reflect=True, path=path)
                lines = lines_of(text)
                waits = [i for i, line in enumerate(lines) if line.startswith("Wait")]
                assert len(waits) == 1 and R.is_correct(p, text)
                work = [LINE.fullmatch(line) for line in lines if LINE.fullmatch(line)]
                wrong = [m for m in work if by_python(int(m[2]), m[3], int(m[4])) != int(m[6])]
                assert len(wrong) == 1 and lines[waits[0] - 1] == wrong[0][0]  # the wrong line comes just before
                events = C.rechecks(text)
                assert len(events) == 1 and events[0].on_wrong_step and events[0].fixed
                assert C.style_of(text) == style
                redo = re.fullmatch(r"Wait, (.*), not \d+\.", lines[waits[0]])[1]
                assert text.replace(lines[waits[0] - 1] + "\n" + lines[waits[0]], redo) \
                    == T.trace(p, style, path=path)  # without the error and its re-check, the plain trace
    with pytest.raises(ValueError, match="rng"):
        T.trace(only(0, 1)[0], reflect=True)
    with pytest.raises(ValueError, match="rng"):
        T.trace(only(0, 1)[0], confirm=True)


def test_confirming_traces_redo_one_right_step_and_find_it_right():
    rng = random.Random(4)
    for tier in range(len(T.TIERS)):
        for p in only(tier, 60):
            for style in T.STYLES:
                text = T.trace(p, style, rng, confirm=True, path=0)
                lines = lines_of(text)
                (k,) = [i for i, line in enumerate(lines) if line.startswith("Wait")]
                redo = re.fullmatch(r"Wait, (.*), right\.", lines[k])[1]
                assert redo == lines[k - 1] and C.parse_work(redo).right  # the line just before, redone the same
                (e,) = C.rechecks(text)
                assert e.kept and e.verdict == "right" and not e.on_wrong_step
                assert text.replace(lines[k] + "\n", "", 1) == T.trace(p, style, path=0) and R.is_correct(p, text)
                both = T.trace(p, style, rng, reflect=True, confirm=True, path=0)  # a correction may be re-checked
                events = C.rechecks(both)
                assert [e.verdict for e in events] in (["not", "right"], ["right", "not"]) and R.is_correct(p, both)
                assert sum(e.fixed for e in events) == 1 and sum(e.kept for e in events) == 1


# --------------------------------------------------------------------------- styles and data


def test_both_styles_parse_and_verbose_checks_are_true():
    for tier in range(len(T.TIERS)):
        for p, path in ((p, path) for p in only(tier, 50) for path in range(len(p.paths))):
            terse, verbose = T.trace(p, "terse", path=path), T.trace(p, "verbose", path=path)
            work = p.paths[path][0]
            assert C.style_of(terse) == "terse" and C.style_of(verbose) == "verbose"
            terse_lines = lines_of(terse)[:-1]
            assert path or terse_lines == list(p.steps)
            assert [C.parse_work(x) for x in terse_lines] == [C.parse_work(T.work_line(s)) for s in work]
            assert all(C.parse_work(x).right for x in terse_lines)
            vlines = lines_of(verbose)[:-1]
            checks = [x for x in vlines if x.startswith("Check: ")]
            assert len(checks) == len(work) == sum(x.startswith("Step ") for x in vlines)
            for check in checks:  # 'Check: 85-48=37, right.'
                lhs, rhs = check[len("Check: "):-len(", right.")].split("=")
                assert eval(lhs) == int(rhs)
            assert [x for x in vlines if C.parse_work(x)] == terse_lines
            states = [x.split(": ", 1)[1] for x in vlines if x.startswith("Step ")]
            for state, step in zip(states, work):  # each restatement is the problem as it stands
                if p.kind == "arithmetic":
                    assert eval(state) == p.answer and state.startswith(f"{step.a}{step.op}{step.b}")
                else:
                    assert solve(state) == [p.answer]
                    works_on = (f"{step.b}(x" in state and f"{step.a})" in state if step.op == "*"  # expands
                                else state.endswith(f"{step.a}") or f"{step.a}{step.op}{step.b}" in state)
                    assert works_on, (state, step)
            assert C.thinking_length(verbose) > C.thinking_length(terse)
    with pytest.raises(ValueError, match="style"):
        T.trace(only(0, 1)[0], "chatty")


def test_training_texts_draw_styles_and_reflection_at_the_stated_shares():
    ps = T.ladder_problems(3000, "train", mix=(1, 1, 1, 1), distinct=False)
    texts = T.training_texts(ps, T.TraceMix(0.2, 0.15, confirm_share=0.1), seed=1)
    verbose = sum(C.style_of(t.split(R.THINK, 1)[1]) == "verbose" for t in texts) / len(texts)
    verdicts = [[e.verdict for e in C.rechecks(t.split(R.THINK, 1)[1])] for t in texts]
    reflect, confirm = (sum(v in vs for vs in verdicts) / len(texts) for v in ("not", "right"))
    assert abs(verbose - 0.2) < 0.03 and abs(reflect - 0.15) < 0.03  # 4 binomial standard errors
    assert abs(confirm - 0.1) < 0.025 and abs(sum(len(vs) == 2 for vs in verdicts) / len(texts) - 0.015) < 0.01
    assert all(t.startswith(p.prompt) for t, p in zip(texts, ps))  # nothing in the prompt marks the style
    assert all(R.is_correct(p, t) for t, p in zip(texts, ps))
    none = T.training_texts(ps[:100], T.TraceMix(0.0, 0.0, confirm_share=0.0))
    assert all(t in [p.prompt + T.trace(p, path=k) for k in range(len(p.paths))] for t, p in zip(none, ps))
    two = [p for p in ps if len(p.paths) == 2]
    plain = T.training_texts(two, T.TraceMix(0.0, 0.0, confirm_share=0.0))
    first = sum(t == p.prompt + p.solution for t, p in zip(plain, two))
    assert abs(first / len(two) - 0.5) < 0.05  # either path, half the time each (4 binomial standard errors)
    every = T.training_texts(ps[:100], T.TraceMix(1.0, 1.0, confirm_share=1.0))
    assert all(C.style_of(t) == "verbose" and len(C.rechecks(t)) == 2 for t in every)
    with pytest.raises(ValueError, match="verbose_share"):
        T.TraceMix(1.5, 0.1)
    with pytest.raises(ValueError, match="confirm_share"):
        T.TraceMix(confirm_share=-0.1)


def test_every_trace_encodes_without_unknown_tokens():
    tok = R.reasoning_tokenizer()
    rng = random.Random(0)
    texts = [p.prompt + T.trace(p, style, rng, reflect) for tier in range(len(T.TIERS)) for p in only(tier, 40)
             for style in T.STYLES for reflect in (False, True)]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert 0 not in ids and tok.decode(ids) == text  # the unknown token is EOS (id 0)
        assert not T.unknown_characters(text)
    assert T.unknown_characters("37+48=85 ÷") == {"÷"}


def test_thinking_length_grows_with_tier_in_the_data():
    for style in T.STYLES:
        means = [sum(C.thinking_length(T.trace(p, style)) for p in only(t, 300)) / 300 for t in range(len(T.TIERS))]
        assert all(b > a for a, b in zip(means, means[1:])), (style, means)


# --------------------------------------------------------------------------- measures on hand-built completions

EOS = R.EOS


def test_pass_at_k_known_values_and_the_product_form():
    assert C.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert C.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert C.pass_at_k(5, 2, 3) == pytest.approx(0.9)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert C.pass_at_k(16, 0, 16) == 0.0 and C.pass_at_k(16, 1, 16) == 1.0 and C.pass_at_k(16, 3, 1) == 3 / 16
    for n, c, k in [(16, 3, 4), (10, 7, 5), (20, 1, 8)]:  # Chen et al.'s numerically stable form
        product = 1.0 - math.prod(1 - k / i for i in range(n - c + 1, n + 1))
        assert C.pass_at_k(n, c, k) == pytest.approx(product)
        # and the definition: the share of k-subsets of the n samples holding a right one
        right = [True] * c + [False] * (n - c)
        subsets = list(combinations(right, k))
        assert C.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError, match="k <= n"):
        C.pass_at_k(4, 1, 5)


def test_majority_vote_known_values():
    assert C.majority_answer(["</think>Answer: 3", "</think>Answer: 5", "x</think>Answer: 5", "no answer"]) == 5
    assert C.majority_answer(["Answer: 7", "Answer: 2", "Answer: 2", "Answer: 7"]) == 7  # tie: first seen
    assert C.majority_answer(["nothing", ""]) is None
    assert C.majority_answer(["Answer: 1", "x", "y", "z"]) == 1  # no-answer samples do not vote


def test_recheck_detection_on_hand_built_completions():
    fix = "37+48: 7+8=15 3+4=7 so 75\nWait, 37+48: 7+8=15 3+4+1=8 so 85, not 75.\n</think>Answer: 85"
    (e,) = C.rechecks(fix)
    assert e.on_wrong_step and e.fixed and e.before.stated == 75 and e.after.stated == 85 and e.verdict == "not"
    assert not e.kept and not e.on_right_step
    confirmed = "37+48: 7+8=15 3+4+1=8 so 85\nWait, 37+48: 7+8=15 3+4+1=8 so 85, right.\n</think>"
    (e,) = C.rechecks(confirmed)
    assert e.on_right_step and e.kept and not e.fixed and e.verdict == "right"
    broke = "37+48: 7+8=15 3+4+1=8 so 85\nWait, 37+48: 7+8=15 3+4=7 so 75, not 85.\n</think>"
    (e,) = C.rechecks(broke)
    assert e.on_right_step and not e.kept and not e.on_wrong_step
    still_wrong = "37+48: 7+8=15 3+4=7 so 75\nWait, 37+48: 7+8=15 3+4=7 so 74, not 75.\n</think>"
    (e,) = C.rechecks(still_wrong)
    assert e.on_wrong_step and not e.fixed
    other_step = "37+48: 7+8=15 3+4=7 so 75\nWait, 11+11: 1+1=2 1+1=2 so 22, not 75.\n</think>"
    (e,) = C.rechecks(other_step)
    assert e.on_wrong_step and e.after.right and not e.fixed  # a right line, but not the step it re-checks
    two = ("x=659/7: 6/7=0r6 65/7=8r2 29/7=4r1 so 84\nWait, x=658/7: 6/7=0r6 65/7=9r2 28/7=4r0 so 94, not 84.\n"
           "Wait, 94+1: 4+1=5 9+0=9 so 95, right.\n</think>")
    first, second = C.rechecks(two)
    assert first.on_wrong_step and not first.fixed  # 659/7 is not 84; the redo is of 658/7, another step
    assert second.on_right_step and not second.kept  # it follows the right redo 658/7=94, and redoes another step
    assert C.rechecks("37+48: 7+8=15 3+4=7 so 75\n</think>Answer: 75 Wait") == []  # only thinking counts
    assert C.rechecks("Wait, hmm.\n</think>")[0].before is None
    assert C.parse_work("x=684/9: 6/9=0r6 68/9=7r5 54/9=6r0 so 76").right
    assert not C.parse_work("7x=684-25: 4-5+10=9 8-2-1=5 6-0=6 so 669").right
    assert C.parse_work("Check: 85-48=37, right.") is None


def test_style_and_thinking_length_on_hand_built_completions():
    terse = "12+30: 2+0=2 1+3=4 so 42\n</think>Answer: 42" + EOS
    verbose = "Step 1 of 1: 12+30\n12+30: 2+0=2 1+3=4 so 42\nCheck: 42-30=12, right.\n</think>Answer: 42"
    assert C.style_of(terse) == "terse" and C.style_of(verbose) == "verbose"
    assert C.style_of("12+30: so 42\n</think>Check: 1") == "terse"  # after </think> does not count
    assert C.thinking("abc\n</think>Answer: 1" + EOS) == "abc\n"
    assert C.thinking_length(terse) == len("12+30: 2+0=2 1+3=4 so 42\n") == 25
    assert C.thinking_length("abc" + EOS + "zz") == 3 and C.thinking_length("abcd") == 4  # no </think>
    assert C.thinking_length(terse, R.reasoning_tokenizer()) == 25  # one token per character


def test_mean_by_tier_and_judge_by_hand():
    assert C.mean_by_tier([0, 1, 1, 3], [1.0, 0.0, 1.0, 0.5], 4) == [1.0, 0.5, None, 0.5]
    good = C.judge([0.95, 0.8, 0.5, 0.3], 0.6, 0.2, 0.5, 0.7, [40, 80, 100, 200])
    assert all(v["pass"] for v in good.values()) and set(good) == set(C.TARGETS)
    assert good["majority@k - greedy (points)"]["value"] == pytest.approx(10)
    assert good["hardest tier pass@k / pass@1"]["value"] == pytest.approx(2.5)
    bad = C.judge([0.85, 0.9, 0.5, 0.45], 0.8, 0.3, 0.4, 0.82, [40, 30, 100, 200])
    assert not any(v["pass"] for v in bad.values())
    assert not C.judge([0.95, 0.8, 0.5, 0.0], 0.6, 0.0, 0.0, 0.7, [1, 2, 3, 4])["hardest tier pass@k / pass@1"]["pass"]
    assert C.judge([0.95, 0.8, 0.5, 0.0], 0.6, 0.0, 0.1, 0.7, [1, 2, 3, 4])["hardest tier pass@k / pass@1"]["pass"]
    edge = C.judge([0.9, 0.9, 0.5, 0.4], 0.4, 0.2, 0.3, 0.45, [1, 2, 3, 4])  # every bound is inclusive
    assert [edge[k]["pass"] for k in C.TARGETS] == [True, True, True, True, True, True, True]


def test_summarize_on_hand_built_completions():
    ps = T.ladder_problems(8, "test")  # tiers 0..3 twice
    right = [T.trace(p) for p in ps]
    wrong = [T.trace(p).replace(f"Answer: {p.answer}", f"Answer: {p.answer + 1}") for p in ps]
    # greedy: right on tiers 0-2, wrong on tier 3. Samples (4 per problem): tier 3 has 1 right of 4 and a
    # wrong majority on the first tier-3 problem, 2 right of 4 (a 2-2 tie, right seen first) on the second.
    greedy = [wrong[i] if p.tier == 3 else right[i] for i, p in enumerate(ps)]
    drawn = []
    for i, p in enumerate(ps):
        if p.tier < 3:
            drawn += [right[i]] * 3 + [T.trace(p, "verbose")]
        elif i == 3:
            drawn += [wrong[i], right[i], wrong[i], wrong[i]]
        else:
            drawn += [right[i], wrong[i], right[i], wrong[i]]
    s = C.summarize(ps, greedy, drawn, 4, R.reasoning_tokenizer())
    assert s["greedy_accuracy_by_tier"] == [1.0, 1.0, 1.0, 0.0] and s["greedy_accuracy"] == 0.75
    assert s["pass@1_by_tier"] == [1.0, 1.0, 1.0, pytest.approx((0.25 + 0.5) / 2)]
    assert s["pass@4_by_tier"] == [1.0, 1.0, 1.0, 1.0]
    assert s["majority@4_by_tier"] == [1.0, 1.0, 1.0, 0.5] and s["majority@4"] == 7 / 8
    assert s["thinking_chars_by_tier"] == [sum(len(T.trace(p).split(R.END_THINK)[0]) for p in ps if p.tier == t) / 2
                                           for t in range(4)]
    assert s["thinking_tokens_by_tier"] == s["thinking_chars_by_tier"]
    assert s["style"]["verbose"]["share"] == 6 / 32 and s["style"]["verbose"]["accuracy"] == 1.0
    assert s["style"]["terse"]["accuracy"] == pytest.approx((6 * 3 + 3) / 26)
    assert s["recheck"]["sampled_rate"] == 0 and s["recheck"]["fix_rate"] is None
    assert s["targets"]["hardest tier pass@k / pass@1"]["value"] == pytest.approx(1 / 0.375)
    assert s["targets"]["majority@k - greedy (points)"]["value"] == pytest.approx(12.5)
    rng = random.Random(0)
    drawn[0] = T.trace(ps[0], "terse", rng, reflect=True)
    s = C.summarize(ps, greedy, drawn, 4)
    assert s["recheck"] == {"greedy_rate": 0.0, "sampled_rate": 1 / 32, "rechecks": 1, "on_wrong_step": 1,
                            "fixed": 1, "fix_rate": 1.0, "on_right_step": 0, "kept": 0, "keep_rate": None}
    drawn[1] = T.trace(ps[0], "terse", rng, confirm=True)
    assert C.summarize(ps, greedy, drawn, 4)["recheck"] == {
        "greedy_rate": 0.0, "sampled_rate": 2 / 32, "rechecks": 2, "on_wrong_step": 1, "fixed": 1, "fix_rate": 1.0,
        "on_right_step": 1, "kept": 1, "keep_rate": 1.0}
    with pytest.raises(ValueError, match="drawn"):
        C.summarize(ps, greedy, drawn[:-1], 4)


# --------------------------------------------------------------------------- card and recipe (smoke)


def test_card_runs_on_the_smoke_reasoner():
    smoke = T.reasoner("smoke")
    card = C.card(smoke.model, smoke.tokenizer, n=4, samples=2, max_new_tokens=16)
    assert card["problems"] == 4 and card["max_new_tokens"] == 16
    assert set(card["targets"]) == set(C.TARGETS) and all(isinstance(v["pass"], bool) for v in card["targets"].values())
    assert len(card["greedy_accuracy_by_tier"]) == len(T.TIERS) and card["per_problem"]["tier"] == [0, 1, 2, 3]
    assert 0 <= card["pass@1"] <= card["pass@2"] <= 1
    assert card["style"]["terse"]["share"] + card["style"]["verbose"]["share"] == pytest.approx(1)
    ps = T.ladder_problems(8, "test")  # the default budget: the longest trace and a quarter, within 1024 positions
    prompt = max(len(smoke.tokenizer(p.prompt, add_special_tokens=False)["input_ids"]) for p in ps)
    assert C.default_budget(smoke.model, smoke.tokenizer, ps) <= 1024 - prompt
    longest = max(len(smoke.tokenizer(T.trace(ps[0], "verbose", random.Random(i), True, confirm=True))["input_ids"])
                  for i in range(20))  # room for any verbose trace with both re-checks, and EOS
    assert longest + 1 < C.default_budget(smoke.model, smoke.tokenizer, ps[:1]) < 1.5 * longest
    with pytest.raises(ValueError, match="n must be"):
        C.card(smoke.model, smoke.tokenizer, n=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        C.card(smoke.model, smoke.tokenizer, n=4, max_new_tokens=1100)  # past the 1024 positions


def test_train_reasoner_smoke_and_the_small_proposal():
    spec = T.REASONERS["smoke"]
    model, record = T.train_reasoner(spec)
    assert model.config.vocab_size == len(R.reasoning_tokenizer()) and record["tokens"] == 4 * 4 * 128
    assert record["val"] and math.isfinite(record["val"][-1]["loss"]) and record["data"]["traces"] == 200
    assert abs(record["data"]["verbose_share"] - 0.2) < 0.15 and record["spec"]["traces"]["reflect_share"] == 0.15
    small, draft = T.REASONERS["small"], T.DRAFTS["small"]
    ctx = 256
    assert T.forward_flops_per_token(small.model, ctx) >= 4 * T.forward_flops_per_token(draft.model, ctx)
    tok, rng = R.reasoning_tokenizer(), random.Random(0)
    longest = max(len(tok(p.prompt + T.trace(p, "verbose", rng, True, confirm=True), add_special_tokens=False)
                      ["input_ids"]) for p in only(3, 500))
    assert longest < small.model.max_seq_len == draft.model.max_seq_len
    with pytest.raises(ValueError, match="tier_mix"):
        T.ReasonerSpec(spec.model, spec.train, 10, tier_mix=(1.0,))


def test_tiers_between_reads_the_card_and_falls_back_to_every_tier():
    r = T.Reasoner("x", None, None, {"card": {"pass@1_by_tier": [0.95, 0.6, 0.12, 0.01],
                                              "pass@16_by_tier": [1.0, 0.98, 0.77, 0.51]}})
    assert T.tiers_between(r, 0.1, 0.9) == [1, 2]
    assert T.tiers_between(r, 0.1, 0.9, statistic="pass@16") == [2, 3]  # best-of-16 off its ceiling
    assert T.tiers_between(r, 0.5, 0.55) == [0, 1, 2, 3]  # none qualifies: every tier
    assert T.tiers_between(T.Reasoner("x", None, None, {}), 0.1, 0.9) == [0, 1, 2, 3]  # no card


def test_the_wrong_step_is_left_out_of_the_loss_and_nothing_else():
    tok = R.reasoning_tokenizer()
    ps = T.ladder_problems(200, "train", distinct=False)
    examples = T.training_examples(ps, T.TraceMix(0.2, 1.0), seed=3)  # every trace reflective
    texts = T.training_texts(ps, T.TraceMix(0.2, 1.0), seed=3)
    assert ["".join(t for t, _ in ex) for ex in examples] == texts
    for ex, text in zip(examples, texts):
        left_out = [t for t, m in ex if m]
        assert len(left_out) == 1 and left_out[0].endswith("\n")
        wrong = C.parse_work(left_out[0].strip())
        assert wrong is not None and not wrong.right  # exactly the injected wrong line, and it is wrong
        after = text.split(left_out[0], 1)[1]
        assert after.startswith(T.WAIT)  # its re-check follows and is trained on
    ids, labels = T.example_blocks(tok, examples, 64)
    flat_ids, flat_labels = ids.flatten(), labels.flatten()
    kept = flat_labels != -100
    assert torch.equal(flat_labels[kept], flat_ids[kept])
    joined = tok(tok.eos_token.join(texts), add_special_tokens=False)["input_ids"]
    assert flat_ids.tolist() == joined[: len(flat_ids)]  # the same tokens token_blocks would make
    masked_chars = sum(len(t) for ex in examples for t, m in ex if m)
    assert 0.9 * masked_chars < (~kept).sum() <= masked_chars  # (the tail cut off by the last block)
    unmasked = T.training_examples(ps, T.TraceMix(0.2, 1.0, mask_wrong_step=False), seed=3)
    assert not any(m for ex in unmasked for _, m in ex)
