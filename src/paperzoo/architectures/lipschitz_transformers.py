r"""Transformers with enforced Lipschitz constants (Newhouse, Hess, Cesista et al., arXiv:2507.13338).

*Training Transformers with Enforced Lipschitz Constants* keeps every weight matrix inside a
spectral-norm ball $\|W\|_2 \le w_{\max}$ for the whole of training, so that a bound on the
network's Lipschitz constant holds at every step, and the transformer trains without LayerNorm,
QK-norm or logit soft-capping. Two observations drive it: optimizer dynamics matter (Muon, whose
update $-\eta\,\mathrm{NS}(M)$ has a fixed spectral norm, helps every constraint method), and a
constraint can be *co-designed* with Muon: since one step moves a singular value by at most the
step's spectral norm, a cheap polynomial that caps singular values only near $w_{\max}$ suffices.

After each optimizer step every linear weight is projected back (``enforce``) by one of:

- **spectral normalisation** $W \leftarrow W / \max(1, \sigma_{\max}/w_{\max})$, $\sigma_{\max}$
  from power iteration;
- **spectral hammer**, the rank-one update that sets the top singular value to $w_{\max}$:
  $W \leftarrow W + (w_{\max} - \sigma_1)\, u_1 v_1^\top$;
- **spectral soft cap**, two odd polynomials applied to the singular values of $W/w_{\max}$:
  $W \leftarrow W(I - \alpha W^\top W)$ then $W \leftarrow W(I + \alpha W^\top W)$, i.e.
  $\sigma \mapsto g(\sigma) = h + \alpha h^3$ with $h = \sigma - \alpha\sigma^3$. Expanding,
  $g(\sigma) = \sigma - 3\alpha^2\sigma^5 + 3\alpha^3\sigma^7 - \alpha^4\sigma^9 \le \sigma$. The
  strength $\alpha$ is coupled to the largest singular value one step can produce,
  $k = (1 - \eta\lambda)\,w_{\max} + \|\Delta W\|_2$ (in units of $w_{\max}$): $\alpha$ is the
  smallest non-negative root of $g(k) = 1$, the quartic
  $-k^9\alpha^4 + 3k^7\alpha^3 - 3k^5\alpha^2 + (k - 1) = 0$ (official code's
  ``soft_cap_coupling``). So a weight that starts the step inside the ball ends it inside;
  with Muon $\|\Delta W\|_2 \le \eta' \gamma$ is known without measuring anything
  (``muon_update_bound``, $\gamma$ the gain of the Newton--Schulz polynomial on $[0, 1]$);
- **weight decay** (the baseline): no projection; the optimizer's decoupled decay.

Muon is ``torch.optim.Muon`` (Newton--Schulz quintic $X \leftarrow aX + b(XX^\top)X +
c(XX^\top)^2X$ with Jordan's $(a, b, c) = (3.4445, -4.7750, 2.0315)$, 5 steps, on the Nesterov
momentum); ``newton_schulz`` here is the same iteration in float32 for analysis and tests.

The paper's transformer (``LipschitzTransformer``, its ``modula`` GPT) has no LayerNorm; each
block is a convex residual $x \leftarrow (1-\beta)x + \beta f(x)$, $\beta = 1/(2N)$ for $N$
layers; attention logits are scaled by $s/d$ (not $1/\sqrt d$) and the head outputs by $1/3$;
the MLP is $W_2\,\mathrm{GeLU}(W_1x)/1.1289$ (1.1289 = max GeLU slope); embedding rows are
kept at norm $\le\sqrt D$ (RMS 1). ``lipschitz_bound`` composes per-block bounds, in the norm
$\|X\| = \max_t \|x_t\|_2$ over positions, from the input embeddings to the logits, on the set
of inputs whose tokens have norm $\le R_0$:

$$R_{\ell+1} = (1-\beta)R_\ell + \beta\,c_\ell R_\ell, \qquad
L \leftarrow \big((1-\beta) + \beta L_{\mathrm{block}}\big)\, L, \qquad L_{\mathrm{out}} = \|U\|_2 L$$
$$L_{\mathrm{mlp}} = \|W_2\|\|W_1\|, \qquad
L_{\mathrm{att}} = \tfrac13\|O\|\Big(\textstyle\sum_h \|V_h\|^2\big(1 + 2\tfrac{s}{d}\|Q_h\|\|K_h\|R_\ell^2\big)^2\Big)^{1/2}$$

The attention term: a head's output $\sum_j p_{ij}V_hx_j$ moves by at most $\|V_h\|\Delta$
through the values (a convex combination) plus $\|p_i - p_i'\|_1\,\|V_h\|R$ through the weights,
and $\|\mathrm{softmax}(z) - \mathrm{softmax}(z')\|_1 \le \|z - z'\|_\infty$ (the softmax
Jacobian's $\infty\to1$ norm is a standard deviation of values in $[-1, 1]$), with
$|z_{ij} - z_{ij}'| \le \tfrac{s}{d}\,2\|Q_h\|\|K_h\|R\Delta$. RoPE rotates $q$ and $k$ by an
isometry and changes none of this.

Deviations and choices
----------------------
- The bound is derived here in the $\ell_2$ operator norm with the max-over-positions sequence
  norm; the official ``calculate_lipschitz_constant`` works in RMS$\to$RMS norms and treats each
  head as if it saw the full $Q, K$ norms (no per-head $\sqrt{H}$ bookkeeping), so its numbers
  differ from ours by dimension factors; ours is checked against measured sensitivities.
- $w_{\max}$ is in the paper's RMS$\to$RMS units: ``enforce`` caps an (out, in) matrix at
  $\sigma_{\max} \le w_{\max}\sqrt{\mathrm{out}/\mathrm{in}}$ (the plain projections take the
  $\ell_2$ cap directly). Muon is torch's (one $(a,b,c)$ for all steps, bfloat16); the official
  code uses six per-step tuned triples.
- The hammer follows the official code: it *sets* $\sigma_1 = w_{\max}$, raising it when it was
  below (it guarantees the cap only when the step moved one singular value past it).
- Soft cap with AdamW: its step has no known spectral norm, so $k$ is the measured
  $\sigma_{\max}$ (power iteration) instead of a bound; with Muon $k$ comes from
  ``muon_update_bound``. The coupling is exact only for $k \lesssim 1.3$ (a step of at most 30%
  of $w_{\max}$): beyond it $g$ rises above 1 before $k$ (at $k = 2$, to 1.19), so the soft cap is
  no guarantee for large steps or for weights far outside the ball. Embedding rows are clipped to norm $\sqrt D$ by every constraint except
  weight decay.
- The head is a constrained linear map (the official ``use_unembed=False`` option).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutput

JORDAN_QUINTIC = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's default coefficients
GELU_MAX_SLOPE = 1.1289

Method = Literal["none", "weight_decay", "normalize", "hammer", "soft_cap"]


# --- Muon's orthogonalisation -------------------------------------------------------------------

def newton_schulz(G: torch.Tensor, coefficients=JORDAN_QUINTIC, steps: int = 5) -> torch.Tensor:
    """X <- aX + b(XX^T)X + c(XX^T)^2 X from X = G/||G||_F: pushes every singular value towards 1,
    so the result approaches the polar factor UV^T of G = USV^T (float32, unlike torch's bfloat16)."""
    a, b, c = coefficients
    X = G.float() / (G.norm() + 1e-7)  # ||G||_F >= sigma_max puts every singular value in [0, 1]
    wide = X.shape[0] <= X.shape[1]
    X = X if wide else X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.T


def newton_schulz_gain(coefficients=JORDAN_QUINTIC, steps: int = 5) -> float:
    """max over sigma in [0, 1] of the iterated scalar polynomial: the largest singular value
    newton_schulz can output (the tuned quintic overshoots 1)."""
    a, b, c = coefficients
    x = np.linspace(0.0, 1.0, 100_001)
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return float(np.abs(x).max())


def muon_update_bound(lr: float, shape: tuple[int, int], coefficients=JORDAN_QUINTIC, steps: int = 5) -> float:
    """Upper bound on ||Delta W||_2 of one torch.optim.Muon step (default adjust_lr_fn), weight decay
    aside: lr * sqrt(max(1, out/in)) * gain, with 2% slack for torch's bfloat16 iteration."""
    return lr * math.sqrt(max(1.0, shape[0] / shape[1])) * newton_schulz_gain(coefficients, steps) * 1.02


# --- the weight constraints ---------------------------------------------------------------------

def power_iteration(W: torch.Tensor, iterations: int = 16,
                    start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular triple (u, sigma_1, v) of W by power iteration on W^T W, from `start` (a warm start: the
    previous step's v, as torch's `spectral_norm` keeps it) or a fixed random vector."""
    if start is None:
        g = torch.Generator().manual_seed(W.shape[0] * 7919 + W.shape[1])
        start = torch.randn(W.shape[1], generator=g, dtype=W.dtype)
    v = start
    for _ in range(iterations):
        v = W.T @ (W @ v)
        v = v / v.norm()
    Wv = W @ v
    sigma = Wv.norm()
    return Wv / sigma, sigma, v


def spectral_normalize(W: torch.Tensor, w_max: float = 1.0, iterations: int = 16, top=None) -> torch.Tensor:
    """W / max(1, sigma_max / w_max); `top`: W's top singular triple if already computed."""
    _, sigma, _ = top or power_iteration(W, iterations)
    return W / torch.clamp(sigma / w_max, min=1.0)


def spectral_hammer(W: torch.Tensor, w_max: float = 1.0, iterations: int = 16, top=None) -> torch.Tensor:
    """W + (w_max - sigma_1) u_1 v_1^T: the top singular value becomes exactly w_max."""
    u, sigma, v = top or power_iteration(W, iterations)
    return W + (w_max - sigma) * torch.outer(u, v)


def soft_cap_strength(k: float) -> float:
    """Smallest alpha >= 0 with g(k) = 1 for g(s) = s - 3a^2 s^5 + 3a^3 s^7 - a^4 s^9 (units of w_max):
    k is the largest singular value the weight can have before the projection."""
    if k <= 1.0:
        return 0.0
    roots = np.roots([-(k**9), 3 * k**7, -3 * k**5, 0.0, k - 1.0])
    real = roots.real[(np.abs(roots.imag) < 1e-9) & (roots.real >= 0)]
    return float(real.min())


def spectral_soft_cap(W: torch.Tensor, alpha: float, w_max: float = 1.0) -> torch.Tensor:
    """w_max * X(I + a X^T X) after X <- X(I - a X^T X), X = W / w_max: sigma -> g(sigma) <= sigma."""
    X = W / w_max
    for sign in (-1.0, 1.0):
        X = X + sign * alpha * X @ (X.T @ X)
    return w_max * X


@dataclass
class Constraint:
    """What `enforce` does after each optimizer step. w_max is in RMS->RMS units (paper's)."""
    method: Method = "soft_cap"
    w_max: float = 1.0
    power_iterations: int = 16


def cap(weight: torch.Tensor, w_max: float) -> float:
    """The l2 cap of an (out, in) weight for an RMS->RMS cap w_max: w_max * sqrt(out / in)."""
    return w_max * math.sqrt(weight.shape[0] / weight.shape[1])


@torch.no_grad()
def enforce(model: nn.Module, constraint: Constraint,
            update_bound: Callable[[torch.Tensor], float] | None = None, shrink: float = 1.0) -> nn.Module:
    """Project every nn.Linear weight of `model` (any HF model) after an optimizer step.

    update_bound(weight) bounds the l2 norm of the step just taken and `shrink` = 1 - lr * wd is the
    optimizer's decoupled decay; both only set the soft cap's strength (None: measure sigma_max)."""
    if constraint.method in ("none", "weight_decay"):
        return model
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            bound = math.sqrt(module.weight.shape[1])  # rows of RMS norm <= 1
            norms = module.weight.norm(dim=1, keepdim=True)
            module.weight.mul_(torch.clamp(bound / norms, max=1.0))
        if not isinstance(module, nn.Linear):
            continue
        W, c = module.weight, cap(module.weight, constraint.w_max)
        if constraint.method in ("normalize", "hammer") or update_bound is None:
            # warm-started from this weight's previous v: a cold start under-estimates sigma_max on the flat
            # spectra Muon makes (1.09x the cap after normalising, with 16 iterations per step)
            top = power_iteration(W, constraint.power_iterations, getattr(module, "_top_singular_v", None))
            module._top_singular_v = top[2]
        if constraint.method == "normalize":
            W.copy_(spectral_normalize(W, c, top=top))
        elif constraint.method == "hammer":
            W.copy_(spectral_hammer(W, c, top=top))
        elif constraint.method == "soft_cap":
            if update_bound is None:
                k = top[1].item() / c
            else:
                k = shrink + update_bound(W) / c
            W.copy_(spectral_soft_cap(W, soft_cap_strength(k), c))
        else:
            raise ValueError(f"unknown constraint {constraint.method!r}")
    return model


# --- the paper's transformer and its bound -------------------------------------------------------

@dataclass
class LipschitzTransformerConfig:
    vocab_size: int
    seq_len: int
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    softmax_scale: float = 1.0  # s in logits s q.k / d
    layernorm: bool = False  # the control: LayerNorm inside each residual branch


def rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary positions on [B, H, T, d]: a per-position rotation, an isometry of each q and k."""
    T, d = x.shape[-2], x.shape[-1]
    freqs = 1.0 / 10000 ** (torch.arange(d // 2, dtype=x.dtype) / (d // 2))
    angle = torch.arange(T, dtype=x.dtype)[:, None] * freqs
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


class LipschitzAttention(nn.Module):
    def __init__(self, config: LipschitzTransformerConfig):
        super().__init__()
        D, self.H, self.s = config.hidden_size, config.num_heads, config.softmax_scale
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.max_logit = 0.0  # largest |logit| of the last forward, for logging

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (m(x).view(B, T, self.H, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        q, k = rope(q), rope(k)
        d = q.shape[-1]
        logits = self.s / d * q @ k.transpose(-1, -2)  # 1/d, not 1/sqrt(d)
        self.max_logit = logits.detach().abs().max().item()
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        p = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.o((p @ v).transpose(1, 2).reshape(B, T, D) / 3)


class LipschitzMLP(nn.Module):
    def __init__(self, config: LipschitzTransformerConfig):
        super().__init__()
        D = config.hidden_size
        self.up, self.down = nn.Linear(D, 4 * D, bias=False), nn.Linear(4 * D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)) / GELU_MAX_SLOPE)  # GeLU/1.1289 is 1-Lipschitz


class LipschitzTransformer(nn.Module):
    """The paper's LayerNorm-free GPT: forward(input_ids, labels=None) -> .loss, .logits like an HF LM."""

    def __init__(self, config: LipschitzTransformerConfig):
        super().__init__()
        self.config, D = config, config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, D)
        with torch.no_grad():  # rows of RMS norm 1
            self.embed.weight.mul_(math.sqrt(D) / self.embed.weight.norm(dim=1, keepdim=True))
        self.attn = nn.ModuleList(LipschitzAttention(config) for _ in range(config.num_layers))
        self.mlp = nn.ModuleList(LipschitzMLP(config) for _ in range(config.num_layers))
        norm = (lambda: nn.LayerNorm(D)) if config.layernorm else nn.Identity
        self.norms = nn.ModuleList(norm() for _ in range(2 * config.num_layers))
        self.head = nn.Linear(D, config.vocab_size, bias=False)
        self.beta = 1.0 / (2 * config.num_layers)  # residual weight 1/(2N)

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, T, D] -> logits [B, T, V]: the map whose Lipschitz constant is bounded."""
        b = self.beta
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp)):
            x = (1 - b) * x + b * attn(self.norms[2 * i](x))
            x = (1 - b) * x + b * mlp(self.norms[2 * i + 1](x))
        return self.head(x)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> CausalLMOutput:
        logits = self.blocks(self.embed(input_ids))
        loss = None
        if labels is not None:  # HF convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def max_attention_logit(self) -> float:
        return max(a.max_logit for a in self.attn)


def spectral_norm(W: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(W.detach().double(), ord=2).item()


@torch.no_grad()
def lipschitz_bound(model: LipschitzTransformer, input_norm: float | None = None) -> float:
    """Upper bound on the Lipschitz constant of model.blocks (embeddings -> logits) in the norm
    max_t ||x_t||_2, over inputs whose tokens have norm <= input_norm (default: the largest
    embedding row). math.inf with LayerNorm, which has no global bound."""
    if model.config.layernorm:
        return math.inf
    b, H = model.beta, model.config.num_heads
    R = input_norm if input_norm is not None else model.embed.weight.norm(dim=1).max().item()
    L = 1.0
    for attn, mlp in zip(model.attn, model.mlp):
        heads = [(attn.q.weight[h], attn.k.weight[h], attn.v.weight[h])
                 for h in torch.arange(attn.q.weight.shape[0]).chunk(H)]
        d = heads[0][0].shape[0]
        O = spectral_norm(attn.o.weight)
        V = [spectral_norm(Vh) for _, _, Vh in heads]
        L_att = O / 3 * math.sqrt(sum(
            (Vh * (1 + 2 * attn.s / d * spectral_norm(Qh) * spectral_norm(Kh) * R**2)) ** 2
            for (Qh, Kh, _), Vh in zip(heads, V)))
        L *= (1 - b) + b * L_att
        R = (1 - b) * R + b * O / 3 * math.sqrt(sum(v**2 for v in V)) * R  # attention output norm
        L_mlp = spectral_norm(mlp.down.weight) * spectral_norm(mlp.up.weight)
        L *= (1 - b) + b * L_mlp
        R = (1 - b) * R + b * L_mlp * R  # |GeLU(z)|/1.1289 <= |z|
    return L * spectral_norm(model.head.weight)
