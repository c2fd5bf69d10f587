"""Sampling from a causal LM with the per-token statistics decoding papers read.

`sample` decodes batches with the model's own KV cache (`model(..., past_key_values=...)`,
the cache transformers builds for the architecture) and returns what `generate` does not
return directly: for every generated token, its log-probability and the entropy of the
model's next-token distribution, and an exact token count that stops at the first EOS.

It is a loop of its own rather than `generate` for one reason, speed: a row that has
written EOS leaves the batch (its KV cache rows are dropped with
`Cache.batch_select_indices`), so a batch costs the sum of its completions' lengths,
not batch size x the longest one. Reasoning traces vary from 20 to 700 tokens and
one sample that never stops used to hold a whole batch to the budget (measured on the
v2 reasoner: a card of 100 problems x 16 samples took 830 s through `generate`; `benchmarks/sampling.py`,
128 completions at temperature 1 on 2 threads: 5.8 s against 77.9 s, 13.4x).
The cache is a `GrowingCache`: transformers' `DynamicCache` concatenates every new
column onto the whole cache, which profiled at half the sampler's time; ours writes into
spare capacity, 256 columns more each time it fills (1.2x end to end on the reasoner's samples, the same tokens).
Sampling follows `generate`'s rules (temperature, then top-p keeping at least one
token; greedy is the argmax), and tests check greedy against `generate` token for token.

Statistics are read from the *raw* logits, that is the model's own distribution at
temperature 1, whatever temperature was sampled at: confidence measures such as
DeepConf's are defined on the model's distribution.

Methods that need control `generate` does not give (forcing or suppressing a token
mid-sequence, stopping on a running statistic, drafting and verifying) write their
own loop over `model(...)` with `past_key_values`; see `paperzoo.decoding`.

Batches of prompts are always padded on the left (`encode_left_padded`), whatever the
tokenizer's own `padding_side` (`load_causal_lm` returns tokenizers that pad on the
right) and whether or not it has a pad token: a decoder-only model continues every row
from its last column. `check_positions` refuses, before any work, a prompt and budget
that would run past a model's learned positions (a raw IndexError otherwise).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


@dataclass
class Sample:
    prompt_index: int
    tokens: list[int]  # generated tokens, up to and including the first EOS
    text: str  # decoded generated tokens, special tokens kept
    logprobs: torch.Tensor  # [len(tokens)] log p(token_t | prefix) under the model at temperature 1
    entropies: torch.Tensor  # [len(tokens)] entropy (nats) of the model's next-token distribution
    finished: bool  # ended with EOS rather than running out of budget
    top_logprobs: torch.Tensor | None = None  # [len(tokens), k] the k largest log-probabilities at each step

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def encode_left_padded(tokenizer, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` [B, L] of `prompts`, padded on the left whatever the tokenizer's side.

    Each prompt is tokenized alone (no special tokens) and padded with the pad token, else
    EOS, else 0; padded columns have attention 0. Raises ValueError for no prompts or an
    empty one.
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings")
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows = [r.tolist() if hasattr(r, "tolist") else list(r) for r in rows]
    rows = [r[0] if r and isinstance(r[0], list) else r for r in rows]  # a tokenizer that returns [[...]]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a prompt is empty (no tokens)")
    pad = next((t for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                if t is not None), 0)
    L = max(map(len, rows))
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask}


def max_positions(model) -> int | None:
    """The number of positions the model was built for (`max_position_embeddings`, GPT-2's `n_positions`), or None."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(model, prompt_tokens: int, max_new_tokens: int, extra: int = 0, what: str = "model") -> None:
    """ValueError unless prompt + max_new_tokens (+ `extra` look-ahead positions) fit in the model's positions."""
    limit = max_positions(model)
    need = prompt_tokens + max_new_tokens + extra
    if limit is not None and need > limit:
        more = f" + {extra} look-ahead" if extra else ""
        raise ValueError(f"the prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}){more} needs {need} "
                         f"positions, but the {what} has {limit} (max_position_embeddings): shorten the prompt or "
                         f"lower max_new_tokens")


def token_statistics(logits: torch.Tensor, tokens: torch.Tensor, top_k: int = 0):
    """log p of `tokens`, entropy, and the top-k log-probabilities, from raw `logits` [..., V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    top = logp.topk(top_k, dim=-1).values if top_k else None
    return chosen, entropy, top


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of raw `logits` [B, V]: the argmax at temperature 0, else a draw at `temperature` within top-p."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_p < 1:
        ascending, order = logits.sort(-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)


_GROW_BY = 256  # spare columns a full buffer gains: a 700-token trace regrows 3 times, and holds at most 256 unused


class _GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in a buffer that grows by `_GROW_BY` columns when full.

    `DynamicLayer.update` concatenates, copying the whole cache at every decoding step
    (half of a reasoning sampler's time, profiled). Here a step writes one column into
    spare capacity; `keys` and `values` are views of the filled part, so every other
    method of the layer (crop, length, masks) works unchanged.
    """

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, m = self.get_seq_length(), self.get_seq_length() + key_states.shape[-2]
        buffer = getattr(self, "_buffer", None)
        if buffer is None or m > buffer[0].shape[-2]:
            shape = (*key_states.shape[:-2], m + _GROW_BY, key_states.shape[-1])
            buffer = (key_states.new_empty(shape), value_states.new_empty(shape))
            if n:
                buffer[0][..., :n, :], buffer[1][..., :n, :] = self.keys, self.values
            self._buffer = buffer
        buffer[0][..., n:m, :], buffer[1][..., n:m, :] = key_states, value_states
        self.keys, self.values = buffer[0][..., :m, :], buffer[1][..., :m, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        n = self.get_seq_length()
        if n > 0:
            self._buffer = (self._buffer[0][indices], self._buffer[1][indices])
            self.keys, self.values = self._buffer[0][..., :n, :], self._buffer[1][..., :n, :]


class GrowingCache(DynamicCache):
    """A KV cache for decoding loops: `DynamicCache` without the per-step copy (1.2x on the reasoner's samples)."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=_GrowingLayer)


def cache_argument(model) -> str:
    """The name `model.forward` takes its KV cache by: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def _decode(model, enc: dict, max_new_tokens: int, temperature: float, top_p: float, eos: int | None,
            guide=None, combine=None):
    """Generated tokens and the logits sampled from, per row, each row stopping at its first EOS (which it keeps).

    With a `guide` model, it decodes in step with `model` (its own cache, the same rows
    dropped), and each step samples from ``combine(model's logits, guide's logits)``.
    """
    ids, mask = enc["input_ids"], enc["attention_mask"]
    rows = torch.arange(ids.shape[0])  # the batch rows still generating, as indices of the original rows
    tokens: list[list[int]] = [[] for _ in range(ids.shape[0])]
    logits_of: list[list[torch.Tensor]] = [[] for _ in range(ids.shape[0])]
    models = [model] if guide is None else [model, guide]
    caches = [GrowingCache() for _ in models]
    names = [cache_argument(m) for m in models]

    def last_logits(step_ids, mask, position):
        out = [m(input_ids=step_ids, attention_mask=mask, position_ids=position, use_cache=True,
                 **{name: c}).logits[:, -1] for m, name, c in zip(models, names, caches)]
        return out[0].float() if guide is None else combine(*out).float()

    position = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = last_logits(ids, mask, position)
    position = position[:, -1:]
    for step in range(max_new_tokens):
        chosen = _next_tokens(logits, temperature, top_p)
        for r, t, lg in zip(rows.tolist(), chosen.tolist(), logits):
            tokens[r].append(t)
            logits_of[r].append(lg)
        going = chosen != eos if eos is not None else torch.ones_like(chosen, dtype=torch.bool)
        if step == max_new_tokens - 1 or not going.any():
            break
        if not going.all():
            keep = going.nonzero().squeeze(-1)
            for cache in caches:
                cache.batch_select_indices(keep)
            rows, chosen, mask, position = rows[keep], chosen[keep], mask[keep], position[keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
        position = position + 1
        logits = last_logits(chosen[:, None], mask, position)
    return tokens, [torch.stack(lg) for lg in logits_of]


def sample(model, tokenizer, prompts: Sequence[str], num_samples: int = 1, max_new_tokens: int = 64,
           temperature: float = 1.0, top_p: float = 1.0, top_k_logprobs: int = 0, seed: int = 0,
           batch_size: int = 64, guide=None, combine=None) -> list[Sample]:
    """`num_samples` completions of each prompt (greedy when temperature is 0), with statistics.

    Returns samples grouped by prompt: prompt 0's samples first. Batches are padded on
    the left whatever the tokenizer's `padding_side`. With a `guide` model (a reward model
    in guided decoding), both run in step, each with its own cache, and tokens are drawn
    from ``combine(model's logits, guide's logits)``; the statistics are then those of
    that combined distribution.
    """
    if (guide is None) != (combine is None):
        raise ValueError("guide and combine go together: a guide model and how to combine its logits")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be at least 1, not {num_samples} and {batch_size}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    encoded = encode_left_padded(tokenizer, prompts)
    check_positions(model, encoded["input_ids"].shape[1], max_new_tokens)
    eos = tokenizer.eos_token_id
    jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(1 if temperature == 0 else num_samples)]
    out: list[Sample] = []
    torch.manual_seed(seed)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        enc = encode_left_padded(tokenizer, [p for _, p in chunk])
        tokens, logits = _decode(model, enc, max_new_tokens, temperature, top_p, eos, guide, combine)
        for (i, _), ids, lg in zip(chunk, tokens, logits):
            chosen, entropy, top = token_statistics(lg, torch.tensor(ids), top_k_logprobs)
            out.append(Sample(i, ids, tokenizer.decode(ids), chosen, entropy, eos in ids, top))
    return out


def completion_logprobs(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                        pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""($\log\pi(y_i\mid x_i)$ summed over completion tokens, $|y_i|$) for token-id lists; each [M].

    With gradients, for fine-tuning objectives. Right padding, so the positions of real
    tokens are 0..L-1 as in an unpadded forward, and only completion tokens are scored.
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError("prompts and completions must be non-empty lists of the same length")
    if any(len(x) == 0 for x in prompts) or any(len(y) == 0 for y in completions):
        raise ValueError("every prompt and every completion needs at least one token")
    seqs = [list(x) + list(y) for x, y in zip(prompts, completions)]
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    scored = torch.zeros((len(seqs), L), dtype=torch.bool)
    for i, (x, s) in enumerate(zip(prompts, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        scored[i, len(x) : len(s)] = True
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # [M, L-1, V]
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [M, L-1]
    mask = scored[:, 1:]
    return (logp * mask).sum(1), mask.sum(1)



def weighted_nll(logp: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    r"""$-\frac1M \sum_i w_i \log\pi(y_i \mid x_i)$; its gradient is the (negated) weighted score function."""
    if logp.shape != weights.shape or logp.ndim != 1 or logp.numel() == 0:
        raise ValueError(f"logp {tuple(logp.shape)} and weights {tuple(weights.shape)} must be the same non-empty [M]")
    return -(weights.detach() * logp).mean()


def weighted_finetune_step(model, optimizer, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                           weights: torch.Tensor, pad_id: int, grad_clip: float = 1.0, micro_batch: int = 16) -> float:
    """One optimiser step on the weighted log-likelihood of sampled completions; returns the loss.

    `weights` is flat [M] (e.g. ``bon_rlb_weights(...).flatten()``); zero-weight
    samples are skipped, as they contribute no gradient (all zero: no step, loss 0). The gradient is accumulated
    over forward passes of at most `micro_batch` samples sorted by length, so each pads
    only to its own longest sample: the same step as one pass, up to float rounding.
    """
    if len(prompts) != len(completions) or not completions:
        raise ValueError(f"prompts and completions must be non-empty and of equal length, "
                         f"got {len(prompts)} and {len(completions)}")
    if not isinstance(weights, torch.Tensor) or weights.shape != (len(completions),):
        raise ValueError(f"weights must be a tensor of shape [{len(completions)}] (one per completion)")
    if not torch.isfinite(weights).all():
        raise ValueError("weights must be finite")
    if not grad_clip > 0 or micro_batch < 1:
        raise ValueError(f"grad_clip must be positive and micro_batch at least 1, not {grad_clip} and {micro_batch}")
    keep = [i for i in range(len(completions)) if float(weights[i]) != 0.0]
    if not keep:
        return 0.0
    keep.sort(key=lambda i: len(prompts[i]) + len(completions[i]))
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = 0.0
    for part in (keep[k:k + micro_batch] for k in range(0, len(keep), micro_batch)):
        logp, _ = completion_logprobs(model, [prompts[i] for i in part], [completions[i] for i in part], pad_id)
        # Mean over all M samples (zeros included), so the step size does not depend on how many were skipped.
        part_loss = weighted_nll(logp, weights[part].to(logp.dtype)) * len(part) / len(completions)
        part_loss.backward()
        loss += float(part_loss.detach())
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    model.eval()
    return loss


def accuracy(samples: Sequence[Sample], problems, verify) -> float:
    """Share of samples whose text `verify(problem, text)` accepts."""
    return sum(bool(verify(problems[s.prompt_index], s.text)) for s in samples) / max(len(samples), 1)
