r"""Reasoning in Large Language Models: A Geometric Perspective (Cosentino & Shekkizhar, arXiv:2407.02678).

An MLP with piecewise-affine activations partitions its input space into regions, each
with its own affine map; the more regions it can carve, the better it approximates. In
a transformer the MLP's input is the output of multi-head attention, and for token $i$
head $h$ returns a convex combination of its value vectors,
$o_h(i) = \sum_j A_h[i, j]\, v_h(j)$ with $A_h[i, \cdot]$ on the simplex, so $o_h(i)$ lies in
the convex hull of the $k_h(i)$ value vectors it actually weights, a set of dimension at
most $k_h(i) - 1$. The layer's output (concatenated heads through $W_O$) then lies in the
Minkowski sum of the per-head hulls (the paper's main theorem), whose dimension is at most

$$\mathrm{ID}(i) \;\le\; \sum_{h=1}^{H} \bigl(k_h(i) - 1\bigr),\qquad
k_h(i) = \#\{\, j : A_h[i, j] > \tau \,\}.$$

The paper calls this count the intrinsic dimension (ID) of the MLP's input: the number of
"meaningful" edges of token $i$ in the attention graph, an edge counting when its weight
exceeds a threshold $\tau$. More heads (more terms) or more context (more tokens to weight)
can raise it; the paper links a higher ID at the last layer to better reasoning.

What is implemented:

- `attention_counts(attentions, tau)`: $k_h(i)$ for every layer, row, head and token, from
  the attention weights a Hugging Face model returns (``output_attentions=True``);
- `minkowski_bound(k)`: $\sum_h \max(k_h - 1, 0)$ per layer, row and token;
- `attention_intrinsic_dimension(model, inputs, tau)`: both, on any HF causal LM. Models
  loaded with SDPA or flash attention return no weights in transformers 5, so the model
  is switched to eager attention for the one forward pass and switched back; a model
  that cannot return weights gets a one-line ``ValueError``;
- `linear_regions_along_line(mlp, x0, x1)`: the number of linear regions of a ReLU network
  met along the segment $x_0 \to x_1$, exactly: inside a region every pre-activation is
  affine in the line parameter $t$, so the next boundary is the nearest zero crossing
  $t - z_u / \dot z_u$ over units $u$ (slopes by forward-mode AD), and the walk jumps there.

Choices and deviations (the review gives no definition beyond "attention weight exceeds a
certain threshold"; the paper gives no $\tau$):

- Counted per layer, per head and per token; which token and layer to read is the caller's
  choice. The authors' earlier code for the same ID (RandallBalestriero/SplineLLM,
  ``modeling_llama.py``, arXiv:2312.01648) reads the *last* token's row and sums the count
  over heads; the experiment reads the token that predicts the answer, at the last layer,
  the layer the paper ties to reasoning.
- $\tau$ is absolute by default. ``relative=True`` counts weights above $\tau \cdot \max_j A_h[i, j]$
  instead, as that earlier code does (with $\tau = 0.1$).
- A weight equal to $\tau$ does not count (strictly above). A head with no weight above
  $\tau$ contributes 0 to the bound, not $-1$: an empty set adds no dimension.
- The bound is not capped by the head dimension or the width ($\dim \le d$ as well);
  it is the graph-density count the paper plots.
- Linear regions are counted for networks whose non-linearities are ``nn.ReLU`` modules
  (run in float64 on a copy). Two boundaries closer than ``step`` (1e-9 of the segment)
  count as one. Linear regions are method-only: the experiment's task models have SwiGLU
  MLPs, which are not piecewise-affine, so it reads the ID alone.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD


def attention_counts(attentions, tau: float, relative: bool = False) -> torch.Tensor:
    """k_h(i) = #{j : A_h[i, j] > tau} (or > tau * max_j A_h[i, j]): [layers, batch, heads, tokens].

    `attentions` is a model's tuple of per-layer weights [batch, heads, tokens, keys], or one
    stacked tensor [layers, batch, heads, tokens, keys].
    """
    A = attentions if torch.is_tensor(attentions) else torch.stack(list(attentions))
    cutoff = tau * A.amax(dim=-1, keepdim=True) if relative else tau
    return (A > cutoff).sum(dim=-1)


def minkowski_bound(k: torch.Tensor) -> torch.Tensor:
    """The ID bound sum_h max(k_h - 1, 0) from counts [..., heads, tokens]: [..., tokens]."""
    return (k - 1).clamp(min=0).sum(dim=-2)


@dataclass
class AttentionIntrinsicDimension:
    k: torch.Tensor  # [layers, batch, heads, tokens] weights above tau, per head
    bound: torch.Tensor  # [layers, batch, tokens] sum_h max(k_h - 1, 0)
    tau: float
    relative: bool = False


@contextmanager
def eager_attention(model):
    """Run the block with eager attention (the only kind that returns weights in transformers 5), then restore."""
    before = getattr(model.config, "_attn_implementation", None)
    switch = before not in (None, "eager")
    if switch:
        try:
            model.set_attn_implementation("eager")
        except (AttributeError, ValueError, NotImplementedError) as error:
            raise ValueError(f"{type(model).__name__} cannot return attention weights (no eager attention): "
                             f"{error}") from None
    try:
        yield model
    finally:
        if switch:
            model.set_attn_implementation(before)


@torch.no_grad()
def attention_intrinsic_dimension(model, inputs, tau: float, relative: bool = False) -> AttentionIntrinsicDimension:
    """Per-head counts k_h(i) and the Minkowski-sum bound for every layer and token of `inputs`.

    `inputs` is a tensor of input ids [batch, tokens] or a dict of model inputs (with its
    attention mask for padded batches; rows of padding tokens are then meaningless).
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau < 1:
        raise ValueError(f"tau must be a number in [0, 1), got {tau!r}")
    inputs = {"input_ids": inputs} if torch.is_tensor(inputs) else dict(inputs)
    with eager_attention(model):
        try:
            attentions = model(**inputs, output_attentions=True).attentions
        except TypeError as error:
            raise ValueError(f"{type(model).__name__} cannot return attention weights: {error}") from None
    if not attentions or any(a is None for a in attentions):
        raise ValueError(f"{type(model).__name__} returned no attention weights with output_attentions=True")
    k = attention_counts([a.float() for a in attentions], tau, relative)
    return AttentionIntrinsicDimension(k, minkowski_bound(k), float(tau), relative)


