r"""Deep Think with Confidence (Fu, Wang, Zhang, Tian, Zhao; arXiv:2508.15260).

Self-consistency samples many reasoning traces and takes the majority answer; every
trace costs the same and every trace gets one vote. DeepConf reads the model's own
confidence while it writes a trace and uses it twice: *offline*, it keeps only the
most confident traces and weights their votes by confidence; *online*, a short
warm-up sets a confidence bar, every later trace is cut off the moment its local
confidence falls below the bar, and sampling stops altogether once the weighted vote
has reached consensus. Bad traces cost a fraction of their length, easy questions
a fraction of the budget.

**Token confidence** is the negative mean log-probability of the $k$ most likely
tokens at position $i$ (paper, eq. 2; $k = 20$ in the official code):

$$ C_i = -\frac{1}{k} \sum_{j=1}^{k} \log P_i(j) $$

A peaked distribution puts all but one of its top-$k$ tokens far below zero, so a
large $C_i$ means a confident model. Over a trace, the **group confidence** of
position $i$ is the mean over the window $G_i$ of the $n$ tokens ending at $i$
(paper, eq. 4), and a trace is scored by one of

$$ C_{G_i} = \frac{1}{|G_i|} \sum_{t \in G_i} C_t, \qquad
   C_{\text{least}} = \min_i C_{G_i}, \qquad
   C_{\text{bottom-10\%}} = \operatorname{mean}\{\text{lowest 10\% of } C_{G_i}\}, \qquad
   C_{\text{tail}} = \operatorname{mean}\{C_t : t \text{ among the last } m\} $$

(paper, eqs. 5-7; the plain mean $C_{\text{avg}}$ is eq. 3).

**Offline** (paper, §3.2): keep the traces whose score is in the top $\eta\%$
($\eta = 10$, "DeepConf-low", or $90$, "DeepConf-high") and return
$\hat a = \arg\max_a V(a)$ with $V(a) = \sum_t C_t \, \mathbb 1[\text{answer}(t) = a]$
over the kept traces (paper, eq. 8).

**Online** (paper, §4, Algorithm 2): sample $N_{\text{init}} = 16$ warm-up traces in
full; the stopping bar is $s = \text{Percentile}_{100-\eta}$ of their lowest-group
confidences. Each later trace stops as soon as a full window's $C_{G_i} < s$ and is
discarded; warm-up traces below $s$ are discarded too. Votes are weighted by
$C_{\text{least}}$. Sampling stops when the consensus
$\beta = V(\hat a) / \sum_a V(a) \ge \tau$ ($\tau = 0.95$) or when $B$ traces have been
generated in all.

Implementation notes (checked against facebookresearch/deepconf: ``helper.py``,
``deepconf-online.py``, ``deepconf/processors.py``, ``analysis_offline.py``):

- The early stop is a transformers `LogitsProcessor` inside `generate`, as the
  official code is a vLLM logits processor: it computes $C_i$ from the raw
  next-token logits (custom processors run before temperature and top-p in
  `generate`), and once a full window's mean is below $s$ it masks every token but
  EOS, so the trace ends there. A `StoppingCriteria` would also fit but sees no
  logits; the processor does both jobs in one place. Traces shorter than a window are
  never cut, but are discarded afterwards if their mean confidence is below $s$, as
  in the official code.
- As officially: the bar uses ``numpy.percentile`` (linear interpolation), the top-$\eta\%$
  filter keeps scores $\ge$ the $(100-\eta)$-th percentile, traces without an answer
  neither vote nor count in the filter, and ties go to the answer seen first.
  The official code rounds $C_i$ to three decimals; we do not.
- Adaptive sampling: the official repository runs a fixed budget; the consensus stop
  follows the paper's Algorithm 2. We test consensus before every new trace,
  right after the warm-up included. With ``parallel > 1`` traces are drawn that many
  at a time and consensus is tested after each batch (``parallel = 1``, the default,
  is the paper's sequential rule). `deepconf_online_batch` runs many prompts in
  lockstep, one trace per active prompt per round, which keeps the sequential rule
  per prompt while batching across prompts.
- **Replay.** `deepconf_online_replay` runs the same loop on traces already sampled in
  full, taking each prompt's in order and cutting each where the live run would have
  (`cut_below`): a trace's prefix has the same distribution whether or not it will be
  cut, so this is a draw of online DeepConf that costs no sampling and that is paired
  with majority voting and offline DeepConf on the same traces. The live function stays
  the method; the replay is how the experiment measures it (tested to cut where the
  live run cuts).
- Window and tail lengths default to the paper's 2048 tokens. Traces of a few dozen
  tokens need proportionally smaller ones; callers pass them (the experiment says
  which it uses).
- `tokens_spent` counts every generated token of every trace, warm-up and cut-off
  traces included, each up to and including its EOS (a forced EOS counts too).
- Warm-up: the official online script samples 16 warm-up traces of a budget of 256
  (``WARMUP_TRACES = 16``, ``TOTAL_BUDGET = 256`` in ``deepconf-online.py``), 6.25% of
  the budget; `PAPER_WARMUP_SHARE` keeps that ratio for smaller budgets.
- Online votes: as in ``deepconf-online.py``, a warm-up trace votes if its lowest group
  confidence is at least the bar; a later trace votes unless it was cut; every vote is
  weighted by the trace's lowest group confidence. ``stats`` lists, per trace, whether
  it was cut, its confidence and whether it voted, so that this rule can be checked.
- Arguments are checked before any trace is sampled (an unknown `metric` included), and
  prompts are padded on the left whatever the tokenizer's `padding_side`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from paperzoo.core.reasoning import extract_answer
from paperzoo.core.sampling import check_positions, encode_left_padded, sample
from paperzoo.decoding import Generation, count_forward_passes

PAPER_WINDOW = 2048  # group (sliding window) and tail length, tokens
PAPER_TOP_K = 20  # logprobs=20 in the official scripts
PAPER_WARMUP = 16  # N_init (WARMUP_TRACES in the official deepconf-online.py)
PAPER_BUDGET = 256  # TOTAL_BUDGET in the official deepconf-online.py
PAPER_WARMUP_SHARE = PAPER_WARMUP / PAPER_BUDGET  # 6.25% of the budget
PAPER_CONSENSUS = 0.95  # tau
METRICS = ("mean", "lowest_group", "bottom_10_group", "tail")


# --------------------------------------------------------------------------- confidence measures

def token_confidence(top_logprobs: torch.Tensor) -> torch.Tensor:
    """C_i = -mean_j log P_i(j) over the top-k log-probabilities: [..., k] -> [...]."""
    return -top_logprobs.float().mean(-1)


def group_confidences(C: torch.Tensor, window: int) -> torch.Tensor:
    """C_{G_i} for every full window of `window` tokens: [T] -> [T - window + 1].

    A trace shorter than one window is a single group: its mean (as officially).
    """
    if window < 1:
        raise ValueError(f"window must be at least 1 token, not {window}")
    if C.numel() == 0:
        raise ValueError("a trace needs at least one token to have a confidence")
    if C.numel() < window:
        return C.float().mean().reshape(1)
    return C.float().unfold(0, window, 1).mean(-1)


def lowest_group_confidence(C: torch.Tensor, window: int) -> float:
    return float(group_confidences(C, window).min())


def bottom_group_confidence(C: torch.Tensor, window: int, fraction: float = 0.1) -> float:
    """Mean of the lowest `fraction` of the group confidences (at least one group)."""
    groups = group_confidences(C, window)
    n = max(1, int(groups.numel() * fraction))
    return float(groups.sort().values[:n].mean())


def tail_confidence(C: torch.Tensor, tail: int) -> float:
    if C.numel() == 0:
        raise ValueError("a trace needs at least one token to have a confidence")
    return float(C[-tail:].float().mean())


def trace_confidence(C: torch.Tensor, metric: str = "lowest_group", window: int = PAPER_WINDOW,
                     tail: int = PAPER_WINDOW) -> float:
    """One number per trace: the paper's C_avg, C_least, C_bottom-10% or C_tail."""
    if metric == "mean":
        return float(C.float().mean())
    if metric == "lowest_group":
        return lowest_group_confidence(C, window)
    if metric == "bottom_10_group":
        return bottom_group_confidence(C, window, 0.1)
    if metric == "tail":
        return tail_confidence(C, tail)
    raise ValueError(f"unknown confidence metric {metric!r}; known: {', '.join(METRICS)}")


