"""Mixtures of In-Context Learners (MoICL; Hong, van Krieken, Ponti, Malkin, Minervini; arXiv:2411.02830).

In-context learning puts every demonstration in one prompt, weighs them all alike, and pays
quadratically for their number. MoICL splits the demonstrations D into k disjoint subsets
D_1 .. D_k. Each subset makes an *expert*: the frozen LM prompted with that subset and the
query x. A small weighting function, trained by gradient descent on the gold answers of a
training set (the LM never changes), merges the experts' distributions over the answers:

- **mixture of experts** (the weights a distribution, $w = \\mathrm{softmax}(s)$):
  $p(y \\mid x) = \\sum_{i=1}^{k} w_i \\, p_{LM}(y \\mid D_i, x)$;
- **product of experts** (raw scalar weights, so an expert may get a negative weight and
  act as an *anti-expert*), renormalised over the candidate answers $\\mathcal{Y}$:
  $p(y \\mid x) \\propto \\exp \\sum_{i=1}^{k} w_i \\log p_{LM}(y \\mid D_i, x)$.

The weights come from one of three functions: uniform ($s = 0$, the plain ensemble), k
learned scalars, or a hyper-network that scores each subset from a representation of its
text (so it can weigh subsets never seen in training). All are trained on
$-\\log p(y^\\star \\mid x)$ over training pairs. For fewer LM calls the paper keeps only the
top-k experts, chosen from the scalars with a perturb-and-MAP mask whose gradient is
estimated by implicit maximum-likelihood estimation (I-MLE, Niepert et al. 2021):
$z = \\mathrm{topk}(s + \\epsilon)$ forward, and backward
$\\nabla_s \\mathcal{L} \\approx z - \\mathrm{topk}(s - \\lambda \\nabla_z \\mathcal{L} + \\epsilon)$.

Because the LM is frozen, `expert_log_probs` runs it once per (expert, query) and every
weighting function is then trained on that tensor alone: training the weights costs no LM
call. `moicl_log_probs` merges; `MoICLWeights` holds and trains the weighting function.

Deviations and readings (the paper's text was not available here, only its abstract and
secondary summaries):
- The mixture takes softmax-normalised weights and the product raw scalars, our reading of
  "anti-experts" (a negative weight is only meaningful in the product).
- I-MLE perturbs with Gumbel noise; the I-MLE paper's default for top-k is sum-of-Gamma
  noise. At inference the top-k experts are taken from the scalars without noise.
- The hyper-network here is a small MLP on the frozen LM's mean last hidden state over a
  subset's tokens (`subset_features`); the paper's hyper-network is a separate, smaller
  pretrained LM reading the subset's text.
- Answers are candidate token sequences scored by the sum of their tokens' log-probabilities
  and renormalised over the candidates (the paper's classification set-up).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from paperzoo.core.evaluation import candidate_log_probs

COMBINES = ("mixture", "product")


# ---------------------------------------------------------------------------------------------
# The experts: one frozen-LM call per (subset, query)


@torch.no_grad()
def expert_log_probs(model, subsets: Sequence[torch.Tensor], queries: Sequence[torch.Tensor],
                     candidates: Sequence[torch.Tensor], prefix: torch.Tensor | None = None,
                     batch_size: int = 256) -> torch.Tensor:
    """[Q, k, C] log p_LM(candidate c | prefix, D_i, x_q), normalised over the C candidates.

    `subsets`: k token-id tensors, each a subset's demonstrations already formatted; `queries`:
    Q token-id tensors; `candidates`: C token-id tensors (the answers, one token or several);
    `prefix`: tokens put first in every prompt (a BOS or an instruction). Works on any HF
    causal LM; prompts are right-padded, so positions and causal masks are unaffected.
    """
    if not subsets or not queries:
        raise ValueError("subsets and queries must each hold at least one token sequence")
    head = prefix if prefix is not None else torch.zeros(0, dtype=torch.long)
    prompts = [torch.cat([head, s, q]) for q in queries for s in subsets]
    out = candidate_log_probs(model, prompts, candidates, batch_size)
    return out.view(len(queries), len(subsets), len(candidates))


@torch.no_grad()
def subset_features(model, subsets: Sequence[torch.Tensor], prefix: torch.Tensor | None = None) -> torch.Tensor:
    """[k, hidden] the frozen LM's last hidden state averaged over each subset's tokens: the hyper-network's input."""
    head = prefix if prefix is not None else torch.zeros(0, dtype=torch.long)
    device = next(model.parameters()).device
    out = []
    for s in subsets:
        ids = torch.cat([head, s])[None].to(device)
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, len(head):]
        out.append(hidden.float().mean(dim=0).cpu())
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Merging the experts


