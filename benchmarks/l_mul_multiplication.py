"""Throughput of the emulated L-Mul matmul against torch's bf16 matmul, measured in the same run.

The point of paperzoo's L-Mul is *accuracy*: a bit-exact emulation of what an L-Mul
multiplier would compute, so that its error can be measured. It is slow by
construction -- every scalar product is materialised as integers (add, clamp, shift,
sign) before an fp32 sum, where a BLAS matmul fuses multiply-adds in registers. The
energy and speed the paper claims need L-Mul hardware; nothing here measures them.
The ratio below only says what the emulation costs when it is used in experiments.
Run: python benchmarks/l_mul_multiplication.py
"""

import torch

from paperzoo.compression.l_mul_multiplication import l_mul_matmul
from timing import best_of


def main():
    torch.manual_seed(0)
    # the Q K^T of one batch of the base LM: 16 sequences x 3 heads, 256 tokens, head size 64
    batch, t, d = 48, 256, 64
    q, k = torch.randn(batch, t, d), torch.randn(batch, d, t)
    products = batch * t * t * d
    q16, k16 = q.bfloat16(), k.bfloat16()
    t_bf16 = best_of(lambda: torch.matmul(q16, k16), repeats=5)
    t_fp32 = best_of(lambda: torch.matmul(q, k), repeats=5)
    print(f"[{batch}, {t}, {d}] @ [{batch}, {d}, {t}]: {products / 1e6:.0f}M scalar products, "
          f"{torch.get_num_threads()} threads")
    print(f"torch bf16 matmul: {t_bf16 * 1e3:8.1f} ms   ({products / t_bf16 / 1e9:6.2f} G products/s)")
    print(f"torch fp32 matmul: {t_fp32 * 1e3:8.1f} ms   ({products / t_fp32 / 1e9:6.2f} G products/s)")
    for m in (3, 7):
        t_lmul = best_of(lambda m=m: l_mul_matmul(q, k, m))
        print(f"L-Mul matmul m={m}:  {t_lmul * 1e3:8.1f} ms   ({products / t_lmul / 1e9:6.2f} G products/s)   "
              f"throughput ratio L-Mul / bf16 = {t_bf16 / t_lmul:.4f} ({t_lmul / t_bf16:.0f}x slower)")


if __name__ == "__main__":
    main()
