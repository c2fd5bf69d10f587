"""Time and peak memory of each attention rule of the efficient-attention survey, as ratios to torch's SDPA.

One causal attention call (batch 1, 2 heads of width 32, the q, k, v already projected) at
N = 256 .. 16384, on one CPU thread: torch's fused scaled-dot-product attention
(is_causal), the sliding window (8), elu+1 linear attention and Performer (64 features)
from `paperzoo.architectures.efficient_attention_survey`. Each (rule, N) runs in its own
process, so peak memory is that process's maximum resident size minus the same process's
size just before the call (inputs made, torch warmed up). Time is the best of three calls
in that process, interleaved with an SDPA call in the same process, so each ratio is
measured under the same load.

The window here is our dense reference (a masked full matrix): its time and memory are
quadratic, although the rule needs only N x w (`attention_flops`); the survey's point is
the rule's cost, which the experiment reads from `attention_flops`. Lengths where the
dense window would need more than 4 GB are skipped.
Measured here (alone on the machine, AMD EPYC, 2026-12-05), time / peak MB against SDPA's
1.00x / 0.1-0.6 MB:

| N | window 8 (dense) | linear | Performer 64 |
|---|---|---|---|
| 256 | 2.20x / 8.1 | 1.73x / 7.1 | 3.13x / 10.5 |
| 1,024 | 6.75x / 24 | 0.55x / 7.9 | 1.04x / 13.6 |
| 4,096 | 13.2x / 296 | 0.22x / 13.7 | 0.47x / 24.6 |
| 16,384 | skipped | 0.06x / 34.7 | 0.10x / 69.5 |

The kernel rules run in chunks of 64 (`_causal_kernel_attention`); their memory is the
feature maps phi(q), phi(k) of every position plus one state per head. An earlier version
materialised the state at every position (N x F x d floats): 1.23x and 2.54x SDPA's time
at 16k, with 281 and 582 MB.
Run: OMP_NUM_THREADS=1 python benchmarks/attention_rules.py
"""

import json
import resource
import subprocess
import sys
import time

H, D = 2, 32
LENGTHS = (256, 1024, 4096, 16384)
RULES = ("sdpa", "window 8", "linear", "Performer 64")


def one(rule: str, n: int) -> dict:
    import torch
    import torch.nn.functional as F

    from paperzoo.architectures.efficient_attention_survey import (linear_attention, performer_attention,
                                                                   sliding_window_attention)

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, generator=g) for _ in range(3))
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    fn = {"sdpa": sdpa, "window 8": lambda: sliding_window_attention(8)(None, q, k, v, None),
          "linear": lambda: linear_attention(None, q, k, v, None),
          "Performer 64": lambda: performer_attention(64)(None, q, k, v, None)}[rule]
    with torch.no_grad():
        sdpa()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        times, base = [], []
        for _ in range(3):
            for target, f in ((times, fn), (base, sdpa)):
                start = time.perf_counter()
                f()
                target.append(time.perf_counter() - start)
    return {"seconds": min(times), "sdpa_seconds": min(base), "peak_mb": peak_kb / 1024}


def main() -> None:
    print(f"causal attention, batch 1, {H} heads of width {D}, one thread; ratios to SDPA in the same process")
    print(f"{'N':>6} " + " ".join(f"{r + ' time':>18} {'MB':>7}" for r in RULES))
    for n in LENGTHS:
        cells = []
        for rule in RULES:
            if rule == "window 8" and H * n * n * 4 * 3 > 4e9:
                cells.append(f"{'skipped':>18} {'':>7}")
                continue
            out = subprocess.run([sys.executable, __file__, rule, str(n)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout)
            cells.append(f"{r['seconds'] / r['sdpa_seconds']:>17.2f}x {r['peak_mb']:>7.1f}")
        print(f"{n:>6} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3:
        print(json.dumps(one(sys.argv[1], int(sys.argv[2]))))
    else:
        main()
