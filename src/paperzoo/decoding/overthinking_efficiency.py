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
correct solution round, and $\sigma_i = 1$ if instance $i$ is answered correctly
(else 0, so wrong responses count as fully wasted).

**Process efficiency**: the share of tokens spent on *distinct* solutions,

$$ \xi_P = \frac1N \sum_{i=1}^N \frac{D_i}{T_i}, \qquad D_i = \sum_{m=1}^{M_i} \tau^i_m\, T^i_m $$

with $T^i_m$ the tokens of round $m$ and $\tau^i_m = 1$ if round $m$ takes a
perspective no earlier round took.

**The fix** (paper, §4): sample responses from the model itself, keep those
whose answer is correct, and build a streamlined response from each: "First-Correct
Solutions" (FCS, the rounds up to and including the first correct one) or
FCS + Reflection (one more round, the paper's best trade-off), followed by the
original conclusion. Then train with SimPO (the paper's best among SFT, DPO, RPO and
SimPO), the streamlined response preferred over the full one:

$$ \mathcal L_{\text{SimPO}} = -\log\sigma\Big(\frac{\beta}{|y_w|}\log\pi(y_w\mid x)
   - \frac{\beta}{|y_l|}\log\pi(y_l\mid x) - \gamma\Big) $$

(SimPO, Meng et al. 2024, eq. 6: length-normalised log-likelihoods, no reference model).

Interface: `split_rounds` cuts a response at a round marker; `SolutionRounds`
holds per-round token counts; `outcome_efficiency` / `process_efficiency` are the
metrics; `streamline` builds FCS(+reflections) responses; `simpo_loss` and
`simpo_step` train any HF causal LM.

Deviations and choices:

- The paper splits QwQ/R1 responses into rounds and judges distinct perspectives
  with GPT-4o. Here the split is by a textual marker ("Wait" at the start of a line,
  the marker the experiment's traces use), and distinctness is decided by a key
  the caller supplies (the experiment uses the round's normalised scratchpad: a
  round that repeats an earlier computation is not distinct).
- Text after the end-of-thinking delimiter (the final answer) is counted in $T_i$ and
  belongs to the last round, so a one-round correct response has $\xi_O = 1$.
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
    if not marker:
        raise ValueError("the round marker must be a non-empty string")
    starts = [0] + [m.start() for m in re.finditer(r"(?m)^" + re.escape(marker), thinking) if m.start() > 0]
    return [thinking[a:b] for a, b in zip(starts, starts[1:] + [len(thinking)])]


@dataclass(frozen=True)
class SolutionRounds:
    """One response as solution rounds: tokens per round, which rounds are correct and distinct."""

    tokens: tuple[int, ...]  # T_m, tokens of round m (the last round includes the conclusion)
    correct: tuple[bool, ...]  # does round m reach the correct answer
    distinct: tuple[bool, ...]  # tau_m: does round m take a perspective no earlier round took
    answered_correctly: bool  # sigma: is the response's final answer correct

    def __post_init__(self):
        if not (len(self.tokens) == len(self.correct) == len(self.distinct)) or not self.tokens:
            raise ValueError("tokens, correct and distinct need one entry per round, and at least one round")
        if min(self.tokens) < 0:
            raise ValueError("token counts must be non-negative")

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)

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
        raise ValueError("need at least one response")
    if any(r.total_tokens == 0 for r in responses):
        raise ValueError("a response with zero tokens has no efficiency")


def outcome_efficiency(responses: Sequence[SolutionRounds]) -> float:
    r"""$\xi_O = \frac1N\sum_i \sigma_i \hat T_i / T_i$ (paper, §2.2)."""
    _check(responses)
    return sum(r.answered_correctly * r.tokens_to_first_correct / r.total_tokens for r in responses) / len(responses)


def process_efficiency(responses: Sequence[SolutionRounds]) -> float:
    r"""$\xi_P = \frac1N\sum_i D_i / T_i$, $D_i = \sum_m \tau_m T_m$ (paper, §2.3)."""
    _check(responses)
    return sum(sum(t for t, d in zip(r.tokens, r.distinct) if d) / r.total_tokens for r in responses) / len(responses)


def streamline(response: str, is_correct_round: Callable[[str], bool], end_of_thinking: str,
               reflections: int = 1, marker: str = "Wait") -> str | None:
    """The FCS (+ `reflections` more rounds) version of a response, or None if no round is correct.

    The thinking before `end_of_thinking` is cut into rounds; the first correct round
    and `reflections` rounds after it are kept, then `end_of_thinking` and the original
    conclusion. ``reflections=0`` is FCS, ``1`` the paper's FCS + Reflection.
    """
    if reflections < 0:
        raise ValueError(f"reflections must be >= 0, not {reflections}")
    if end_of_thinking not in response:
        return None
    thinking, conclusion = response.split(end_of_thinking, 1)
    rounds = split_rounds(thinking, marker)
    first = next((m for m, t in enumerate(rounds) if is_correct_round(t)), None)
    if first is None:
        return None
    return "".join(rounds[: first + 1 + reflections]) + end_of_thinking + conclusion


def simpo_loss(logp_w: torch.Tensor, len_w: torch.Tensor, logp_l: torch.Tensor, len_l: torch.Tensor,
               beta: float = 2.0, gamma: float = 1.0) -> torch.Tensor:
    r"""Mean of $-\log\sigma(\beta\,\overline{\log\pi}(y_w) - \beta\,\overline{\log\pi}(y_l) - \gamma)$ over pairs."""
    if not (logp_w.shape == len_w.shape == logp_l.shape == len_l.shape):
        raise ValueError("chosen and rejected log-probabilities and lengths must have the same shape")
    if (len_w <= 0).any() or (len_l <= 0).any():
        raise ValueError("every response needs at least one token")
    margin = beta * logp_w / len_w - beta * logp_l / len_l - gamma  # [P]
    return -F.logsigmoid(margin).mean()


def simpo_step(model, optimizer, prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
               rejected: Sequence[Sequence[int]], pad_id: int, beta: float = 2.0, gamma: float = 1.0,
               grad_clip: float = 1.0) -> dict:
    """One SimPO step on a batch of (prompt, preferred, rejected) token lists; returns loss and reward margin."""
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
