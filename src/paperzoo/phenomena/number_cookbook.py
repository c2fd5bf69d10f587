r"""Number Cookbook: the NUPA benchmark and how numbers are tokenised (Yang et al., arXiv:2411.03766).

The paper measures the *number understanding and processing ability* (NUPA) of language
models on 4 number representations (integer ``123``, float ``123.45``, fraction ``12/5``,
scientific notation ``1.23e2``) and 17 tasks in four families: elementary arithmetic
(add, sub, multiply, truediv, floordiv, mod), comparison (max, min), digit understanding
(digit max, digit min, digit add, get digit, length, count) and conversion (to float, to
scientific, significant figures). Of the 68 task x representation pairs, 41 are meaningful
and in the test (the ✔ cells of the official README's table): 16 integer, 12 float,
7 fraction and 6 scientific-notation cases. `CASES` lists exactly those 41, as data: each
`Case` draws problems with ``sample(n, digits, seed)`` -> ``[(question, answer), ...]`` and
checks a prediction exactly with ``check``.

**Metrics** (official ``text_model/metrics.py``, the one used for text LMs). A number is
cut into its digit *parts* (integer: one; float: integer and decimal part; fraction:
numerator and denominator; scientific: mantissa integer part, mantissa decimals,
exponent), each keeping only its digits. With label parts $g_j$ and predicted parts $p_j$:

- exact match: $\mathbb{1}[p_j = g_j\ \forall j]$;
- digit match: $\sum_j \sum_i \mathbb{1}[p_{j,i} = g_{j,i}] / \sum_j |g_j|$, where the
  digits of a part are aligned at the decimal point: integer-like parts (integers,
  numerator, denominator, exponent, a float's integer part) are compared from the right
  (units with units), a decimal part from the left (tenths with tenths); ``zip`` stops at
  the shorter string, so missing digits count as wrong;
- length error ("dlength"): $\left|\sum_j |p_j| - \sum_j |g_j|\right|$.

An unreadable prediction becomes the empty string (all parts empty): exact match 0, digit
match 0, length error the label's digit count.

**Tokenisation pieces** the paper studies (Sec. 4): `k_digit_tokens` (numbers split into
k-digit tokens left to right, as GPT-style tokenisers do; the paper finds 1-digit tokens
best), `reversed_digits` (each digit run written least-significant first) and
`index_hints` (each digit preceded by a marker of its place, so digits of equal place
share a marker across operands).

Deviations from the paper and its code, and why:

- Problems are generated here, not read from the released files; the *distributions*
  follow the official generator (``numbers_class.random_generate`` and
  ``task._preprocess_*``): an integer of ``digits`` digits; a float with a 1..``digits``-
  digit integer part and ``digits`` decimals (last one non-zero); a fraction whose
  reduced denominator has ``digits`` digits; a scientific number with mantissa
  ``d.<digits decimals>`` and exponent 0..99. The second operand has
  $\lfloor digits/2 \rfloor$..``digits`` digits (the test sets' ``test_shorter_len=0.5``).
  Per-task fix-ups as in the official code: scientific add keeps exponents within 5,
  scientific sub makes $a$'s exponent larger and $a-b \ge 1$; sub, floordiv and mod put
  the larger operand first; divisors of 0 become 1; mod keeps at most
  $\lfloor 0.7\,|a| \rfloor + 1$ digits of $b$ (its last digits); fraction max/min use
  fractions below 1; fraction to-float uses a denominator $2^i 5^j$, $i,j \le digits$;
  scientific to-float an exponent $\le \min(e, digits)$; integer to-scientific zeroes up
  to half of the last digits; sig. fig. asks for 2..(significant digits) figures. The
  official code picks $a$ as the longer of a pair for one-number tasks; here $a$ simply
  has ``digits`` digits.
- "multiply" is the official ``multiply_hard`` (both operands long); the config's extra
  variants ``add_easy``, ``multiply_easy``, ``max_hard``/``min_hard`` (operands sharing
  digits) and ``mod_easy`` are not built. The official config lists 44 generated variants
  but omits min and digit min from its list; the paper's 41 include them, as here.
- Sig. fig. rounds half to even on the exact value. The official ``Float.to_scient``
  looks only at the next digit and its tie test compares a character with the integer 5,
  so it never fires and ties round down there.
- Question text: the official structure (an answer-format hint, an instruction, then
  ``a <op> b = ``, the answer read after `` = ``) with our own shorter wording. The
  official "aligning the decimal points" wording for float digit tasks is keyed on
  ``"float"`` (lower case) there and never used; the digit tasks here state it for floats.
- `evaluate` greedy-decodes up to ``4 * digits + 8`` new tokens per question (official:
  twice the digit count, which suits multi-digit tokenisers but cuts a character-level
  model's 4·digits-long products and fractions), no few-shot prefix, and reads the
  answer with the official patterns.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from fractions import Fraction

import torch

REPRESENTATIONS = ("Integer", "Float", "Fraction", "ScientificNotation")
TASKS_BY_REPRESENTATION = {
    "Integer": ("add", "sub", "multiply", "truediv", "floordiv", "mod", "max", "min", "digit_max", "digit_min",
                "digit_add", "get_digit", "length", "count", "to_scient", "sig"),
    "Float": ("add", "sub", "multiply", "max", "min", "digit_max", "digit_min", "digit_add", "get_digit", "length",
              "to_scient", "sig"),
    "Fraction": ("add", "sub", "multiply", "truediv", "max", "min", "to_float"),
    "ScientificNotation": ("add", "sub", "multiply", "max", "min", "to_float"),
}
ONE_NUMBER_TASKS = ("length", "to_float", "to_scient")
INT_ANSWER_TASKS = ("get_digit", "length", "count")  # answers that are a count or a digit: type "int"

# Parts of a number and the side each is aligned on when digits are compared ("right": units first).
READ_DIRECTION = {"Integer": ("right",), "int": ("right",), "Float": ("right", "left"),
                  "Fraction": ("right", "right"), "ScientificNotation": ("right", "left", "right")}
# The official answer patterns, matched at the start of the generated text.
ANSWER_PATTERN = {"Integer": r"\d+", "int": r"\d+", "Float": r"\d+\.\d+", "Fraction": r"\d+/\d+",
                  "ScientificNotation": r"\d+\.\d+[eE][+-]?\d+"}
ANSWER_FORMAT = {"Integer": "an integer, like 123", "int": "an integer, like 123", "Float": "a float, like 10.4",
                 "Fraction": "an irreducible fraction, like 7/13",
                 "ScientificNotation": "scientific notation with 1 <= mantissa < 10, like 1.23e4"}
INSTRUCTION = {  # (instruction, operator between the operands)
    "add": ("Add the two numbers.", "+"), "sub": ("Subtract the second number from the first.", "-"),
    "multiply": ("Multiply the two numbers.", "*"), "truediv": ("Divide the first number by the second.", "/"),
    "floordiv": ("Divide the first number by the second and round down.", "//"),
    "mod": ("Give the remainder of the first number divided by the second.", "%"),
    "max": ("Give the larger number.", "and"), "min": ("Give the smaller number.", "and"),
    "digit_max": ("Take the larger digit at each place, missing digits being 0.", "and"),
    "digit_min": ("Take the smaller digit at each place, missing digits being 0.", "and"),
    "digit_add": ("Add digit by digit modulo 10 without carry, missing digits being 0.", "digit add"),
    "get_digit": ("Give the digit at the position (counted from the left from 0, skipping the point).",
                  "at position"),
    "length": ("Count all digits of the number.", None), "count": ("Count how often the digit occurs.", "count digit"),
    "to_float": ("Write the number as a float.", None), "to_scient": ("Write the number in scientific notation.", None),
    "sig": ("Round to the given number of significant figures in scientific notation.", "to significant figures"),
}


# --- exact numbers: every representation is a string; its value is a fractions.Fraction -------------------

def value(number: str) -> Fraction:
    """Exact value of '123', '12.34', '12/5' or '1.23e4'."""
    return Fraction(number)


def as_integer(x: Fraction) -> str:
    assert x.denominator == 1, x
    return str(x.numerator)


def as_float(x: Fraction) -> str:
    """Finite decimal with at least one decimal digit and no trailing zeros ('12.0', '0.25'), as the official Float."""
    den, twos, fives = x.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        raise ValueError(f"{x} has no finite decimal expansion")
    k = max(twos, fives)  # x * 10^k is an integer
    whole, decimals = divmod(x.numerator * 10**k // x.denominator, 10**k)
    decimals = str(decimals).zfill(k).rstrip("0") if k else ""
    return f"{whole}.{decimals or '0'}"


def as_fraction(x: Fraction) -> str:
    return f"{x.numerator}/{x.denominator}"


def as_scientific(x: Fraction, sig: int | None = None) -> str:
    """m e E with 1 <= m < 10 (0 is '0.0e0'); with `sig`, m keeps exactly `sig` figures, rounded half to even."""
    if x == 0:
        return "0.0e0"
    E = len(str(x.numerator // x.denominator)) - 1 if x >= 1 else -len(str(x.denominator // x.numerator))
    while x / Fraction(10) ** E >= 10:
        E += 1
    while x / Fraction(10) ** E < 1:
        E -= 1
    m = x / Fraction(10) ** E
    if sig is None:
        return f"{as_float(m)}e{E}"
    figures = round(m * 10 ** (sig - 1))  # round() on a Fraction rounds half to even
    if figures == 10**sig:  # 9.99 -> 10.0: carry into the exponent
        figures, E = figures // 10, E + 1
    digits = str(figures)
    return f"{digits[0]}.{digits[1:]}e{E}"


FORMAT = {"Integer": as_integer, "int": as_integer, "Float": as_float, "Fraction": as_fraction,
          "ScientificNotation": as_scientific}


def random_number(representation: str, digits: int, rng: random.Random) -> str:
    """One number as the official generator draws it (`digits` = its length)."""
    L = digits
    if representation == "Integer":
        return str(rng.randint(10 ** (L - 1) if L > 1 else 0, 10**L - 1))
    if representation == "Float":
        int_digits = rng.randint(1, L)
        decimals = "".join(str(rng.randint(0, 9)) for _ in range(L - 1)) + str(rng.randint(1, 9))
        return f"{rng.randint(10 ** (int_digits - 1), 10**int_digits - 1)}.{decimals}"
    if representation == "Fraction":
        while True:  # the reduced denominator must keep L digits
            x = Fraction(rng.randint(0, 10**L - 1), rng.randint(10 ** (L - 1), 10**L - 1))
            if len(str(x.denominator)) == L:
                return as_fraction(x)
    if representation == "ScientificNotation":
        decimals = random_number("Float", L, rng).split(".")[1]
        return f"{rng.randint(1, 9)}.{decimals}e{rng.randint(0, 99)}"
    raise ValueError(representation)


def _with_exponent(number: str, E: int) -> str:
    return f"{number.split('e')[0]}e{E}"


def _digit_parts(number: str) -> list[str]:
    return re.split(r"[./e]", number)


def _digitwise(a: str, b: str, representation: str, op) -> str:
    """Apply op to the digits of equal place (integer parts from the right, decimals from the left), 0 for missing."""
    parts = []
    for pa, pb, side in zip(_digit_parts(a), _digit_parts(b), READ_DIRECTION[representation]):
        if side == "right":
            pa, pb = pa[::-1], pb[::-1]
        n = max(len(pa), len(pb))
        digits = "".join(str(op(int(x), int(y))) for x, y in zip(pa.ljust(n, "0"), pb.ljust(n, "0")))
        parts.append(digits[::-1] if side == "right" else digits)
    return FORMAT[representation](value(".".join(parts)))  # re-reading drops leading/trailing zeros, as the official code


# --- the 41 cases --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One (task, representation) pair of the NUPA test."""
    task: str
    representation: str

    @property
    def name(self) -> str:
        return f"{self.task}_{self.representation}"

    @property
    def answer_type(self) -> str:
        if self.task in INT_ANSWER_TASKS:
            return "int"
        return {"truediv": "Fraction", "to_float": "Float", "to_scient": "ScientificNotation",
                "sig": "ScientificNotation"}.get(self.task, self.representation)

    def operands(self, digits: int, rng: random.Random) -> tuple[str, str | None]:
        """(a, b) for one problem; b is None for one-number tasks and an int string for positions, digits, figures."""
        rep, t, L = self.representation, self.task, digits
        a = random_number(rep, L, rng)
        b = random_number(rep, rng.randint(max(1, L // 2), L), rng)
        if t in ONE_NUMBER_TASKS:
            b = None
        if t == "add" and rep == "ScientificNotation":
            E = min(int(a.split("e")[1]), 98)
            a, b = _with_exponent(a, E), _with_exponent(b, min(max(E + rng.randint(-5, 5), 0), 98))
        if t in ("sub", "floordiv", "mod") and value(b) > value(a):
            a, b = b, a
        if t == "sub" and rep == "ScientificNotation":
            E = max(int(a.split("e")[1]), int(b.split("e")[1]), 1)
            a, b = _with_exponent(a, E), _with_exponent(b, max(E + rng.randint(-5, -1), 0))
            if value(a) - value(b) < 1:  # keep the difference's exponent non-negative, as the official code
                a = as_scientific(value(a) + 1)
        if t in ("max", "min") and rep == "Fraction":
            a, b = (as_fraction(1 / value(x)) if value(x) > 1 else x for x in (a, b))
        if t == "mod":
            keep = int(0.7 * len(a)) + 1
            b = str(int(b) % 10**keep)
        if t in ("truediv", "floordiv", "mod") and value(b) == 0:
            b = "1" if rep == "Integer" else "1/1"
        if t == "get_digit":
            b = str(rng.randint(0, len("".join(_digit_parts(a))) - 1))
        if t == "count":
            b = str(rng.randint(0, 9))
        if t == "to_float" and rep == "Fraction":
            x = value(a)
            a = as_fraction(Fraction(max(x.numerator, x.denominator), 2 ** rng.randint(0, L) * 5 ** rng.randint(0, L)))
        if t == "to_float" and rep == "ScientificNotation":
            a = _with_exponent(a, rng.randint(0, min(int(a.split("e")[1]), L)))
        if t == "to_scient" and rep == "Integer":
            a = str(int(a) - int(a) % 10 ** rng.randint(0, L // 2))
        if t == "sig":
            significant = len(a) if rep == "Integer" else len(a.replace(".", "").strip("0"))
            b = str(rng.randint(2, max(2, significant)))
        return a, b

    def answer(self, a: str, b: str | None) -> str:
        """The exact answer text, computed on exact values."""
        t, rep, out = self.task, self.representation, self.answer_type
        x, y = value(a), (value(b) if b is not None else None)
        if t == "add":
            return FORMAT[out](x + y)
        if t == "sub":
            return FORMAT[out](x - y)
        if t == "multiply":
            return FORMAT[out](x * y)
        if t == "truediv":
            return FORMAT[out](x / y)
        if t == "floordiv":
            return FORMAT[out](Fraction(x // y))
        if t == "mod":
            return FORMAT[out](x % y)
        if t in ("max", "min"):
            return FORMAT[out]((max if t == "max" else min)(x, y))
        if t in ("digit_max", "digit_min", "digit_add"):
            op = {"digit_max": max, "digit_min": min, "digit_add": lambda d, e: (d + e) % 10}[t]
            return _digitwise(a, b, rep, op)
        if t == "get_digit":
            return "".join(_digit_parts(a))[int(b)]
        if t == "length":
            return str(len("".join(_digit_parts(a))))
        if t == "count":
            return str("".join(_digit_parts(a)).count(b))
        if t == "to_float":
            return as_float(x)
        if t == "to_scient":
            return as_scientific(x)
        if t == "sig":
            return as_scientific(x, sig=int(b))
        raise ValueError(t)

    def question(self, a: str, b: str | None) -> str:
        instruction, op = INSTRUCTION[self.task]
        if self.task.startswith("digit_") and self.representation == "Float":
            instruction += " Align the decimal points."
        operands = a if b is None else f"{a} {op} {b}"
        return f"Answer directly with {ANSWER_FORMAT[self.answer_type]}. {instruction} {operands} = "

    def sample(self, n: int, digits: int, seed: int = 0) -> list[tuple[str, str]]:
        """n problems with `digits`-digit numbers: [(question text, exact answer text), ...]."""
        rng = random.Random(f"{self.name}/{digits}/{seed}")
        problems = []
        for _ in range(n):
            a, b = self.operands(digits, rng)
            problems.append((self.question(a, b), self.answer(a, b)))
        return problems

    def check(self, prediction: str, answer: str) -> bool:
        return score(prediction, answer, self.answer_type)["exact_match"] == 1.0


CASES = tuple(Case(task, rep) for rep in REPRESENTATIONS for task in TASKS_BY_REPRESENTATION[rep])


# --- metrics -----------------------------------------------------------------------------------------------

def answer_parts(text: str, answer_type: str) -> list[str]:
    """The digit parts of a number (non-digits dropped); all empty when the separators are missing."""
    n_parts = len(READ_DIRECTION[answer_type])
    if answer_type == "ScientificNotation":
        pieces = text.split("e")
        pieces = pieces[0].split(".") + pieces[1:] if len(pieces) == 2 else []
    else:
        pieces = text.split({"Float": ".", "Fraction": "/"}.get(answer_type, "\0"))
    if len(pieces) < n_parts:
        return [""] * n_parts
    return ["".join(c for c in piece if c.isdigit()) for piece in pieces[:n_parts]]


def score(prediction: str, answer: str, answer_type: str) -> dict[str, float]:
    """Exact match, digit match and length error of one prediction (official text-model metrics)."""
    pred, gold = answer_parts(prediction, answer_type), answer_parts(answer, answer_type)
    matched = 0
    for p, g, side in zip(pred, gold, READ_DIRECTION[answer_type]):
        if side == "right":  # align at the units digit
            p, g = p[::-1], g[::-1]
        matched += sum(pi == gi for pi, gi in zip(p, g))
    return {"exact_match": float(pred == gold),
            "digit_match": matched / sum(len(g) for g in gold),
            "length_error": float(abs(sum(map(len, pred)) - sum(map(len, gold))))}


def extract_answer(generated: str, answer_type: str) -> str:
    """The number at the start of the generated text (after ' = '), or '' when none is there."""
    if " = " in generated:
        generated = generated[generated.index(" = ") + 3:]
    match = re.match(ANSWER_PATTERN[answer_type], generated.strip())
    return match.group(0) if match else ""


@torch.no_grad()
def evaluate(model, tokenizer, case: Case, n: int = 32, digits: int = 4, seed: int = 0,
             max_new_tokens: int | None = None) -> dict:
    """Greedy-decode answers to n problems of `case` on any HF causal LM; mean metrics and the raw predictions."""
    max_new_tokens = max_new_tokens or 4 * digits + 8  # room for the longest answers (products, fractions) in chars
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for question, answer in case.sample(n, digits, seed):
        ids = tokenizer(question, return_tensors="pt").to(device)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)
        generated = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        prediction = extract_answer(generated, case.answer_type)
        rows.append((question, answer, prediction, score(prediction, answer, case.answer_type)))
    metrics = {k: sum(r[3][k] for r in rows) / n for k in ("exact_match", "digit_match", "length_error")}
    return {**metrics, "n": n, "case": case.name, "digits": digits,
            "predictions": [(q, a, p) for q, a, p, _ in rows]}


# --- tokenisation pieces (Sec. 4) ----------------------------------------------------------------------------

def k_digit_tokens(number: str, k: int) -> list[str]:
    """Split every digit run into k-digit tokens from the left ('12345', 3 -> '123', '45'); other characters alone."""
    tokens = []
    for run in re.findall(r"\d+|\D", number):
        tokens += [run[i:i + k] for i in range(0, len(run), k)] if run.isdigit() else [run]
    return tokens


def reversed_digits(number: str) -> str:
    """Each digit run written least-significant digit first ('123.45' -> '321.54')."""
    return re.sub(r"\d+", lambda m: m.group(0)[::-1], number)


HINT_MARKERS = "abcdefghijklmnopqrstuvwxyz"


def index_hints(number: str) -> list[str]:
    """Each digit preceded by the marker of its place: integer-like runs count from the units digit (a = units),
    a run after '.' counts from the point (a = tenths). '123' -> ['c', '1', 'b', '2', 'a', '3']."""
    tokens, after_point = [], False
    for run in re.findall(r"\d+|\D", number):
        if not run.isdigit():
            tokens.append(run)
            after_point = run == "."
            continue
        if len(run) > len(HINT_MARKERS):
            raise ValueError(f"index hints cover at most {len(HINT_MARKERS)} digits per part")
        for i, d in enumerate(run):
            place = i if after_point else len(run) - 1 - i
            tokens += [HINT_MARKERS[place], d]
    return tokens
