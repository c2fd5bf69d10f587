"""Perplexity and next-token accuracy of a causal LM on blocks of token ids."""

from __future__ import annotations

import math

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
