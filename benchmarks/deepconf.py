"""Tokens DeepConf (online, DeepConf-low) generates against majority voting at equal accuracy.

Samples a pool of traces per held-out problem on the cached reasoner, reads majority
voting's accuracy and tokens as the number of traces K grows (K = 1, 2, 4, ...), runs
online DeepConf-low with the same budget, and finds the smallest K at which majority
voting is at least as accurate as DeepConf. Both are measured in the same run, on the
same problems.
Run: python benchmarks/deepconf.py [--scale small] [--problems 64] [--seed 0]
"""

import argparse
import time

from paperzoo.core.experiment import RunContext, seed_everything
from paperzoo.experiments.decoding import deepconf


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", default="small", choices=sorted(deepconf.SCALES))
    parser.add_argument("--problems", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = dict(deepconf.SCALES[args.scale])
    if args.problems:
        settings["problems"] = args.problems
    seed_everything(args.seed)
    start = time.perf_counter()
    m = deepconf.run(RunContext("deepconf", args.scale, args.seed, settings)).metrics
    low = m["online"]["low"]
    print(f"{m['model']}: {m['problems']} held-out problems, up to {settings['traces']} traces each "
          f"({time.perf_counter() - start:.0f} s)")
    for c in m["curves"]:
        if c["method"] == "majority":
            print(f"  majority voting, K={c['K']:>3}: accuracy {c['accuracy']:.3f}, {c['tokens']:7.0f} tokens/question")
    print(f"  online DeepConf-low:        accuracy {low['accuracy']:.3f}, {low['tokens']:7.0f} tokens/question "
          f"({low['traces_generated']:.1f} traces)")
    print(f"tokens against majority voting at the same budget: {low['tokens'] / m['majority_tokens']:.2f}x "
          f"({low['token_saving']:.0%} fewer)")
    if m["equal_accuracy_token_ratio"] is None:
        print("majority voting never reaches DeepConf-low's accuracy within the budget")
    else:
        print(f"tokens against majority voting at equal accuracy (K={m['equal_accuracy_majority_K']}): "
              f"{m['equal_accuracy_token_ratio']:.2f}x")


if __name__ == "__main__":
    main()
