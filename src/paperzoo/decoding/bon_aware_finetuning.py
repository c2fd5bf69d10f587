r"""Inference-Aware Fine-Tuning for Best-of-N Sampling in LLMs
(Chow, Tennenholtz, Gur, Zhuang, Dai, Thiagarajan, Boutilier, Agarwal, Kumar, Faust; arXiv:2412.15287).

Best-of-N (BoN) samples $N$ answers from the policy $\pi$ and returns the one a
verifier $r$ scores highest (paper, eq. 1). Ordinary fine-tuning (SFT, rejection
sampling, RL) improves the *single* sample; but the quantity that matters at test
time is what BoN returns. The paper fine-tunes $\pi$ for the BoN policy $\pi_{\text{BoN}}$
directly. Its argmax is not differentiable, so the paper derives policy gradients
that only need samples from $\pi$ and the verifier's outcomes. With a binary
verifier the result is a reweighting of REINFORCE: on a problem where $\pi$ already
succeeds often, a correct sample is worth little (BoN would have found one anyway)
and a wrong one costs little; on a hard problem every correct sample is precious.
The model learns to spread probability over answers instead of collapsing onto the
single most likely one: the exploration/exploitation "meta-strategy" the paper reports.

**Implemented: BoN-RL with a binary reward (the paper's "BoN-RLB").** With a binary
verifier equal to the reward, $r(x, y) \in \{0, 1\}$, and $p(x) = P_{y\sim\pi}(r = 1)$,
$q = p_{\text{fail}} = 1 - p$, BoN succeeds with probability $1 - q^N$. The objective
is its logarithm, and by the score-function identity $\nabla p = \mathbb E_{y\sim\pi}[r\,\nabla\log\pi]$
its gradient is a reweighted REINFORCE (paper, §4, BoN-RL with binary reward):

$$ J_N(\pi) = \mathbb E_x \log\big(1 - q(x)^N\big), \qquad
   \nabla J_N = \mathbb E_{x,\, y\sim\pi}\big[\nabla \log\pi(y \mid x)\; g_N(q)\,(r - p)\big],
   \qquad g_N(q) = \frac{\partial}{\partial p}\log(1 - q^N) = \frac{N q^{N-1}}{1 - q^N} $$

so a positive sample gets weight $g^+ = (1 - p)\,g_N(q)$ and a negative one
$-g^- = -p\,g_N(q)$. The baseline $p$ (subtracting $g_N p\,\mathbb E[\nabla\log\pi] = 0$)
makes the weights zero-mean under $\pi$ without bias. $g_N$ is largest for hard
problems and vanishes like $q^{N-1}$ on easy ones: once BoN would succeed anyway,
pushing a problem's $p$ higher (and its diversity lower) earns nothing. $N = 1$
recovers ordinary policy gradient on $\log p$, weights $(r - p)/p$, which the
experiment uses as the like-for-like baseline. $p$ is estimated per problem from
the $k$ samples drawn for it, $\hat p = \frac1k\sum_j r_j$, as in the paper.

The training step maximises $\sum_i w_i \log\pi(y_i \mid x_i)$ over the sampled
completions (completion tokens only; the prompt is context), i.e. minimises the
weighted negative log-likelihood. Sampling is `core.sampling.sample` (HF
`generate`); everything works on any HF causal LM and its tokenizer.

Deviations and choices:

- The weights above are derived here from the paper's objective (log BoN success
  probability with an exact binary verifier) and checked exactly in the tests against
  autograd on a categorical policy; the paper states the same estimator with
  coefficients written as functions of $p_{\text{fail}}$. We could not consult the
  paper's lemma text to compare constants term by term; a per-problem constant would
  only rescale problems, not change the direction on each.
- Where $\hat p = 0$ (no correct sample among the $k$) $r - \hat p = 0$ for every
  sample; where $\hat p = 1$ likewise. Such groups get weight 0 (no signal), as
  group-relative RL estimators do; $g_N$ is then never evaluated at $q \in \{0, 1\}$.
- The paper also gives BoN-SFT (a variational imitation objective) and BoN-RL with a
  learned verifier (BoN-RLV); with an exact verifier, as here, BoN-RLB is the
  paper's estimator for that setting, so it is the one implemented.
- No official code is public (checked: no repository by the authors found with the
  code search); the weights follow the paper's binary-reward derivation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from paperzoo.core.sampling import completion_logprobs


def bon_success_probability(p: torch.Tensor, N: int) -> torch.Tensor:
    """$1 - (1 - p)^N$: the chance that BoN with an exact verifier returns a correct answer."""
    if N < 1:
        raise ValueError(f"N must be >= 1, not {N}")
    return 1 - (1 - p) ** N


def bon_gain(p_fail: torch.Tensor, N: int) -> torch.Tensor:
    r"""$g_N(q) = N q^{N-1} / (1 - q^N)$, the derivative of $\log(1 - q^N)$ in $p = 1 - q$; $q \in [0, 1)$."""
    if N < 1:
        raise ValueError(f"N must be >= 1, not {N}")
    q = p_fail.double()
    return (N * q ** (N - 1) / (1 - q**N)).to(p_fail.dtype)


def bon_rlb_weights(correct: torch.Tensor, N: int) -> torch.Tensor:
    r"""Per-sample weights $w_{ij} = g_N(\hat q_i)\,(r_{ij} - \hat p_i)$, with $\hat p_i$ the group's success rate.

    `correct`: [G, k] verifier outcomes (0/1) of k samples for each of G problems.
    Returns [G, k] float weights; groups that are all right or all wrong get 0.
    """
    if correct.ndim != 2 or correct.shape[1] < 2:
        raise ValueError(f"correct must be [problems, k >= 2] to estimate p, got shape {tuple(correct.shape)}")
    r = correct.float()
    if not torch.all((r == 0) | (r == 1)):
        raise ValueError("correct must hold binary verifier outcomes (0 or 1)")
    p_hat = r.mean(dim=1, keepdim=True)  # [G, 1]
    informative = (p_hat > 0) & (p_hat < 1)
    q = torch.where(informative, 1 - p_hat, torch.full_like(p_hat, 0.5))  # placeholder where uninformative
    w = bon_gain(q, N) * (r - p_hat)  # [G, k]: (1-p) g on positives, -p g on negatives
    return torch.where(informative, w, torch.zeros_like(w))


def rejection_sampling_weights(correct: torch.Tensor) -> torch.Tensor:
    """Rejection-sampling fine-tuning (RFT): weight 1 on every verified-correct sample, 0 otherwise."""
    if correct.ndim != 2:
        raise ValueError(f"correct must be [problems, k], got shape {tuple(correct.shape)}")
    return correct.float()


def weighted_nll(logp: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    r"""$-\frac1M \sum_i w_i \log\pi(y_i \mid x_i)$; its gradient is the (negated) weighted score function."""
    if logp.shape != weights.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and weights {tuple(weights.shape)} differ in shape")
    return -(weights.detach() * logp).mean()


def weighted_finetune_step(model, optimizer, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                           weights: torch.Tensor, pad_id: int, grad_clip: float = 1.0) -> float:
    """One optimiser step on the weighted log-likelihood of sampled completions; returns the loss.

    `weights` is flat [M] (e.g. ``bon_rlb_weights(...).flatten()``); zero-weight
    samples are skipped, as they contribute no gradient.
    """
    keep = [i for i in range(len(completions)) if float(weights[i]) != 0.0]
    if not keep:
        return 0.0
    model.train()
    logp, _ = completion_logprobs(model, [prompts[i] for i in keep], [completions[i] for i in keep], pad_id)
    # Mean over all M samples (zeros included), so the step size does not depend on how many were skipped.
    loss = weighted_nll(logp, weights[keep].to(logp.dtype)) * len(keep) / len(completions)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    model.eval()
    return float(loss.detach())


def pass_at_k(n: int, c: int, k: int) -> float:
    r"""Unbiased pass@k from n samples with c correct: $1 - \binom{n-c}{k}/\binom{n}{k}$ (Chen et al., 2021).

    With an exact verifier, BoN accuracy at N equals pass@N.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(k):
        prob_all_wrong *= (n - c - i) / (n - i)
    return 1.0 - prob_all_wrong
