"""Compression: make a trained model smaller or cheaper while keeping its quality.

Every method in this family has the same shape. A model and calibration data go in;
a `Compressed` (the new model and a report of what was done) comes out. The report
says what was saved, under the same keys everywhere:

- ``size_ratio``: bits needed to store the compressed weights / bits of the original;
- ``compute_ratio``: multiply-accumulates per token after / before (where it changes).

Calibration data is a batch of token ids: a tensor ``[batch, T]`` or any mapping with
``input_ids`` (and optionally ``attention_mask``) -- a dict, or a tokenizer's own
``BatchEncoding`` -- read through `batch_tensors`.

`compare` is the one evaluation every compression experiment uses: validation
perplexity of the original and the compressed model on the same blocks, in the same
run, beside what the report says was saved. With ``per_sequence=True`` it also returns
each block's mean loss, the items a margin (`paperzoo.core.margins`) resamples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Compressed:
    """What every compression method returns: the new model and a report of what was done."""

    model: nn.Module
    report: dict = field(default_factory=dict)


def parameter_bits(model: nn.Module) -> int:
    """Bits to store the model's parameters as they are held now (dtype by dtype)."""
    return sum(p.numel() * p.element_size() * 8 for p in model.parameters())


def batch_tensors(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids [batch, T], attention_mask or None) from a token-id tensor or any mapping with 'input_ids'.

    A mapping is a dict or a tokenizer's ``BatchEncoding`` (which is not a dict).
    """
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"a batch mapping needs 'input_ids'; this one has {sorted(map(str, batch))}")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    elif isinstance(batch, torch.Tensor):
        ids, mask = batch, None
    else:
        raise ValueError("a batch must be a token-id tensor [batch, T] or a mapping with 'input_ids' "
                         f"(such as a tokenizer's output with return_tensors='pt'), got {type(batch).__name__}")
    ids = torch.as_tensor(ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.is_floating_point():
        raise ValueError(f"input_ids must be integer token ids of shape [batch, T], got {ids.dtype} {tuple(ids.shape)}")
    if mask is not None:
        mask = torch.as_tensor(mask)
        mask = mask[None] if mask.ndim == 1 else mask
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
    return ids, mask


def check_token_ids(model: nn.Module, input_ids: torch.Tensor) -> None:
    """Refuse token ids the model has no embedding row for (a tokenizer bigger than the model's vocabulary)."""
    rows = model.get_input_embeddings().num_embeddings
    if input_ids.numel() and (int(input_ids.max()) >= rows or int(input_ids.min()) < 0):
        bad = int(input_ids.max()) if int(input_ids.max()) >= rows else int(input_ids.min())
        raise ValueError(f"input_ids hold token id {bad}, but {type(model).__name__} has embedding rows 0 .. "
                         f"{rows - 1} only: the tokenizer's vocabulary is larger than the model's")


@torch.no_grad()
def measure(model: nn.Module, blocks: torch.Tensor, batch_size: int = 16) -> dict:
    """Loss, perplexity and next-token accuracy on equal-length `blocks` [N, T], plus each block's mean loss.

    Returns ``loss`` (nats/token), ``perplexity`` = exp(loss), ``accuracy`` and
    ``sequence_loss``: a [N] tensor whose mean is ``loss`` (every block predicts T - 1 tokens).
    """
    check_token_ids(model, blocks)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses, correct = [], 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i : i + batch_size].to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        target = x[:, 1:]
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [B, T-1]
        losses.append(nll.mean(1).cpu().double())
        correct += (logits.argmax(-1) == target).sum().item()
    model.train(was_training)
    sequence_loss = torch.cat(losses)
    loss = float(sequence_loss.mean())
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / (blocks.shape[0] * (blocks.shape[1] - 1)),
            "sequence_loss": sequence_loss}


def item_list(values) -> list[float]:
    """Per-item values for a record: a plain list, 5 significant digits."""
    return [float(f"{float(v):.5g}") for v in torch.as_tensor(values).flatten().tolist()]


def compare(original: nn.Module, compressed: Compressed, blocks: torch.Tensor,
            original_metrics: dict | None = None, per_sequence: bool = False) -> dict:
    """Perplexity of the original and the compressed model on `blocks`, and what was saved.

    Pass `original_metrics` (a `measure` or `paperzoo.core.evaluation.evaluate` result on
    the same blocks) to skip re-evaluating the original when comparing several
    compressions of one model. ``per_sequence=True`` adds each block's mean loss for both
    models (``original_sequence_loss``, ``compressed_sequence_loss``), paired by block.
    """
    before = original_metrics
    if before is None or (per_sequence and "sequence_loss" not in before):
        before = measure(original, blocks)
    after = measure(compressed.model, blocks)
    out = {
        "original_perplexity": before["perplexity"],
        "compressed_perplexity": after["perplexity"],
        "perplexity_ratio": after["perplexity"] / before["perplexity"],
        "original_accuracy": before["accuracy"],
        "compressed_accuracy": after["accuracy"],
    }
    if per_sequence:
        out["original_sequence_loss"] = item_list(before["sequence_loss"])
        out["compressed_sequence_loss"] = item_list(after["sequence_loss"])
    out.update({k: compressed.report[k] for k in ("size_ratio", "compute_ratio") if k in compressed.report})
    return out
