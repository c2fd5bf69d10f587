"""Decoding and test-time compute: how tokens are chosen, and how much that costs.

Every strategy in this family has the same shape: a model, its tokenizer and a
prompt go in; a `Generation` comes out: the tokens chosen, their text, and what they
cost (forward passes of the model, wall time), with the strategy's own statistics
(acceptance rate, confidence, traces kept ...) in `stats`.

`greedy_decode` is the baseline every speed-up is measured against, and
`count_forward_passes` counts calls of any module exactly (a forward hook), so that
no strategy reports its own cost by arithmetic.

Every strategy checks its arguments before any forward pass: bad values raise a
`ValueError` naming the argument and its allowed range, and a prompt plus budget that
would run past the model's positions is refused naming the limit
(`paperzoo.core.sampling.check_positions`). Batched strategies pad on the left
themselves, so a tokenizer that pads on the right (as `load_causal_lm` returns) works.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from paperzoo.core.sampling import check_positions


@dataclass
class Generation:
    tokens: list[int]  # generated tokens, prompt excluded, up to and including EOS
    text: str
    forward_passes: int  # calls of the (target) model
    wall_seconds: float
    stats: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


class PassCounter:
    count: int = 0


@contextmanager
def count_forward_passes(module: nn.Module):
    """``with count_forward_passes(model) as c: ...``; then ``c.count`` is the number of forward calls."""
    counter = PassCounter()

    def hook(*_):
        counter.count += 1

    handle = module.register_forward_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    return ids


def cut_at_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens


@torch.no_grad()
def greedy_decode(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> Generation:
    """Plain greedy decoding with transformers' `generate` (KV cache), the baseline for speed-ups."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    ids = prompt_ids(tokenizer, prompt)
    check_positions(model, ids.shape[1], max_new_tokens)
    eos = tokenizer.eos_token_id
    with count_forward_passes(model) as passes:
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos)
        wall = time.perf_counter() - start
    tokens = cut_at_eos(out[0, ids.shape[1]:].tolist(), eos)
    return Generation(tokens, tokenizer.decode(tokens), passes.count, wall)