# --------------------------------------------------------------------------- traces and votes

@dataclass
class Trace:
    """One sampled reasoning trace with its per-token confidences."""

    tokens: list[int]  # generated tokens, up to and including EOS
    text: str
    confidences: torch.Tensor  # [len(tokens)] C_i
    answer: Hashable | None
    stopped: bool = False  # cut off by the online confidence bar (it ends with a forced EOS)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


@dataclass
class Vote:
    answer: Hashable | None
    weights: dict = field(default_factory=dict)  # answer -> V(answer)
    kept: list[int] = field(default_factory=list)  # indices of the traces that voted

    @property
    def consensus(self) -> float:
        """beta = V(a_hat) / sum_a V(a); 0 when nobody voted."""
        total = sum(self.weights.values())
        return self.weights[self.answer] / total if total > 0 else 0.0


def weighted_vote(answers: Sequence[Hashable | None], weights: Sequence[float]) -> Vote:
    """arg max_a sum_t w_t 1[answer_t = a] (paper, eq. 8); None answers do not vote; ties: first seen."""
    if len(answers) != len(weights):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    V: dict = {}
    kept = []
    for i, (a, w) in enumerate(zip(answers, weights)):
        if a is not None:
            V[a] = V.get(a, 0.0) + float(w)
            kept.append(i)
    best = max(V, key=V.get) if V else None  # max keeps the first of equal keys
    return Vote(best, V, kept)


