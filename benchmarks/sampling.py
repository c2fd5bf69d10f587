"""Sampling speed: `core.sampling.sample` (rows leave the batch at EOS) against transformers' `generate`.

Both sample the same prompts from the cached small reasoner at temperature 1 with the
same budget, interleaved `--repeats` times, on this machine's threads; the figure is
the ratio of their median wall times, measured in one run (a ratio, so it means the
same on a faster or slower CPU). Also printed: generated tokens per second of each.
`generate` keeps every row until the longest one ends, so the ratio grows with the
spread of completion lengths (reasoning traces: 20 to 700 tokens).
Run: python benchmarks/sampling.py [--prompts 64] [--samples 4] [--repeats 3]
"""

import argparse
import platform
import statistics
import time

import torch

from paperzoo.core.reasoner import problems, reasoner
from paperzoo.core.reasoner_card import default_budget
from paperzoo.core.sampling import encode_left_padded, sample


def main(n_prompts: int, samples: int, repeats: int) -> None:
    r = reasoner("small")
    qs = problems(n_prompts, "test", seed=123)
    prompts = [q.prompt for q in qs for _ in range(samples)]
    budget = default_budget(r.model, r.tokenizer, qs)
    enc = encode_left_padded(r.tokenizer, prompts)
    times = {"paperzoo sample": [], "transformers generate": []}
    tokens = {}
    for k in range(repeats):
        t = time.perf_counter()
        out = sample(r.model, r.tokenizer, prompts, temperature=1.0, max_new_tokens=budget, seed=k,
                     batch_size=len(prompts))
        times["paperzoo sample"].append(time.perf_counter() - t)
        tokens["paperzoo sample"] = sum(s.num_tokens for s in out)
        torch.manual_seed(k)
        t = time.perf_counter()
        g = r.model.generate(**enc, max_new_tokens=budget, do_sample=True, temperature=1.0, top_k=0,
                             eos_token_id=r.tokenizer.eos_token_id, pad_token_id=r.tokenizer.eos_token_id)
        times["transformers generate"].append(time.perf_counter() - t)
        new = g[:, enc["input_ids"].shape[1]:].tolist()
        tokens["transformers generate"] = sum((row.index(0) + 1) if 0 in row else len(row) for row in new)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; {len(prompts)} "
          f"completions, budget {budget} tokens")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name}: median {m:.1f} s over {repeats}, {tokens[name] / m:.0f} generated tokens/s")
    ratio = statistics.median(times["transformers generate"]) / statistics.median(times["paperzoo sample"])
    print(f"speed-up of sample over generate: {ratio:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    main(a.prompts, a.samples, a.repeats)
