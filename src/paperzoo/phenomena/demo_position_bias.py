"""Where to Show Demos in Your Prompt: A Positional Bias of In-Context Learning (Cobbina & Zhou, arXiv:2507.22887).

Known ICL sensitivities are about *which* demonstrations and in *what order*. This paper
moves the whole, unchanged demonstration block between four places of a chat prompt and
calls the effect DPP (demos' position in prompt) bias:

- ``ssp``: start of the system prompt,   ``esp``: end of the system prompt,
- ``sum``: start of the user message,    ``eum``: end of the user message (after the question).

It measures accuracy per placement and **prediction change**, the share of test items whose
answer flips between two placements (against a reference placement), since equal accuracy can
hide many flips. Findings (ten models, eight tasks): early placements (ssp, esp) are usually
more accurate and more stable, by up to 6 points; eum can flip over 30% of answers; the best
placement depends on model and task.

This module builds the four prompts for any HF tokenizer with a chat template and scores
answers on any HF causal LM:

- `placement_ids(tokenizer, system, user, demos, placement)`: the chat template is rendered
  with a marker where the block goes; the text on each side is tokenised on its own and the
  block's token ids are spliced in, so the block is *token-identical* in every placement (a
  block tokenised inside different neighbours could otherwise change at its edges). The
  block and its neighbour are separated by a blank line;
- `placement_predictions(model, tokenizer, items, demos, candidates)`: the predicted
  candidate per item and placement (`core.evaluation.candidate_log_probs`);
- `prediction_change(a, b)`: the share of items whose prediction differs; `dpp_report` gives
  accuracy per placement and prediction change against a reference placement.

Deviation: the paper's exact separators between the block and the instruction or question
are not known here; a blank line is used everywhere. A template without a system role gets
a one-line error (ssp and esp need one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from paperzoo.core.evaluation import candidate_log_probs

PLACEMENTS = ("ssp", "esp", "sum", "eum")
_MARKER = "\uE000DEMOS\uE000"  # a private-use string no prompt contains
SEPARATOR = "\n\n"


def placed_messages(system: str, user: str, placement: str) -> list[dict]:
    """System and user messages with the block's marker at `placement`."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, not {placement!r}")
    if _MARKER in system or _MARKER in user:
        raise ValueError("the system prompt or user message contains the block marker")
    where = {"ssp": (_MARKER + SEPARATOR + system, user), "esp": (system + SEPARATOR + _MARKER, user),
             "sum": (system, _MARKER + SEPARATOR + user), "eum": (system, user + SEPARATOR + _MARKER)}
    sys_text, user_text = where[placement]
    return [{"role": "system", "content": sys_text}, {"role": "user", "content": user_text}]


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def placement_ids(tokenizer, system: str, user: str, demos: str | torch.Tensor, placement: str) -> torch.Tensor:
    """Token ids of the chat prompt (generation prompt added) with the demonstration block at `placement`.

    `demos` is the block as text (tokenised once, on its own) or as token ids; either way the same ids
    appear in every placement.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template: DPP placements are defined on chat prompts")
    try:
        rendered = tokenizer.apply_chat_template(placed_messages(system, user, placement), tokenize=False,
                                                 add_generation_prompt=True)
    except Exception as e:  # templates that reject a system role raise their own error types
        raise ValueError(f"the chat template cannot render a system and a user message: {e}") from None
    before, after = rendered.split(_MARKER)
    block = demos if torch.is_tensor(demos) else _ids(tokenizer, demos)
    return torch.cat([_ids(tokenizer, before), block, _ids(tokenizer, after)])


@dataclass(frozen=True)
class Item:
    """One test question: its user message and the index of its right candidate."""

    user: str
    answer: int


def placement_predictions(model, tokenizer, system: str, items: Sequence[Item], demos: str,
                          candidates: Sequence[str], placements: Sequence[str] = PLACEMENTS) -> dict[str, torch.Tensor]:
    """{placement: [items] index of the highest-scoring candidate}, the same block and items in every placement."""
    block = _ids(tokenizer, demos)
    answers = [_ids(tokenizer, c) for c in candidates]
    out = {}
    for placement in placements:
        prompts = [placement_ids(tokenizer, system, item.user, block, placement) for item in items]
        out[placement] = candidate_log_probs(model, prompts, answers).argmax(dim=-1)
    return out


def prediction_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of items whose prediction differs between two placements (the paper's prediction change)."""
    if a.shape != b.shape:
        raise ValueError(f"predictions of the same items needed: {tuple(a.shape)} against {tuple(b.shape)}")
    return (a != b).float().mean().item()


def dpp_report(predictions: dict[str, torch.Tensor], answers: torch.Tensor, reference: str = "ssp") -> dict:
    """Accuracy per placement and prediction change of every placement against `reference`."""
    return {"accuracy": {p: (v == answers).float().mean().item() for p, v in predictions.items()},
            "prediction_change": {p: prediction_change(v, predictions[reference]) for p, v in predictions.items()}}
