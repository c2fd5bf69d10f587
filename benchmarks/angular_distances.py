"""All (l, n) angular distances from one forward pass, against one pass per block size.

The naive scheme (as in scripts that loop over n) runs the model once per block size
n = 1 .. L-1 and keeps only the pairs (l, l + n) each time. paperzoo keeps every
layer's last-token state from a single pass and takes one Gram matrix.
Run: python benchmarks/angular_distances.py
"""

import time

import torch

from paperzoo.compression.layer_pruning import angular_distance, angular_distances, residual_stream_at_last_token
from paperzoo.core.models import BASE_MODELS


def one_pass_per_block_size(model, batches):
    L = model.config.num_hidden_layers
    D = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    for n in range(1, L + 1):
        total, count = torch.zeros(L - n + 1, dtype=torch.float64), 0
        for ids in batches:
            x = residual_stream_at_last_token(model, ids)
            total += torch.stack([angular_distance(x[l], x[l + n]).sum() for l in range(L - n + 1)])
            count += ids.shape[0]
        for l in range(L - n + 1):
            D[l, l + n] = D[l + n, l] = total[l] / count
    return D


def best_of(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    torch.manual_seed(0)
    spec = BASE_MODELS["small"]
    model = spec.model.build().eval()
    batches = list(torch.randint(0, spec.model.vocab_size, (64, spec.train.seq_len)).split(8))
    t_one, D_one = best_of(lambda: angular_distances(model, batches))
    t_naive, D_naive = best_of(lambda: one_pass_per_block_size(model, batches), repeats=1)
    assert torch.allclose(D_one, D_naive, atol=1e-6), "both schemes must give the same distances"
    L = spec.model.num_layers
    print(f"{L}-layer model, 64 calibration sequences of {spec.train.seq_len} tokens")
    print(f"one pass for all (l, n): {t_one:.2f} s;  one pass per block size: {t_naive:.2f} s")
    print(f"speed-up: {t_naive / t_one:.1f}x (ideal {L}x: the naive scheme runs {L} passes)")


if __name__ == "__main__":
    main()
