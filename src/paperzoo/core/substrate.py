"""The shared cached models experiments stand on, by name.

An experiment lists the names it uses in ``SUBSTRATE``; `build` makes sure each is
cached before a sweep fans out, so parallel tasks read one entry instead of racing
to train it. Every load of a cached model is also noted in the run's record (its
cache key and a short card, `paperzoo.core.models.substrate_used`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


def _base_lm(scale: str) -> None:
    from paperzoo.core.models import base_model

    base_model(scale)


def _reasoner(scale: str) -> None:
    from paperzoo.core.reasoning import reasoner

    reasoner(scale)


def _draft(scale: str) -> None:
    from paperzoo.core.reasoning import draft_reasoner

    draft_reasoner(scale)


def _moe_lm(scale: str) -> None:
    from paperzoo.experiments.compression.lynx_expert_selection import moe_lm

    moe_lm(scale)


BUILDERS: dict[str, Callable[[str], None]] = {"base-lm": _base_lm, "reasoner": _reasoner, "draft": _draft,
                                              "moe-lm": _moe_lm}


def build(names: Iterable[str], scale: str) -> None:
    """Build (or find cached) every named shared model at `scale`."""
    for name in dict.fromkeys(names):
        if name not in BUILDERS:
            raise KeyError(f"unknown substrate {name!r} (known: {', '.join(BUILDERS)})")
        BUILDERS[name](scale)
