"""Perplexity and next-token accuracy of a causal LM on blocks of token ids; candidate answers scored after prompts."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """Mean next-token cross-entropy over every predicted position, in fp32.

    Returns ``loss`` (nats/token), ``perplexity`` = exp(loss) and ``accuracy``
    (share of positions whose argmax is the next token).
    """
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    device = next(model.parameters()).device
    for i in range(0, len(blocks), batch_size):
        x = blocks[i : i + batch_size].to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        target = x[:, 1:]
        total_loss += torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    model.train(was_training)
    loss = total_loss / count
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / count}


@torch.no_grad()
def candidate_log_probs(model, prompts: Sequence[torch.Tensor], candidates: Sequence[torch.Tensor],
                        batch_size: int = 256) -> torch.Tensor:
    """[P, C] log p(candidate | prompt), summed over each candidate's tokens and renormalised over the C candidates.

    How classification-style papers score answers on any HF causal LM: each prompt + candidate is
    one right-padded row (positions and the causal mask are unaffected by padding on the right).
    """
    if not prompts or not candidates:
        raise ValueError("prompts and candidates must each hold at least one token sequence")
    rows = [(p, c) for p in prompts for c in candidates]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        lengths = [len(p) + len(c) for p, c in chunk]
        ids = torch.zeros(len(chunk), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (p, c) in enumerate(chunk):
            ids[r, :lengths[r]] = torch.cat([p, c])
            mask[r, :lengths[r]] = 1
        logp = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1).cpu()
        for r, (p, c) in enumerate(chunk):
            at = torch.arange(len(p) - 1, len(p) + len(c) - 1)  # the logits that predict the candidate's tokens
            scores.append(logp[r, at, c].sum())
    model.train(was_training)
    return torch.stack(scores).view(len(prompts), len(candidates)).log_softmax(dim=-1)
