r"""Inference-Aware Fine-Tuning for Best-of-N Sampling in LLMs
(Chow, Tennenholtz, Gur, Zhuang, Dai, Thiagarajan, Boutilier, Agarwal, Kumar, Faust; arXiv:2412.15287).

Best-of-N (BoN) samples $N$ answers from the policy $\pi$ and returns the one a
verifier $r$ scores highest (paper, eq. 1). Ordinary fine-tuning (SFT, rejection
sampling, RL) improves the *single* sample; but the quantity that matters at test
time is what BoN returns. The paper fine-tunes $\pi$ for the BoN policy $\pi_{\text{bon}}$
directly: its RL objective is the reward of the BoN policy's answer,

$$ J(\pi) = \mathbb E_{x,\; y \sim \pi_{\text{bon}}(\cdot \mid x;\, \pi, r, N)}\big[R(x, y)\big], $$

and its gradient is a REINFORCE-style estimator whose samples come from
$\pi_{\text{bon}}$ rather than from $\pi$ (paper, §4, BoN-RL).

**Implemented: BoN-RL with a binary reward (the paper's "BoN-RLB").** With an exact
binary verifier, $R = r \in \{0, 1\}$, write $p_f(x) = P_{y\sim\pi}(r = 0)$ for the
failure probability of one sample. BoN then fails only if all $N$ samples fail, so
$J = \mathbb E_x[1 - p_f^N]$: the BoN *success probability itself*, not its logarithm.
The paper's closed-form estimator draws $y \sim \pi_{\text{bon}}$ and weights its score
function by an asymmetric, difficulty-dependent coefficient:

$$ \nabla J \approx \mathbb E_{x,\; y\sim\pi_{\text{bon}}}\Big[\nabla\log\pi(y\mid x)\,
   \big(r\, g^+_N(p_f) - (1 - r)\, g^-(p_f)\big)\Big], \qquad
   g^+_N(p_f) = \frac{N p_f^{N-1}}{1 - p_f^N}, \quad g^-(p_f) = \frac{N p_f}{1 - p_f} . $$

Both weights grow with $p_f$: on hard problems a correct sample is pushed up hard and
a wrong one pushed down hard; on easy problems ($p_f \to 0$, $N > 1$) a correct sample
is worth almost nothing, since BoN would find one anyway. The paper's positive-only
variant (BoN-RLB(P)) uses $\bar g^+_N = (1 - p_f)\,g^+_N$ on correct samples alone.

**The BoN policy with a binary verifier.** BoN returns a correct answer with
probability $1 - p_f^N$, then one distributed as $\pi$ restricted to correct answers;
otherwise a wrong one, distributed as $\pi$ restricted to wrong answers:

$$ \pi_{\text{bon}}(y) = \pi(y)\Big[r(y)\,\frac{1 - p_f^N}{1 - p_f} + (1 - r(y))\,p_f^{N-1}\Big]. $$

From $k$ samples $y_1..y_k \sim \pi$ of one problem (with $\hat p_f$ their failure rate),
the empirical BoN policy puts $(1-\hat p_f^N)/c$ on each of the $c$ correct samples and
$\hat p_f^N/(k-c)$ on each wrong one (`bon_policy_probabilities`). Drawing from it and
weighting the draw as above has the same expectation as weighting *every* sample
$y_i$ by $k\,\hat\pi_{\text{bon}}(y_i)\,(r_i g^+ - (1 - r_i) g^-)$, which is what
`bon_rlb_weights` returns (no resampling noise):

$$ w_i = \frac{N \hat p_f^{N-1}}{1 - \hat p_f}\; r_i \;-\; \frac{N \hat p_f^{N}}{1 - \hat p_f}\;(1 - r_i) . $$

Taking expectations (with $\sum_{r=1}\pi\nabla\log\pi = \nabla(1-p_f) = -\sum_{r=0}\pi\nabla\log\pi$),
the estimator's mean update on one problem is $N p_f^{N-1}\frac{1 + p_f}{1 - p_f}\,\nabla(1 - p_f)$:
a positive multiple of $\nabla(1 - p_f^N) = N p_f^{N-1}\nabla(1-p_f)$, so every problem moves
up its BoN success probability (the tests check this identity, and that the
positive-only weights give $\nabla(1 - p_f^N)$ exactly). $N = 1$ is the same estimator
for one sample ($\pi_{\text{bon}} = \pi$, $g^+ = 1/(1-p_f)$, $g^- = p_f/(1-p_f)$), which the
experiment uses as the ordinary-RL control.

The training step maximises $\sum_i w_i \log\pi(y_i \mid x_i)$ over the sampled
completions (completion tokens only; the prompt is context), i.e. minimises the
weighted negative log-likelihood. Sampling is `core.sampling.sample` (HF
`generate`); everything works on any HF causal LM and its tokenizer.

Deviations and choices:

- $p_f$ is estimated per problem from the $k$ samples drawn for it, as in the paper.
  A problem with no correct sample ($\hat p_f = 1$) has $g^- = \infty$ and no positive
  example; it gets weight 0 (the paper notes that the weights explode as $p_f \to 1$
  and clips them). A problem with every sample correct ($\hat p_f = 0$) keeps its
  weights: $g^+_N(0) = 0$ for $N > 1$, and 1 for $N = 1$.
- The paper's lemma text was read through public summaries that quote the two weights
  (and BoN-RLB(P)'s) verbatim; the derivation of the mean update above is ours.
- The paper also gives BoN-SFT (a variational imitation objective) and BoN-RL with a
  learned verifier (BoN-RL-V); with an exact verifier, as here, BoN-RLB is the
  paper's estimator for that setting, so it is the one implemented.
- No official code is public (checked: no repository by the authors found with the
  code search).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from paperzoo.core.sampling import weighted_finetune_step, weighted_nll  # shared with the RLOO control


def _check_N(N) -> None:
    if isinstance(N, bool) or not isinstance(N, int) or N < 1:
        raise ValueError(f"N must be an integer >= 1, not {N!r}")


def _check_p_fail(p_fail: torch.Tensor, name: str = "p_fail") -> torch.Tensor:
    if not isinstance(p_fail, torch.Tensor):
        p_fail = torch.as_tensor(p_fail, dtype=torch.float64)
    if not torch.all((p_fail >= 0) & (p_fail < 1)):
        raise ValueError(f"{name} must lie in [0, 1): the weights are undefined when every sample fails")
    return p_fail


def _check_correct(correct: torch.Tensor) -> torch.Tensor:
    if not isinstance(correct, torch.Tensor) or correct.ndim != 2 or correct.shape[0] < 1 or correct.shape[1] < 1:
        raise ValueError("correct must be a [problems >= 1, k >= 1] tensor of verifier outcomes, got "
                         f"{tuple(correct.shape) if isinstance(correct, torch.Tensor) else type(correct).__name__}")
    r = correct.double()
    if not torch.all((r == 0) | (r == 1)):
        raise ValueError("correct must hold binary verifier outcomes (0 or 1)")
    return r


def bon_success_probability(p: torch.Tensor, N: int) -> torch.Tensor:
    """$1 - (1 - p)^N$: the chance that BoN with an exact verifier returns a correct answer; p in [0, 1]."""
    _check_N(N)
    if not torch.all((p >= 0) & (p <= 1)):
        raise ValueError("p (the success probability of one sample) must lie in [0, 1]")
    return 1 - (1 - p) ** N


def bon_positive_weight(p_fail: torch.Tensor, N: int) -> torch.Tensor:
    r"""$g^+_N(p_f) = N p_f^{N-1} / (1 - p_f^N)$, the weight of a correct BoN sample; p_fail in [0, 1)."""
    _check_N(N)
    q = _check_p_fail(p_fail).double()
    return (N * q ** (N - 1) / (1 - q**N)).to(p_fail.dtype if isinstance(p_fail, torch.Tensor) else torch.float64)


def bon_negative_weight(p_fail: torch.Tensor, N: int) -> torch.Tensor:
    r"""$g^-(p_f) = N p_f / (1 - p_f)$, the weight of a wrong BoN sample (it is pushed down); p_fail in [0, 1)."""
    _check_N(N)
    q = _check_p_fail(p_fail).double()
    return (N * q / (1 - q)).to(p_fail.dtype if isinstance(p_fail, torch.Tensor) else torch.float64)


def bon_positive_only_weight(p_fail: torch.Tensor, N: int) -> torch.Tensor:
    r"""BoN-RLB(P): $\bar g^+_N(p_f) = N p_f^{N-1}(1 - p_f) / (1 - p_f^N)$, for correct samples alone."""
    return (1 - _check_p_fail(p_fail)) * bon_positive_weight(p_fail, N)


def bon_policy_probabilities(correct: torch.Tensor, N: int) -> torch.Tensor:
    r"""The empirical BoN policy over each problem's k samples: [G, k] -> [G, k], rows summing to 1.

    A correct sample gets $(1 - \hat p_f^N)/c$, a wrong one $\hat p_f^N/(k - c)$, with c the
    problem's correct samples and $\hat p_f = 1 - c/k$.
    """
    _check_N(N)
    r = _check_correct(correct)
    k = r.shape[1]
    c = r.sum(1, keepdim=True)  # [G, 1]
    q = 1 - c / k
    win = (1 - q**N) / c.clamp(min=1)
    lose = q**N / (k - c).clamp(min=1)
    return torch.where(r == 1, win, lose)


def bon_rlb_weights(correct: torch.Tensor, N: int) -> torch.Tensor:
    r"""Per-sample weights of the paper's BoN-RLB estimator for k samples drawn from $\pi$: [G, k] -> [G, k].

    $w_i = k\,\hat\pi_{\text{bon}}(y_i)\,(r_i g^+_N(\hat p_f) - (1 - r_i) g^-(\hat p_f))$: the expected
    weight of a draw from the empirical BoN policy. Problems with no correct sample get 0.
    """
    _check_N(N)
    r = _check_correct(correct)
    k = r.shape[1]
    q = 1 - r.mean(1, keepdim=True)  # [G, 1] estimated p_fail
    has_positive = q < 1
    q_safe = torch.where(has_positive, q, torch.zeros_like(q))
    signed = r * bon_positive_weight(q_safe, N) - (1 - r) * bon_negative_weight(q_safe, N)  # [G, k]
    w = k * bon_policy_probabilities(correct, N) * signed
    return torch.where(has_positive, w, torch.zeros_like(w)).float()


def rejection_sampling_weights(correct: torch.Tensor) -> torch.Tensor:
    """Rejection-sampling fine-tuning (RFT): weight 1 on every verified-correct sample, 0 otherwise."""
    return _check_correct(correct).float()


def pass_at_k(n: int, c: int, k: int) -> float:
    r"""Unbiased pass@k from n samples with c correct: $1 - \binom{n-c}{k}/\binom{n}{k}$ (Chen et al., 2021).

    With an exact verifier, BoN accuracy at N equals pass@N.
    """
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, c, k)):
        raise ValueError(f"n, c and k must be integers, got n={n!r}, c={c!r}, k={k!r}")
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(k):
        prob_all_wrong *= (n - c - i) / (n - i)
    return 1.0 - prob_all_wrong


__all__ = ["bon_negative_weight", "bon_policy_probabilities", "bon_positive_only_weight", "bon_positive_weight",
           "bon_rlb_weights", "bon_success_probability", "pass_at_k", "rejection_sampling_weights",
           "weighted_finetune_step", "weighted_nll"]
