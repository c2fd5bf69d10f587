"""The reasoning format every reasoner in paperzoo shares: prompts, traces, verifier, tokenizer.

Test-time-compute papers need a model that reasons step by step, sometimes wrongly,
on problems whose answers can be checked exactly. This module fixes the format;
`paperzoo.core.reasoner` builds the problems (a difficulty ladder), the traces and the
cached reasoner on it, and `paperzoo.core.reasoner_card` measures a trained one.

**Problems.** A `Problem` has a question (``37+48-19``, ``7x+25=683``), an integer
answer and the scratchpad lines of a correct solution. Whether a problem is held out
is a function of its question alone (a stable hash, 1 in 8), so a test problem can
never appear in training however many are drawn.

**Traces.** A problem is shown as ``Q: <question>\n<think>``; a solution continues
with the scratchpad, the end-of-thinking delimiter, and ``Answer: <integer>``, then
EOS. `<think>` and `</think>` are single special tokens, so a decoder can force or
suppress the delimiter as one token (budget forcing, 2501.19393). The verifier reads
the integer after the last ``Answer:``.

**Tokenizer.** Character-level: every printable ASCII character is one token, plus
EOS, the two delimiters and eight reserved tokens that no text produces, for methods
that need fresh tokens such as mask tokens.

Version 1 of the reasoner (two generators, `arithmetic` chains of two-digit numbers and
`linear_equation`, written one line per operation without column work) was replaced by
version 2 in issue 10: it was right on 17% of held-out problems and never re-checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from paperzoo.core import store

EOS = "<|endoftext|>"
THINK, END_THINK = "<think>", "</think>"
ANSWER = "Answer:"
RESERVED = tuple(f"<|reserved_{i}|>" for i in range(8))
SPECIAL_TOKENS = (EOS, THINK, END_THINK, *RESERVED)  # EOS is id 0
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))
HELD_OUT_ONE_IN = 8


@dataclass(frozen=True)
class Problem:
    kind: str
    question: str
    answer: int
    steps: tuple[str, ...]  # the scratchpad lines of a correct solution
    difficulty: int

    @property
    def prompt(self) -> str:
        return f"Q: {self.question}\n{THINK}"

    @property
    def solution(self) -> str:
        """The text a correct reasoner writes after the prompt (EOS follows)."""
        return "".join(f"{line}\n" for line in self.steps) + f"{END_THINK}{ANSWER} {self.answer}"

    @property
    def held_out(self) -> bool:
        return int(store.stable_hash(self.question), 16) % HELD_OUT_ONE_IN == 0


_ANSWER_RE = re.compile(re.escape(ANSWER) + r"\s*(-?\d+)")


def extract_answer(text: str) -> int | None:
    """The integer after the last ``Answer:`` in a completion, or None if there is none."""
    found = _ANSWER_RE.findall(text)
    return int(found[-1]) if found else None


def is_correct(problem: Problem, completion: str) -> bool:
    """The exact verifier: the completion's final answer equals the problem's."""
    return extract_answer(completion) == problem.answer


def reasoning_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: special tokens first (EOS = 0), then one token per character."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=EOS,
        additional_special_tokens=[THINK, END_THINK, *RESERVED], padding_side="left",
    )
    return tokenizer
