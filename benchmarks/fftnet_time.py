"""Forward time of one FFTNet layer against one softmax-attention layer (and FNet) as the sequence grows.

FFTNet's claim (2502.18394) is O(N log N) mixing against attention's O(N^2). Measured
here on one CPU thread, batch 1, width 64, two heads, for N = 256 .. 16384, best of three
runs; the attention layer is the Q/K/V/output projections around torch's fused
scaled-dot-product attention over all tokens. The slopes are least-squares fits of
log(time) on log(N) over N >= 1024, where fixed per-call costs no longer dominate: about 1
for N log N, 2 for N^2. They are reported, not checked: a shared CPU makes single timings noisy.
Run: OMP_NUM_THREADS=1 python benchmarks/fftnet_time.py
"""

import numpy as np
import torch
from torch import nn

from paperzoo.architectures.fftnet_attention import FFTNetConfig, FNetMixer, SpectralAttention
from timing import best_of


class SoftmaxAttention(nn.Module):
    """Bidirectional multi-head attention: the layer FFTNet replaces."""

    def __init__(self, D: int, H: int):
        super().__init__()
        self.H, self.qkv, self.out = H, nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)
        return self.out(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))


@torch.no_grad()
def main(D=64, H=2, lengths=tuple(2**k for k in range(8, 15))):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    times = {"attention": [], "FFTNet": [], "FNet": []}
    print(f"one layer's forward, batch 1, width {D}, {H} heads, {torch.get_num_threads()} thread(s)")
    print(f"{'N':>6} {'attention ms':>13} {'FFTNet ms':>10} {'FNet ms':>8} {'attention / FFTNet':>19}")
    for N in lengths:
        x = torch.randn(1, N, D)
        layers = {"attention": SoftmaxAttention(D, H), "FFTNet": SpectralAttention(FFTNetConfig(D, N, H)),
                  "FNet": FNetMixer(D)}
        for name, layer in layers.items():
            layer(x)  # warm-up
            times[name].append(best_of(lambda: layer(x)))
        a, f, n = (times[k][-1] * 1e3 for k in ("attention", "FFTNet", "FNet"))
        print(f"{N:>6} {a:>13.2f} {f:>10.2f} {n:>8.2f} {a / f:>19.1f}")
    fit = np.array(lengths) >= 1024
    for name, t in times.items():
        slope = np.polyfit(np.log(np.array(lengths)[fit]), np.log(np.array(t)[fit]), 1)[0]
        print(f"log-log slope of time on N (N >= 1024), {name}: {slope:.2f}")


if __name__ == "__main__":
    main()
