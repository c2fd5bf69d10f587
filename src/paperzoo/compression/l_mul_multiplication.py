r"""Addition Is All You Need for Energy-Efficient Language Models (Luo & Sun, arXiv:2410.00907).

A floating-point number is $x = (-1)^{x_s} (1 + x_m) 2^{x_e}$ with an $m$-bit
mantissa $x_m \in [0, 1)$. The exact product of two such numbers is

$$ \mathrm{Mul}(x, y) = (1 + x_m + y_m + x_m y_m)\, 2^{x_e + y_e}, $$

whose mantissa product $x_m y_m$ is the costly part of a multiplier (quadratic in
$m$). *L-Mul* (linear-complexity multiplication) drops it and adds a constant
instead:

$$ \mathcal{L}\text{-Mul}(x, y) = (-1)^{x_s \oplus y_s} (1 + x_m + y_m + 2^{-l(m)})\, 2^{x_e + y_e},
   \qquad l(m) = \begin{cases} m & m \le 3 \\ 3 & m = 4 \\ 4 & m > 4 \end{cases}
   \qquad \text{(paper, §3.1)} $$

In hardware this is *one integer addition* of the two operands' bit patterns
(exponent and mantissa fields side by side), minus the exponent bias, plus the
offset $2^{-l(m)}$ written in mantissa units; the sign is an XOR. The paper
simulates it on GPUs exactly so (its Figure 2: a PTX routine that adds the two fp32
registers and subtracts ``0x3F780000`` = bias $-\ 2^{-4}$). Its claims: L-Mul with a
4-bit mantissa is about as precise as fp8 e4m3 multiplication, with a 3-bit
mantissa more precise than fp8 e5m2, and L-Mul in the attention matmuls
($QK^\top$ and $PV$) of an LLM is almost lossless.

What is implemented here:

- `l_mul(x, y, m)`: a bit-exact emulation on tensors. Each operand is first
  *rounded to nearest (ties to even)* to an $m$-bit mantissa, keeping fp32's 8-bit
  exponent range; this is what casting to an $m$-bit format does (torch's bf16 and
  fp8 casts round the same way, which the tests check). Then the magnitudes are
  added as integers, $q_x + q_y - 127 \cdot 2^m + 2^{m - l(m)}$ with
  $q = (\text{biased exponent}) \cdot 2^m + 2^m x_m$, and the sign bits XOR-ed.
- `l_mul_matmul(a, b, m)`: $C_{ij} = \sum_k \mathcal{L}\text{-Mul}(a_{ik}, b_{kj})$, the
  products summed in fp32, computed in chunks to bound memory.
- `simulated_matmul(a, b, arithmetic)` and `attention_arithmetic(model, arithmetic)`:
  the attention matmuls of an unmodified HF model computed in a chosen arithmetic --
  ``"exact"`` (fp32), ``"bf16"``, ``"fp8-e4m3"``, ``"fp8-e5m2"`` (operands rounded,
  then multiplied exactly and summed in fp32) or ``"l-mul-<m>"`` -- through a
  function registered with transformers' ``AttentionInterface``; no modelling code
  is forked.

Choices and deviations, with reasons:

- *The carry.* When $x_m + y_m + 2^{-l(m)} \ge 1$ the integer adder carries into the
  exponent, giving $(x_m + y_m + 2^{-l(m)})\, 2^{x_e + y_e + 1}$, not the value of the
  displayed formula, $(1 + x_m + y_m + 2^{-l(m)}) 2^{x_e + y_e}$. The two agree when
  there is no carry. We follow the paper's own integer-adder implementation (its
  Figure 2, and every public L-Mul kernel we read), since that is the operation
  whose cost and precision the paper reports.
- *Operand rounding.* The paper does not say how operands reach $m$ bits; we round
  to nearest-even, like the fp8 baselines, so that the comparison isolates the
  multiplication. The L-Mul result itself needs no rounding: the integer sum is
  already an $m$-bit number.
- *Edge cases.* A zero operand gives zero (as in the paper's kernel); results
  below fp32's normal range flush to zero, results above it become inf; operands
  that are not finite raise a ValueError.
- *fp8 baselines* use a per-tensor power-of-two scale that maps the tensor's
  largest magnitude into the format's range before the cast (and is undone
  exactly afterwards), as fp8 is used in practice; without it, small attention
  probabilities would underflow in e4m3 and the comparison would measure range,
  not precision. Rounding is torch's (nearest-even, saturating at the format's max).
- In attention only the two matmuls use the chosen arithmetic; the scale
  $1/\sqrt{d}$, the mask and the softmax stay in fp32, as in the paper. Gemma-2's
  attention logit soft-capping, $c \tanh(s / c)$ applied to the scaled scores before
  the mask, is applied the same way (in fp32, after the simulated $Q K^\top$), as
  transformers' own eager attention does; attention sinks (gpt-oss) are refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

FP32_MANTISSA_BITS = 23
FP32_BIAS = 127
FP32_EXPONENT_MAX = 255  # the biased exponent of inf / nan
SIGN_BIT = -(1 << 31)  # int32 with only the sign bit set

FP8_FORMATS = {"fp8-e4m3": torch.float8_e4m3fn, "fp8-e5m2": torch.float8_e5m2}
ARITHMETICS = ("exact", "bf16", *FP8_FORMATS, "l-mul-<m>")


def offset_exponent(m: int) -> int:
    """l(m): L-Mul adds 2^-l(m) in place of the mantissa product x_m * y_m (paper, §3.1)."""
    _check_mantissa_bits(m)
    return m if m <= 3 else 3 if m == 4 else 4


def _check_mantissa_bits(m: int) -> None:
    if not isinstance(m, int) or not 1 <= m <= FP32_MANTISSA_BITS:
        raise ValueError(f"mantissa bits m must be an integer in 1..{FP32_MANTISSA_BITS}, got {m!r}")


def round_mantissa(x: torch.Tensor, m: int) -> torch.Tensor:
    """x as fp32 rounded to nearest (ties to even) to an m-bit mantissa, fp32's exponent range kept."""
    _check_mantissa_bits(m)
    x = x.float()
    drop = FP32_MANTISSA_BITS - m
    if drop == 0:
        return x.clone()
    bits = x.contiguous().view(torch.int32)
    # Round to nearest even on the bit pattern: add half an ulp minus one, plus the kept lsb; a carry out of
    # the mantissa correctly bumps the exponent. Sign-magnitude keeps this valid for negative numbers.
    kept_lsb = (bits >> drop) & 1
    bits = (bits + ((1 << (drop - 1)) - 1) + kept_lsb) & ~((1 << drop) - 1)
    return bits.view(torch.float32)


