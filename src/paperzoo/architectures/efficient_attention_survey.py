r"""Efficient Attention Mechanisms for Large Language Models: A Survey (arXiv 2507.19595): its
measurable side, as attention functions for any HF decoder.

The survey sorts efficient attention into *linear* attention (kernel feature maps, recurrences
with forgetting, fast-weight / test-time-regression views) and *sparse* attention (fixed
patterns, block-wise routing, clustering), then looks at pretrained models built on them,
uniformly or as local-global hybrids. Its conclusion is a trade-off, not a winner: each
mixer buys its cost with some loss of what full softmax attention can retrieve. The map of
its branches onto the catalogue is `paperzoo.catalog.survey_maps.EFFICIENT_ATTENTION_SURVEY`.

Here are one representative per measurable branch, each an attention function with
transformers' attention-interface signature, installed by
``paperzoo.core.blocks.swap(model, "attention_fn", fn)``. They reuse the model's own
projections and rotary positions, so a swap changes only the attention rule:

- **Fixed-pattern sparsity**: `sliding_window_attention(w)`. Softmax over the last w keys,
  $o_t = \sum_{t - w < s \le t} \operatorname{softmax}_s(q_t \cdot k_s / \sqrt{d})\, v_s$; the same
  rule as Mistral's sliding window (checked against transformers' Mistral in the tests).
- **Kernelised linear attention** (Katharopoulos et al. 2020): `linear_attention`. With
  $\phi(x) = \operatorname{elu}(x) + 1$,
  $o_t = \phi(q_t)^\top S_t / \phi(q_t)^\top z_t$, $S_t = \sum_{s \le t} \phi(k_s) v_s^\top$,
  $z_t = \sum_{s \le t} \phi(k_s)$: prefix sums, computed in chunks of 64 (the masked
  quadratic form within a chunk, one state carried across chunks), linear in T.
- **Random-feature softmax kernels** (Performer, FAVOR+): `performer_attention(m)`. Positive
  features $\phi(x) = \exp(W x - \lVert x\rVert^2 / 2) / \sqrt{m}$, rows of W drawn from
  $N(0, I)$ and orthogonalised in blocks, so that $E[\phi(q)^\top \phi(k)] = \exp(q \cdot k)$ for the
  scaled q, k; then the same prefix sums. It approximates softmax attention, rotary
  included, with an error that shrinks as m grows.

`attention_flops(kind, n, d, ...)` is each rule's cost per token per head at context n
(multiply-adds counted as 2 FLOPs, causal average over positions): what each rule needs, not
what the reference code here spends (the window is computed as a masked full matrix; the
kernel rules in chunks of 64, a constant factor on the running-state count). It is the
experiment's cost axis.

Deviations: the survey has no algorithm or constants of its own; the representatives and
their settings are ours. Low-rank projection along the sequence (Linformer), which the
review lists as a family, is not causal and is left out of the measured set. Padding
masks are not supported by the linear rules (they are causal by construction); batches
must be unpadded. Performer's features are drawn once per function (a fixed seed), not
redrawn during training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _repeat_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """Grouped-query attention: repeat each key/value head for its query heads."""
    groups = query.shape[1] // key.shape[1]
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


def sliding_window_attention(window: int):
    """Softmax attention over the last `window` keys (the query's own included)."""
    if window < 1:
        raise ValueError(f"window must be at least 1, not {window}")

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        key, value = _repeat_kv(query, key, value)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        scores = query @ key.transpose(-1, -2) * scaling  # [B, H, T, S]
        t, s = query.shape[-2], key.shape[-2]
        q_pos = torch.arange(s - t, s).view(-1, 1)  # queries are the last t of the s positions (a KV cache)
        k_pos = torch.arange(s).view(1, -1)
        allowed = (k_pos <= q_pos) & (q_pos - k_pos < window)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        if attention_mask is not None:
            scores = scores + attention_mask[..., -s:]  # padding, if the caller gives any
        weights = scores.softmax(-1)
        return (weights @ value).transpose(1, 2).contiguous(), weights

    attention.__name__ = f"sliding_window_{window}"
    return attention


def _causal_kernel_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, value: torch.Tensor,
                             chunk: int = 64) -> torch.Tensor:
    """o_t = phi(q_t)^T S_t / phi(q_t)^T z_t with S_t, z_t the prefix sums of phi(k_s) v_s^T and phi(k_s).

    Computed chunk by chunk (the chunked form of linear attention): within a chunk of C
    positions the masked quadratic form phi(Q) phi(K)^T (lower triangle), across chunks one
    running state S, z carried from the chunks before. Time O(T C F) and memory O(C^2 + F d_v)
    per head: linear in T, with no per-position state.
    """
    B, H, T, features = phi_q.shape
    S = phi_q.new_zeros(B, H, features, value.shape[-1])
    z = phi_q.new_zeros(B, H, features)
    out = []
    for start in range(0, T, chunk):
        q, k, v = (x[:, :, start:start + chunk] for x in (phi_q, phi_k, value))
        within = (q @ k.transpose(-1, -2)).tril()  # [B, H, C, C]: phi(q_t) . phi(k_s), s <= t in the chunk
        numerator = within @ v + q @ S
        denominator = within.sum(-1, keepdim=True) + (q * z[:, :, None]).sum(-1, keepdim=True)
        out.append(numerator / denominator)
        S = S + k.transpose(-1, -2) @ v
        z = z + k.sum(2)
    return torch.cat(out, dim=2).transpose(1, 2).contiguous()


