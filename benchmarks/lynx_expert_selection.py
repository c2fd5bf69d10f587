"""Lynx decode latency per token against full top-k routing (and static top-1), at several batch sizes.

Uses the experiment's tiny trained Mixtral-style MoE (8 experts, top-2; trained and
cached on first use, a few minutes), one CPU thread, KV-cache decoding after a
32-token prefill of validation text. All routings are timed in the same run,
interleaved, for both of transformers' CPU experts implementations.
Run: python benchmarks/lynx_expert_selection.py
"""

from paperzoo.core.models import base_model
from paperzoo.experiments.compression.lynx_expert_selection import (
    POLICIES,
    SCALES,
    decode_step_latency,
    install,
    one_thread,
    tiny_moe,
)


def main():
    s = dict(SCALES["small"], latency_rounds=7)
    lm = base_model("small")
    with one_thread():
        model, _ = tiny_moe(lm, s, seed=0)
        rows = lm.blocks("validation", s["seq_len"])
        default = model.config._experts_implementation
        print(f"tiny MoE: {s['num_layers']} layers, {s['num_experts']} experts, top-{s['top_k']}; "
              f"Lynx keeps <= {s['num_kept']} experts per layer and step")
        for impl in dict.fromkeys([default, "eager"]):
            model.set_experts_implementation(impl)
            print(f"\nexperts implementation: {impl}")
            print(f"{'batch':>5} {'full ms/tok':>12} {'Lynx ms/tok':>12} {'top-1 ms/tok':>13} "
                  f"{'full/Lynx':>10} {'full/top-1':>11}")
            for B in s["batch_sizes"]:
                secs = decode_step_latency(model, rows[:B, : s["latency_prompt"]], s["latency_steps"],
                                           s["latency_rounds"],
                                           {p: (lambda p=p: install(model, p, s, None, track=False)) for p in POLICIES})
                ms = {p: 1e3 * secs[p] / B for p in POLICIES}
                print(f"{B:>5} {ms['full']:>12.3f} {ms['lynx']:>12.3f} {ms['top1']:>13.3f} "
                      f"{secs['full'] / secs['lynx']:>9.2f}x {secs['full'] / secs['top1']:>10.2f}x")
        model.set_experts_implementation(default)


if __name__ == "__main__":
    main()
