"""Compression: make a trained model smaller or cheaper while keeping its quality.

Every method in this family has the same shape. A model and calibration data go in;
a `Compressed` (the new model and a report of what was done) comes out. The report
says what was saved, under the same keys everywhere:

- ``size_ratio``: bits needed to store the compressed weights / bits of the original;
- ``compute_ratio``: multiply-accumulates per token after / before (where it changes).

`compare` is the one evaluation every compression experiment uses: validation
perplexity of the original and the compressed model on the same blocks, in the same
run, beside what the report says was saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from paperzoo.core.evaluation import evaluate


@dataclass
class Compressed:
    """What every compression method returns: the new model and a report of what was done."""

    model: nn.Module
    report: dict = field(default_factory=dict)


def parameter_bits(model: nn.Module) -> int:
    """Bits to store the model's parameters as they are held now (dtype by dtype)."""
    return sum(p.numel() * p.element_size() * 8 for p in model.parameters())


def compare(original: nn.Module, compressed: Compressed, blocks: torch.Tensor,
            original_metrics: dict | None = None) -> dict:
    """Perplexity of the original and the compressed model on `blocks`, and what was saved.

    Pass `original_metrics` (an `evaluate` result on the same blocks) to skip
    re-evaluating the original when comparing several compressions of one model.
    """
    before = original_metrics or evaluate(original, blocks)
    after = evaluate(compressed.model, blocks)
    out = {
        "original_perplexity": before["perplexity"],
        "compressed_perplexity": after["perplexity"],
        "perplexity_ratio": after["perplexity"] / before["perplexity"],
        "original_accuracy": before["accuracy"],
        "compressed_accuracy": after["accuracy"],
    }
    out.update({k: compressed.report[k] for k in ("size_ratio", "compute_ratio") if k in compressed.report})
    return out
