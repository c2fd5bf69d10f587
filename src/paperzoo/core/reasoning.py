"""Verifiable reasoning at small scale: exact tasks, thinking traces, a cached tiny reasoner.

Test-time-compute papers need a model that reasons step by step, sometimes wrongly,
on problems whose answers can be checked exactly. This module builds that once.

**Tasks.** Two generators with exact verifiers, each at an adjustable difficulty:

- `arithmetic`: a chain of additions and subtractions of two-digit numbers,
  ``37+48-19``; the scratchpad does one operation per line (``37+48=85``). The
  difficulty is the number of operations.
- `linear_equation`: ``7x+12=61``, solved in two lines (``7x=61-12=49``,
  ``x=49/7=7``). The difficulty sets the size of the coefficients.

Whether a problem is held out is a function of its question alone (a stable hash,
1 in 8), so a test problem can never appear in training however many are drawn.

**Traces.** A problem is shown as ``Q: <question>\\n<think>``; a solution continues
with the scratchpad, the end-of-thinking delimiter, and ``Answer: <integer>``, then
EOS. `<think>` and `</think>` are single special tokens, so a decoder can force or
suppress the delimiter as one token (budget forcing, 2501.19393).

**Models.** The tokenizer is character-level (every printable ASCII character is one
token, plus EOS, the two delimiters and eight reserved tokens that no text
produces, for methods that need fresh tokens such as mask tokens). `reasoner(scale)`
is a 4-layer Llama-style LM trained on correct traces by `core.training.train`, and
`draft_reasoner(scale)` a 2-layer one for speculative decoding. Both share the
tokenizer and are cached like the base LMs, keyed by everything that sets the weights.

Version 2 (issue 10: a difficulty ladder, terse and verbose traces, reflective traces, and
the card that measures a reasoner) is built beside this module, on the same prompt,
tokenizer and held-out rule: `paperzoo.core.reasoning_tasks` and `paperzoo.core.reasoner_card`.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from paperzoo.core import store
from paperzoo.core.models import TinyLMConfig, load_trained, save_trained
from paperzoo.core.training import training_device, TrainConfig, token_blocks, train

EOS = "<|endoftext|>"
THINK, END_THINK = "<think>", "</think>"
ANSWER = "Answer:"
RESERVED = tuple(f"<|reserved_{i}|>" for i in range(8))
SPECIAL_TOKENS = (EOS, THINK, END_THINK, *RESERVED)  # EOS is id 0
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))
TASKS = ("arithmetic", "linear_equation")
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


def arithmetic(rng: random.Random, difficulty: int) -> Problem:
    """`difficulty` operations (+ or -) on two-digit numbers; every partial result stays in 0..999."""
    value = rng.randint(10, 99)
    question, steps = str(value), []
    for _ in range(difficulty):
        b = rng.randint(10, 99)
        op = "-" if value - b >= 0 and rng.random() < 0.5 else "+"
        if value + b > 999:
            op = "-"
        new = value + b if op == "+" else value - b
        steps.append(f"{value}{op}{b}={new}")
        question += f"{op}{b}"
        value = new
    return Problem("arithmetic", question, value, tuple(steps), difficulty)


def linear_equation(rng: random.Random, difficulty: int) -> Problem:
    """a*x + b = c (or a*x - b = c) with an integer root; larger difficulty, larger a, b and x."""
    top = 5 * difficulty + 4
    a, x, b = rng.randint(2, top), rng.randint(1, top), rng.randint(1, 10 * difficulty + 9)
    if rng.random() < 0.5:
        c = a * x + b
        question, first = f"{a}x+{b}={c}", f"{a}x={c}-{b}={a * x}"
    else:
        c = a * x - b
        question, first = f"{a}x-{b}={c}", f"{a}x={c}+{b}={a * x}"
    return Problem("linear_equation", question, x, (first, f"x={a * x}/{a}={x}"), difficulty)


GENERATORS = {"arithmetic": arithmetic, "linear_equation": linear_equation}
DIFFICULTIES = {"arithmetic": (1, 2, 3, 4), "linear_equation": (1, 2, 3)}


def problems(n: int, split: str = "test", seed: int = 0, kinds: Sequence[str] = TASKS,
             difficulties: dict[str, Sequence[int]] | None = None, distinct: bool = True) -> list[Problem]:
    """`n` problems of the given split, cycling through kinds and difficulties.

    With `distinct` (the default, for evaluation) no question repeats; training data
    passes ``distinct=False``, since the easiest settings hold only a few thousand questions.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    unknown = set(kinds) - set(GENERATORS)
    if unknown:
        raise ValueError(f"unknown task kind(s) {sorted(unknown)}; known: {', '.join(GENERATORS)}")
    difficulties = difficulties or DIFFICULTIES
    menu = [(k, d) for k in kinds for d in difficulties[k]]
    rng = random.Random(f"{split}-{seed}")
    out, seen, misses = [], set(), 0
    while len(out) < n:
        kind, d = menu[len(out) % len(menu)]
        p = GENERATORS[kind](rng, d)
        if p.held_out == (split == "test") and not (distinct and p.question in seen):
            seen.add(p.question)
            out.append(p)
            misses = 0
        elif (misses := misses + 1) > 100_000:
            raise ValueError(f"could not draw {n} distinct {split} problems ({kind}, difficulty {d} is exhausted)")
    return out


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


