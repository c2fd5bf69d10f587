r"""The Super Weight in Large Language Models (Yu, Wang, Shan, Reed, Wan; arXiv:2411.07191).

The paper finds that a handful of scalar weights -- often a single one -- carry an
LLM: zeroing that one *super weight* in Llama-7B raises perplexity by orders of
magnitude and drops zero-shot accuracy to guessing, while zeroing thousands of other,
even larger, weights costs a few points. Every super weight sits in the feed-forward
down-projection of an early block, and it announces itself: it turns a large input
activation into a *super activation*, a huge output value in one channel that the
residual stream carries through the rest of the network. So it can be found from one
forward pass, without data beyond a prompt. The paper's practical use is
quantisation: hold the super weight out, clip the other outliers, round the rest to
nearest, and round-to-nearest keeps working at much larger block sizes.

With the down-projection $Y = X W^\top$ of block $\ell$ ($X \in \mathbb{R}^{T \times H}$
its input, $W \in \mathbb{R}^{D \times H}$, $Y \in \mathbb{R}^{T \times D}$ its output),

$$ Y_{tj} = \sum_k X_{tk} W_{jk}, \qquad
   j^* = \arg\max_j \max_t |Y_{tj}|, \qquad k^* = \arg\max_k \max_t |X_{tk}| $$

and the super weight candidate of block $\ell$ is $W_{j^* k^*}$: the row is the
channel of the output spike (the super activation), the column the channel of the
input spike that feeds it. The paper flags a block when both spikes are large, zeroes
the flagged weights and looks again, until no spike is left (`find_super_weights`).

Ablation with the super activation restored (the paper's "Prune SW, +SA"): zero
$W_{j^*k^*}$, then put the original value back at the one position per sequence
where the super activation was largest,

$$ Y'_{t^* j^*} \leftarrow Y'_{t^* j^*} + W_{j^*k^*} X_{t^* k^*}, \qquad
   t^* = \arg\max_t \big|Y'_{tj^*} + W_{j^*k^*} X_{tk^*}\big| $$

(linearity gives the original output from the zeroed one without a second product).

Super-weight-aware round-to-nearest (asymmetric min-max over blocks of $B$
consecutive weights of the flattened matrix, $b$ bits):

$$ \tau = \overline{|w|} + z \,\mathrm{std}(|w|), \quad w \leftarrow \mathrm{clip}(w, -\tau, \tau), \quad
   \Delta = \frac{\max w - \min w}{2^b - 1}, \quad
   \hat w = \Delta \,\mathrm{round}\!\Big(\frac{w - \min w}{\Delta}\Big) + \min w $$

per block, then every held-out super weight is written back at its original value.
Plain round-to-nearest is the same without the clip and without the hold-out.

Implementation notes, and what was checked in the official code (mengxiayu/LLMSuperWeight):

- Detection hooks the input and output of every down-projection of an unmodified HF
  model in one forward pass. Down-projections are found generically: in each decoder
  block, the linear layers (``nn.Linear`` or GPT-2's ``Conv1D``) outside attention that
  write the residual width from a different width (Llama/Qwen/Mistral ``mlp.down_proj``,
  GPT-2 ``mlp.c_proj``, OPT ``fc2``, NeoX ``dense_4h_to_h``). Coordinates are always
  ``(row, col)`` of the ``nn.Linear`` layout ``[out, in]``; GPT-2's transposed ``Conv1D``
  weight is read through a transposed view. Padded positions are left out of the
  maxima when an attention mask is given; the prompt may be a token-id tensor or a
  tokenizer's output (any mapping with ``input_ids``).
- The spike threshold defaults to 50, the value the official analysis script uses for
  fp16 7B models; it is an absolute activation size, so on other models read the
  magnitudes (``input_spike``, ``output_spike``) rather than only the flag.
- Restoring the super activation follows the official hook: per sequence, the single
  position of largest |output| in the super-activation channel gets its original value.
- Quantisation follows the official ``quantize_blockwise``: blocks are consecutive
  chunks of the flattened ``[out, in]`` matrix, the clip threshold is the z-score rule on
  |w| per block (the official scripts run z = 9; they also offer percentile rules, left
  out here), clipping is applied with the super weight still in place and the super
  weight is restored afterwards, and only the linear weights inside decoder blocks are
  quantised (embeddings, norms and the head stay as they are). Deviation: when the
  block size does not divide a matrix, the official code silently falls back to one
  block per tensor; here the last, shorter block is quantised on its own.
- ``size_ratio`` counts ``b`` bits per quantised weight, a 16-bit scale and a 16-bit
  minimum per block, 16 + 32 bits (value and flat position) per held-out weight, and
  every other parameter at its stored width, against the original model's bits.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from paperzoo.compression import Compressed, batch_tensors, check_token_ids, parameter_bits
from paperzoo.core.models import decoder_layers

ATTENTION_NAMES = ("attn", "attention")
SCALE_BITS = 16  # the per-block scale and minimum, stored in fp16 as in the paper's models
POSITION_BITS = 32  # a held-out weight's flat index


@dataclass(frozen=True)
class SuperWeight:
    """One scalar W[row, col] of a down-projection, in the nn.Linear layout [out, in]."""

    module: str  # full name of the down-projection
    layer: int  # index of its decoder block
    row: int  # output channel j*: where the super activation appears
    col: int  # input channel k*: where the input spike enters
    value: float = math.nan  # W[row, col] when found
    input_spike: float = math.nan  # max_t |X[t, col]|
    output_spike: float = math.nan  # max_t |Y[t, row]|


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear layer

    return isinstance(module, (nn.Linear, Conv1D))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in]: nn.Linear's own tensor, or a transposed view of a Conv1D's [in, out].

    Writing into the returned tensor writes into the module.
    """
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


