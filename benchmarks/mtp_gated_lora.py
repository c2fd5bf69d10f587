"""The wall-clock ceiling of gated-MTP self-speculative decoding, against greedy_decode.

Tokens per pass is what the paper reports; on a CPU a pass that reads (c + 1)(k + 1)
tokens through LoRA-adapted layers costs more than a one-token greedy step, so the
wall-clock gain is smaller. This benchmark measures that gap without any training:
the drafts are planted from the greedy output itself (all right, or every other one
wrong), so tokens per pass is fixed by construction and only the cost of a pass varies.
Models are randomly initialised with the architectures of the small reasoner (4 layers,
d=128) and the small base LM (12 layers, d=192); one CPU thread.
Run: python benchmarks/mtp_gated_lora.py
"""

import copy

import torch

from paperzoo.core.models import BASE_MODELS
from paperzoo.core.reasoning import reasoning_tokenizer
from paperzoo.core.reasoner import REASONERS
from paperzoo.decoding import greedy_decode, prompt_ids
from paperzoo.decoding.mtp_gated_lora import MTPConfig, attach, mtp_decode

NEW_TOKENS = 64


def planted(ref: list[int], prompt_len: int, every_other_wrong: bool):
    def propose(z, prev, so_far):
        n = len(so_far) - prompt_len
        drafts = list(ref[n : n + z.shape[0]])
        if every_other_wrong:
            drafts = [t if i % 2 == 0 else (t + 1) % 50 + 20 for i, t in enumerate(drafts)]
        return drafts
    return propose


def bench(name: str, model, tokenizer, prompt: str, k: int = 8) -> None:
    mtp = attach(copy.deepcopy(model), tokenizer, MTPConfig(k=k, rank=16))
    n_prompt = prompt_ids(tokenizer, prompt).shape[1]
    ref = greedy_decode(model, tokenizer, prompt, NEW_TOKENS)
    greedy_seconds = min(greedy_decode(model, tokenizer, prompt, NEW_TOKENS).wall_seconds for _ in range(3))
    print(f"{name}: greedy_decode {ref.num_tokens} tokens in {greedy_seconds * 1e3:.0f} ms "
          f"({greedy_seconds / ref.forward_passes * 1e3:.1f} ms per pass)")
    for label, wrong in (("all drafts right", False), ("every other draft wrong", True)):
        for strategy in ("linear", "quadratic"):
            runs = [mtp_decode(mtp, tokenizer, prompt, NEW_TOKENS, strategy, planted(ref.tokens, n_prompt, wrong))
                    for _ in range(3)]
            g = min(runs, key=lambda r: r.wall_seconds)
            assert g.tokens == ref.tokens
            print(f"  {label:24s} {strategy:9s}: {g.stats['tokens_per_pass']:.2f} tokens/pass, "
                  f"{g.wall_seconds / g.forward_passes * 1e3:.1f} ms per pass, "
                  f"wall-clock speed-up {greedy_seconds / g.wall_seconds:.2f}x")


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = reasoning_tokenizer()
    bench("reasoner architecture (4 layers, d=128)", REASONERS["small"].model.build().eval(), tok, "Q: 37+48-19\n<think>")
    from paperzoo.core.models import base_model

    lm = base_model("small")  # cached; only its tokenizer and architecture matter here
    model = BASE_MODELS["small"].model.build().eval()
    bench("base LM architecture (12 layers, d=192)", model, lm.tokenizer, "The default argument is")


if __name__ == "__main__":
    main()
