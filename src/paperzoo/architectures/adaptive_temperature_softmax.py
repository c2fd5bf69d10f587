r"""Adaptive temperature: softmax sharpened by its own entropy (Veličković et al., arXiv:2410.01104).

*Softmax is not Enough (for Sharp Out-of-Distribution)* proves that softmax with any fixed
temperature must disperse as the number of items grows: with bounded logits, every
coefficient tends to $1/n$, so a head that picks out one item sharply on the sizes it was
trained on spreads its attention over many items on larger inputs (the paper's dispersion
theorem). As an ad-hoc repair at inference time the paper lowers the temperature
$\theta = 1/\beta$ whenever the coefficients are spread, choosing $\beta$ from the Shannon
entropy of the softmax itself, with a degree-4 polynomial fitted to the inverse
temperature that was best on a synthetic set of logit vectors (Fig. 5):

$$p = \mathrm{softmax}(z), \qquad H = -\sum_i p_i \log p_i$$
$$\beta(H) = \begin{cases} \max\big(P(H),\, 1\big) & H > 0.5 \\ 1 & \text{otherwise} \end{cases},
\qquad P(H) = -0.037 H^4 + 0.481 H^3 - 2.3 H^2 + 4.917 H - 1.791$$
$$\mathrm{adaptive\_softmax}(z) = \mathrm{softmax}(\beta(H)\, z)$$

The coefficients are listed highest power first, as the paper's JAX listing passes them to
``jnp.polyval``; so $\beta(1) = P(1) = 1.27$. The floor at 1 means the temperature is never
raised (so the entropy never rises: the entropy of $\mathrm{softmax}(\beta z)$ is
non-increasing in $\beta > 0$), and heads already sharp ($H \le 0.5$) are left alone. Note
that $P$ exceeds 1 only for $0.85 < H < 5.94$ nats: a head spread over more than about
$e^{5.94} \approx 380$ items effectively is returned unchanged. Since $P < 1$ below 0.85 nats,
the 0.5-nat threshold never changes $\beta$ with these coefficients; it is kept (and is the knob
that `threshold=math.inf` uses to force $\beta = 1$).

Two ways in:

- `adaptive_temperature_attention`: an attention function with transformers' attention
  interface, $\mathrm{out} = \mathrm{adaptive\_softmax}(q k^\top s + M)\, v$, for any Hugging
  Face model: ``use_adaptive_temperature(model)`` registers it (with eager attention's mask
  builder, without which transformers hands a custom function no padding mask) and makes it
  the model's attention implementation; the architectures family's
  ``paperzoo.core.blocks.swap(model, "attention_fn", adaptive_temperature_attention)`` does the
  same at the default threshold. One $\beta$ per head and query position.
- `AdaptiveTemperatureLogitsProcessor`: the same rule on a causal LM's next-token logits
  inside ``generate``: it returns $\beta(H)\, z$, which the sampler's softmax turns into
  $\mathrm{softmax}(\beta z)$.

Deviations and choices
----------------------
- The entropy uses $0 \log 0 = 0$ (``torch.special.entr``); the paper's listing adds
  $10^{-9}$ inside the log. The two differ by at most $n \cdot 10^{-9}$ nats over $n$ items.
- The row maximum is subtracted from the logits before they are multiplied by $\beta$ (softmax
  is invariant to it). Without it, a mask's most negative float times $\beta > 1$ overflows
  to $-\infty$ and a fully masked row would turn into NaN.
- The gradient flows through $\beta$ as in the paper's listing (no stop-gradient). The paper
  applies the rule at inference only; nothing here stops a user from training with it.
- The attention function computes weights explicitly (like transformers' eager attention),
  so it costs $O(T^2)$ memory; the paper's streaming entropy kernel is not reproduced.
  Soft-capping and sliding windows that some models pass as keyword arguments are not
  applied (sliding windows arrive in the mask for Llama-style models).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, LogitsProcessor
from transformers.masking_utils import AttentionMaskInterface, eager_mask

# P(H), highest power first (the paper's listing, for jnp.polyval; Fig. 5).
POLYNOMIAL = (-0.037, 0.481, -2.3, 4.917, -1.791)
# Heads at or below this entropy (nats) are already sharp: "don't overcorrect low-entropy heads".
ENTROPY_THRESHOLD = 0.5


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy H = -sum_i p_i log p_i in nats (0 log 0 = 0), keeping `dim`."""
    return torch.special.entr(p).sum(dim, keepdim=True)