def _preactivations_and_slopes(net, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ReLU's input z at x, and its derivative along v (forward-mode AD), flattened."""
    z, dz = [], []

    def record(module, args):
        primal, tangent = fwAD.unpack_dual(args[0])
        z.append(primal.reshape(-1))
        dz.append(torch.zeros_like(primal).reshape(-1) if tangent is None else tangent.reshape(-1))

    hooks = [m.register_forward_pre_hook(record) for m in net.modules() if isinstance(m, torch.nn.ReLU)]
    try:
        with fwAD.dual_level():
            net(fwAD.make_dual(x, v))
    finally:
        for hook in hooks:
            hook.remove()
    if not z:
        raise ValueError("the network has no nn.ReLU modules: its linear regions are not counted here")
    return torch.cat(z), torch.cat(dz)


@torch.no_grad()
def linear_regions_along_line(mlp: torch.nn.Module, x0: torch.Tensor, x1: torch.Tensor, step: float = 1e-9,
                              max_regions: int = 1_000_000) -> int:
    """How many linear regions of a ReLU network the segment x0 -> x1 passes through (exact up to `step`).

    x0 and x1 are single inputs, shaped as the network takes them (a leading batch axis of 1
    where it needs one). Regions are counted along t in [0, 1], x(t) = x0 + t (x1 - x0).
    """
    net = copy.deepcopy(mlp).double().eval()
    x0, x1 = x0.detach().double(), x1.detach().double()
    v = x1 - x0
    t, regions = 0.0, 1
    while regions < max_regions:
        z, dz = _preactivations_and_slopes(net, x0 + t * v, v)
        moving = dz != 0
        ahead = -z[moving] / dz[moving]  # where each unit's affine pre-activation reaches zero, from t
        ahead = ahead[ahead > 0]
        if ahead.numel() == 0 or t + ahead.min().item() >= 1:
            return regions
        t += ahead.min().item() + step  # just past the nearest boundary: inside the next region
        regions += 1
    raise RuntimeError(f"more than {max_regions} regions along the segment")
