"""Mixture-of-Recursions (2507.10524) training and inference tokens/s against the vanilla model of the same config.

MoR shares one middle block across recursions and, with expert-choice routing, sends a
shrinking share of the tokens through each further recursion (capacities 1, 2/3, 1/3 ...),
so it should process more tokens per second than the vanilla stack of the same depth. The
config is the experiment's `large` shape (width 128, 14 layers, 4 recursions, 4 heads,
vocabulary 4096), rows of 128 tokens, batch 16, on one CPU thread; a training step is
forward, backward and an AdamW update; inference is one forward pass. Best of three timed
runs after a warm-up, reported as ratios to vanilla measured in the same run: a shared CPU
makes single timings noisy. The FLOPs-per-token ratio from the torch counter is printed
beside it.
Run: OMP_NUM_THREADS=1 python benchmarks/recursion_throughput.py
"""

import torch

from paperzoo.core.blocks import flops_per_token
from paperzoo.experiments.architectures.mixture_of_recursions import SCALES, build
from timing import best_of


def main(scale="large", batch=16):
    torch.set_num_threads(1)
    s = dict(SCALES[scale])
    x = torch.randint(0, s["vocab"], (batch, s["seq_len"]))
    tokens = x.numel()
    rows = {}
    for name in ("vanilla", "fixed", "expert", "token"):
        torch.manual_seed(0)
        model = build(name, s)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            model.train()
            opt.zero_grad()
            model(input_ids=x, labels=x).loss.backward()
            opt.step()

        def infer():
            model.eval()
            with torch.no_grad():
                model(input_ids=x)

        step(), infer()  # warm-up
        rows[name] = (tokens / best_of(step), tokens / best_of(infer), flops_per_token(model, s["seq_len"], s["vocab"]))
    base = rows["vanilla"]
    print(f"{scale} shape, batch {batch} x {s['seq_len']} tokens, {torch.get_num_threads()} thread(s)")
    print(f"{'model':>8} {'train tok/s':>12} {'x vanilla':>10} {'infer tok/s':>12} {'x vanilla':>10} {'FLOPs/token x':>14}")
    for name, (train, infer, flops) in rows.items():
        print(f"{name:>8} {train:>12.0f} {train / base[0]:>10.2f} {infer:>12.0f} {infer / base[1]:>10.2f} "
              f"{flops / base[2]:>14.2f}")


if __name__ == "__main__":
    main()
