"""Hierarchy-PDF's cost: next-digit distributions read and wall time, pruned against the full tree, in one run.

On the icl-dynamical-systems experiment's `small` model (seed 0; trained once and cached),
for 128 test chains at context lengths 8 and 63, reads the density three ways: the full tree
(every bin refined to the last digit), pruned below a mass of 0.01 (paperzoo's option), and
the official code's locality rule (the observed value's path and its first-digit neighbours).
Prints, per way, the distributions read and the wall time as ratios to the full tree, and the
Bhattacharyya distance to the full tree's density (what the saving costs). Timings are
interleaved over repeats; run it alone on the machine. Records the CPU and thread count.

Run: python benchmarks/hierarchy_pdf.py [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from paperzoo.core.experiment import machine
from paperzoo.core.tasks import TaskModelConfig, TaskTraining, train_on_task
from paperzoo.experiments.phenomena.icl_dynamical_systems import PRUNE_BELOW, SCALES, DigitMarkovChains
from paperzoo.phenomena.icl_dynamical_systems import bhattacharyya_distance, hierarchy_pdf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s, seed = SCALES["small"], 0
    codes = tuple(sorted(torch.randperm(10 ** s["digits"], generator=torch.Generator().manual_seed(seed))[:s["states"]]
                         .tolist()))  # as the experiment draws them
    task = DigitMarkovChains(codes, s["steps"], s["digits"], s["concentration"])
    model, _ = train_on_task(task, TaskModelConfig(s["hidden_size"], s["num_layers"], s["num_heads"]),
                             TaskTraining(s["train_steps"], s["batch_size"], lr=s["lr"]), seed=seed, eval_size=64)
    model.eval()
    fmt = task.fmt
    _, x = task.chains(128, 10**6 + seed)
    tokens = fmt.encode(torch.tensor(codes)[x])
    info = machine()
    print(f"cpu: {info.get('cpu')}, threads: {args.threads}, chains: {len(x)}, digits per value: {fmt.digits}")
    print(f"{'context':>7} {'way':>10} {'reads':>7} {'reads/full':>10} {'time/full':>9} {'B-dist to full':>15}")
    for n in (8, 63):
        prefix = tokens[:, : 1 + n * (fmt.digits + 1)]
        observed = torch.tensor(codes)[x[:, n]] if n < x.shape[1] else None
        ways = {"full": {}, "pruned": {"min_mass": PRUNE_BELOW}, "locality": {"observed": observed}}
        seconds = {w: [] for w in ways}
        results = {}
        for _ in range(args.repeats):
            for way, kw in ways.items():
                t0 = time.perf_counter()
                results[way] = hierarchy_pdf(model, prefix, fmt, **kw)
                seconds[way].append(time.perf_counter() - t0)
        full_time = statistics.median(seconds["full"])
        for way in ways:
            r = results[way]
            distance = bhattacharyya_distance(results["full"].probs, r.probs).mean().item()
            print(f"{n:>7} {way:>10} {r.queries:>7} {r.queries / results['full'].queries:>10.2f} "
                  f"{statistics.median(seconds[way]) / full_time:>9.2f} {distance:>15.2e}")


if __name__ == "__main__":
    main()
