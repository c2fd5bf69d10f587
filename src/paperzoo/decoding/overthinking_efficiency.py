r"""Do NOT Think That Much for 2+3=? On the Overthinking of o1-Like LLMs
(Chen, Xu, Liang, He, Pang, Yu, Song, Liu, Zhou, Zhang, Wang, Tu, Mi, Yu; arXiv:2412.21187).

o1-like models keep thinking after they have found the answer: a response is a
sequence of *solution rounds* (the first solution, then "Wait, let me check ...",
another solution, ...), and on easy problems the later rounds rarely change the
answer and rarely bring a new approach. The paper measures this waste with two
efficiency metrics and removes it by self-training: responses are streamlined to
their first correct solution (plus one reflection) and the model is trained to
prefer the streamlined response over its own full one.

**Outcome efficiency** (paper, §2): of the tokens spent, the share needed to reach
the first correct answer, averaged over the $N$ test instances,

$$ \xi_O = \frac1N \sum_{i=1}^N \sigma_i \frac{\hat T_i}{T_i} $$

with $T_i$ the response's tokens, $\hat T_i$ the tokens up to the end of its first
correct solution round, and $\sigma_i = 1$ if at least one solution in the response is
correct (paper, §2.2; else 0 and $\hat T_i = T_i$, so such a response counts as fully wasted).
$\sigma_i$ is about the solution rounds, not the final answer: a response whose first
round is right and whose last round talks itself out of it still has $\sigma_i = 1$.

**Process efficiency**: the share of tokens spent on *distinct* solutions,

$$ \xi_P = \frac1N \sum_{i=1}^N \frac{D_i}{T_i}, \qquad D_i = \sum_{m=1}^{M_i} \tau^i_m\, T^i_m $$

with $T^i_m$ the tokens of round $m$ and $\tau^i_m = 1$ if round $m$ takes a
perspective no earlier round took.

**The fix** (paper, §3): sample 10 responses per training problem from the model itself
at temperature 1, discard those without a correct answer, and streamline each:
"First-Correct Solutions" (FCS, the rounds up to the first one that reaches the correct
answer) or FCS + Reflection (up to the *second* round that reaches the correct answer,
the paper's default), followed by the original conclusion. One preference pair per
problem (`length_preference_pair`): the shortest streamlined response of the problem's
samples is preferred ("for each instance, we select the shortest result of each type"),
the longest sampled response is rejected ("using the longest sampled response as the
negative example"). Then train with SimPO (the paper's best among SFT, DPO, RPO and
SimPO):

$$ \mathcal L_{\text{SimPO}} = -\log\sigma\Big(\frac{\beta}{|y_w|}\log\pi(y_w\mid x)
   - \frac{\beta}{|y_l|}\log\pi(y_l\mid x) - \gamma\Big) $$

(SimPO, Meng et al. 2024, eq. 6: length-normalised log-likelihoods, no reference model).

Interface: `split_rounds` cuts a response at a round marker; `SolutionRounds`
holds per-round token counts; `outcome_efficiency` / `process_efficiency` are the
metrics (`outcome_terms` / `process_terms` per response); `streamline` builds FCS and
FCS + Reflection responses; `length_preference_pair` the paper's pair for one problem;
`simpo_loss` and `simpo_step` train any HF causal LM.

Deviations and choices:

- The paper splits QwQ/R1 responses into rounds and judges distinct perspectives
  with GPT-4o. Here the split is by a textual marker ("Wait" at the start of a line,
  the marker the experiment's traces use), and distinctness is decided by a key
  the caller supplies (the experiment uses the round's normalised scratchpad: a
  round that repeats an earlier computation is not distinct).
- Text after the end-of-thinking delimiter (the final answer) is counted in $T_i$ and
  belongs to the last round, so a one-round correct response has $\xi_O = 1$.
- FCS + Reflection on a response with only one correct round keeps up to that round
  (there is no second one to keep): it is then the FCS response.
- trl is not installed, so SimPO's loss is written out (a few lines) rather than
  taken from ``trl.CPOTrainer(loss_type="simpo")``. The paper's SimPO
  hyper-parameters for QwQ-32B are not used at this scale; the experiment's β and γ
  follow SimPO's recommended ratio γ/β = 0.5.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from paperzoo.core.sampling import completion_logprobs


def split_rounds(thinking: str, marker: str = "Wait") -> list[str]:
    """Cut a thinking text into solution rounds, a new round at each line that starts with `marker`.

    The rounds concatenate back to `thinking` exactly.
    """
    if not isinstance(marker, str) or not marker:
        raise ValueError("marker (the round marker) must be a non-empty string")
    starts = [0] + [m.start() for m in re.finditer(r"(?m)^" + re.escape(marker), thinking) if m.start() > 0]
    return [thinking[a:b] for a, b in zip(starts, starts[1:] + [len(thinking)])]


@dataclass(frozen=True)
class SolutionRounds:
    """One response as solution rounds: tokens per round, which rounds are correct and distinct."""

    tokens: tuple[int, ...]  # T_m, tokens of round m (the last round includes the conclusion)
    correct: tuple[bool, ...]  # does round m reach the correct answer
    distinct: tuple[bool, ...]  # tau_m: does round m take a perspective no earlier round took
    answered_correctly: bool  # is the response's final answer correct (accuracy; not sigma)

    def __post_init__(self):
        if not (len(self.tokens) == len(self.correct) == len(self.distinct)) or not self.tokens:
            raise ValueError("tokens, correct and distinct need one entry per round, and at least one round")
        if min(self.tokens) < 0:
            raise ValueError("token counts must be non-negative")

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)

    @property
    def sigma(self) -> bool:
        r"""$\sigma_i$: at least one solution round in the response is correct (paper, §2.2)."""
        return any(self.correct)

    @property
    def first_correct(self) -> int | None:
        return next((m for m, c in enumerate(self.correct) if c), None)

    @property
    def tokens_to_first_correct(self) -> int:
        """$\\hat T$: tokens up to the end of the first correct round (all tokens if no round is marked correct)."""
        m = self.first_correct
        return self.total_tokens if m is None else sum(self.tokens[: m + 1])


def rounds_of(texts: Sequence[str], count_tokens: Callable[[str], int], is_correct_round: Callable[[str], bool],
              distinct_key: Callable[[str], object], answered_correctly: bool) -> SolutionRounds:
    """Build `SolutionRounds` from round texts, a token counter, a per-round verifier and a distinctness key."""
    seen: set = set()
    distinct = []
    for t in texts:
        key = distinct_key(t)
        distinct.append(key not in seen)
        seen.add(key)
    return SolutionRounds(tuple(count_tokens(t) for t in texts), tuple(bool(is_correct_round(t)) for t in texts),
                          tuple(distinct), answered_correctly)


def _check(responses: Sequence[SolutionRounds]) -> None:
    if not responses:
        raise ValueError("responses must hold at least one response")
    if any(r.total_tokens == 0 for r in responses):
        raise ValueError("a response with zero tokens has no efficiency")


def outcome_terms(responses: Sequence[SolutionRounds]) -> list[float]:
    r"""Per response, $\sigma_i \hat T_i / T_i$; their mean is $\xi_O$."""
    _check(responses)
    return [r.sigma * r.tokens_to_first_correct / r.total_tokens for r in responses]


def process_terms(responses: Sequence[SolutionRounds]) -> list[float]:
    r"""Per response, $D_i / T_i$ with $D_i = \sum_m \tau_m T_m$; their mean is $\xi_P$."""
    _check(responses)
    return [sum(t for t, d in zip(r.tokens, r.distinct) if d) / r.total_tokens for r in responses]


def outcome_efficiency(responses: Sequence[SolutionRounds]) -> float:
    r"""$\xi_O = \frac1N\sum_i \sigma_i \hat T_i / T_i$, $\sigma_i$ = some round is correct (paper, §2.2)."""
    terms = outcome_terms(responses)
    return sum(terms) / len(terms)


def process_efficiency(responses: Sequence[SolutionRounds]) -> float:
    r"""$\xi_P = \frac1N\sum_i D_i / T_i$, $D_i = \sum_m \tau_m T_m$ (paper, §2.3)."""
    terms = process_terms(responses)
    return sum(terms) / len(terms)


def streamline(response: str, is_correct_round: Callable[[str], bool], end_of_thinking: str,
               correct_solutions: int = 2, marker: str = "Wait") -> str | None:
    """The FCS (``correct_solutions=1``) or FCS + Reflection (``2``, the paper's) version of a response.

    The thinking before `end_of_thinking` is cut into rounds; the rounds up to and
    including the `correct_solutions`-th round that reaches the correct answer are kept
    (up to the last correct round if there are fewer), then `end_of_thinking` and the
    original conclusion. None if no round is correct or the delimiter is missing.
    """
    if isinstance(correct_solutions, bool) or not isinstance(correct_solutions, int) or correct_solutions < 1:
        raise ValueError(f"correct_solutions must be an integer >= 1 (1: FCS, 2: FCS + Reflection), "
                         f"not {correct_solutions!r}")
    if not end_of_thinking:
        raise ValueError("end_of_thinking must be a non-empty delimiter")
    if end_of_thinking not in response:
        return None
    thinking, conclusion = response.split(end_of_thinking, 1)
    rounds = split_rounds(thinking, marker)
    hits = [m for m, t in enumerate(rounds) if is_correct_round(t)]
    if not hits:
        return None
    last = hits[min(correct_solutions, len(hits)) - 1]
    return "".join(rounds[: last + 1]) + end_of_thinking + conclusion


def length_preference_pair(responses: Sequence[str], is_correct: Callable[[str], bool],
                           is_correct_round: Callable[[str], bool], end_of_thinking: str,
                           count_tokens: Callable[[str], int], correct_solutions: int = 2,
                           marker: str = "Wait") -> tuple[str, str] | None:
    """The paper's (chosen, rejected) pair from one problem's sampled responses, or None.

    Responses without a correct answer are discarded; chosen = the shortest streamlined
    (FCS + Reflection by default) response, rejected = the longest response. None when
    no response is correct or the chosen is not shorter than the rejected.
    """
    kept = [r for r in responses if is_correct(r)]
    if not kept:
        return None
    streamlined = [x for x in (streamline(r, is_correct_round, end_of_thinking, correct_solutions, marker)
                               for r in kept) if x is not None]
    if not streamlined:
        return None
    lengths = {r: count_tokens(r) for r in set(kept) | set(streamlined)}
    chosen = min(streamlined, key=lambda r: lengths[r])  # the first of the shortest, in sample order
    rejected = max(kept, key=lambda r: lengths[r])
    return (chosen, rejected) if lengths[chosen] < lengths[rejected] else None


def simpo_loss(logp_w: torch.Tensor, len_w: torch.Tensor, logp_l: torch.Tensor, len_l: torch.Tensor,
               beta: float = 2.0, gamma: float = 1.0) -> torch.Tensor:
    r"""Mean of $-\log\sigma(\beta\,\overline{\log\pi}(y_w) - \beta\,\overline{\log\pi}(y_l) - \gamma)$ over pairs."""
    if not (logp_w.shape == len_w.shape == logp_l.shape == len_l.shape) or logp_w.numel() == 0:
        raise ValueError("chosen and rejected log-probabilities and lengths must have the same non-empty shape")
    if not beta > 0:
        raise ValueError(f"beta must be positive, not {beta}")
    if (len_w <= 0).any() or (len_l <= 0).any():
        raise ValueError("every response needs at least one token")
    margin = beta * logp_w / len_w - beta * logp_l / len_l - gamma  # [P]
    return -F.logsigmoid(margin).mean()


def simpo_step(model, optimizer, prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
               rejected: Sequence[Sequence[int]], pad_id: int, beta: float = 2.0, gamma: float = 1.0,
               grad_clip: float = 1.0) -> dict:
    """One SimPO step on a batch of (prompt, preferred, rejected) token lists; returns loss and reward margin."""
    if not (len(prompts) == len(chosen) == len(rejected)) or not prompts:
        raise ValueError(f"prompts, chosen and rejected must be non-empty and of equal length, got "
                         f"{len(prompts)}, {len(chosen)} and {len(rejected)}")
    if not grad_clip > 0:
        raise ValueError(f"grad_clip must be positive, not {grad_clip}")
    model.train()
    logp, n = completion_logprobs(model, list(prompts) * 2, list(chosen) + list(rejected), pad_id)
    P = len(prompts)
    loss = simpo_loss(logp[:P], n[:P], logp[P:], n[P:], beta, gamma)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    model.eval()
    with torch.no_grad():
        margin = (logp[:P] / n[:P] - logp[P:] / n[P:]).mean()
    return {"loss": float(loss.detach()), "mean_logp_margin": float(margin)}