def majority_vote(answers: Sequence[Hashable | None]) -> Vote:
    """Self-consistency: one vote per trace that has an answer."""
    return weighted_vote(answers, [1.0] * len(answers))


def top_eta_mask(scores: Sequence[float], eta: float) -> list[bool]:
    """Keep the scores >= the (100 - eta)-th percentile: the top eta% most confident."""
    if not 0 < eta <= 100:
        raise ValueError(f"eta is a percentage in (0, 100], not {eta}")
    if len(scores) == 0:
        return []
    bar = np.percentile(np.asarray(scores, dtype=np.float64), 100 - eta)
    return [s >= bar for s in scores]


def deepconf_vote(traces: Sequence[Trace], eta: float = 10, metric: str = "lowest_group",
                  window: int = PAPER_WINDOW, tail: int = PAPER_WINDOW) -> Vote:
    """Offline DeepConf: keep the top-eta% traces by confidence, then a confidence-weighted vote.

    Traces without an answer are dropped before filtering (as officially). The
    indices in ``Vote.kept`` refer to `traces`.
    """
    valid = [i for i, t in enumerate(traces) if t.answer is not None]
    scores = [trace_confidence(traces[i].confidences, metric, window, tail) for i in valid]
    keep = top_eta_mask(scores, eta)
    chosen = [i for i, k in zip(valid, keep) if k]
    vote = weighted_vote([traces[i].answer for i in chosen],
                         [s for s, k in zip(scores, keep) if k])
    vote.kept = [chosen[j] for j in vote.kept]
    return vote


# --------------------------------------------------------------------------- sampling traces

class ConfidenceEarlyStop(LogitsProcessor):
    """Records C_i of every row at every step; forces EOS once a full window's mean is below the row's bar.

    `thresholds` [B] holds each row's bar s (None: record only, never stop). It must
    be the first processor so that it sees the model's raw logits.
    """

    def __init__(self, thresholds: torch.Tensor | None, window: int, top_k: int, eos_token_id: int):
        self.thresholds, self.window, self.top_k, self.eos = thresholds, window, top_k, eos_token_id
        self.C: list[torch.Tensor] = []  # one [B] tensor per generated position
        self.first_stop: torch.Tensor | None = None  # [B] step of the first forced EOS, -1 if none

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logp = torch.log_softmax(scores.float(), dim=-1)  # [B, V]
        self.C.append(token_confidence(logp.topk(self.top_k, dim=-1).values))
        if self.first_stop is None:
            self.first_stop = torch.full((scores.shape[0],), -1, dtype=torch.long)
        if self.thresholds is None or len(self.C) < self.window:
            return scores
        group = torch.stack(self.C[-self.window:], dim=1).mean(1)  # [B] C_{G_i}
        stop = group < self.thresholds.to(group.device)
        self.first_stop[stop.cpu() & (self.first_stop < 0)] = len(self.C) - 1
        if stop.any():
            scores = scores.clone()
            eos_logit = scores[stop, self.eos].clone()
            scores[stop] = float("-inf")
            scores[stop, self.eos] = eos_logit
        return scores