def _zero(m: int) -> int:
    """The integer magnitude standing for a zero operand: its sum with any other magnitude is < 0."""
    return -(1 << (m + 8))  # below -(255 - 127) * 2^m, the most any magnitude plus the folded bias reaches


def _integer_dtype(m: int) -> torch.dtype:
    # sums of two magnitudes (< 2^(m + 9)) and of two zero stand-ins fit int32 up to m = 21
    return torch.int32 if m <= 21 else torch.int64


def _fields(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign bit, integer magnitude q = biased exponent * 2^m + mantissa) of x rounded to m bits."""
    if not torch.isfinite(x).all():
        raise ValueError("L-Mul operands must be finite (found inf or nan)")
    bits = round_mantissa(x, m).view(torch.int32)
    dtype = _integer_dtype(m)
    sign = (bits & SIGN_BIT).to(dtype)
    q = ((bits & 0x7FFFFFFF) >> (FP32_MANTISSA_BITS - m)).to(dtype)
    # zeros and fp32 subnormals (biased exponent 0) are treated as zero operands
    q = torch.where(q < (1 << m), torch.full_like(q, _zero(m)), q)
    return sign, q


def _bias_and_offset(m: int) -> int:
    """What L-Mul adds to q_x + q_y: the offset 2^-l(m) in mantissa units, minus one exponent bias."""
    return (1 << (m - offset_exponent(m))) - (FP32_BIAS << m)


def _assemble(r: torch.Tensor, sign: torch.Tensor, m: int, out_of_range: bool = True) -> torch.Tensor:
    """fp32 values from integer magnitudes r (biased exponent * 2^m + mantissa) and sign bits; in place on r.

    `out_of_range=False` promises that no nonzero product leaves fp32's normal range (checked by the
    caller), which saves two passes: then only zero operands (r < 0) need handling.
    """
    if out_of_range:
        r.clamp_(min=0, max=FP32_EXPONENT_MAX << m)  # overflow -> the inf pattern
        r.masked_fill_(r < (1 << m), 0)  # exponent underflow (and zero operands) -> 0
    else:
        r.clamp_(min=0)  # zero operands -> 0
    r <<= FP32_MANTISSA_BITS - m
    r |= sign
    return (r if r.dtype == torch.int32 else r.to(torch.int32)).view(torch.float32)


def l_mul(x: torch.Tensor, y: torch.Tensor, m: int) -> torch.Tensor:
    r"""Elementwise L-Mul of x and y (broadcast) with m-bit mantissas, bit-exact; returns fp32.

    $(-1)^{x_s \oplus y_s}$ times the number whose bits are $q_x + q_y - 127 \cdot 2^m + 2^{m - l(m)}$.
    """
    _check_mantissa_bits(m)
    try:
        torch.broadcast_shapes(x.shape, y.shape)
    except RuntimeError:
        raise ValueError(f"x and y must broadcast to one shape, got {tuple(x.shape)} and {tuple(y.shape)}") from None
    sx, qx = _fields(x, m)
    sy, qy = _fields(y, m)
    r = qx + (qy + _bias_and_offset(m))
    return _assemble(r, sx ^ sy, m)


def l_mul_matmul(a: torch.Tensor, b: torch.Tensor, m: int, max_elements: int = 1 << 24) -> torch.Tensor:
    r"""$C = A \otimes B$ with $C_{ij} = \sum_k \mathcal{L}\text{-Mul}(A_{ik}, B_{kj})$, summed in fp32.

    a: [..., n, k], b: [..., k, p] (batch dimensions broadcast) -> [..., n, p].
    At most `max_elements` products are held at once (as integers), so memory stays bounded.
    """
    _check_mantissa_bits(m)
    if isinstance(max_elements, bool) or not isinstance(max_elements, int) or max_elements < 1:
        raise ValueError(f"max_elements must be an integer >= 1, got {max_elements!r}")
    if a.dim() < 2 or b.dim() < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"l_mul_matmul needs [..., n, k] @ [..., k, p], got {tuple(a.shape)} and {tuple(b.shape)}")
    try:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        raise ValueError(f"the batch dimensions of a and b must broadcast, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}") from None
    n, k, p = a.shape[-2], a.shape[-1], b.shape[-1]
    sa, qa = _fields(a.expand(*batch, n, k).reshape(-1, n, k), m)  # [B, n, k]
    sb, qb = _fields(b.expand(*batch, k, p).reshape(-1, k, p).transpose(1, 2), m)  # [B, p, k]
    out_of_range = _may_leave_normal_range(qa, qb, m)
    qb = qb + _bias_and_offset(m)  # folded in once
    out = torch.empty(qa.shape[0], n, p, dtype=torch.float32, device=a.device)
    for rows, cols in _chunks(qa.shape[0], n, p * k, max_elements):
        r = qa[rows, cols, None, :] + qb[rows, None, :, :]  # [batch, rows, p, k] integer sums
        out[rows, cols] = _assemble(r, sa[rows, cols, None, :] ^ sb[rows, None, :, :], m, out_of_range).sum(-1)
    return out.view(*batch, n, p)


def _may_leave_normal_range(qa: torch.Tensor, qb: torch.Tensor, m: int) -> bool:
    """Whether the L-Mul of some nonzero entry of qa with some nonzero entry of qb under- or overflows."""
    nonzero_a, nonzero_b = qa[qa >= (1 << m)], qb[qb >= (1 << m)]
    if nonzero_a.numel() == 0 or nonzero_b.numel() == 0:
        return False
    low = int(nonzero_a.min()) + int(nonzero_b.min()) + _bias_and_offset(m)
    high = int(nonzero_a.max()) + int(nonzero_b.max()) + _bias_and_offset(m)
    return low < (1 << m) or high >= (FP32_EXPONENT_MAX << m)


def _chunks(batch: int, n: int, per_row: int, max_elements: int) -> Iterator[tuple[slice, slice]]:
    """(batch slice, row slice) pairs covering [batch, n] with at most ~max_elements products each."""
    if n * per_row <= max_elements:  # whole matrices, several at a time
        step = max(1, max_elements // (n * per_row))
        for start in range(0, batch, step):
            yield slice(start, min(start + step, batch)), slice(0, n)
    else:  # row blocks of one matrix at a time
        step = max(1, max_elements // per_row)
        for i in range(batch):
            for start in range(0, n, step):
                yield slice(i, i + 1), slice(start, min(start + step, n))


def round_to_fp8(x: torch.Tensor, dtype: torch.dtype, scaled: bool = True) -> torch.Tensor:
    """x rounded to an fp8 format and returned as fp32.

    With `scaled`, a per-tensor power-of-two scale first maps max|x| into the format's range
    (undone exactly afterwards). Values beyond the largest finite fp8 number saturate to it.
    """
    if dtype not in FP8_FORMATS.values():
        raise ValueError(f"dtype must be one of {', '.join(map(str, FP8_FORMATS.values()))}, got {dtype}")
    x = x.float()
    fmax = torch.finfo(dtype).max
    scale = 1.0
    if scaled:
        amax = x.abs().max().item() if x.numel() else 0.0
        if amax > 0:
            scale = 2.0 ** int(torch.floor(torch.log2(torch.tensor(fmax / amax))).item())
    return (x * scale).clamp(-fmax, fmax).to(dtype).float() / scale


def _l_mul_bits(arithmetic: str) -> int | None:
    match = re.fullmatch(r"l-mul-(\d+)", arithmetic)
    return int(match.group(1)) if match else None


def check_arithmetic(arithmetic: str) -> None:
    """Raise ValueError unless `arithmetic` is one of ARITHMETICS ('l-mul-<m>' with 1 <= m <= 23)."""
    m = _l_mul_bits(arithmetic)
    if m is not None:
        _check_mantissa_bits(m)
    elif arithmetic not in ARITHMETICS:
        raise ValueError(f"unknown arithmetic {arithmetic!r}; choose from {', '.join(ARITHMETICS)}")


def round_operand(x: torch.Tensor, arithmetic: str) -> torch.Tensor:
    """The operand as the arithmetic sees it before multiplying (fp32)."""
    check_arithmetic(arithmetic)
    if arithmetic == "exact":
        return x.float()
    if arithmetic == "bf16":
        return x.to(torch.bfloat16).float()
    if arithmetic in FP8_FORMATS:
        return round_to_fp8(x, FP8_FORMATS[arithmetic])
    return round_mantissa(x, _l_mul_bits(arithmetic))


def simulated_multiply(x: torch.Tensor, y: torch.Tensor, arithmetic: str) -> torch.Tensor:
    """Elementwise x * y in `arithmetic` (fp32 result). Rounded operands multiply exactly in fp32/fp64."""
    check_arithmetic(arithmetic)
    m = _l_mul_bits(arithmetic)
    if m is not None:
        return l_mul(x, y, m)
    # products of two operands with <= 8 significant bits each are exact in fp32
    return round_operand(x, arithmetic) * round_operand(y, arithmetic)


def simulated_matmul(a: torch.Tensor, b: torch.Tensor, arithmetic: str) -> torch.Tensor:
    """a @ b with every scalar product in `arithmetic` and the sums in fp32."""
    check_arithmetic(arithmetic)
    m = _l_mul_bits(arithmetic)
    if m is not None:
        return l_mul_matmul(a, b, m)
    return torch.matmul(round_operand(a, arithmetic), round_operand(b, arithmetic))


# ---------------------------------------------------------------------------------------------
# Attention with simulated arithmetic, through transformers' AttentionInterface.


def simulated_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        *, arithmetic: str = "exact", record: list | None = None, **kwargs):
    """Eager attention whose two matmuls, Q K^T and P V, use `arithmetic`.

    query: [b, h, t, d]; key, value: [b, h_kv, s, d]. Returns ([b, t, h, d], probabilities [b, h, t, s]),
    the contract of transformers' attention functions. With `record`, appends each call's operands.
    """
    check_arithmetic(arithmetic)
    if kwargs.get("s_aux") is not None:
        raise ValueError("simulated attention does not support attention sinks (s_aux, e.g. gpt-oss)")
    softcap = kwargs.get("softcap")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number (or None), got {softcap!r}")
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each kv head serves `groups` query heads
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = simulated_matmul(query, key.transpose(-1, -2), arithmetic) * scaling  # [b, h, t, s]
    if softcap is not None:  # Gemma-2's attention logit soft-capping: c tanh(scores / c), before the mask
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    if record is not None:
        record.append({"query": query.detach(), "key": key.detach(), "probs": probs.detach(), "value": value.detach()})
    out = simulated_matmul(probs, value, arithmetic).to(query.dtype)  # [b, h, t, d]
    return out.transpose(1, 2).contiguous(), probs.to(query.dtype)


def register_attention(arithmetic: str, record: list | None = None) -> str:
    """Register `simulated_attention` in `arithmetic` with transformers; return the implementation name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    check_arithmetic(arithmetic)
    name = f"paperzoo-{arithmetic}" + ("-recording" if record is not None else "")

    def attention(module, query, key, value, attention_mask, **kwargs):
        return simulated_attention(module, query, key, value, attention_mask, arithmetic=arithmetic,
                                   record=record, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, eager_mask)  # without a mask function transformers would pass no mask
    return name


