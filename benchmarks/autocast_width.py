"""Where bf16 autocast pays on this CPU: one training step of a task model, bf16 over fp32 time, by width.

`paperzoo.core.training.autocast_pays` trains models narrower than `AUTOCAST_MIN_WIDTH` in
fp32 on a CPU; this measures why. Both precisions run interleaved, one thread, on the same
model and batch, so load on the machine affects both alike; the ratio is the median over steps.
Run: python benchmarks/autocast_width.py
"""

import statistics
import time

import torch

from paperzoo.core.tasks import TaskModelConfig
from paperzoo.core.training import AUTOCAST_MIN_WIDTH, bf16_autocast_available

SHAPES = [(32, 1, 34, 64), (64, 2, 40, 64), (64, 2, 97, 32), (128, 2, 64, 64), (256, 4, 128, 32)]  # width, layers, T, batch


def step_seconds(width: int, layers: int, length: int, batch: int, repeats: int = 12) -> dict[bool, float]:
    model = TaskModelConfig(width, layers, 4).build(128, length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 128, (batch, length))
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(repeats + 2):  # two warm-up rounds
        for bf16 in (False, True):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if r >= 2:
                times[bf16].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    torch.set_num_threads(1)
    if not bf16_autocast_available(torch.device("cpu")):
        print("this CPU has no native bf16: autocast is never used here")
        return
    print(f"threshold in core.training: width >= {AUTOCAST_MIN_WIDTH}")
    for width, layers, length, batch in SHAPES:
        t = step_seconds(width, layers, length, batch)
        print(f"width {width:3d}, {layers} layers, T {length:3d}, batch {batch}: fp32 {1e3 * t[False]:7.1f} ms, "
              f"bf16 {1e3 * t[True]:7.1f} ms, bf16/fp32 {t[True] / t[False]:.2f}")


if __name__ == "__main__":
    main()