def _check_top_k(model, top_k: int) -> None:
    vocab = model.get_output_embeddings().weight.shape[0]
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be between 1 and the vocabulary size {vocab}, not {top_k}")


def _check_arguments(model, top_k: int, temperature: float, top_p: float, max_new_tokens: int, window: int,
                     eta: float | None = None, metric: str | None = None, tail: int | None = None) -> None:
    """Every public entry point's argument checks, before any trace is sampled."""
    _check_top_k(model, top_k)
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if window < 1 or (tail is not None and tail < 1):
        raise ValueError(f"window and tail must be at least 1 token, got {window} and {tail}")
    if eta is not None and not 0 < eta <= 100:
        raise ValueError(f"eta is a percentage in (0, 100], not {eta}")
    if metric is not None and metric not in METRICS:
        raise ValueError(f"unknown confidence metric {metric!r}; known: {', '.join(METRICS)}")


@torch.no_grad()
def sample_traces(model, tokenizer, prompts: Sequence[str], thresholds: torch.Tensor | None = None,
                  window: int = PAPER_WINDOW, top_k: int = PAPER_TOP_K, temperature: float = 1.0,
                  top_p: float = 1.0, max_new_tokens: int = 512, seed: int = 0,
                  answer_of: Callable[[str], Hashable | None] = extract_answer) -> list[Trace]:
    """One trace per prompt (repeat a prompt for several), cut off below `thresholds` [len(prompts)] if given."""
    _check_arguments(model, top_k, temperature, top_p, max_new_tokens, window)
    if thresholds is not None and tuple(thresholds.shape) != (len(prompts),):
        raise ValueError(f"thresholds must hold one bar per prompt ({len(prompts)}), got shape {tuple(thresholds.shape)}")
    eos = tokenizer.eos_token_id
    enc = encode_left_padded(tokenizer, prompts)
    check_positions(model, enc["input_ids"].shape[1], max_new_tokens)
    stop = ConfidenceEarlyStop(thresholds, window, top_k, eos)
    kwargs = ({"do_sample": False} if temperature == 0 else
              {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0})
    torch.manual_seed(seed)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos,
                         logits_processor=LogitsProcessorList([stop]), **kwargs)
    new = out[:, enc["input_ids"].shape[1]:]  # [B, T]
    C = torch.stack(stop.C, dim=1)  # [B, T]
    traces = []
    for row in range(new.shape[0]):
        ids = new[row].tolist()
        n = ids.index(eos) + 1 if eos in ids else len(ids)
        text = tokenizer.decode(ids[:n])
        # a row whose first forced EOS is its last token was cut; later forcing hit padding
        cut = bool(stop.first_stop[row] == n - 1)
        traces.append(Trace(ids[:n], text, C[row, :n].clone(), answer_of(text), cut))
    return traces


def _traces_from_samples(samples, answer_of) -> list[Trace]:
    return [Trace(s.tokens, s.text, token_confidence(s.top_logprobs), answer_of(s.text)) for s in samples]


def _generation(traces: Sequence[Trace], vote: Vote, scores: dict[int, float], passes: int, wall: float,
                stats: dict) -> Generation:
    """The voted answer's most confident trace stands for the result; `stats` says what it cost."""
    if vote.answer is None:
        tokens, text = [], ""
    else:
        best = max((i for i in vote.kept if traces[i].answer == vote.answer), key=lambda i: scores[i])
        tokens, text = traces[best].tokens, traces[best].text
    return Generation(tokens, text, passes, wall, {
        "answer": vote.answer,
        "votes": {str(a): w for a, w in vote.weights.items()},
        "consensus": vote.consensus,
        "traces_voting": len(vote.kept),
        **stats,
    })


# --------------------------------------------------------------------------- the two modes

