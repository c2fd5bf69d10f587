r"""Transformers are Universal In-context Learners (Furuya, de Hoop, Peyré; arXiv:2408.01367, ICLR 2025).

**The idea.** A transformer maps each token x, in the context of the others, to a new token.
The paper writes the context as a probability measure $\mu$ on a compact token domain
$\Omega \subset \mathbb{R}^d$ (n tokens give $\mu = \frac1n \sum_i \delta_{x_i}$), so that one
attention layer with H heads is an *in-context map* of $(\mu, x)$ (Sec. 2):

$$\Gamma_\theta(\mu, x) = x + \sum_{h=1}^H W_h \int
  \frac{\exp\langle Q_h x, K_h y\rangle}{\int \exp\langle Q_h x, K_h z\rangle \, d\mu(z)}\, V_h y \; d\mu(y).$$

For an empirical measure the integrals are sums and this is the usual softmax attention of x
over the tokens, $\sum_h W_h \sum_j \mathrm{softmax}_j(\langle Q_h x, K_h x_j\rangle) V_h x_j$.
Layers compose by moving the context with the map they apply to every token,
$(\mu, x) \mapsto (\Gamma(\mu, \cdot)_\sharp \mu,\ \Gamma(\mu, x))$, with context-free MLPs on each
token in between. The theorem (Thm. 1 unmasked; Thm. 2 causal, through a space-time lifting):
every map $\Lambda(\mu, x)$ continuous for the weak-* topology on $\mu$ (the Wasserstein
topology on compact $\Omega$) is approximated within any $\varepsilon$, uniformly over all $\mu$
(any number of tokens, even infinitely many), by a deep transformer whose width and number of
heads do not depend on $\varepsilon$.

**Why duplicates change nothing.** The formula sees the tokens only through $\mu$. Repeating
every token k times leaves $\mu$ unchanged, so a bidirectional transformer without positional
encodings gives every copy the output the original token had: `context_size_invariance`
measures the largest deviation. A model with positions or a causal mask is not a function of
$\mu$ alone, and the check catches it.

What this module gives:

- `measure_attention`: one head of the formula above on a weighted discrete measure
  $\mu = \sum_j a_j \delta_{y_j}$ (the mass enters as $\log a_j$ added to the scores);
- `InContextTransformer` (`InContextConfig`): a bidirectional transformer over a set of
  continuous tokens, entering through a linear read-in $\mathbb{R}^d \to$ width; it takes
  optional query points (the $x$ of $\Gamma(\mu, x)$ away from the support) and optional token
  masses (a weighted measure); `causal` and `max_positions` exist only to build the violations
  the check must catch;
- `context_size_invariance(model, tokens, copies, queries)`: the max deviation under duplication.

Deviations from the paper:

- Pre-LayerNorm residual blocks with a GELU MLP between attentions. Both act on each token
  alone, so they are context-free maps and the measure form above is unchanged; the paper's
  construction uses plain MLPs and no normalisation.
- Queries read the context but do not join it: $\Gamma(\mu, x)$ at points x that are not tokens
  of the context, which the paper's definition allows for any $x \in \Omega$. Without queries
  the model outputs $\Gamma(\mu, x_i)$ at the context's own tokens, as a usual encoder does.
- The scaling $1/\sqrt{d_k}$ of the scores is written out (the paper absorbs it in $Q_h$); the
  heads' outputs are concatenated and projected, i.e. $W = [W_1 \cdots W_H]$.
- The causal mask is the usual one, only a foil for the check: the paper's masked theorem
  needs its space-time lifting and is not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def measure_attention(x: torch.Tensor, support: torch.Tensor, mass: torch.Tensor,
                      Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    r"""One head, $\int e^{\langle Qx, Ky\rangle} V y \, d\mu(y) / \int e^{\langle Qx, Kz\rangle} d\mu(z)$, for
    $\mu = \sum_j \mathrm{mass}_j \delta_{\mathrm{support}_j}$.

    x [..., m, d] the points that attend, support [..., n, d], mass [..., n] (non-negative, summing to 1);
    Q, K [d_k, d], V [d_v, d]. Returns [..., m, d_v].
    """
    scores = (x @ Q.T) @ (support @ K.T).transpose(-1, -2)  # [..., m, n]: <Q x, K y_j>
    # exp(s_j) a_j / sum_l exp(s_l) a_l: the softmax taken against mu, i.e. with log a_j added
    weights = torch.softmax(scores + mass.log()[..., None, :], dim=-1)
    return weights @ (support @ V.T)


@dataclass(frozen=True)
class InContextConfig:
    d_in: int = 2  # token dimension d (continuous tokens in R^d)
    d_out: int = 1
    width: int = 64  # fixed embedding dimension, whatever the number of tokens
    heads: int = 4
    depth: int = 3
    mlp_ratio: int = 4
    causal: bool = False  # a causal mask: breaks the measure view (a foil for the check)
    max_positions: int = 0  # > 0 adds learned absolute positions: another foil


class MultiHeadMeasureAttention(nn.Module):
    """Multi-head softmax attention of every stream token over the first n (the context's) tokens."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads, self.d_k = heads, width // heads
        self.Q, self.K, self.V = (nn.Linear(width, width, bias=False) for _ in range(3))
        self.W = nn.Linear(width, width, bias=False)  # [W_1 ... W_H]: sum_h W_h (head h's output)

    def head_matrices(self, h: int) -> tuple[torch.Tensor, ...]:
        """(Q_h, K_h, V_h, W_h) of head h as in the paper's formula, with 1/sqrt(d_k) folded into Q_h."""
        rows = slice(h * self.d_k, (h + 1) * self.d_k)
        return (self.Q.weight[rows] / math.sqrt(self.d_k), self.K.weight[rows], self.V.weight[rows],
                self.W.weight[:, rows])

    def forward(self, stream: torch.Tensor, n: int, log_mass: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, T, _ = stream.shape  # T = n context tokens, then the queries
        split = lambda t: t.view(B, -1, self.heads, self.d_k).transpose(1, 2)  # [B, H, tokens, d_k]
        context = stream[:, :n]
        q, k, v = split(self.Q(stream)), split(self.K(context)), split(self.V(context))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_k) + log_mass[:, None, None, :]  # [B, H, T, n]
        if causal:  # context token i sees tokens <= i; queries still see the whole context
            seen = torch.ones(T, n, dtype=torch.bool, device=stream.device)
            seen[:n] = torch.tril(seen[:n])
            scores = scores.masked_fill(~seen, float("-inf"))
        out = scores.softmax(-1) @ v  # [B, H, T, d_k]
        return self.W(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, c: InContextConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c.width), nn.LayerNorm(c.width)
        self.attention = MultiHeadMeasureAttention(c.width, c.heads)
        self.mlp = nn.Sequential(nn.Linear(c.width, c.mlp_ratio * c.width), nn.GELU(),
                                 nn.Linear(c.mlp_ratio * c.width, c.width))

    def forward(self, stream, n, log_mass, causal):
        stream = stream + self.attention(self.norm1(stream), n, log_mass, causal)  # Gamma(mu, x)
        return stream + self.mlp(self.norm2(stream))  # a context-free map on every token


class InContextTransformer(nn.Module):
    r"""A deep transformer as an in-context map: context tokens (a measure), optional query points, outputs.

    ``model(context)`` gives $G(\mu, x_i)$ at every context token, [B, n, d_out];
    ``model(context, queries)`` gives $G(\mu, x)$ at each query, [B, m, d_out] (queries attend to the
    context and never join it). ``mass`` [B, n] (rows summing to 1) makes the context the weighted
    measure $\sum_j a_j \delta_{x_j}$; the default is the empirical measure.
    """

    def __init__(self, config: InContextConfig):
        super().__init__()
        self.config = c = config
        self.read_in = nn.Linear(c.d_in, c.width)  # how a continuous token in R^d enters the model
        self.positions = nn.Embedding(c.max_positions, c.width) if c.max_positions else None
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)
        self.read_out = nn.Linear(c.width, c.d_out)

    def forward(self, context: torch.Tensor, queries: torch.Tensor | None = None,
                mass: torch.Tensor | None = None) -> torch.Tensor:
        B, n, _ = context.shape
        tokens = self.read_in(context)
        if self.positions is not None:
            tokens = tokens + self.positions(torch.arange(n, device=context.device))
        stream = tokens if queries is None else torch.cat([tokens, self.read_in(queries)], dim=1)
        # the empirical measure's log(1/n) is the same for every token and cancels in the softmax
        log_mass = context.new_zeros(B, n) if mass is None else mass.log()
        for block in self.blocks:
            stream = block(stream, n, log_mass, self.config.causal)
        out = self.read_out(self.norm(stream))
        return out if queries is None else out[:, n:]


@torch.no_grad()
def context_size_invariance(model, tokens: torch.Tensor, copies: int = 2,
                            queries: torch.Tensor | None = None) -> float:
    """Max |output change| when every context token is repeated `copies` times (the measure is unchanged).

    tokens [B, n, d]. Without queries, ``model(tokens)`` must return per-token outputs [B, n, ...] and every
    copy is compared with its original token's output (any such module: an ``nn.TransformerEncoder`` with
    ``batch_first=True`` too); with queries, ``model(tokens, queries)`` at the queries is compared.
    Float precision for a map of the measure alone; large for one that sees positions or order.
    """
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be a positive integer, got {copies!r}")
    repeated = tokens.repeat_interleave(copies, dim=1)  # x1 x1 x2 x2 ...: each token k times, in place
    if queries is None:
        expected = model(tokens).repeat_interleave(copies, dim=1)
        return (model(repeated) - expected).abs().max().item()
    return (model(repeated, queries) - model(tokens, queries)).abs().max().item()