@dataclass(frozen=True)
class ReasonerSpec:
    model: TinyLMConfig
    train: TrainConfig
    train_problems: int
    seed: int = 0


_VOCAB = len(SPECIAL_TOKENS) + len(CHARACTERS)
_SMOKE_TRAIN = TrainConfig(steps=20, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=2)
# `small`: about 1.1M tokens... sized so the reasoner is right about half the time on held-out problems.
REASONERS = {
    "smoke": ReasonerSpec(TinyLMConfig(_VOCAB, 32, 2, 2, 64, 256), _SMOKE_TRAIN, 2_000),
    "small": ReasonerSpec(TinyLMConfig(_VOCAB, 128, 4, 4, 384, 256),
                          TrainConfig(steps=600, batch_size=32, seq_len=128, lr=3e-3, warmup_steps=50), 100_000),
    "large": ReasonerSpec(TinyLMConfig(_VOCAB, 384, 8, 6, 1024, 512),
                          TrainConfig(steps=5000, batch_size=64, seq_len=256, lr=1e-3, warmup_steps=200), 1_000_000),
}
DRAFTS = {
    "smoke": ReasonerSpec(TinyLMConfig(_VOCAB, 16, 1, 1, 32, 256), _SMOKE_TRAIN, 2_000),
    "small": ReasonerSpec(TinyLMConfig(_VOCAB, 64, 2, 2, 192, 256),
                          TrainConfig(steps=600, batch_size=32, seq_len=128, lr=3e-3, warmup_steps=50), 100_000),
    "large": ReasonerSpec(TinyLMConfig(_VOCAB, 128, 4, 4, 384, 512),
                          TrainConfig(steps=5000, batch_size=64, seq_len=256, lr=2e-3, warmup_steps=200), 1_000_000),
}


@dataclass
class Reasoner:
    """A trained reasoning LM, its tokenizer, and the record of how it was trained."""

    name: str
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    record: dict = field(default_factory=dict)

    def encode_prompts(self, prompts: Sequence[str]) -> dict:
        return self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)


def training_text(problem: Problem) -> str:
    return problem.prompt + problem.solution


def train_reasoner(spec: ReasonerSpec, desc: str, texts: Sequence[str] | None = None) -> tuple[LlamaForCausalLM, dict]:
    """Train a fresh tiny LM on solution traces (or on `texts`, e.g. another trace style)."""
    tokenizer = reasoning_tokenizer()
    if texts is None:
        texts = [training_text(p) for p in problems(spec.train_problems, "train", seed=spec.seed, distinct=False)]
    torch.manual_seed(spec.seed)
    model = spec.model.build().to(training_device())
    start = time.perf_counter()
    history = train(model, token_blocks(tokenizer, texts, spec.train.seq_len), spec.train, desc=desc, seed=spec.seed)
    return model.cpu(), {"spec": asdict(spec), "device": str(training_device()),
                         "train_seconds": time.perf_counter() - start, **history}


def _cached(kind: str, spec: ReasonerSpec, scale: str) -> Reasoner:
    tokenizer = reasoning_tokenizer()
    key = store.stable_hash([f"{kind}-v1", asdict(spec), tokenizer.backend_tokenizer.to_str()])
    path = store.home() / "models" / f"{kind}-{scale}-{key}"

    def build(tmp: Path) -> None:
        model, record = train_reasoner(spec, f"training the {scale} {kind} (cached afterwards)")
        save_trained(tmp, model, tokenizer, record)

    model, tokenizer, record = load_trained(store.cached_dir(path, build))
    return Reasoner(f"paperzoo {kind}-{scale} ({path.name})", model, tokenizer, record)


def reasoner(scale: str = "small", seed: int = 0) -> Reasoner:
    """The cached tiny reasoner for `scale`, trained on first use (with a progress bar)."""
    spec = REASONERS[scale]
    return _cached("reasoner", ReasonerSpec(spec.model, spec.train, spec.train_problems, seed), scale)


def draft_reasoner(scale: str = "small", seed: int = 0) -> Reasoner:
    """A smaller reasoner on the same tokenizer and data, for speculative decoding."""
    spec = DRAFTS[scale]
    return _cached("draft", ReasonerSpec(spec.model, spec.train, spec.train_problems, seed), scale)
