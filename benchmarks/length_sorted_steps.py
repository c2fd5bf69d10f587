"""Training steps on sampled reasoning traces: one padded pass against length-sorted micro-batches.

GenARM's `train_arm` and BoN-aware fine-tuning's `weighted_finetune_step` accumulate a
batch's gradient over forward passes of a few samples sorted by length, so a pass pads
only to its own longest sequence. This times, on the cached reasoner, one ARM step (32
pairs, the official batch; LoRA adapter) and one weighted fine-tuning step (64 samples:
8 problems x 8, as BoN-aware's `small`), each both ways, interleaved, best of three, as
ratios. The samples mimic what the v3 reasoner draws at temperature 1: a trace of the
problem's own length, or, in 30% of samples (the share seen on the two hardest tiers), a
completion that runs to the 640-token cap.

Run: python benchmarks/length_sorted_steps.py [--scale small] [--threads 1]
"""

import argparse
import random

import torch

from timing import best_of
from paperzoo.core.reasoner import ladder_problems, reasoner, trace
from paperzoo.decoding.bon_aware_finetuning import weighted_finetune_step
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
    print(f"ARM step, one padded pass: {times[32]:.2f} s; micro-batches of 8 sorted by length: {times[8]:.2f} s; "
          f"ratio {times[32] / times[8]:.2f}x ({args.threads} thread(s))")

    samples = pairs_like_the_reasoners(64, seed=1)
    enc = lambda text: r.tokenizer(text, add_special_tokens=False)["input_ids"]
    prompts = [enc(x) for x, _, _ in samples]
    completions = [enc(w if i % 2 else l) for i, (_, w, l) in enumerate(samples)]
    weights = torch.linspace(-1, 1, 64)
    opt = torch.optim.SGD(r.model.parameters(), lr=0.0)  # the step's cost, not its effect
    times = {}
    for _ in range(3):
        for micro in (64, 16):
            t = best_of(lambda: weighted_finetune_step(r.model, opt, prompts, completions, weights,
                                                       r.tokenizer.eos_token_id, micro_batch=micro), repeats=1)
            times[micro] = min(times.get(micro, float("inf")), t)
    print(f"weighted fine-tuning step (64 samples), one padded pass: {times[64]:.2f} s; micro-batches of 16: "
          f"{times[16]:.2f} s; ratio {times[64] / times[16]:.2f}x")

if __name__ == "__main__":
    main()