def inverse_temperature(H: torch.Tensor, threshold: float = ENTROPY_THRESHOLD,
                        coefficients=POLYNOMIAL) -> torch.Tensor:
    """beta(H) = max(P(H), 1) where H > threshold, else 1."""
    P = torch.zeros_like(H)
    for c in coefficients:  # Horner: highest power first
        P = P * H + c
    # max(., 1): never raise the temperature, so the entropy never rises
    return torch.where(H > threshold, P.clamp(min=1.0), torch.ones_like(H))


def adaptive_softmax(z: torch.Tensor, dim: int = -1, threshold: float = ENTROPY_THRESHOLD) -> torch.Tensor:
    """softmax(beta(H) z) with H the entropy of softmax(z) along `dim`."""
    z = z - z.amax(dim, keepdim=True)  # softmax-invariant; keeps beta * (masked logit) finite
    beta = inverse_temperature(entropy(F.softmax(z, dim), dim), threshold)
    return F.softmax(beta * z, dim)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, T, hd] -> [B, H_kv * groups, T, hd] for grouped-query attention."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _additive_mask(module, attention_mask, T: int, S: int, dtype, device) -> torch.Tensor | float:
    """The mask as an additive float tensor. transformers hands a custom attention function the mask that
    SDPA would get: None when it may be left to causality (then a causal module masks keys after the query,
    aligned at the end when S > T), a boolean "may attend" tensor, or an additive float tensor (eager)."""
    if attention_mask is None:
        if not getattr(module, "is_causal", False) or T == 1:
            return 0.0
        attention_mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)
    if attention_mask.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=device).masked_fill(~attention_mask, torch.finfo(dtype).min)
    return attention_mask[..., :S]


def adaptive_temperature_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                   threshold: float = ENTROPY_THRESHOLD, **kwargs):
    """transformers' attention interface: q [B, H, T, hd], k/v [B, H_kv, S, hd] -> (out [B, T, H, hd], weights).

    weights = adaptive_softmax(q k^T * scaling + mask) over the keys, one beta per head and query;
    `threshold=math.inf` forces beta = 1 (plain softmax attention).
    """
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    z = torch.matmul(query, key.transpose(2, 3)) * scaling
    z = z + _additive_mask(module, attention_mask, *z.shape[-2:], z.dtype, z.device)
    weights = adaptive_softmax(z.float(), threshold=threshold).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=getattr(module, "training", False))
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def use_adaptive_temperature(model, threshold: float = ENTROPY_THRESHOLD):
    """Make every attention layer of a Hugging Face model use `adaptive_temperature_attention`; returns the model.

    Registers the function together with eager attention's mask builder: transformers passes no mask at all
    (so no padding mask) to an attention function whose name has no mask builder.
    """
    name = "adaptive_temperature" if threshold == ENTROPY_THRESHOLD else f"adaptive_temperature_threshold_{threshold}"
    AttentionInterface.register(name, partial(adaptive_temperature_attention, threshold=threshold))
    AttentionMaskInterface.register(name, eager_mask)
    model.set_attn_implementation(name)
    return model


class AdaptiveTemperatureLogitsProcessor(LogitsProcessor):
    """Next-token logits z [B, V] -> beta(H) z, H the entropy of softmax(z): sampling then draws from softmax(beta z)."""

    def __init__(self, threshold: float = ENTROPY_THRESHOLD):
        self.threshold = threshold

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        z = scores.float()
        z = z - z.amax(-1, keepdim=True)
        beta = inverse_temperature(entropy(F.softmax(z, -1)), self.threshold)
        return (beta * z).to(scores.dtype)

