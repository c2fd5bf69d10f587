import re
from decimal import Decimal, localcontext
from fractions import Fraction

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from paperzoo.core.reasoning import reasoning_tokenizer
from paperzoo.phenomena.number_cookbook import (
    CASES, INSTRUCTION, Case, evaluate, extract_answer, index_hints, k_digit_tokens, reversed_digits, score)


# --- an independent reference: Python's Fraction for the value, Decimal for every written form ---------------

def ref_float(x: Fraction) -> str:
    with localcontext() as ctx:
        ctx.prec = 400
        text = format(Decimal(x.numerator) / Decimal(x.denominator), "f")
    whole, _, decimals = text.partition(".")
    return f"{whole}.{decimals.rstrip('0') or '0'}"


def ref_scientific(x: Fraction, sig: int | None = None) -> str:
    if x == 0:
        return "0.0e0"  # the official ScientificNotation of zero
    with localcontext() as ctx:
        ctx.prec = 400
        d = Decimal(x.numerator) / Decimal(x.denominator)
        text = format(d.normalize(), "e") if sig is None else format(d, f".{sig - 1}e")  # Decimal rounds half-even
    mantissa, exponent = text.split("e")
    if sig is None:
        whole, _, decimals = mantissa.partition(".")
        mantissa = f"{whole}.{decimals or '0'}"
    return f"{mantissa}e{int(exponent)}"


def ref_written(x: Fraction, kind: str) -> str:
    if kind in ("Integer", "int"):
        assert x.denominator == 1
        return str(x.numerator)
    return {"Float": ref_float, "Fraction": lambda v: f"{v.numerator}/{v.denominator}",
            "ScientificNotation": ref_scientific}[kind](x)


def ref_digitwise(a: str, b: str, op) -> Fraction:
    """Pad integer parts on the left and decimals on the right to a common width, then apply op digit by digit."""
    ia, _, da = a.partition(".")
    ib, _, db = b.partition(".")
    w, v = max(len(ia), len(ib)), max(len(da), len(db))
    whole = "".join(str(op(int(x), int(y))) for x, y in zip(ia.zfill(w), ib.zfill(w)))
    decimals = "".join(str(op(int(x), int(y))) for x, y in zip(da.ljust(v, "0"), db.ljust(v, "0")))
    return Fraction(f"{whole}.{decimals}" if v else whole)


def operands_of(case: Case, question: str) -> tuple[str, str | None]:
    instruction, op = INSTRUCTION[case.task]
    tail = question.split(instruction)[1].removeprefix(" Align the decimal points.").strip()
    assert tail.endswith(" =")
    tail = tail[:-2]
    if op is None:
        return tail, None
    a, b = tail.split(f" {op} ")
    return a, b


