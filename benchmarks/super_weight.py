"""Super-weight detection: one hooked forward pass against a per-weight ablation scan, seconds per layer.

The naive way to find the weight a model cannot lose is to zero each down-projection
weight in turn, run the calibration input and keep the loss increase: one forward
pass per weight. The paper reads the input and output spikes of every
down-projection from ONE pass (`super_weight_candidates`). The scan is far too slow
to run in full, so it runs on a small random sample of weights in a few layers, and
its time per weight is multiplied by the number of weights in a down-projection to
give seconds per layer. The one-pass time is divided by the number of layers.
Run: python benchmarks/super_weight.py
"""

import random
import time

import torch

from paperzoo.compression.super_weight import (
    SuperWeight,
    ablated,
    down_projections,
    super_weight_candidates,
    weight_matrix,
)
from paperzoo.core.models import BASE_MODELS
from timing import best_of

SAMPLED_LAYERS = 3
WEIGHTS_PER_LAYER = 8


@torch.no_grad()
def ablation_scan_seconds_per_weight(model, ids, projections, rng) -> float:
    """Mean seconds to score one weight by zeroing it and re-running the input (sampled weights)."""
    base = model(input_ids=ids, labels=ids).loss.item()
    timings = []
    for layer, name, module in rng.sample(projections, SAMPLED_LAYERS):
        rows, cols = weight_matrix(module).shape
        for _ in range(WEIGHTS_PER_LAYER):
            w = SuperWeight(name, layer, rng.randrange(rows), rng.randrange(cols))
            t = time.perf_counter()
            with ablated(model, [w]):
                _ = model(input_ids=ids, labels=ids).loss.item() - base  # the weight's importance
            timings.append(time.perf_counter() - t)
    return sum(timings) / len(timings)


def main():
    torch.manual_seed(0)
    spec = BASE_MODELS["small"]
    model = spec.model.build().eval()
    ids = torch.randint(0, spec.model.vocab_size, (4, spec.train.seq_len))
    projections = down_projections(model)
    L = len(projections)
    weights_per_layer = weight_matrix(projections[0][2]).numel()

    one_pass = best_of(lambda: super_weight_candidates(model, ids)) / L
    per_weight = ablation_scan_seconds_per_weight(model, ids, projections, random.Random(0))
    scan = per_weight * weights_per_layer
    print(f"{L}-layer model, down-projections of {weights_per_layer} weights, input {tuple(ids.shape)}")
    print(f"one hooked pass: {one_pass * 1e3:.1f} ms per layer")
    print(f"ablation scan: {per_weight * 1e3:.1f} ms per weight (mean of {SAMPLED_LAYERS * WEIGHTS_PER_LAYER} sampled)"
          f" x {weights_per_layer} weights = {scan:.0f} s per layer (extrapolated)")
    print(f"speed-up: {scan / one_pass:.3g}x (about weights per layer x layers = {weights_per_layer * L:.3g}x)")


if __name__ == "__main__":
    main()