def deepconf_offline(model, tokenizer, prompt: str, num_traces: int = 512, eta: float = 10,
                     metric: str = "lowest_group", window: int = PAPER_WINDOW, tail: int = PAPER_WINDOW,
                     top_k: int = PAPER_TOP_K, temperature: float = 1.0, top_p: float = 1.0,
                     max_new_tokens: int = 512, seed: int = 0,
                     answer_of: Callable[[str], Hashable | None] = extract_answer) -> Generation:
    """Sample `num_traces` full traces, keep the top-eta% by `metric`, return the confidence-weighted vote."""
    if num_traces < 1:
        raise ValueError(f"num_traces must be at least 1, not {num_traces}")
    _check_arguments(model, top_k, temperature, top_p, max_new_tokens, window, eta, metric, tail)
    with count_forward_passes(model) as passes:
        start = time.perf_counter()
        samples = sample(model, tokenizer, [prompt], num_samples=num_traces, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, top_k_logprobs=top_k, seed=seed)
        traces = _traces_from_samples(samples, answer_of)
        vote = deepconf_vote(traces, eta, metric, window, tail)
        wall = time.perf_counter() - start
    scores = {i: trace_confidence(traces[i].confidences, metric, window, tail) for i in vote.kept}
    return _generation(traces, vote, scores, passes.count, wall, {
        "mode": "offline", "eta": eta, "metric": metric,
        "tokens_spent": sum(t.num_tokens for t in traces), "traces_generated": len(traces),
    })


