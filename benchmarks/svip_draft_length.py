"""Tokens per second of speculative decoding (fixed draft lengths, SVIP, transformers' assisted generation)
against plain greedy decoding of the target, as ratios measured in the same run.

Target: the cached reasoner, draft: the cached draft reasoner (same tokenizer), on
held-out problems, greedy, batch 1, one intra-op thread. Every method's output is
checked to be the target's greedy output. Each prompt is timed ``--repeats`` times per
method, methods in a rotating order, and the minimum kept.
Run: python benchmarks/svip_draft_length.py [--scale small] [--prompts 16] [--repeats 3]
"""

import argparse

import torch

from paperzoo.core.reasoner import draft_reasoner, problems, reasoner
from paperzoo.decoding import greedy_decode
from paperzoo.decoding.svip_draft_length import (
    SVIP,
    FixedLength,
    speculative_decode,
    transformers_assisted_decode,
)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", default="small")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(1)
    t, d = reasoner(args.scale), draft_reasoner(args.scale)
    tok, M = t.tokenizer, args.max_new_tokens
    methods = {
        "greedy (transformers generate)": lambda p: greedy_decode(t.model, tok, p, M),
        "greedy (own loop, gamma = 0)": lambda p: speculative_decode(t.model, d.model, tok, p, FixedLength(0), M),
        **{f"fixed gamma = {g}": (lambda p, g=g: speculative_decode(t.model, d.model, tok, p, FixedLength(g), M))
           for g in (2, 4, 5, 8)},
        "SVIP (c = 0.15, tau = 0.3)": lambda p: speculative_decode(t.model, d.model, tok, p, SVIP(), M),
        "transformers assisted generation": lambda p: transformers_assisted_decode(t.model, d.model, tok, p, M),
    }
    names = list(methods)
    prompts = [q.prompt for q in problems(args.prompts, "test", seed=1)]
    for fn in methods.values():
        fn(prompts[0])
    best = {n: [float("inf")] * len(prompts) for n in names}
    tokens = {n: [0] * len(prompts) for n in names}
    passes = {n: [0] * len(prompts) for n in names}
    for rep in range(args.repeats):
        for i, p in enumerate(prompts):
            shift = (i + rep) % len(names)
            for n in names[shift:] + names[:shift]:
                g = methods[n](p)
                best[n][i] = min(best[n][i], g.wall_seconds)
                tokens[n][i], passes[n][i] = g.tokens, g.forward_passes
    base = names[0]
    base_tps = sum(map(len, tokens[base])) / sum(best[base])
    print(f"{t.name} / {d.name}: {len(prompts)} prompts, best of {args.repeats}, one thread")
    print(f"{'method':36s} {'tokens/s':>9s} {'ratio':>7s} {'target passes/token':>20s}  same output")
    for n in names:
        count = sum(map(len, tokens[n]))
        tps = count / sum(best[n])
        same = all(a == b for a, b in zip(tokens[n], tokens[base]))
        print(f"{n:36s} {tps:9.0f} {tps / base_tps:6.2f}x {sum(passes[n]) / count:20.2f}  {same}")


if __name__ == "__main__":
    main()
