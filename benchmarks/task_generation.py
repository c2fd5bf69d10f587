"""Is task generation ever the bottleneck? Sampling a batch of each synthetic task against one training step on it.

For every task of `paperzoo.core.tasks` at the size its experiment uses, times (median of
repeats, interleaved) drawing a batch with `task.sample` and one forward-backward-AdamW
step of the experiment's tiny model on that batch, and prints their ratio. Generation is
not the bottleneck while the ratio stays well below 1. Run alone on the machine: timings
under contention mean nothing. Records the CPU and thread count beside the figures.

Run: python benchmarks/task_generation.py [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from paperzoo.core.experiment import machine
from paperzoo.core.tasks import (GroupWordProblem, LabelMapEpisodes, MostFrequent, QueryCount, TaskModelConfig,
                                 TypedLanguage, TypedLanguageTask)
from paperzoo.experiments.phenomena.number_cookbook import NumberArithmetic
from paperzoo.phenomena.broader_icl import ContextForms

# (task, model, batch size) as the experiments use them
CASES = {
    "QueryCount m=16 n=32": (QueryCount(16, 32), TaskModelConfig(32, 1, 1), 64),
    "MostFrequent m=16 n=32": (MostFrequent(16, 32), TaskModelConfig(32, 1, 1), 64),
    "S5 words, chain of thought, L=16": (GroupWordProblem("S5", 16, "cot"), TaskModelConfig(128, 2, 4), 64),
    "label-map episodes, 64 demos, noisy": (LabelMapEpisodes(64, 4, 64, 4, 0.3), TaskModelConfig(64, 2, 2), 32),
    "typed language, |K|=384, 20/80 mix": (TypedLanguageTask(TypedLanguage(properties=384)),
                                           TaskModelConfig(64, 2, 2), 64),
    "number addition, 2-digit tokens, padded": (NumberArithmetic("add", 2, 1, 4, width=6), TaskModelConfig(64, 2, 4), 64),
    "six forms of in-context learning": (ContextForms(), TaskModelConfig(64, 2, 4), 32),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    print(f"cpu: {info.get('cpu')}, threads: {args.threads}")
    print(f"{'task':40} {'sample ms':>10} {'step ms':>9} {'ratio':>7}")
    for name, (task, config, batch) in CASES.items():
        model = config.build(task.vocab_size, task.length)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sample_s, step_s = [], []
        for r in range(args.repeats + 2):  # two warm-up rounds
            t0 = time.perf_counter()
            b = task.sample(batch, seed=r)
            t1 = time.perf_counter()
            loss = model(input_ids=b.tokens, labels=b.labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            t2 = time.perf_counter()
            if r >= 2:
                sample_s.append(t1 - t0)
                step_s.append(t2 - t1)
        s, t = statistics.median(sample_s), statistics.median(step_s)
        print(f"{name:40} {1e3 * s:10.2f} {1e3 * t:9.2f} {s / t:7.3f}")


if __name__ == "__main__":
    main()