def down_projections(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """(block index, full name, module) of every feed-forward down-projection, in block order.

    In each decoder block: the linear layers outside attention whose output is the
    residual width and whose input is not (the layer that writes the MLP back).
    """
    path, layers = decoder_layers(model)
    hidden = model.get_input_embeddings().embedding_dim
    found = []
    for i, layer in enumerate(layers):
        in_block = []
        for name, module in layer.named_modules():
            if not name or not _is_linear(module) or any(a in part for part in name.split(".") for a in ATTENTION_NAMES):
                continue
            out_features, in_features = weight_matrix(module).shape
            if out_features == hidden and in_features != hidden:
                in_block.append((i, f"{path}.{i}.{name}", module))
        if not in_block:
            raise ValueError(f"found no feed-forward down-projection in block {i} of {type(model).__name__}")
        found += in_block
    return found


@torch.no_grad()
def super_weight_candidates(model: nn.Module, input_ids, attention_mask: torch.Tensor | None = None) -> list[SuperWeight]:
    """One candidate per down-projection, from ONE forward pass: W[argmax |Y| channel, argmax |X| channel].

    `input_ids` is [batch, T], or a mapping with 'input_ids' and 'attention_mask' (a
    tokenizer's output); positions where the attention mask is 0 do not count.
    """
    if isinstance(input_ids, torch.Tensor) and input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, T], got shape {tuple(input_ids.shape)}")
    input_ids, mask = batch_tensors(input_ids)
    attention_mask = mask if attention_mask is None else attention_mask
    check_token_ids(model, input_ids)
    projections = down_projections(model)
    peaks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (max_t |X| per channel, max_t |Y| per channel)
    keep = None if attention_mask is None else attention_mask.to(torch.bool)

    def channel_peaks(a: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [C]
        a = a.detach().abs().float()
        if keep is not None:
            a = a * keep.to(a.device).unsqueeze(-1)
        return a.reshape(-1, a.shape[-1]).amax(0).cpu()

    def record(name):
        def hook(module, args, output):
            peaks[name] = (channel_peaks(args[0]), channel_peaks(output))
        return hook

    handles = [module.register_forward_hook(record(name)) for _, name, module in projections]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    candidates = []
    for layer, name, module in projections:
        x_peak, y_peak = peaks[name]
        row, col = int(y_peak.argmax()), int(x_peak.argmax())
        candidates.append(SuperWeight(name, layer, row, col, float(weight_matrix(module)[row, col]),
                                      float(x_peak[col]), float(y_peak[row])))
    return candidates


def find_super_weights(model: nn.Module, input_ids, spike_threshold: float = 50.0,
                       max_rounds: int = 10, attention_mask: torch.Tensor | None = None) -> list[SuperWeight]:
    """The paper's procedure: flag blocks whose down-projection input AND output spike above the
    threshold, zero the flagged weights, and look again until nothing new spikes.

    `input_ids` as in `super_weight_candidates` (a tensor or a tokenizer's output).
    The model is left unchanged. Each round is one forward pass.
    """
    if not spike_threshold > 0:
        raise ValueError(f"spike_threshold must be positive, got {spike_threshold!r}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds must be a positive integer, got {max_rounds!r}")
    found: list[SuperWeight] = []
    for _ in range(max_rounds):
        with ablated(model, found):
            candidates = super_weight_candidates(model, input_ids, attention_mask)
        known = {(w.module, w.row, w.col) for w in found}
        new = [c for c in candidates if c.input_spike > spike_threshold and c.output_spike > spike_threshold
               and (c.module, c.row, c.col) not in known]
        if not new:
            break
        found += new
    return found


def _check_coordinates(model: nn.Module, weights: Iterable[SuperWeight]) -> list[tuple[SuperWeight, nn.Module]]:
    out = []
    for w in weights:
        try:
            module = model.get_submodule(w.module)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no module {w.module!r}") from None
        rows, cols = weight_matrix(module).shape
        if not (0 <= w.row < rows and 0 <= w.col < cols):
            raise ValueError(f"({w.row}, {w.col}) is outside the [{rows}, {cols}] weight of {w.module}")
        out.append((w, module))
    return out


@contextlib.contextmanager
def ablated(model: nn.Module, weights: Iterable[SuperWeight], restore_super_activation: bool = False) -> Iterator[nn.Module]:
    """Zero the given weights in place for the duration of the block, then put them back.

    With ``restore_super_activation``, the down-projection's output keeps its original
    value at the position of largest |output| in each zeroed weight's row, per sequence
    (the paper's "Prune SW, +SA" experiment).
    """
    pairs = _check_coordinates(model, weights)
    saved = []
    with torch.no_grad():
        for w, module in pairs:
            W = weight_matrix(module)
            saved.append((W, w.row, w.col, W[w.row, w.col].clone()))
    handles = []
    if restore_super_activation:
        by_module: dict[int, tuple[nn.Module, list[tuple[int, int, torch.Tensor]]]] = {}
        for (w, module), (_, _, _, original) in zip(pairs, saved):
            by_module.setdefault(id(module), (module, []))[1].append((w.row, w.col, original))
        for module, entries in by_module.values():
            handles.append(module.register_forward_hook(_super_activation_restorer(entries)))
    try:
        with torch.no_grad():
            for W, row, col, _ in saved:
                W[row, col] = 0.0
        yield model
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for W, row, col, original in reversed(saved):
                W[row, col] = original


def _super_activation_restorer(entries: list[tuple[int, int, torch.Tensor]]):
    """A forward hook putting back, per sequence, the largest original output of each zeroed row."""
    rows: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for row, col, original in entries:
        rows.setdefault(row, []).append((col, original))

    def hook(module, args, output):
        X = args[0]  # [B, T, H]
        Y = output.clone()  # [B, T, D], computed with the weights zeroed
        for row, cols in rows.items():
            # linearity: the original output is the zeroed one plus each removed term w_jk * X[..., k]
            y = Y[..., row] + sum(original.to(X.dtype) * X[..., col] for col, original in cols)  # [B, T]
            y = y.reshape(-1, y.shape[-1])
            t_star = y.abs().argmax(-1)  # [B]
            b = torch.arange(y.shape[0])
            column = Y[..., row].reshape(-1, Y.shape[-2]).clone()  # [B, T]
            column[b, t_star] = y[b, t_star].to(Y.dtype)
            Y[..., row] = column.view(Y.shape[:-1])
        return Y

    return hook


def quantize_rtn(W: torch.Tensor, bits: int, block_size: int | None = None,
                 clip_z: float | None = None) -> tuple[torch.Tensor, int]:
    """Asymmetric min-max round-to-nearest over blocks of `block_size` consecutive weights.

    Returns the dequantised tensor (same shape and dtype) and how many weights the
    z-score clip changed. ``block_size=None``: one block per tensor; a last block
    shorter than `block_size` is quantised on its own.
    """
    if bits < 1:
        raise ValueError(f"bits must be at least 1, got {bits}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be positive or None (per tensor), got {block_size}")
    if clip_z is not None and clip_z <= 0:
        raise ValueError(f"clip_z must be positive or None (no clipping), got {clip_z}")
    flat = W.detach().reshape(-1).float()
    B = flat.numel() if block_size is None else min(block_size, flat.numel())
    full = flat.numel() // B * B
    pieces, clipped = [], 0
    for part in (flat[:full].view(-1, B), flat[full:].view(1, -1)):
        if part.numel() == 0:
            continue
        if clip_z is not None:
            a = part.abs()
            tau = a.mean(1, keepdim=True) + clip_z * a.std(1, keepdim=True).nan_to_num(0.0)  # [blocks, 1]
            clipped += int((a > tau).sum())
            part = torch.maximum(torch.minimum(part, tau), -tau)
        lo, hi = part.amin(1, keepdim=True), part.amax(1, keepdim=True)
        delta = (hi - lo) / (2 ** bits - 1)
        safe = torch.where(delta > 0, delta, torch.ones_like(delta))  # a constant block is exact already
        pieces.append(torch.where(delta > 0, torch.round((part - lo) / safe) * safe + lo, part).reshape(-1))
    return torch.cat(pieces).view(W.shape).to(W.dtype), clipped


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every linear layer inside the decoder blocks: what the paper quantises."""
    path, layers = decoder_layers(model)
    return [(f"{path}.{i}.{name}", module) for i, layer in enumerate(layers)
            for name, module in layer.named_modules() if name and _is_linear(module)]


@torch.no_grad()
def quantize(model: nn.Module, bits: int = 4, block_size: int | None = None, clip_z: float | None = 9.0,
             super_weights: Iterable[SuperWeight] = ()) -> Compressed:
    """Super-weight-aware round-to-nearest: clip outliers (z-score per block), round, restore the super weights.

    ``clip_z=None`` and no `super_weights` is plain round-to-nearest. Returns a
    quantised copy; the original model is untouched.
    """
    held_out = _check_coordinates(model, super_weights)
    quantized = copy.deepcopy(model).eval()
    originals = [(w, weight_matrix(m)[w.row, w.col].clone()) for w, m in held_out]
    bits_after, clipped, blocks_total, quantized_ids = 0, 0, 0, set()
    for _, module in block_linears(quantized):
        W = weight_matrix(module)
        W_hat, n_clipped = quantize_rtn(W, bits, block_size, clip_z)
        W.copy_(W_hat)
        n_blocks = 1 if block_size is None else math.ceil(W.numel() / min(block_size, W.numel()))
        bits_after += W.numel() * bits + n_blocks * 2 * SCALE_BITS
        blocks_total += n_blocks
        clipped += n_clipped
        quantized_ids.add(id(module.weight))
    for w, value in originals:
        weight_matrix(quantized.get_submodule(w.module))[w.row, w.col] = value
    bits_after += len(originals) * (SCALE_BITS + POSITION_BITS)
    bits_after += sum(p.numel() * p.element_size() * 8 for p in quantized.parameters() if id(p) not in quantized_ids)
    return Compressed(quantized, {
        "method": "round-to-nearest" + (f", z={clip_z} clipping" if clip_z is not None else "")
                  + (f", {len(originals)} super weight(s) held out (2411.07191)" if originals else ""),
        "bits": bits,
        "block_size": block_size,  # None: one block per tensor
        "clip_z": clip_z,
        "held_out": [(w.module, w.row, w.col) for w, _ in originals],
        "quantized_linears": len(quantized_ids),
        "blocks": blocks_total,
        "clipped_weights": clipped,
        "size_ratio": bits_after / parameter_bits(model),
    })