def moicl_log_probs(expert_logp: torch.Tensor, weights: torch.Tensor, combine: str = "mixture") -> torch.Tensor:
    """[Q, C] log p(y | x) from experts' [Q, k, C] log-probabilities and weights [k] (or [Q, k]).

    "mixture": log sum_i w_i p_i(y), the weights a distribution (zero weights drop an expert);
    "product": log_softmax_y sum_i w_i log p_i(y), any real weights.
    """
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, not {combine!r}")
    w = weights if weights.dim() == 2 else weights[None]  # [Q or 1, k]
    if combine == "mixture":
        # log sum_i w_i exp(l_i), shifted by max_i l_i; written without log(w) so a weight of 0 keeps a finite gradient
        top = expert_logp.max(dim=1, keepdim=True).values
        return ((w[:, :, None] * (expert_logp - top).exp()).sum(dim=1)).log() + top.squeeze(1)
    return (w[:, :, None] * expert_logp).sum(dim=1).log_softmax(dim=-1)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """{0, 1} mask of the k largest scores (last dimension)."""
    return torch.zeros_like(scores).scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)


class IMLETopK(torch.autograd.Function):
    """z = topk(s + eps) forward; I-MLE's backward z - topk(s - lambda * dL/dz + eps) (Niepert et al. 2021, eq. 9)."""

    @staticmethod
    def forward(ctx, scores, k: int, lam: float, noise):
        z = topk_mask(scores + noise, k)
        ctx.save_for_backward(scores, noise, z)
        ctx.k, ctx.lam = k, lam
        return z

    @staticmethod
    def backward(ctx, grad_z):
        scores, noise, z = ctx.saved_tensors
        target = topk_mask(scores - ctx.lam * grad_z + noise, ctx.k)
        return z - target, None, None, None


@dataclass
class FitReport:
    losses: list[float]


class MoICLWeights(torch.nn.Module):
    """The weighting function: "uniform" (fixed zeros), "scalar" (k learned scores) or "hyper" (an MLP on subset features).

    `weights(features)` gives [k] weights: softmax of the scores for a mixture, the raw scores for
    a product (uniform: 1/k for a mixture, 1 for a product). With `top_k`, training draws an
    I-MLE mask over the scores and the merge uses only the chosen experts; `active_experts()`
    gives the k experts inference keeps (the largest scores, no noise).
    """

    def __init__(self, k: int, combine: str = "mixture", kind: str = "scalar", features: int = 0,
                 top_k: int | None = None, hidden: int = 32, imle_lambda: float = 10.0):
        super().__init__()
        if combine not in COMBINES or kind not in ("uniform", "scalar", "hyper"):
            raise ValueError(f"combine must be one of {COMBINES} and kind one of uniform/scalar/hyper, "
                             f"not {combine!r}/{kind!r}")
        if top_k is not None and not 1 <= top_k <= k:
            raise ValueError(f"top_k must be in 1..{k}, not {top_k}")
        if kind == "hyper" and features <= 0:
            raise ValueError("a hyper-network needs features > 0 (the width of subset_features)")
        self.k, self.combine, self.kind, self.top_k, self.imle_lambda = k, combine, kind, top_k, imle_lambda
        # Both start at the plain ensemble: equal mixture weights, or every log-probability counted once.
        start = torch.zeros(k) if combine == "mixture" else torch.ones(k)
        self.scores = torch.nn.Parameter(start, requires_grad=kind == "scalar")
        self.net = (torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
                    if kind == "hyper" else None)

    def raw_scores(self, features: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "hyper":
            if features is None:
                raise ValueError("a hyper-network's weights need the subsets' features")
            return self.net(features).squeeze(-1)
        return self.scores if self.kind == "scalar" else self.scores.detach()

    def weights(self, features: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        s = self.raw_scores(features)
        if self.combine == "product":
            return s if mask is None else s * mask
        e = (s - s.max()).exp()
        e = e if mask is None else e * mask
        return e / e.sum()

    def active_experts(self, features: torch.Tensor | None = None) -> torch.Tensor:
        """Indices of the experts inference runs: all, or the top_k largest scores."""
        s = self.raw_scores(features).detach()
        return torch.arange(self.k) if self.top_k is None else s.topk(self.top_k).indices.sort().values

    def forward(self, expert_logp: torch.Tensor, features: torch.Tensor | None = None, sample: bool = False) -> torch.Tensor:
        """[Q, C] merged log-probabilities; `sample` draws an I-MLE top-k mask (training), else the deterministic one."""
        mask = None
        if self.top_k is not None:
            s = self.raw_scores(features)
            if sample:
                gumbel = -torch.log(-torch.log(torch.rand_like(s).clamp_min(1e-20)))
                mask = IMLETopK.apply(s, self.top_k, self.imle_lambda, gumbel)
            else:
                mask = topk_mask(s.detach(), self.top_k)
        return moicl_log_probs(expert_logp, self.weights(features, mask), self.combine)

    def fit(self, expert_logp: torch.Tensor, gold: torch.Tensor, features: torch.Tensor | None = None,
            steps: int = 300, lr: float = 0.1, seed: int = 0) -> FitReport:
        """Train the weights on -log p(gold | x) over the training queries (full batch, Adam); the LM is not touched."""
        if self.kind == "uniform":
            return FitReport([])
        torch.manual_seed(seed)
        optimizer = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=lr)
        losses = []
        for _ in range(steps):
            loss = F.nll_loss(self(expert_logp, features, sample=True), gold)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return FitReport(losses)
