"""GenARM's reward-model training: one padded pass per batch against length-sorted micro-batches.

`train_arm` accumulates each batch's gradient over forward passes of at most `micro_batch`
pairs, sorted by length, so a pass pads only to its own longest sequence. This times one
training step (a batch of 32 pairs, the official batch) on the cached reasoner with a LoRA
adapter, both ways, interleaved, best of three, as a ratio. The pairs mimic what the v3
reasoner samples at temperature 1: a right trace of the problem's own length, and a wrong
completion that runs to the 640-token cap in 30% of pairs (the share seen on the two
hardest tiers) and is a short wrong trace otherwise.

Run: python benchmarks/genarm_arm_training.py [--scale small] [--threads 1]
"""

import argparse
import random

import torch

from timing import best_of
from paperzoo.core.reasoner import ladder_problems, reasoner, trace
from paperzoo.decoding.genarm_reward_decoding import lora_arm, train_arm


def pairs_like_the_reasoners(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    qs = ladder_problems(n, "train", seed=seed)
    out = []
    for q in qs:
        right = trace(q, "terse", rng)
        wrong = ("1" * 640) if rng.random() < 0.3 else right.replace(str(q.answer), str(q.answer + 1))
        out.append((q.prompt, right, wrong))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="small")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    r = reasoner(args.scale)
    pairs = pairs_like_the_reasoners(32)
    lengths = sorted(len(r.tokenizer(x + max(w, l, key=len))["input_ids"]) for x, w, l in pairs)
    print(f"32 pairs, longest side per pair: median {lengths[16]} tokens, max {lengths[-1]}")
    arm = lora_arm(r.model)
    times = {}
    for _ in range(3):  # interleaved, so both see the same machine
        for micro in (32, 8):
            t = best_of(lambda: train_arm(arm, r.tokenizer, pairs, batch_size=32, micro_batch=micro), repeats=1)
            times[micro] = min(times.get(micro, float("inf")), t)
    print(f"one step, one padded pass: {times[32]:.2f} s; micro-batches of 8 sorted by length: {times[8]:.2f} s; "
          f"ratio {times[32] / times[8]:.2f}x ({args.threads} thread(s))")


if __name__ == "__main__":
    main()
