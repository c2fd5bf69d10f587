"""`paperzoo sweep` (Ray, one thread per task) against the same runs one after another, as a ratio.

Both run the same (paper, seed) pairs at the same scale into fresh results folders, with
the substrate already cached (it is built before either is timed); the serial loop runs
each pair in this process on one thread, as a sweep task does. The figure is serial wall
time over sweep wall time, measured in one run on this machine's cores (issue 9 aims at
>= 1.7x on 2 cores). Run alone: anything else on the cores makes the ratio meaningless.
Run: python benchmarks/sweep.py [--papers lottery-ticket,l-mul-multiplication] [--seeds 0,1] [--scale smoke]

Measured (AMD EPYC, 2 cores, alone, 2026-12-05): --papers l-mul-multiplication,super-weight
--seeds 0,1 --scale small: serial 418.6 s, sweep 218.1 s, 1.92x. At smoke scale Ray's
start-up dominates; measure at small.
"""

import argparse
import os
import tempfile
import time

import torch

from paperzoo.core import substrate
from paperzoo.core.experiment import plan, run_experiment
from paperzoo.core.sweep import sweep


def main(papers: list[str], seeds: list[int], scale: str) -> None:
    substrate.build([n for p in papers for n in getattr(plan(p, scale).module, "SUBSTRATE", ())], scale)
    cpus = os.cpu_count()
    with tempfile.TemporaryDirectory() as serial_out, tempfile.TemporaryDirectory() as sweep_out:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        t = time.perf_counter()
        for p in papers:
            for s in seeds:
                run_experiment(p, scale, s, out=serial_out)
        serial = time.perf_counter() - t
        torch.set_num_threads(before)
        t = time.perf_counter()
        summary = sweep(papers, scale, seeds, out=sweep_out, num_cpus=cpus, progress=False)
        parallel = time.perf_counter() - t
    assert summary.ran == len(papers) * len(seeds) and not summary.failed, summary
    print(f"{len(papers)} papers x {len(seeds)} seeds at {scale}, {cpus} cores")
    print(f"serial, one thread: {serial:.1f} s; sweep on Ray: {parallel:.1f} s (Ray start-up included)")
    print(f"speed-up of the sweep: {serial / parallel:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--papers", default="lottery-ticket,l-mul-multiplication")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--scale", default="smoke")
    a = parser.parse_args()
    main(a.papers.split(","), [int(x) for x in a.seeds.split(",")], a.scale)
