"""Synthetic tasks for learning-phenomena papers: token sequences in their own vocabularies.

The reasoner (`paperzoo.core.reasoning`) writes text through a character tokenizer; the
phenomena papers instead train tiny models on token ids of a task's own vocabulary and
score only the positions that carry an answer. A task here is a frozen dataclass with

- ``vocab_size`` and ``length`` (tokens per example),
- ``sample(n, seed) -> TaskBatch``: ``tokens [n, length]``, a ``scored`` mask of the
  positions whose token is an answer the model must predict from the prefix, and the same
  draw for the same seed on every machine (a `torch.Generator`, never global state),
- the exact checker `TaskBatch.correct(predictions)`: a row is right when every scored
  position is.

`train_on_task` trains a tiny HF Llama on fresh samples with the loss on scored positions
only and caches the result by a hash of everything that fixes the weights.

Tasks so far:

- `QueryCount` and `MostFrequent` (When Can Transformers Count to n?, 2407.15160):
  n tokens from a vocabulary of m, then the answer: how often the last token occurs, or
  which token occurs most often.
- `GroupWordProblem` (The Illusion of State, 2404.08819): a word of group elements and,
  at every position, the product of the prefix so far; groups S5, A5, A4 x Z5 and Z60 by
  their multiplication tables.
- `LabelMapEpisodes` (the in-context-learning papers: 2411.02830, 2405.00200, 2507.22887):
  pairs (x, y) under a random label map drawn afresh for every sequence, so a label can
  only be read from the context.
- `AssociativeRecall`, `MaxRetrieval` and `Passkey` (the architectures papers, compared by
  `paperzoo.core.blocks.compare_blocks`): read out at the last position, so non-causal
  mixers fit.
- `TypedLanguage` and `TypedLanguageTask` (A Percolation Model of Emergence, 2408.12578): a
  PCFG over parts of speech whose entity and property slots must type-check under a
  bipartite entity-property graph, with its parser and type checker, in the paper's three
  task formats (free generation, unscrambling, conditional generation).
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from functools import cached_property

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from paperzoo.core import store


@dataclass(frozen=True)
class TaskBatch:
    """Token ids, the positions that are scored, and what is expected there.

    Position t is predicted from the tokens before it. By default the expected token is
    the input token itself (the answer is written into the sequence, as in a chain of
    thought); `targets` sets other expected tokens where the answer must never enter
    the input (a prefix product predicted at every position without being shown).
    """

    tokens: torch.Tensor  # [n, T] token ids
    scored: torch.Tensor  # [n, T] bool: positions whose expected token the model must predict from the prefix
    targets: torch.Tensor | None = None  # [n, T] expected tokens; None: `tokens`

    @property
    def expected(self) -> torch.Tensor:
        return self.tokens if self.targets is None else self.targets

    @property
    def labels(self) -> torch.Tensor:
        """HF causal-LM labels: the expected tokens at scored positions, -100 elsewhere (the model shifts them)."""
        return self.expected.masked_fill(~self.scored, -100)

    def correct(self, predictions: torch.Tensor) -> torch.Tensor:
        """[n] bool: the row's every scored position holds the expected token in `predictions` ([n, T])."""
        wrong = (predictions != self.expected) & self.scored
        return ~wrong.any(dim=1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# ---------------------------------------------------------------------------------------------
# Counting (2407.15160)


@dataclass(frozen=True)
class QueryCount:
    """BOS, x_1 .. x_n from a vocabulary of m, then the answer token ``m + c``: c = #{i : x_i = x_n}.

    Token ids: 0..m-1 the vocabulary, m + c for the count c in 1..n, and BOS = m + n + 1
    (the attention sink the paper's CountAttend construction reads 1/(c+1) from). The
    last input token is the query, so c >= 1. The paper's QC task.

    With `every_position`, every prefix is a QC instance too: after reading x_t the model
    predicts m + #{i <= t : x_i = x_t} (as `targets`, never shown in the input), so a sequence
    gives n answers instead of one; the last is the full sequence's QC answer.
    """

    m: int
    n: int
    every_position: bool = False

    @property
    def bos(self) -> int:
        return self.m + self.n + 1

    @property
    def vocab_size(self) -> int:
        return self.m + self.n + 2

    @property
    def length(self) -> int:
        return self.n + 2

    def answer_token(self, x: torch.Tensor) -> torch.Tensor:
        return self.m + (x == x[:, -1:]).sum(dim=1)

    def sample(self, n: int, seed: int) -> TaskBatch:
        x = torch.randint(0, self.m, (n, self.n), generator=_generator(seed))
        tokens = torch.cat([torch.full((n, 1), self.bos), x, self.answer_token(x)[:, None]], dim=1)
        scored = torch.zeros_like(tokens, dtype=torch.bool)
        if not self.every_position:
            scored[:, -1] = True
            return TaskBatch(tokens, scored)
        so_far = torch.zeros(n, self.m, dtype=torch.long)  # running count of each token
        targets = tokens.clone()
        for t in range(self.n):  # position t + 2 answers for x_{t+1}, read at position t + 1
            so_far[torch.arange(n), x[:, t]] += 1
            targets[:, t + 2] = self.m + so_far[torch.arange(n), x[:, t]]
        scored[:, 2:] = True
        return TaskBatch(tokens, scored, targets)


@dataclass(frozen=True)
class MostFrequent:
    """BOS, x_1 .. x_n from a vocabulary of m with one most frequent token, then that token (the paper's MFE).

    Rows with a tie for the most frequent token are redrawn, so the answer is unique. BOS = m.
    """

    m: int
    n: int

    @property
    def bos(self) -> int:
        return self.m

    @property
    def vocab_size(self) -> int:
        return self.m + 1

    @property
    def length(self) -> int:
        return self.n + 2

    @staticmethod
    def counts(x: torch.Tensor, m: int) -> torch.Tensor:
        return torch.zeros(len(x), m, dtype=torch.long).scatter_add_(1, x, torch.ones_like(x))

    def sample(self, n: int, seed: int) -> TaskBatch:
        g = _generator(seed)
        rows = []
        while sum(len(r) for r in rows) < n:
            x = torch.randint(0, self.m, (2 * n, self.n), generator=g)
            top2 = self.counts(x, self.m).topk(2, dim=1).values
            rows.append(x[top2[:, 0] > top2[:, 1]])
        x = torch.cat(rows)[:n]
        answer = self.counts(x, self.m).argmax(dim=1)
        tokens = torch.cat([torch.full((n, 1), self.bos), x, answer[:, None]], dim=1)
        scored = torch.zeros_like(tokens, dtype=torch.bool)
        scored[:, -1] = True
        return TaskBatch(tokens, scored)


# ---------------------------------------------------------------------------------------------
# Finite groups and word problems (2404.08819)


def _compose(p: tuple[int, ...], q: tuple[int, ...]) -> tuple[int, ...]:
    """p o q, the permutation i -> p(q(i)): q acts first (sympy writes this ``q * p``)."""
    return tuple(p[i] for i in q)


def _parity(p: tuple[int, ...]) -> int:
    seen, parity = set(), 0
    for i in range(len(p)):
        j, length = i, 0
        while j not in seen:
            seen.add(j)
            j, length = p[j], length + 1
        if length:
            parity ^= (length - 1) & 1
    return parity


@dataclass(frozen=True)
class Group:
    """A finite group by its elements (index 0 is the identity) and multiplication table."""

    name: str
    table: tuple[tuple[int, ...], ...]  # table[a][b] = index of a * b

    @property
    def order(self) -> int:
        return len(self.table)

    def product(self, a: int, b: int) -> int:
        return self.table[a][b]

    @cached_property
    def table_tensor(self) -> torch.Tensor:
        return torch.tensor(self.table, dtype=torch.long)

    @property
    def abelian(self) -> bool:
        return all(self.table[a][b] == self.table[b][a] for a in range(self.order) for b in range(self.order))


def _permutation_group(name: str, elements: list[tuple[int, ...]]) -> Group:
    index = {p: i for i, p in enumerate(elements)}
    return Group(name, tuple(tuple(index[_compose(p, q)] for q in elements) for p in elements))


def symmetric_group(k: int = 5) -> Group:
    """S_k: permutations of k points, identity first; a * b applies b, then a."""
    elements = sorted(itertools.permutations(range(k)))
    return _permutation_group(f"S{k}", elements)


def alternating_group(k: int = 5) -> Group:
    """A_k: the even permutations of k points."""
    elements = [p for p in sorted(itertools.permutations(range(k))) if _parity(p) == 0]
    return _permutation_group(f"A{k}", elements)


def cyclic_group(k: int) -> Group:
    return Group(f"Z{k}", tuple(tuple((a + b) % k for b in range(k)) for a in range(k)))


def direct_product(g: Group, h: Group) -> Group:
    """g x h with elements (a, b) indexed a * |h| + b, multiplied componentwise."""
    table = tuple(tuple(g.product(a1, a2) * h.order + h.product(b1, b2)
                        for a2 in range(g.order) for b2 in range(h.order))
                  for a1 in range(g.order) for b1 in range(h.order))
    return Group(f"{g.name}x{h.name}", table)


def group(name: str) -> Group:
    """S5, A5, A4xZ5 or Z60 (the paper's groups), or any Sk, Ak, Zk."""
    if name == "A4xZ5":
        return direct_product(alternating_group(4), cyclic_group(5))
    kind, k = name[0], name[1:]
    if kind in "SAZ" and k.isdigit():
        return {"S": symmetric_group, "A": alternating_group, "Z": cyclic_group}[kind](int(k))
    raise ValueError(f"unknown group {name!r} (S5, A5, A4xZ5, Z60, or Sk, Ak, Zk)")


@dataclass(frozen=True)
class GroupWordProblem:
    """g_1 .. g_L from a group, and the prefix products s_t = g_1 g_2 ... g_t.

    Tokens 0..|G|-1 are the input elements, |G| + e the state e, and 2|G| a start token.
    Three formats:

    - ``"cot"``: ``g_1 s_1 g_2 s_2 ... g_L s_L``, every s_t scored and written into the
      sequence (a chain of thought of intermediate states);
    - ``"every-prefix"``: ``<start> g_1 ... g_L <start>``, s_t expected at position t + 1
      (predicted from g_1 .. g_t) but never shown: the word problem with every prefix as
      target, one model for every length (The Illusion of State);
    - ``"answer"``: ``<start> g_1 ... g_L s_L``, only s_L scored.
    """

    group_name: str
    L: int
    format: str = "cot"

    def __post_init__(self):
        if self.format not in ("cot", "every-prefix", "answer"):
            raise ValueError(f"format must be 'cot', 'every-prefix' or 'answer', not {self.format!r}")

    @cached_property
    def group(self) -> Group:
        return group(self.group_name)

    @property
    def start(self) -> int:
        return 2 * self.group.order

    @property
    def vocab_size(self) -> int:
        return 2 * self.group.order + 1

    @property
    def length(self) -> int:
        return 2 * self.L if self.format == "cot" else self.L + 2

    def prefix_products(self, g: torch.Tensor) -> torch.Tensor:
        table = self.group.table_tensor
        states = [g[:, 0]]
        for t in range(1, g.shape[1]):
            states.append(table[states[-1], g[:, t]])
        return torch.stack(states, dim=1)

    def sample(self, n: int, seed: int) -> TaskBatch:
        G = self.group.order
        g = torch.randint(0, G, (n, self.L), generator=_generator(seed))
        s = self.prefix_products(g) + G
        start = torch.full((n, 1), self.start)
        if self.format == "cot":
            tokens = torch.stack([g, s], dim=2).reshape(n, 2 * self.L)
            scored = torch.zeros_like(tokens, dtype=torch.bool)
            scored[:, 1::2] = True
            return TaskBatch(tokens, scored)
        if self.format == "answer":
            tokens = torch.cat([start, g, s[:, -1:]], dim=1)
            scored = torch.zeros_like(tokens, dtype=torch.bool)
            scored[:, -1] = True
            return TaskBatch(tokens, scored)
        tokens = torch.cat([start, g, start], dim=1)
        targets = torch.cat([start, start, s], dim=1)  # s_t sits at position t + 1, after g_t
        scored = torch.zeros_like(tokens, dtype=torch.bool)
        scored[:, 2:] = True
        return TaskBatch(tokens, scored, targets)


# ---------------------------------------------------------------------------------------------
# In-context classification under a random label map (2411.02830, 2405.00200, 2507.22887)


@dataclass(frozen=True)
class LabelMapEpisodes:
    """BOS, then `demos` demonstrations ``x (x, y)`` with y = f(x) under a label map f drawn afresh for every row.

    A demonstration is two tokens: the item x (the query slot) and one token for the pair
    (x, y); the label y is predicted at the query slot, from everything before it. Token ids:
    items 0..I-1, pairs I + x C + y, labels I + I C + y, BOS last (I = `items`, C = `labels`).
    Items come in fixed clusters of `cluster_size` consecutive ids (x // cluster_size), and
    f gives one label per cluster, uniform and fresh per row: nothing about f can be stored
    in the weights (only which items share a cluster), a label is predictable only when an
    item of its cluster was demonstrated earlier in the row, and then one demonstration
    informs every query of its cluster, as a real task's demonstrations inform more than
    their own input (with `cluster_size` 1, each informs only itself: pure look-up). With
    `label_noise`, a share of the shown labels is redrawn at random while the target stays
    f's label, so more demonstrations of a cluster keep helping (a majority of noisy labels).
    Otherwise the best prediction is the uniform prior, which is what an in-context expert
    without a relevant demonstration should say. Every query slot is scored (the label is
    the target there; the pair token that follows is never a target), so one row trains
    every context length up to `demos` demonstrations. One-token pairs make the look-up one
    attention step, which a tiny model learns in a few hundred steps; with the label as its
    own token after the item (``x y x y ...``) the copy needs an induction circuit, which two
    layers of width 64 had not formed after 1,500 steps (calibration, seed 0: the loss stayed
    at log 4). `seen_before(tokens)` marks the predictable query slots.
    """

    items: int = 32
    labels: int = 4
    demos: int = 64
    cluster_size: int = 1
    label_noise: float = 0.0  # share of demonstrations whose shown label is redrawn uniformly (the target never is)

    def __post_init__(self):
        if self.items % self.cluster_size:
            raise ValueError(f"cluster_size ({self.cluster_size}) must divide items ({self.items})")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), not {self.label_noise}")

    @property
    def bos(self) -> int:
        return self.items + self.items * self.labels + self.labels

    @property
    def vocab_size(self) -> int:
        return self.bos + 1

    @property
    def length(self) -> int:
        return 2 * self.demos + 1

    def label_token(self, y: torch.Tensor) -> torch.Tensor:
        return self.items + self.items * self.labels + y

    def random_maps(self, n: int, g: torch.Generator) -> torch.Tensor:
        """[n, clusters] label indices: one uniform map f per row, from clusters to labels."""
        return torch.randint(0, self.labels, (n, self.items // self.cluster_size), generator=g)

    def pairs(self, x: torch.Tensor, f: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        """[n, 2k] tokens ``x_1 (x_1, y_1) .. x_k (x_k, y_k)`` for items x [n, k] under maps f [n, clusters].

        With `label_noise` and a generator `g`, each shown label is redrawn uniformly with that probability.
        """
        y = self.label_of(x, f)
        if self.label_noise and g is not None:
            redraw = torch.rand(x.shape, generator=g) < self.label_noise
            y = torch.where(redraw, torch.randint(0, self.labels, x.shape, generator=g), y)
        pair = self.items + x * self.labels + y
        return torch.stack([x, pair], dim=2).reshape(len(x), -1)

    def label_of(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Label indices y = f(cluster of x) for items x [n, k] under maps f [n, clusters]."""
        return f.gather(1, x // self.cluster_size)

    def seen_before(self, tokens: torch.Tensor) -> torch.Tensor:
        """[n, T] bool: pair positions (even t >= 2, after BOS) whose item's cluster was demonstrated at an earlier pair."""
        x = tokens[:, 1::2] // self.cluster_size  # the items' clusters, at odd positions
        earlier = (x[:, :, None] == x[:, None, :]).tril(diagonal=-1).any(dim=2)
        seen = torch.zeros_like(tokens, dtype=torch.bool)
        seen[:, 2::2] = earlier
        return seen

    def sample(self, n: int, seed: int) -> TaskBatch:
        g = _generator(seed)
        f = self.random_maps(n, g)
        x = torch.randint(0, self.items, (n, self.demos), generator=g)
        tokens = torch.cat([torch.full((n, 1), self.bos), self.pairs(x, f, g)], dim=1)
        targets = tokens.clone()
        targets[:, 2::2] = self.label_token(self.label_of(x, f))  # the label, predicted at the query slot before it
        scored = torch.zeros_like(tokens, dtype=torch.bool)
        scored[:, 2::2] = True
        return TaskBatch(tokens, scored, targets)


# ---------------------------------------------------------------------------------------------
# Retrieval tasks for comparing blocks (the architectures papers; `paperzoo.core.blocks`)
#
# Each is read out at the last position: the row ends in a placeholder whose expected token
# (`targets`) is the answer, so the answer never enters the input and a non-causal mixer
# (FFTNet, FNet) is scored as fairly as a causal one.


def _read_out_last(context: torch.Tensor, placeholder: int, answer: torch.Tensor) -> TaskBatch:
    tokens = torch.cat([context, torch.full((len(context), 1), placeholder)], dim=1)
    targets = tokens.clone()
    targets[:, -1] = answer
    scored = torch.zeros_like(tokens, dtype=torch.bool)
    scored[:, -1] = True
    return TaskBatch(tokens, scored, targets)


@dataclass(frozen=True)
class AssociativeRecall:
    """``k_1 v_1 .. k_n v_n q ?``: n pairs with distinct keys, then one of their keys; the answer is its value.

    Token ids: keys 0..K-1, values K..K+V-1, the placeholder last. Values are drawn
    independently per pair, so a value can repeat and only the key identifies it.

    With ``queries`` > 1 the row asks several keys (distinct, in random order) and each answer
    is written into the input after its query, ``q_1 a_1 q_2 a_2 ..``, every answer scored:
    multi-query associative recall (Zoology, arXiv:2312.04927), many signals per row, for
    causal models only (a non-causal mixer would see the answers).

    With ``pair_tokens`` each pair is one token ``(k, v)`` (ids after the placeholder,
    ``K + V + 1 + k V + v``): recall is then one content-based look-up, which a small model
    learns in hundreds of steps, where two tokens per pair first need a previous-token
    circuit to bind each value to its key (thousands of steps at width 64).
    """

    pairs: int = 8
    keys: int = 16
    values: int = 16
    queries: int = 1
    pair_tokens: bool = False

    def __post_init__(self):
        if self.pairs > self.keys:
            raise ValueError(f"{self.pairs} pairs need at least as many keys, not {self.keys}")
        if not 1 <= self.queries <= self.pairs:
            raise ValueError(f"queries must be between 1 and the number of pairs ({self.pairs}), not {self.queries}")

    @property
    def placeholder(self) -> int:
        return self.keys + self.values

    @property
    def vocab_size(self) -> int:
        return self.placeholder + 1 + (self.keys * self.values if self.pair_tokens else 0)

    @property
    def length(self) -> int:
        return (1 if self.pair_tokens else 2) * self.pairs + 2 * self.queries

    def sample(self, n: int, seed: int) -> TaskBatch:
        g = _generator(seed)
        k = torch.rand(n, self.keys, generator=g).argsort(dim=1)[:, : self.pairs]  # distinct keys per row
        v = self.keys + torch.randint(0, self.values, (n, self.pairs), generator=g)
        asked = torch.rand(n, self.pairs, generator=g).argsort(dim=1)[:, : self.queries]
        if self.pair_tokens:
            pairs = self.placeholder + 1 + k * self.values + (v - self.keys)
        else:
            pairs = torch.stack([k, v], dim=2).reshape(n, -1)
        if self.queries == 1:
            return _read_out_last(torch.cat([pairs, k.gather(1, asked)], dim=1), self.placeholder,
                                  v.gather(1, asked)[:, 0])
        tokens = torch.cat([pairs, torch.stack([k.gather(1, asked), v.gather(1, asked)], dim=2).reshape(n, -1)], dim=1)
        scored = torch.zeros_like(tokens, dtype=torch.bool)
        scored[:, pairs.shape[1] + 1::2] = True
        return TaskBatch(tokens, scored)


@dataclass(frozen=True)
class MaxRetrieval:
    """``x_1 .. x_n ?``: n items drawn uniformly from `values` ordered tokens; the answer is the largest."""

    items: int = 16
    values: int = 64

    @property
    def vocab_size(self) -> int:
        return self.values + 1

    @property
    def length(self) -> int:
        return self.items + 1

    def sample(self, n: int, seed: int) -> TaskBatch:
        x = torch.randint(0, self.values, (n, self.items), generator=_generator(seed))
        return _read_out_last(x, self.values, x.max(dim=1).values)


@dataclass(frozen=True)
class Passkey:
    """Filler with ``marker key`` at a uniform position, then ``query ?``; the answer is the key.

    Token ids: keys 0..K-1, filler K..K+F-1 (drawn uniformly: noise the state must carry
    the key through), then the marker, the query and the placeholder. `length` counts
    every token of the row.
    """

    length: int = 64
    keys: int = 16
    filler: int = 16

    def __post_init__(self):
        if self.length < 5:
            raise ValueError(f"a passkey row needs at least 5 tokens, not {self.length}")

    @property
    def marker(self) -> int:
        return self.keys + self.filler

    @property
    def vocab_size(self) -> int:
        return self.marker + 3

    def sample(self, n: int, seed: int) -> TaskBatch:
        g = _generator(seed)
        context = self.keys + torch.randint(0, self.filler, (n, self.length - 1), generator=g)
        key = torch.randint(0, self.keys, (n,), generator=g)
        at = torch.randint(0, self.length - 3, (n,), generator=g)  # the marker's position; the key follows it
        rows = torch.arange(n)
        context[rows, at] = self.marker
        context[rows, at + 1] = key
        context[:, -1] = self.marker + 1  # the query
        return _read_out_last(context, self.marker + 2, key)


# ---------------------------------------------------------------------------------------------
# Task models and the task trainer


@dataclass(frozen=True)
class TaskModelConfig:
    """A tiny HF Llama for a task: `hidden_size` d, `num_layers`, `num_heads`, MLP width `mlp_ratio` x d."""

    hidden_size: int
    num_layers: int = 1
    num_heads: int = 1
    mlp_ratio: int = 4

    def build(self, vocab_size: int, max_len: int) -> LlamaForCausalLM:
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=self.hidden_size,
                             intermediate_size=self.mlp_ratio * self.hidden_size,
                             num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                             num_key_value_heads=self.num_heads, max_position_embeddings=max_len,
                             tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        return LlamaForCausalLM(config)


@dataclass(frozen=True)
class TaskTraining:
    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0


@torch.no_grad()
def task_correct(model, batch: TaskBatch, chunk: int = 512) -> torch.Tensor:
    """[n] bool: the row's every scored token is the model's greedy (teacher-forced) prediction."""
    was_training = model.training
    model.eval()
    right = []
    for i in range(0, len(batch.tokens), chunk):
        part = TaskBatch(batch.tokens[i:i + chunk], batch.scored[i:i + chunk],
                         None if batch.targets is None else batch.targets[i:i + chunk])
        logits = model(input_ids=part.tokens).logits
        predictions = torch.cat([part.tokens[:, :1], logits[:, :-1].argmax(-1)], dim=1)  # position t from prefix < t
        right.append(part.correct(predictions))
    model.train(was_training)
    return torch.cat(right)


def task_accuracy(model, batch: TaskBatch, chunk: int = 512) -> float:
    """Share of rows whose every scored token is the model's greedy (teacher-forced) prediction."""
    return task_correct(model, batch, chunk).float().mean().item()


def task_source(task) -> str:
    """The source of the task's class and of every dataclass among its fields: part of a task model's cache key.

    A change to how a task draws its sequences changes this text, so a model trained on the old
    format is never loaded for the new one, even when the dataclass's fields stay the same.
    """
    values = [getattr(task, f.name) for f in fields(task)]  # fields only: cached properties also live in vars()
    classes = [type(task)] + [type(v) for v in values if is_dataclass(v) and not isinstance(v, type)]
    return "".join(inspect.getsource(c) for c in dict.fromkeys(classes))


def task_model_path(task, config: TaskModelConfig, training: TaskTraining, seed: int) -> "Path":
    """Where `train_on_task` caches a model: a hash of the task (fields and source), config, training and seed."""
    key = store.stable_hash(["task-model-v3", type(task).__name__, asdict(task), task_source(task), asdict(config),
                             asdict(training), seed])
    return store.home() / "task-models" / f"{type(task).__name__}-{key}"


def train_on_task(task, config: TaskModelConfig, training: TaskTraining, seed: int = 0,
                  eval_size: int = 1024, cache: bool = True):
    """A tiny model trained on samples of `task` (loss on scored positions only); (model, history).

    The training pool holds steps x batch_size examples drawn with `seed`, and the
    foundation's loop (`paperzoo.core.training.train`: AdamW, warm-up and cosine decay)
    draws its batches from it; the held-out batch is drawn with a seed no pool uses. The
    history holds the training loss, seconds and held-out accuracy. Cached under a hash
    of the task (its fields and its class's source, `task_source`), config, training and seed
    (`cache=False` trains without caching).
    """
    from paperzoo.core.models import load_trained, save_trained
    from paperzoo.core.training import TrainConfig, train

    path = task_model_path(task, config, training, seed)
    held_out = task.sample(eval_size, seed=10**9 + seed)

    def build(tmp) -> None:
        torch.manual_seed(seed)
        model = config.build(task.vocab_size, task.length)
        batches = task.sample(training.steps * training.batch_size, seed=seed)
        history = train(model, batches.tokens, TrainConfig(
            steps=training.steps, batch_size=training.batch_size, seq_len=task.length, lr=training.lr,
            warmup_steps=training.warmup_steps, weight_decay=training.weight_decay),
            labels=batches.labels, seed=seed, desc=f"training on {type(task).__name__}")
        history = {"train_loss": history["train_loss"], "seconds": history["seconds"],
                   "accuracy": task_accuracy(model, held_out)}
        save_trained(tmp, model, None, history)

    if not cache:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp))
            model, _, history = load_trained(Path(tmp), shared=False)
        return model, history
    model, _, history = load_trained(store.cached_dir(path, build), shared=False)
    return model, history


# ---------------------------------------------------------------------------------------------
# A typed formal language: a PCFG over parts of speech and an entity-property graph (2408.12578)


@dataclass(frozen=True)
class TypedLanguage:
    """A PCFG over parts of speech whose slots are filled under a bipartite entity-property type graph.

    After A Percolation Model of Emergence (Lubana et al., arXiv:2408.12578; official code
    github.com/EkdeepSLubana/ConceptPercolation, ``dgp/PCSG.py`` and ``dgp/makeConceptClasses.py``),
    cut down to the parts its emergence story needs:

    - *grammar* (a PCFG over parts of speech): ``S -> CL R``, ``R -> 'and' CL R [continue_prob] |
      '<eos>'``, ``CL -> ENTITY 'is' PROPERTY``, with at most `max_clauses` clauses (the official
      grammar's ``VP -> descPreP descV`` with one copula and one conjunction);
    - *type constraints*: entity e and property k type-check iff they belong to the same concept
      class (the official code gives each class its own descriptive properties); entity i is in
      class ``i % classes``, property j in class ``j % classes``. The valid pairs form a bipartite
      graph of `classes` complete blocks, |E|/C x |K|/C each;
    - *held-out pairs*: a share `held_out` of the valid pairs (drawn by `seed`, redrawn until every
      block's training graph stays connected) never appears in training sentences, so that
      producing one requires inferring it through the class structure (the paper's move from
      memorisation to generalisation, which its percolation model describes).

    Token ids: entities ``0..E-1``, properties ``E..E+K-1``, then ``is``, ``and``, ``<eos>``,
    the task tokens ``T0`` (free generation), ``T1`` (unscrambling), ``T2`` (conditional
    generation), ``Out:`` and ``<pad>``. `parse` is the grammar's parser and `type_check` the
    type checker; `TypedLanguageTask` draws training and evaluation rows.
    """

    entities: int = 12
    properties: int = 24
    classes: int = 3
    max_clauses: int = 3
    continue_prob: float = 0.7
    held_out: float = 0.25
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.max_clauses <= self.classes:
            raise ValueError(f"max_clauses must be in 1..classes ({self.classes}): clauses use distinct classes")
        if self.entities < self.classes or self.properties < self.classes:
            raise ValueError("every class needs at least one entity and one property")
        if not 0.0 <= self.held_out < 1.0:
            raise ValueError(f"held_out must be in [0, 1), not {self.held_out}")

    # token ids
    @property
    def IS(self) -> int:
        return self.entities + self.properties

    @property
    def AND(self) -> int:
        return self.IS + 1

    @property
    def EOS(self) -> int:
        return self.IS + 2

    def task_token(self, task: int) -> int:
        return self.IS + 3 + task

    @property
    def OUT(self) -> int:
        return self.IS + 6

    @property
    def PAD(self) -> int:
        return self.IS + 7

    @property
    def vocab_size(self) -> int:
        return self.IS + 8

    @property
    def sentence_max(self) -> int:
        """Tokens of the longest sentence, <eos> included."""
        return 4 * self.max_clauses

    def entity_class(self, e: int) -> int:
        return e % self.classes

    def property_class(self, k: int) -> int:
        """Class of property token k (a token id, E..E+K-1)."""
        return (k - self.entities) % self.classes

    def is_entity(self, t: int) -> bool:
        return 0 <= t < self.entities

    def is_property(self, t: int) -> bool:
        return self.entities <= t < self.entities + self.properties

    def valid(self, e: int, k: int) -> bool:
        """The type constraint: entity e may carry property token k."""
        return self.is_entity(e) and self.is_property(k) and self.entity_class(e) == self.property_class(k)

    @cached_property
    def valid_pairs(self) -> tuple[tuple[int, int], ...]:
        return tuple((e, k) for e in range(self.entities) for k in range(self.entities, self.entities + self.properties)
                     if self.valid(e, k))

    @cached_property
    def split_pairs(self) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
        """(training pairs, held-out pairs): held-out pairs never occur in training rows."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        g, pairs = _generator(self.seed), self.valid_pairs
        n = self.entities + self.properties
        for _ in range(1000):
            held = torch.rand(len(pairs), generator=g) < self.held_out
            train = [p for p, h in zip(pairs, held.tolist()) if not h]
            rows, cols = zip(*train)
            graph = coo_matrix(([1] * len(train), (rows, cols)), shape=(n, n))
            if connected_components(graph, directed=False)[0] == self.classes:  # one component per class
                return tuple(train), tuple(p for p, h in zip(pairs, held.tolist()) if h)
        raise ValueError("could not hold out pairs and keep every class connected: lower held_out")

    def pairs_by_class(self, split: str) -> list[list[tuple[int, int]]]:
        train, held = self.split_pairs
        pool = {"train": train, "held_out": held, "all": self.valid_pairs}[split]
        out = [[] for _ in range(self.classes)]
        for e, k in pool:
            out[self.entity_class(e)].append((e, k))
        return out

    def sentence(self, pairs: list[tuple[int, int]]) -> list[int]:
        """The sentence ``e1 is k1 and e2 is k2 ... <eos>`` for clauses [(e, k), ...]."""
        tokens = []
        for i, (e, k) in enumerate(pairs):
            tokens += ([self.AND] if i else []) + [e, self.IS, k]
        return tokens + [self.EOS]

    def parse(self, tokens) -> list[tuple[int, int]] | None:
        """The clauses [(entity, property), ...] of a grammatical sentence, or None if it does not parse.

        `tokens` is the sentence up to and including its first <eos> (anything after it is ignored;
        no <eos> means unfinished, hence ungrammatical). The grammar: CL ('and' CL)* '<eos>',
        CL = ENTITY 'is' PROPERTY, at most `max_clauses` clauses.
        """
        tokens = [int(t) for t in tokens]
        if self.EOS not in tokens:
            return None
        tokens = tokens[: tokens.index(self.EOS)]
        clauses, i = [], 0
        while True:
            if i + 3 > len(tokens):
                return None
            e, cop, k = tokens[i:i + 3]
            if not (self.is_entity(e) and cop == self.IS and self.is_property(k)):
                return None
            clauses.append((e, k))
            i += 3
            if i == len(tokens):
                return clauses if len(clauses) <= self.max_clauses else None
            if tokens[i] != self.AND:
                return None
            i += 1

    def type_check(self, clauses: list[tuple[int, int]]) -> list[bool]:
        """Per clause: does its (entity, property) pair satisfy the type constraint?"""
        return [self.valid(e, k) for e, k in clauses]

    def solves(self, task: int, ops, sentence) -> bool:
        """The task checker: does `sentence` (output tokens) solve task `task` (0 free, 1 unscramble, 2 conditional)?

        Every task needs a grammatical sentence whose clauses all type-check; unscrambling also needs it
        to use exactly the bag `ops` (any order of clauses that does so is right); conditional generation
        needs every conditioning token of `ops` in it.
        """
        clauses = self.parse(sentence)
        if clauses is None or not all(self.type_check(clauses)):
            return False
        words = [t for pair in clauses for t in (pair[0], self.IS, pair[1])] + [self.AND] * (len(clauses) - 1)
        if task == 1:
            return sorted(words) == sorted(int(t) for t in ops)
        if task == 2:
            return set(int(t) for t in ops) <= set(words)
        return True

    @cached_property
    def pairs_by_class_cached(self) -> dict[str, list[list[tuple[int, int]]]]:
        return {s: self.pairs_by_class(s) for s in ("train", "held_out", "all")}


TYPED_TASKS = ("free", "unscramble", "conditional")


@dataclass(frozen=True)
class TypedLanguageTask:
    """Rows of the paper's three tasks on a `TypedLanguage`, in its instruction format ``T ops Out: sentence``.

    - free generation: ``T0 Out: sentence`` (the sentence is the model's to generate);
    - unscrambling: ``T1 <the sentence's tokens but <eos>, shuffled> Out: sentence``;
    - conditional generation: ``T2 <some of its entities and properties, shuffled> Out: sentence``.

    `mix` gives the share of each task (the official config trains on 20% free generation and
    the rest split evenly over the two instruction tasks: ``instr_ratio: 0.8``). Rows are
    right-padded with ``<pad>`` to `length`. `split` says which pairs fill the sentences
    (``"train"``, ``"held_out"``, ``"all"``); `min_clauses` raises the PCFG's floor.

    `scoring`: ``"output"`` scores every token of the sentence (the training loss: the
    model learns to write the sentence); ``"determined"`` scores, in unscrambling rows, only
    the tokens the bag and the prefix determine: every token except the subject of a clause
    that is not the last (several unused entities could open it). Clauses use distinct
    classes, so each property is determined by its subject through the type constraint:
    a model that knows the grammar but not the types gets a 3-clause row right with chance
    1/6. Free-generation rows score nothing under ``"determined"`` (no single right answer).
    """

    language: TypedLanguage
    mix: tuple[float, float, float] = (0.2, 0.8, 0.0)
    split: str = "train"
    min_clauses: int = 1
    scoring: str = "output"

    def __post_init__(self):
        if self.split not in ("train", "held_out", "all"):
            raise ValueError(f"split must be 'train', 'held_out' or 'all', not {self.split!r}")
        if self.scoring not in ("output", "determined"):
            raise ValueError(f"scoring must be 'output' or 'determined', not {self.scoring!r}")
        if len(self.mix) != 3 or min(self.mix) < 0 or sum(self.mix) <= 0:
            raise ValueError(f"mix needs three non-negative shares, not {self.mix}")

    @property
    def vocab_size(self) -> int:
        return self.language.vocab_size

    @property
    def length(self) -> int:
        L = self.language
        return 1 + (L.sentence_max - 1) + 1 + L.sentence_max  # task, ops (at most the bag), Out:, sentence

    def sample(self, n: int, seed: int) -> TaskBatch:
        """n rows, vectorised: the PCFG's clause counts, distinct classes, pairs from `split`, the ops, the sentence."""
        g = _generator(seed)
        L, C, M = self.language, self.language.classes, self.language.max_clauses
        shares = torch.tensor(self.mix, dtype=torch.float)
        task = torch.multinomial(shares / shares.sum(), n, replacement=True, generator=g)  # [n]
        extra = (torch.rand(n, M - self.min_clauses, generator=g) < L.continue_prob).long().cumprod(dim=1).sum(dim=1)
        clauses = self.min_clauses + extra  # [n]: 1 + (R -> 'and' CL R) expansions, capped at M
        classes = torch.rand(n, C, generator=g).argsort(dim=1)[:, :M]  # distinct classes, one per clause
        pools = L.pairs_by_class_cached[self.split]
        sizes = torch.tensor([len(p) for p in pools])
        table = torch.zeros(C, int(sizes.max()), 2, dtype=torch.long)
        for c, pool in enumerate(pools):
            table[c, : len(pool)] = torch.tensor(pool)
        pick = (torch.rand(n, M, generator=g) * sizes[classes]).long()
        pairs = table[classes, pick]  # [n, M, 2]
        j = torch.arange(M)
        used = j[None, :] < clauses[:, None]  # [n, M]
        # the sentence: e is k, then 'and' between clauses and <eos> after the last; 4 tokens per clause slot
        sent = torch.stack([pairs[..., 0], torch.full_like(pairs[..., 0], L.IS), pairs[..., 1],
                            torch.where(j[None, :] == clauses[:, None] - 1, L.EOS, L.AND).expand(n, M)], dim=2)
        sent_valid = used[:, :, None].expand(n, M, 4).reshape(n, 4 * M)
        sent = sent.reshape(n, 4 * M)
        # ops: unscrambling shuffles the sentence but its <eos>; conditional generation keeps a random nonempty
        # subset of its entities and properties, shuffled
        bag_valid = sent_valid & (sent != L.EOS)
        words = pairs.reshape(n, 2 * M)
        words_valid = used[:, :, None].expand(n, M, 2).reshape(n, 2 * M)
        keep = 1 + (torch.rand(n, generator=g) * (2 * clauses)).long()
        order = torch.rand(n, 2 * M, generator=g).masked_fill(~words_valid, 2.0).argsort(dim=1)
        words, words_valid = words.gather(1, order), (torch.arange(2 * M)[None, :] < keep[:, None])
        order = torch.rand(n, 4 * M, generator=g).masked_fill(~bag_valid, 2.0).argsort(dim=1)
        bag, bag_valid = sent.gather(1, order), bag_valid.gather(1, order)
        ops = torch.zeros(n, 4 * M, dtype=torch.long)
        ops_valid = torch.zeros(n, 4 * M, dtype=torch.bool)
        is_un, is_cond = (task == 1)[:, None], (task == 2)[:, None]
        ops = torch.where(is_un, bag, ops)
        ops_valid = torch.where(is_un, bag_valid, ops_valid)
        ops[:, : 2 * M] = torch.where(is_cond, words, ops[:, : 2 * M])
        ops_valid[:, : 2 * M] = torch.where(is_cond, words_valid, ops_valid[:, : 2 * M])
        # what is scored in the sentence
        if self.scoring == "output":
            score = sent_valid.clone()
        else:
            position = torch.arange(4 * M)[None, :]
            open_subject = (position % 4 == 0) & (position < 4 * (clauses[:, None] - 1))
            score = sent_valid & ~open_subject & (task == 1)[:, None]
        wide = torch.cat([L.task_token(0) + task[:, None], ops, torch.full((n, 1), L.OUT), sent], dim=1)
        valid = torch.cat([torch.ones(n, 1, dtype=torch.bool), ops_valid, torch.ones(n, 1, dtype=torch.bool),
                           sent_valid], dim=1)
        wide_scored = torch.cat([torch.zeros(n, 1 + 4 * M + 1, dtype=torch.bool), score], dim=1)
        order = (~valid).long().argsort(dim=1, stable=True)  # valid tokens first, in order; then padding
        tokens = wide.gather(1, order).masked_fill(~valid.gather(1, order), L.PAD)[:, : self.length]
        scored = wide_scored.gather(1, order)[:, : self.length]
        return TaskBatch(tokens, scored)

    def sentences(self, tokens: torch.Tensor) -> list[list[int]]:
        """The output part (after ``Out:``) of each row."""
        out = []
        for row in tokens.tolist():
            out.append(row[row.index(self.language.OUT) + 1:] if self.language.OUT in row else [])
        return out
