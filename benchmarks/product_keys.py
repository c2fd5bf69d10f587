"""Product-key top-k (2412.09764) against brute force over every slot: time as a ratio, and equal results.

A memory layer with N = n^2 value slots scores a query against two sets of n half-keys
and sums only the top k of each half (k^2 candidates), instead of scoring all N full
keys. Measured here on one CPU thread, a batch of 256 queries, 4 heads, key width 128,
k = 32, for n = 64 .. 1024 (N = 4k .. 1M slots), best of three runs; the brute force
forms every full key [K1_i; K2_j] score as s1_i + s2_j (already the cheap form; a
materialised N x d key matrix would cost more) and takes its top k. Both must return the
top-k scores; their slots differ only where two slots tie at the k-th score (counted).
Reported, not checked: a shared CPU makes single timings noisy.
Run: OMP_NUM_THREADS=1 python benchmarks/product_keys.py
"""

import torch

from paperzoo.architectures.memory_layers import product_key_topk
from timing import best_of


def brute_force_topk(q, K1, K2, k):
    q1, q2 = q.chunk(2, dim=-1)
    s1 = torch.einsum("bhd,hnd->bhn", q1, K1)
    s2 = torch.einsum("bhd,hnd->bhn", q2, K2)
    return (s1[..., :, None] + s2[..., None, :]).flatten(-2).topk(k, dim=-1)


@torch.no_grad()
def main(batch=256, heads=4, k_dim=128, k=32, sizes=(64, 128, 256, 512, 1024)):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"top-{k} of n^2 slots, {batch} queries x {heads} heads, key width {k_dim}, {torch.get_num_threads()} thread(s)")
    print(f"{'n':>5} {'slots':>9} {'product ms':>11} {'brute ms':>9} {'brute / product':>16} {'same scores':>12} "
          f"{'tied rows':>10}")
    for n in sizes:
        q = torch.randn(batch, heads, k_dim)
        K1, K2 = torch.randn(heads, n, k_dim // 2), torch.randn(heads, n, k_dim // 2)
        fast = product_key_topk(q, K1, K2, k)
        slow = brute_force_topk(q, K1, K2, k)
        same = torch.equal(fast[0], slow.values)
        tied = int((fast[1].sort(-1).values != slow.indices.sort(-1).values).any(-1).sum())
        p = best_of(lambda: product_key_topk(q, K1, K2, k))
        b = best_of(lambda: brute_force_topk(q, K1, K2, k))
        print(f"{n:>5} {n * n:>9} {p * 1e3:>11.2f} {b * 1e3:>9.2f} {b / p:>16.1f} {str(same):>12} {tied:>10}")


if __name__ == "__main__":
    main()
