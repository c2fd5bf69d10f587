"""Wall time of EfficientQAT's phases against round-to-nearest, and E2E-QP against full training.

On the small base-LM architecture (randomly initialised: timing does not depend on
the weights), quantise to 2 bits with group size 64 and time, in one run:
RTN (min-max, nothing trained), Block-AP (12 steps per block: 12 calibration
sequences of 256 tokens, batch 2, 2 epochs) and E2E-QP (step sizes only, 4 steps of
8 x 256 tokens). As a baseline for E2E-QP's cost per step, the same number of steps
of ordinary full-parameter training of the fp model. Each timing is the best of 2 or
3 runs, as the machine may be shared.
Run: python benchmarks/efficient_qat.py
"""

import time

import torch

from paperzoo.compression.efficient_qat import (
    BlockAPConfig,
    E2EQPConfig,
    block_ap,
    e2e_qp,
    rtn,
)
from paperzoo.core.models import BASE_MODELS
from paperzoo.core.training import TrainConfig, train


def timed(fn, repeats=2):
    """Best wall time of `repeats` runs (the machine is shared: the minimum is the least disturbed)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    torch.manual_seed(0)
    spec = BASE_MODELS["small"]
    model = spec.model.build().eval()
    T = spec.train.seq_len
    data = torch.randint(0, spec.model.vocab_size, (64, T))
    calibration = data[:12]
    block_steps = 2 * 12 // 2
    steps, batch = 4, 8

    t_rtn, _ = timed(lambda: rtn(model, 2, 64), repeats=3)  # the first call also pays for warm-up
    t_block, (quantized, _) = timed(lambda: block_ap(model, calibration, 2, 64, BlockAPConfig(epochs=2, batch_size=2)))
    t_e2e, _ = timed(lambda: e2e_qp(quantized, data, E2EQPConfig(steps=steps, batch_size=batch, seq_len=T)))
    full = spec.model.build()
    t_full, _ = timed(lambda: train(full, data, TrainConfig(steps=steps, batch_size=batch, seq_len=T, lr=1e-4),
                                    desc="full-parameter training (baseline)"))
    L = spec.model.num_layers
    print(f"{L}-layer d={spec.model.hidden_size} model, 2-bit, group size 64")
    print(f"RTN: {t_rtn:.2f} s;  Block-AP: {t_block:.1f} s ({t_block / L:.2f} s per block, {block_steps} steps each);  "
          f"E2E-QP: {t_e2e:.1f} s for {steps} steps")
    print(f"Block-AP / RTN: {t_block / t_rtn:.0f}x;  E2E-QP per step / Block-AP per block step: "
          f"{(t_e2e / steps) / (t_block / (L * block_steps)):.1f}x")
    print(f"E2E-QP step / full-parameter training step: {t_e2e / t_full:.2f}x")


if __name__ == "__main__":
    main()
