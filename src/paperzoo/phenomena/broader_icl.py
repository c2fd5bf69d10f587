r"""The Broader Spectrum of In-Context Learning (Lampinen, Chan, Singh, Shanahan; arXiv:2412.03782).

A position paper. Its definition (section 1): a model learns in context whenever earlier
tokens of a sequence lower its loss on later ones, whether or not the sequence looks like
few-shot demonstrations. Few-shot learning is one form; instructions, roles, explanations,
unlabelled inputs, time series and several tasks in a row (meta-ICL, where later tasks
need fewer examples) are others (section 2), and natural language is full of them:
coreference, repeated names, topics (section 3). All of them, the paper argues, are the
inner loop of a meta-learner whose outer loop is pretraining on sequences with such
structure. The paper has no algorithm; what it gives is a measurement. `paperzoo.catalog.
survey_maps.BROADER_ICL` maps its taxonomy onto the catalogue.

**The measurement** (for any Hugging Face causal LM and the user's own token data):

- `context_benefit(model, tokens, informative, early, late)`: for each sequence, the mean
  next-token loss over its *informative* positions (where earlier context can tell the
  answer) in an early window minus that in a late window,
  $b_i = \bar\ell_i(\text{early}) - \bar\ell_i(\text{late})$, with a bootstrap interval of the
  mean over sequences. $b > 0$ is in-context learning in the paper's sense. This is the
  per-sequence form of the "ICL score" (late-position minus early-position loss; Olsson et
  al. 2022, which the paper cites), with the sign turned so that more learning is larger,
  and with windows rather than single positions so one sequence's few informative tokens
  are enough.
- `token_losses(model, tokens)`: per-token next-token losses aligned with the tokens
  (`paperzoo.core.measures.token_losses` with a NaN first column), the input of both.

**The forms, as sequence generators** (`FORMS`; one shared vocabulary of 64 content tokens,
each sequence opened by its form's marker, `ContextForms` draws them round-robin):

- `key_value` (few-shot ICL): 4 keys, each bound to a random value for this sequence only,
  shown as 48 key-value pairs; informative positions: the values.
- `names` (coreference, repeated names): filler from a fixed Zipf law; at a quarter of the
  positions one of three names drawn for this sequence from 16; informative: the names.
- `topics` (topic modelling): every token from one of four fixed topic distributions
  (Dirichlet(0.2) over the vocabulary), the topic never named; informative: all.
- `series` (time-series ICL): $x_t = (p_{t \bmod P} + s\,t) \bmod 64$, a random pattern of
  period $P \in \{2, 3, 4\}$ plus a trend $s \in \{0, 1\}$; informative: all.
- `tasks` (meta-ICL): four key-value tasks in a row, each after a separator, each with four
  fresh keys but mapped onto the same four labels, drawn for this sequence; informative: the
  values, with their task index (`MetaBatch.task`). A learner of the task *family* needs
  fewer examples in the later tasks: it already knows which four labels are in play.
- `iid` (the control): Zipf tokens with nothing to learn from context, so the benefit must
  be zero there; a measurement that finds a benefit on it is measuring position, not context.

Deviations: the paper trains nothing; every form here is our synthetic analogue of a
form it names (its instructional, role-based and explanation-augmented forms need natural
language and are not built). Key-value maps, names and topics are the review's suggested
set-up; the series and meta-ICL forms and the i.i.d. control are ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from paperzoo.core import measures
from paperzoo.core.margins import Interval, bootstrap_mean
from paperzoo.core.tasks import TaskBatch

CONTENT = 64  # content tokens 0..63 shared by every form
FORMS = ("key_value", "names", "topics", "series", "tasks", "iid")
SEPARATOR = CONTENT + len(FORMS)  # starts each task of a meta-ICL sequence
PAD = SEPARATOR + 1
TASKS_PER_SEQUENCE = 4


def zipf(size: int, exponent: float = 1.0) -> torch.Tensor:
    p = 1.0 / torch.arange(1, size + 1, dtype=torch.float64) ** exponent
    return p / p.sum()


@dataclass(frozen=True)
class MetaBatch:
    """What a measurement needs beside the tokens: form, informative positions, meta-ICL task index."""

    form: torch.Tensor  # [n] index into FORMS
    informative: torch.Tensor  # [n, T] bool: the token at t can be told (in part) from the context before it
    task: torch.Tensor  # [n, T] task index 0..3 of a meta-ICL value position; -1 elsewhere


@dataclass(frozen=True)
class ContextForms:
    """Sequences of the six forms, round-robin by row: marker, then `length - 1` tokens (PAD where a form is shorter)."""

    length: int = 97
    topic_seed: int = 1234  # the four topics are fixed for the task, not per sequence

    @property
    def vocab_size(self) -> int:
        return PAD + 1

    def topics(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.topic_seed)
        return _dirichlet(4, CONTENT, 0.2, g)

    def sample(self, n: int, seed: int) -> TaskBatch:
        return self.sample_with_meta(n, seed)[0]

    def sample_with_meta(self, n: int, seed: int) -> tuple[TaskBatch, MetaBatch]:
        g = torch.Generator().manual_seed(int(seed))
        T = self.length - 1
        tokens = torch.full((n, self.length), PAD)
        informative = torch.zeros(n, self.length, dtype=torch.bool)
        task = torch.full((n, self.length), -1)
        form = torch.arange(n) % len(FORMS)
        topics = self.topics()
        for f, name in enumerate(FORMS):
            rows = (form == f).nonzero().flatten()
            if len(rows) == 0:
                continue
            x, info, t = _FORM_MAKERS[name](len(rows), T, g, topics)
            tokens[rows, 0] = CONTENT + f
            tokens[rows, 1:1 + x.shape[1]] = x
            informative[rows, 1:1 + x.shape[1]] = info
            task[rows, 1:1 + x.shape[1]] = t
        scored = tokens != PAD
        scored[:, 0] = False
        return TaskBatch(tokens, scored), MetaBatch(form, informative, task)


def _dirichlet(k: int, size: int, alpha: float, g: torch.Generator) -> torch.Tensor:
    # torch.distributions cannot draw from a Generator; numpy, seeded from it, can (drawn once per task)
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    return torch.from_numpy(rng.dirichlet(np.full(size, alpha), size=k))


def _none(n: int, T: int) -> torch.Tensor:
    return torch.full((n, T), -1)


def _key_value(n, T, g, topics):
    keys = torch.rand(n, 32, generator=g).argsort(1)[:, :4]  # 4 distinct keys of 0..31
    values = 32 + torch.randint(0, 32, (n, 4), generator=g)  # each bound to a random value of 32..63
    which = torch.randint(0, 4, (n, T // 2), generator=g)
    x = torch.stack([keys.gather(1, which), values.gather(1, which)], 2).reshape(n, -1)
    info = torch.zeros_like(x, dtype=torch.bool)
    info[:, 1::2] = True
    return x, info, _none(n, x.shape[1])


def _names(n, T, g, topics):
    filler = torch.multinomial(zipf(48).float(), n * T, replacement=True, generator=g).view(n, T)
    names = 48 + torch.rand(n, 16, generator=g).argsort(1)[:, :3]
    is_name = torch.rand(n, T, generator=g) < 0.25
    x = torch.where(is_name, names.gather(1, torch.randint(0, 3, (n, T), generator=g)), filler)
    return x, is_name, _none(n, T)


def _topics(n, T, g, topics):
    chosen = topics[torch.randint(0, len(topics), (n,), generator=g)].float()
    return torch.multinomial(chosen, T, replacement=True, generator=g), torch.ones(n, T, dtype=torch.bool), _none(n, T)


def _series(n, T, g, topics):
    period = torch.randint(2, 5, (n, 1), generator=g)
    pattern = torch.randint(0, CONTENT, (n, 4), generator=g)
    slope = torch.randint(0, 2, (n, 1), generator=g)
    t = torch.arange(T)[None]
    x = (pattern.gather(1, t.expand(n, T) % period) + slope * t) % CONTENT
    return x, torch.ones(n, T, dtype=torch.bool), _none(n, T)


def _tasks(n, T, g, topics):
    pairs = (T // TASKS_PER_SEQUENCE - 1) // 2
    labels = 32 + torch.rand(n, 32, generator=g).argsort(1)[:, :4]  # the sequence's label set, shared by its tasks
    parts, info, task = [], [], []
    for j in range(TASKS_PER_SEQUENCE):
        keys = torch.rand(n, 32, generator=g).argsort(1)[:, :4]  # fresh keys for every task
        bound = labels.gather(1, torch.rand(n, 4, generator=g).argsort(1))  # a fresh bijection onto the labels
        which = torch.randint(0, 4, (n, pairs), generator=g)
        body = torch.stack([keys.gather(1, which), bound.gather(1, which)], 2).reshape(n, -1)
        parts += [torch.full((n, 1), SEPARATOR), body]
        body_info = torch.zeros_like(body, dtype=torch.bool)
        body_info[:, 1::2] = True
        info += [torch.zeros(n, 1, dtype=torch.bool), body_info]
        task += [_none(n, 1), torch.where(body_info, j, -1)]
    return torch.cat(parts, 1), torch.cat(info, 1), torch.cat(task, 1)


def _iid(n, T, g, topics):
    return torch.multinomial(zipf(CONTENT).float(), n * T, replacement=True, generator=g).view(n, T), \
        torch.ones(n, T, dtype=torch.bool), _none(n, T)


_FORM_MAKERS = {"key_value": _key_value, "names": _names, "topics": _topics, "series": _series, "tasks": _tasks,
                "iid": _iid}


def token_losses(model, tokens: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """[n, T]: the next-token loss of token t given tokens < t, aligned with the tokens (NaN at t = 0)."""
    return torch.cat([torch.full((len(tokens), 1), float("nan")), measures.token_losses(model, tokens, batch_size)], 1)


def window_means(losses: torch.Tensor, positions: torch.Tensor, window: slice) -> np.ndarray:
    """[n]: each sequence's mean loss over the chosen positions inside `window` (NaN where it has none)."""
    inside = torch.zeros_like(positions)
    inside[:, window] = True
    chosen = positions & inside
    total = torch.where(chosen, losses, torch.zeros_like(losses)).sum(1)
    count = chosen.sum(1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan"))).numpy()


def context_benefit(model, tokens: torch.Tensor, informative: torch.Tensor, early: slice, late: slice,
                    losses: torch.Tensor | None = None) -> tuple[Interval, np.ndarray]:
    """Mean over sequences of (early loss - late loss) at informative positions, its bootstrap interval, per sequence.

    > 0: the context bought a lower loss later in the sequence (in-context learning in 2412.03782's sense).
    Sequences without informative positions in both windows are left out.
    """
    losses = token_losses(model, tokens) if losses is None else losses
    b = window_means(losses, informative, early) - window_means(losses, informative, late)
    b = b[~np.isnan(b)]
    if b.size < 2:
        raise ValueError("fewer than two sequences have informative positions in both windows")
    return bootstrap_mean(b), b