def deepconf_online_batch(model, tokenizer, prompts: Sequence[str], budget: int = 512,
                          warmup: int = PAPER_WARMUP, eta: float = 10, tau: float = PAPER_CONSENSUS,
                          window: int = PAPER_WINDOW, top_k: int = PAPER_TOP_K, temperature: float = 1.0,
                          top_p: float = 1.0, max_new_tokens: int = 512, seed: int = 0, parallel: int = 1,
                          answer_of: Callable[[str], Hashable | None] = extract_answer) -> list[Generation]:
    """Online DeepConf (paper, Algorithm 2) for every prompt, batched across prompts.

    Each prompt gets `warmup` full traces, the bar s = Percentile_{100-eta} of their
    lowest-group confidences, then up to `budget - warmup` traces that stop below s,
    until the weighted vote reaches consensus `tau`. `forward_passes` and
    `wall_seconds` of every Generation are those of the whole batched call.
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings")
    _check_online(warmup, budget, tau, parallel)
    _check_arguments(model, top_k, temperature, top_p, max_new_tokens, window, eta)
    P = len(prompts)
    with count_forward_passes(model) as passes:
        start = time.perf_counter()
        warm = sample(model, tokenizer, prompts, num_samples=warmup, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_p=top_p, top_k_logprobs=top_k, seed=seed)
        rounds = iter(range(1, 1 << 62))

        def draw(rows: list[int], bars: list[float]) -> list[Trace]:
            return sample_traces(model, tokenizer, [prompts[p] for p in rows], torch.tensor(bars), window, top_k,
                                 temperature, top_p, max_new_tokens, seed=seed + next(rounds), answer_of=answer_of)

        state = _online([_traces_from_samples(warm[p * warmup:(p + 1) * warmup], answer_of) for p in range(P)],
                        draw, budget, eta, tau, window, parallel)
        wall = time.perf_counter() - start
    return _online_generations(*state, warmup, eta, tau, passes.count, wall)


def cut_below(trace: Trace, bar: float, window: int, eos_token_id: int) -> Trace:
    """The trace online DeepConf would have written under `bar`: cut at the first full window whose mean is below it.

    The token at the end of that window becomes EOS, as `ConfidenceEarlyStop` forces it; a
    trace with no such window (or shorter than one) is returned unchanged. A cut trace has
    no answer: it never votes.
    """
    C = trace.confidences
    if C.numel() < window:
        return trace
    below = (group_confidences(C, window) < bar).nonzero()
    if len(below) == 0:
        return trace
    i = int(below[0]) + window - 1
    return Trace(trace.tokens[:i] + [eos_token_id], "", C[: i + 1].clone(), None, stopped=True)


def deepconf_online_replay(pools: Sequence[Sequence[Trace]], eos_token_id: int, budget: int = 512,
                           warmup: int = PAPER_WARMUP, eta: float = 10, tau: float = PAPER_CONSENSUS,
                           window: int = PAPER_WINDOW, parallel: int = 1) -> list[Generation]:
    """Online DeepConf replayed on full traces already sampled: `pools[p]` holds prompt p's, in sampling order.

    The same algorithm as `deepconf_online_batch`, with draws taken in order from each
    pool and cut by `cut_below`: a trace's prefix is distributed the same whether or not
    it will be cut, so this is a draw of online DeepConf, at no sampling cost, on the
    very traces that majority voting and offline DeepConf use. Each pool needs `budget`
    traces sampled in full (no cap below the budget of new tokens the live run would use).
    """
    if len(pools) == 0:
        raise ValueError("pools must hold one list of traces per prompt")
    _check_online(warmup, budget, tau, parallel)
    if any(len(pool) < budget for pool in pools):
        raise ValueError(f"every pool needs at least budget={budget} traces; the smallest has "
                         f"{min(map(len, pools))}")
    if window < 1 or not 0 < eta <= 100:
        raise ValueError(f"need window >= 1 and eta in (0, 100], got {window} and {eta}")
    start = time.perf_counter()
    taken = [warmup] * len(pools)

    def draw(rows: list[int], bars: list[float]) -> list[Trace]:
        out = []
        for p, bar in zip(rows, bars):
            out.append(cut_below(pools[p][taken[p]], bar, window, eos_token_id))
            taken[p] += 1
        return out

    state = _online([list(pool[:warmup]) for pool in pools], draw, budget, eta, tau, window, parallel)
    return _online_generations(*state, warmup, eta, tau, 0, time.perf_counter() - start)


def _check_online(warmup: int, budget: int, tau: float, parallel: int) -> None:
    if not 1 <= warmup <= budget:
        raise ValueError(f"need 1 <= warmup <= budget, got warmup={warmup}, budget={budget}")
    if not 0 < tau <= 1:
        raise ValueError(f"the consensus threshold tau must be in (0, 1], not {tau}")
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, not {parallel}")


def _online(traces: list[list[Trace]], draw: Callable[[list[int], list[float]], list[Trace]], budget: int,
            eta: float, tau: float, window: int, parallel: int):
    """Algorithm 2 after the warm-up `traces` (one list per prompt, extended in place); `draw(rows, bars)` samples.

    Returns (traces, lowest group confidences, bars, votes), each one per prompt.
    """
    P = len(traces)
    least = [[lowest_group_confidence(t.confidences, window) for t in ts] for ts in traces]
    bars = [float(np.percentile(np.asarray(c, dtype=np.float64), 100 - eta)) for c in least]

    def vote(p: int) -> Vote:
        # only traces that never fell below the bar vote, weighted by their lowest group confidence
        voting = [i for i, c in enumerate(least[p]) if c >= bars[p] and not traces[p][i].stopped]
        v = weighted_vote([traces[p][i].answer for i in voting], [least[p][i] for i in voting])
        v.kept = [voting[j] for j in v.kept]
        return v

    votes = [vote(p) for p in range(P)]
    while True:
        active = [p for p in range(P) if len(traces[p]) < budget and votes[p].consensus < tau]
        if not active:
            break
        rows = [p for p in active for _ in range(min(parallel, budget - len(traces[p])))]
        for p, t in zip(rows, draw(rows, [bars[p] for p in rows])):
            traces[p].append(t)
            least[p].append(lowest_group_confidence(t.confidences, window))
        for p in active:
            votes[p] = vote(p)
    return traces, least, bars, votes


def _online_generations(traces, least, bars, votes, warmup: int, eta: float, tau: float, passes: int,
                        wall: float) -> list[Generation]:
    out = []
    for p in range(len(traces)):
        online = traces[p][warmup:]
        out.append(_generation(traces[p], votes[p], dict(enumerate(least[p])), passes, wall, {
            "mode": "online", "eta": eta, "tau": tau, "threshold": bars[p],
            "tokens_spent": sum(t.num_tokens for t in traces[p]),
            "warmup_tokens": sum(t.num_tokens for t in traces[p][:warmup]),
            "traces_generated": len(traces[p]),
            "online_traces": len(online),
            "stopped_early": sum(t.stopped for t in online),
            "discarded": sum(t.stopped or c < bars[p] for t, c in zip(traces[p], least[p])),
            "consensus_reached": votes[p].consensus >= tau,
            "batch_prompts": len(traces),
            # per trace, in sampling order (warm-up first): cut off, lowest group confidence, voted
            "trace_stopped": [t.stopped for t in traces[p]],
            "trace_confidence": list(least[p]),
            "trace_voted": [i in set(votes[p].kept) for i in range(len(traces[p]))],
        }))
    return out


def deepconf_online(model, tokenizer, prompt: str, **kwargs) -> Generation:
    """Online DeepConf for one prompt; keyword arguments as `deepconf_online_batch`."""
    return deepconf_online_batch(model, tokenizer, [prompt], **kwargs)[0]