def reference_answer(case: Case, a: str, b: str | None) -> str:
    x, y = Fraction(a), (Fraction(b) if b is not None else None)
    digits = re.sub(r"\D", "", a.split("e")[0]) if case.representation != "Fraction" else None
    t, out = case.task, case.answer_type
    arithmetic = {"add": lambda: x + y, "sub": lambda: x - y, "multiply": lambda: x * y, "truediv": lambda: x / y,
                  "floordiv": lambda: Fraction(x // y), "mod": lambda: x % y, "max": lambda: max(x, y),
                  "min": lambda: min(x, y), "to_float": lambda: x, "to_scient": lambda: x}
    if t in arithmetic:
        return ref_written(arithmetic[t](), out)
    if t == "sig":
        return ref_scientific(x, int(b))
    if t.startswith("digit_"):
        op = {"digit_max": max, "digit_min": min, "digit_add": lambda d, e: (d + e) % 10}[t]
        return ref_written(ref_digitwise(a, b, op), out)
    return {"get_digit": lambda: digits[int(b)], "length": lambda: str(len(digits)),
            "count": lambda: str(digits.count(b))}[t]()


def test_the_41_cases_of_the_paper_table():
    assert len(CASES) == 41 and len({c.name for c in CASES}) == 41
    per_representation = {rep: sum(c.representation == rep for c in CASES)
                          for rep in ("Integer", "Float", "Fraction", "ScientificNotation")}
    assert per_representation == {"Integer": 16, "Float": 12, "Fraction": 7, "ScientificNotation": 6}
    assert len({c.task for c in CASES}) == 17


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_generator_agrees_with_python_arithmetic(case):
    for digits in (1, 2, 5, 9):
        for question, answer in case.sample(25, digits, seed=digits):
            a, b = operands_of(case, question)
            assert answer == reference_answer(case, a, b), (question, answer)
            assert case.check(answer, answer)


def test_generators_respect_the_benchmark_constraints():
    by_name = {c.name: c for c in CASES}
    for question, answer in by_name["sub_ScientificNotation"].sample(200, 4):
        a, b = operands_of(by_name["sub_ScientificNotation"], question)
        assert Fraction(a) - Fraction(b) >= 1 and int(a.split("e")[1]) > int(b.split("e")[1])
        assert int(answer.split("e")[1]) >= 0
    for question, _ in by_name["add_ScientificNotation"].sample(200, 4):
        a, b = operands_of(by_name["add_ScientificNotation"], question)
        assert abs(int(a.split("e")[1]) - int(b.split("e")[1])) <= 5
    for name in ("max_Fraction", "min_Fraction"):
        for question, _ in by_name[name].sample(100, 3):
            assert all(Fraction(x) <= 1 for x in operands_of(by_name[name], question))
    for question, _ in by_name["mod_Integer"].sample(200, 8):
        a, b = operands_of(by_name["mod_Integer"], question)
        assert int(a) >= int(b) > 0 and len(b) <= int(0.7 * len(a)) + 1
    for question, _ in by_name["add_Integer"].sample(200, 6):
        a, b = operands_of(by_name["add_Integer"], question)
        assert len(a) == 6 and 3 <= len(b) <= 6  # the second operand is at least half as long
    for question, _ in by_name["add_Fraction"].sample(100, 4):
        a, b = operands_of(by_name["add_Fraction"], question)
        assert len(str(Fraction(a).denominator)) == 4 and 2 <= len(str(Fraction(b).denominator)) <= 4


def test_sig_rounds_half_to_even():
    sig = Case("sig", "Integer")
    assert sig.answer("1250", "2") == "1.2e3" and sig.answer("1350", "2") == "1.4e3"
    assert sig.answer("1251", "2") == "1.3e3" and sig.answer("1996", "3") == "2.00e3"
    assert sig.answer("99999", "2") == "1.0e5"


def off_by_one(answer: str) -> list[str]:
    """The answer with each digit in turn moved by one."""
    return [answer[:i] + str((int(c) + 1) % 10) + answer[i + 1:] for i, c in enumerate(answer) if c.isdigit()]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_checker_accepts_the_answer_and_rejects_off_by_one_digits(case):
    for _, answer in case.sample(5, 4):
        assert case.check(answer, answer) and case.check(f" {answer}", answer)
        for wrong in off_by_one(answer):
            assert not case.check(wrong, answer), (wrong, answer)
        assert not case.check("", answer)


def test_digit_match_and_length_error_on_hand_set_strings():
    def m(pred, gold, kind):
        s = score(pred, gold, kind)
        return s["exact_match"], s["digit_match"], s["length_error"]

    assert m("1234", "1234", "Integer") == (1.0, 1.0, 0.0)
    assert m("1334", "1234", "Integer") == (0.0, 0.75, 0.0)
    assert m("234", "1234", "Integer") == (0.0, 0.75, 1.0)  # units aligned with units: 4, 3, 2 match
    assert m("12345", "1234", "Integer") == (0.0, 0.0, 1.0)  # shifted by one place: nothing matches
    assert m("1.05", "1.5", "Float") == (0.0, 0.5, 1.0)  # decimals aligned at the point: 0 vs 5
    assert m("12.35", "2.3", "Float") == (0.0, 1.0, 2.0)
    assert m("12/7", "2/17", "Fraction") == (0.0, 2 / 3, 0.0)
    assert m("1.25e3", "1.2e13", "ScientificNotation") == (0.0, 0.75, 0.0)
    assert m("", "123", "Integer") == (0.0, 0.0, 3.0)
    assert m("12", "1.5", "Float") == (0.0, 0.0, 2.0)  # no decimal point: unreadable as a float
    assert m("3.10", "3.1", "Float")[0] == 0.0  # the official metric compares the written digits


def test_extract_answer_reads_the_number_after_the_equals_sign():
    assert extract_answer("12 + 3 = 15 and more", "Integer") == "15"
    assert extract_answer(" 1.5e3\n", "ScientificNotation") == "1.5e3"
    assert extract_answer("x 7/13", "Fraction") == ""
    assert extract_answer("42", "Float") == ""


def test_k_digit_tokens_split_left_to_right():
    assert k_digit_tokens("1234567", 1) == list("1234567")
    assert k_digit_tokens("1234567", 2) == ["12", "34", "56", "7"]
    assert k_digit_tokens("1234567", 3) == ["123", "456", "7"]
    assert k_digit_tokens("12.345", 2) == ["12", ".", "34", "5"]
    assert k_digit_tokens("123/45", 3) == ["123", "/", "45"]


def test_reversed_digits():
    assert reversed_digits("1200") == "0021"
    assert reversed_digits("123.45") == "321.54"
    assert reversed_digits("1.5e12") == "1.5e21"


def test_index_hints_mark_each_digit_with_its_place():
    assert index_hints("123") == ["c", "1", "b", "2", "a", "3"]
    assert index_hints("45") == ["b", "4", "a", "5"]  # units of 123 and of 45 share the marker 'a'
    assert index_hints("3.14") == ["a", "3", ".", "a", "1", "b", "4"]
    assert "".join(index_hints("9081726354")[1::2]) == "9081726354"


def tiny_char_llama():
    tok = reasoning_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval(), tok


def test_evaluate_runs_on_a_tiny_random_llama():
    model, tok = tiny_char_llama()
    case = Case("add", "Integer")
    result = evaluate(model, tok, case, n=3, digits=2)
    assert result["n"] == 3 and len(result["predictions"]) == 3
    for key in ("exact_match", "digit_match"):
        assert 0.0 <= result[key] <= 1.0
    rescored = [score(p, a, case.answer_type) for _, a, p in result["predictions"]]
    assert result["length_error"] == pytest.approx(sum(s["length_error"] for s in rescored) / 3)


class Oracle(torch.nn.Module):
    """A 'model' whose greedy continuation is the answer to the question, shifted by `error` in the last digit."""

    def __init__(self, tokenizer, answers, error=0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.answers, self.error = tokenizer, answers, error

    def generate(self, input_ids, max_new_tokens, **_):
        answer = self.answers[self.tokenizer.decode(input_ids[0])]
        if self.error:
            answer = answer[:-1] + str((int(answer[-1]) + self.error) % 10)
        new = self.tokenizer(answer + " junk", return_tensors="pt")["input_ids"][:, :max_new_tokens]
        return torch.cat([input_ids, new], 1)


@pytest.mark.parametrize("name", ["multiply_Integer", "add_Float", "truediv_Fraction", "sig_Float"])
def test_evaluate_scores_an_oracle_perfectly_and_an_off_by_one_oracle_not(name):
    _, tok = tiny_char_llama()
    case = next(c for c in CASES if c.name == name)
    answers = dict(case.sample(4, 3))
    right = evaluate(Oracle(tok, answers), tok, case, n=4, digits=3)
    assert (right["exact_match"], right["digit_match"], right["length_error"]) == (1.0, 1.0, 0.0)
    wrong = evaluate(Oracle(tok, answers, error=1), tok, case, n=4, digits=3)
    assert wrong["exact_match"] == 0.0 and 0.5 < wrong["digit_match"] < 1.0 and wrong["length_error"] == 0.0


# --- the experiment's task: k-digit tokens, least-significant digit first, optional padding and index hints ----

import numpy as np  # noqa: E402

from paperzoo.experiments.phenomena import number_cookbook as exp  # noqa: E402


def ref_vocabulary(k: int) -> dict[int, str]:
    """Independent id -> digit string map: after the 6 specials, all 1-digit strings, then 2-digit, ... (official order)."""
    strings = [str(v).zfill(n) for n in range(1, k + 1) for v in range(10**n)]
    return {exp.NUMBER0 + i: s for i, s in enumerate(strings)}


def decode_row(task, tokens, scored):
    """(a, b, c) as integers from one encoded row, hints dropped, pieces read least-significant first."""
    vocab = ref_vocabulary(task.k)
    ids = [t for t in tokens.tolist() if t != exp.PAD]
    assert ids[0] == exp.BOS and ids[-1] == exp.EOS
    op_at, eq_at = ids.index(exp.OPERATOR[task.op]), ids.index(exp.EQ)

    def number(part):
        return int("".join(vocab[t] for t in part if t in vocab)[::-1])

    assert scored.nonzero().flatten().tolist() == list(range(eq_at + 1, len(ids)))  # answer and EOS only
    return number(ids[1:op_at]), number(ids[op_at + 1:eq_at]), number(ids[eq_at + 1:-1])


def test_token_ids_follow_the_official_vocabulary_order():
    for k in (1, 2, 3):
        for i, s in ref_vocabulary(k).items():
            assert exp.token_id(s) == i
        assert exp.NumberArithmetic(k=k).vocab_size == exp.NUMBER0 + {1: 10, 2: 110, 3: 1110}[k]
    assert exp.NumberArithmetic(k=2, hints=True, max_index=30).vocab_size == exp.NUMBER0 + 110 + 30


def test_pieces_are_grouped_from_the_units():
    assert exp.number_pieces("12345", 1) == list("54321")
    assert exp.number_pieces("12345", 2) == ["54", "32", "1"]  # places 0-1, 2-3, 4
    assert exp.number_pieces("12345", 3) == ["543", "21"]  # places 0-2, 3-4: 345 and 12 written units first
    assert exp.number_pieces("1000", 3) == ["000", "1"]


@pytest.mark.parametrize("op", ["add", "multiply"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("width", [0, 6])
def test_rows_decode_to_correct_arithmetic(op, k, width):
    task = exp.NumberArithmetic(op, k, 1, 5, width=width)
    pairs = task.problems(200, seed=3)
    batch = task.encode(pairs, seed=0)
    assert batch.tokens.shape == (200, task.length) and int(batch.tokens.max()) < task.vocab_size
    for (a, b), tokens, scored in zip(pairs, batch.tokens, batch.scored):
        x, y, c = decode_row(task, tokens, scored)
        assert (x, y) == (int(a), int(b)) and c == (x + y if op == "add" else x * y)
        row = tokens.tolist()
        op_at, eq_at = row.index(exp.OPERATOR[op]), row.index(exp.EQ)
        padded = max(width, len(a), len(b)) if width else None  # both operands zero-padded to the width, never cut
        assert op_at - 1 == -(-(padded or len(a)) // k) and eq_at - op_at - 1 == -(-(padded or len(b)) // k)


def test_problems_follow_the_nupa_operand_distribution_and_are_seeded():
    task = exp.NumberArithmetic("add", 1, 2, 6)
    pairs = task.problems(500, seed=1)
    assert pairs == task.problems(500, seed=1) and pairs != task.problems(500, seed=2)
    assert {len(a) for a, _ in pairs} == set(range(2, 7))
    assert all(len(a) // 2 <= len(b) <= len(a) for a, b in pairs)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_index_hints_mark_each_operand_token_with_its_lowest_place(k):
    task = exp.NumberArithmetic("add", k, 1, 5, hints=True, max_index=12, width=6)
    pairs = task.problems(300, seed=0)
    batch = task.encode(pairs, seed=0)
    shifts = set()
    for tokens, scored in zip(batch.tokens.tolist(), batch.scored):
        op_at, eq_at = tokens.index(exp.OPERATOR["add"]), tokens.index(exp.EQ)
        row_shifts = set()
        for part in (tokens[1:op_at], tokens[op_at + 1:eq_at]):
            hints, pieces = part[0::2], part[1::2]
            assert all(h >= task.hint0 for h in hints) and all(p < task.hint0 for p in pieces)
            places = [h - task.hint0 for h in hints]
            row_shifts.add(places[0])
            assert [p - places[0] for p in places] == [j * k for j in range(len(pieces))]
        assert len(row_shifts) == 1  # both operands share one shift
        shifts |= row_shifts
        answer = [t for t, s in zip(tokens, scored.tolist()) if s]
        assert all(t < task.hint0 for t in answer)  # no hints in the answer
    assert max(batch.tokens.max().item() + 1, 0) <= task.vocab_size
    assert len(shifts) > 3 and min(shifts) == 0 and max(shifts) <= 12 - 6


def test_ordered_needs_one_digit_clearly_best_and_fails_when_multi_digit_wins():
    n = 400
    good, bad = np.ones(n), np.zeros(n)
    half = np.r_[np.ones(n // 2), np.zeros(n // 2)]
    assert exp.ordered({1: good, 2: half, 3: bad}) is True
    assert exp.ordered({1: good, 2: good, 3: bad}) is True  # ties between neighbours are allowed
    assert exp.ordered({1: half, 2: half, 3: half}) is None  # no difference: undecided
    assert exp.ordered({1: bad, 2: half, 3: good}) is False  # multi-digit wins: the negative
    assert exp.ordered({1: good, 2: bad, 3: half}) is False  # 3-digit clearly beats 2-digit


def test_checks_and_preconditions_read_the_paired_cells():
    n = 200
    cells = [{"op": "add", "k": k, "hints": False,
              "correct_in_length": [1] * (n - 50 * (k - 1)) + [0] * (50 * (k - 1)),
              "correct_longer": [1] * (n // k) + [0] * (n - n // k),
              "correct_short": [1] * n} for k in (1, 2, 3)]
    m = {"judged_op": "add", "cells": cells}
    assert list(exp.preconditions(m).values()) == [True, True]
    assert list(exp.checks(m).values()) == [True, True]
    cells[2]["correct_short"] = [0] * n  # the 3-digit model never fitted its training problems
    assert list(exp.preconditions(m).values()) == [True, False]
    cells[0]["correct_in_length"] = [0] * n
    assert list(exp.preconditions(m).values()) == [False, False] and list(exp.checks(m).values())[0] is False