@contextmanager
def attention_arithmetic(model: nn.Module, arithmetic: str, record: list | None = None) -> Iterator[nn.Module]:
    """Within the block, `model`'s attention matmuls use `arithmetic` (e.g. 'l-mul-3', 'fp8-e4m3').

    The model is left unmodified afterwards: its previous attention implementation is restored.
    """
    check_arithmetic(arithmetic)
    if not hasattr(model, "_can_set_attn_implementation") or not model._can_set_attn_implementation():
        raise ValueError(f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface")
    if any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} uses attention sinks (e.g. gpt-oss), which simulated attention "
                         "does not support")
    name = register_attention(arithmetic, record)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def attention_operands(model: nn.Module, input_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """The operands of every layer's attention matmuls on `input_ids`, from one exact fp32 pass.

    One dict per layer: query [b, h, t, d], key [b, h, s, d] (kv heads repeated), probs [b, h, t, s], value.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype != torch.long \
            or input_ids.numel() == 0:
        raise ValueError("input_ids must be a non-empty [batch, T] tensor of token ids (int64)")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and input_ids.shape[1] > limit:
        raise ValueError(f"input_ids has {input_ids.shape[1]} positions; the model takes at most {limit}")
    record: list = []
    with attention_arithmetic(model, "exact", record=record):
        model(input_ids=input_ids, use_cache=False)
    return record
