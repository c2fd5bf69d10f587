"""In-Context Learning with Long-Context Models: An In-Depth Exploration (Bertsch et al., arXiv:2405.00200).

The paper asks what happens to in-context learning when the context holds hundreds or
thousands of demonstrations instead of ten. Its findings (abstract and Sec. 3-6): accuracy
keeps rising to 1,000+ demonstrations; sensitivity to the order of the demonstrations
shrinks; retrieving the demonstrations most similar to the query helps much at small n and
little at large n; sorting demonstrations by label hurts, more so as n grows; and most of
the gain survives *block attention*, where each demonstration attends only to the
demonstrations of its own block of b and the test example attends to all, which the paper
reads as evidence that many-shot ICL works mostly by retrieving relevant demonstrations
rather than by learning the task from all of them jointly.

This module is that protocol for any HF causal LM whose demonstrations the user formats as
token ids:

- `order_demos`: the demonstrations in random order, or grouped by label (every
  demonstration of a label together, the labels in random order);
- `retrieve_demos`: the n demonstrations a similarity function scores highest for the query
  (the paper retrieves with BM25), the most similar last, nearest the query;
- `prompt_ids`: prefix + demonstrations + query, and the token span of each demonstration;
- `block_attention_mask`: the [T, T] boolean mask (True: may attend) in which a token of
  demonstration j attends causally to the prefix and to the demonstrations of its block
  (j // b), and every token after the last demonstration attends causally to everything.
  It goes to the unmodified model as a 4-D ``attention_mask`` ([batch, 1, T, T]);
  positions stay those of the full prompt;
- `label_log_probs`: log p(label | prompt) over single-token candidate labels, renormalised,
  with or without a block mask.

Deviations: positions in a block are the positions of the whole prompt (the paper's blocks
likewise keep the prompt's positions; re-encoding each block from position 0 is not done).
Demonstrations also attend to the shared prefix (BOS): a model needs its attention sink. The
paper's fine-tuning comparison (LoRA on the same demonstrations) is not built here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

ORDERS = ("random", "grouped")


@dataclass(frozen=True)
class Demo:
    """One formatted demonstration (input and answer, as token ids) and its label (for grouping)."""

    tokens: torch.Tensor
    label: int


def order_demos(demos: Sequence[Demo], order: str, g: torch.Generator) -> list[Demo]:
    """`demos` in a random order, or grouped by label: labels in a random order, each label's demos in a random order."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    shuffled = [demos[i] for i in torch.randperm(len(demos), generator=g).tolist()]
    if order == "random":
        return shuffled
    labels = sorted({d.label for d in demos})
    rank = {labels[i]: r for r, i in enumerate(torch.randperm(len(labels), generator=g).tolist())}
    return sorted(shuffled, key=lambda d: rank[d.label])  # stable: keeps the shuffle within a label


def retrieve_demos(pool: Sequence[Demo], query: torch.Tensor, n: int,
                   similarity: Callable[[torch.Tensor, Demo], float]) -> list[Demo]:
    """The n demos of `pool` that `similarity(query, demo)` scores highest, in ascending order (most similar last)."""
    if not 0 <= n <= len(pool):
        raise ValueError(f"n must be in 0..{len(pool)}, not {n}")
    scores = torch.tensor([float(similarity(query, d)) for d in pool])
    top = torch.argsort(scores, descending=True, stable=True)[:n].flip(0)
    return [pool[i] for i in top.tolist()]


def prompt_ids(demos: Sequence[Demo], query: torch.Tensor, prefix: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """(ids [T], [(start, end) of each demonstration]): prefix, the demonstrations in order, then the query."""
    head = prefix if prefix is not None else torch.zeros(0, dtype=torch.long)
    parts, spans, at = [head], [], len(head)
    for d in demos:
        parts.append(d.tokens)
        spans.append((at, at + len(d.tokens)))
        at += len(d.tokens)
    parts.append(query)
    return torch.cat(parts), spans


def block_attention_mask(spans: Sequence[tuple[int, int]], length: int, block: int) -> torch.Tensor:
    """[T, T] bool (True = may attend): demonstration j sees the prefix and its block j // `block`; the rest sees all.

    Causal throughout. With `block` >= the number of demonstrations it is the plain causal mask.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, not {block}")
    mask = torch.tril(torch.ones(length, length, dtype=torch.bool))
    prefix_end = spans[0][0] if spans else 0
    block_of = torch.full((length,), -1)  # -1: prefix or query, not inside a demonstration
    for j, (start, end) in enumerate(spans):
        block_of[start:end] = j // block
    inside = block_of >= 0
    same_block = block_of[:, None] == block_of[None, :]
    keys_in_prefix = torch.arange(length)[None, :] < prefix_end
    allowed_for_demo = same_block | keys_in_prefix
    mask[inside] &= allowed_for_demo[inside]
    return mask


@torch.no_grad()
def label_log_probs(model, prompts: Sequence[torch.Tensor], labels: Sequence[int],
                    masks: Sequence[torch.Tensor] | None = None, batch_size: int = 64) -> torch.Tensor:
    """[n, C] log p(label | prompt) at each prompt's last position, renormalised over the C single-token labels.

    `masks`: one [T, T] bool mask per prompt (e.g. `block_attention_mask`), given to the model as a 4-D
    attention mask. Prompts of one length run in batches; others one at a time.
    """
    if masks is not None and len(masks) != len(prompts):
        raise ValueError(f"masks need one [T, T] mask per prompt: {len(masks)} for {len(prompts)} prompts")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    label_ids = torch.tensor(list(labels))
    step = batch_size if len({len(p) for p in prompts}) == 1 else 1
    out = []
    for i in range(0, len(prompts), step):
        ids = torch.stack(list(prompts[i:i + step])).to(device)
        mask = None if masks is None else torch.stack(list(masks[i:i + step]))[:, None].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1].float().cpu()
        out.append(logits[:, label_ids].log_softmax(-1))
    model.train(was_training)
    return torch.cat(out)
