"""The shared cached models experiments stand on, by name: what is cached, their cards, building them.

An experiment lists the names it uses in ``SUBSTRATE``; `build` makes sure each is
cached before a sweep fans out, so parallel tasks read one entry instead of racing
to train it. Every load of a cached model is also noted in the run's record (its
cache key and a short card, `paperzoo.core.models.substrate_used`), so a verdict
always says which substrate it stood on.

`status(scale)` reads the cards of what is cached without training anything
(`store.lookup_only`); `paperzoo substrate` prints it and the report shows it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from paperzoo.core import store
from paperzoo.core.models import substrate_used


def _base_lm(scale: str) -> None:
    from paperzoo.core.models import base_model

    base_model(scale)


def _reasoner(scale: str) -> None:
    from paperzoo.core.reasoner import reasoner

    reasoner(scale)


def _draft(scale: str) -> None:
    from paperzoo.core.reasoner import draft_reasoner

    draft_reasoner(scale)


def _reasoner_controls(scale: str) -> None:
    from paperzoo.core.reasoner_controls import reasoner_controls

    reasoner_controls(scale)


def _moe_lm(scale: str) -> None:
    from paperzoo.experiments.compression.lynx_expert_selection import moe_lm

    moe_lm(scale)


BUILDERS: dict[str, Callable[[str], None]] = {"base-lm": _base_lm, "reasoner": _reasoner, "draft": _draft,
                                              "reasoner-controls": _reasoner_controls, "moe-lm": _moe_lm}
DESCRIPTIONS = {
    "base-lm": "tiny Llama LM on the embedded corpus (compression papers, SIFT, MTP prose)",
    "reasoner": "tiny reasoner on the arithmetic ladder, with reflective and verbose traces (decoding papers)",
    "draft": "the reasoner's draft for speculative decoding, same tokenizer and data",
    "reasoner-controls": "a plain SFT and a short RLOO+LoRA run of the reasoner, measured against it (no model kept)",
    "moe-lm": "tiny mixture-of-experts LM on the base LM's tokenizer and corpus (Lynx)",
}
SCALES = {"base-lm": ("smoke", "small", "large"), "reasoner": ("smoke", "small", "large"),
          "draft": ("smoke", "small", "large"), "reasoner-controls": ("smoke", "small"), "moe-lm": ("smoke", "small")}


def _check(name: str, scale: str) -> None:
    if name not in BUILDERS:
        raise KeyError(f"unknown substrate {name!r} (known: {', '.join(BUILDERS)})")
    if scale not in SCALES[name]:
        raise KeyError(f"{name} has no {scale!r} scale (it has: {', '.join(SCALES[name])})")


def build(names: Iterable[str], scale: str) -> None:
    """Build (or find cached) every named shared model at `scale`."""
    for name in dict.fromkeys(names):
        _check(name, scale)
        BUILDERS[name](scale)


def card(name: str, scale: str) -> dict | None:
    """The card of the cached `name` at `scale` (None when it is not cached); never trains."""
    _check(name, scale)
    if name == "reasoner-controls":
        from paperzoo.core.reasoner_controls import controls_card, reasoner_controls

        with store.lookup_only():
            try:
                return controls_card(reasoner_controls(scale))
            except store.NotCached:
                return None
    with store.lookup_only(), substrate_used() as log:
        try:
            BUILDERS[name](scale)
        except store.NotCached:
            return None
    return log[-1]  # a model that stands on another (moe-lm on base-lm) loads it first


def status(scales: Iterable[str] = ("smoke", "small")) -> list[dict]:
    """One row per shared model and scale: name, scale, description, cached or not, and its card."""
    rows = []
    for name in BUILDERS:
        for scale in scales:
            if scale in SCALES[name]:
                c = card(name, scale)
                rows.append({"name": name, "scale": scale, "description": DESCRIPTIONS[name],
                             "cached": c is not None, "card": c})
    return rows