def linear_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal linear attention with phi(x) = elu(x) + 1 (prefix sums; the mask is implied)."""
    key, value = _repeat_kv(query, key, value)
    if query.shape[-2] != key.shape[-2]:
        raise ValueError("linear_attention runs on whole sequences (no KV cache): keep the state instead")
    return _causal_kernel_attention(F.elu(query) + 1, F.elu(key) + 1, value), None


def performer_features(x: torch.Tensor, W: torch.Tensor, is_query: bool) -> torch.Tensor:
    """FAVOR+ positive features exp(W x - |x|^2 / 2) / sqrt(m), stabilised by a max that cancels in the ratio.

    Queries subtract their own maximum (it cancels between numerator and denominator of
    each output row); keys subtract one maximum over the whole tensor (a common factor).
    """
    projection = x @ W.T  # [B, H, T, m]
    log_phi = projection - (x * x).sum(-1, keepdim=True) / 2
    shift = log_phi.amax(-1, keepdim=True) if is_query else log_phi.amax(dim=(-1, -2), keepdim=True)
    return torch.exp(log_phi - shift.detach()) / math.sqrt(W.shape[0])


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """[m, d] rows orthogonal within blocks of d, each scaled to the norm of a N(0, I_d) draw (FAVOR+)."""
    blocks = []
    for _ in range(math.ceil(m / d)):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
        blocks.append(q.T)
    norms = torch.randn(m, d, generator=generator).norm(dim=1, keepdim=True)
    return torch.cat(blocks)[:m] * norms


def performer_attention(features: int = 64, seed: int = 0):
    """Causal Performer attention (FAVOR+) with `features` orthogonal random features per head dimension."""
    generator = torch.Generator().manual_seed(seed)
    cache: dict[int, torch.Tensor] = {}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        key, value = _repeat_kv(query, key, value)
        if query.shape[-2] != key.shape[-2]:
            raise ValueError("performer_attention runs on whole sequences (no KV cache)")
        d = query.shape[-1]
        if d not in cache:
            cache[d] = orthogonal_gaussian(features, d, generator)
        W = cache[d].to(query.dtype)
        root = (query.shape[-1] ** -0.5 if scaling is None else scaling) ** 0.5  # exp(q.k * scaling) = exp(q'.k')
        return _causal_kernel_attention(performer_features(query * root, W, True),
                                        performer_features(key * root, W, False), value), None

    attention.__name__ = f"performer_{features}_{seed}"
    return attention


def attention_flops(kind: str, n: int, d: int, window: int = 0, features: int = 0) -> float:
    """FLOPs per token per head of the attention rule at context n (scores and weighted sum; causal average).

    softmax: 2 x 2 d (t + 1) averaged over t < n, i.e. 2 d (n + 1); window: the same over min(t + 1, w)
    keys; linear and performer: the state update phi(k) v^T and its running sum (2 F d, elementwise) and
    the read-out phi(q)^T S (2 F d, a matmul), 4 F d per token with F features (d for linear; the
    performer adds 2 x 2 m d for its projections of q and k).
    """
    if kind == "softmax":
        return 2 * d * (n + 1)
    if kind == "window":
        return 4 * d * sum(min(t + 1, window) for t in range(n)) / n
    if kind == "linear":
        return 4 * d * d
    if kind == "performer":
        return 4 * features * d + 2 * 2 * features * d
    raise ValueError(f"unknown attention kind {kind!r}")
