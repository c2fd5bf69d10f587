"""Claims as data, and the harness that runs an experiment to a verdict.

An experiment module (``paperzoo/experiments/<family>/<slug>.py``) declares three
things and writes one function:

- ``CLAIM``: a `Claim` -- the paper's statement with its numbers, the predicate
  measured here in words, and `checks`, which turns measured metrics into named
  True/False/None (undecidable) sub-predicates. It is fixed before anything runs.
- ``SCALES``: the settings for each supported scale (`smoke`, `small`, `large`).
- ``run(ctx) -> Outcome``: measure, and return the metrics and a plot.

`run_experiment` does the rest, once for every paper: seeding, timing, the
verdict, an atomic JSON record that is never overwritten, and the plot beside it.
A `smoke` run checks that the code runs end to end and claims no verdict.
"""

from __future__ import annotations

import importlib
import io
import importlib.util
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from types import ModuleType

import numpy as np
import torch

from paperzoo import catalog
from paperzoo.core import results, store
from paperzoo.core.models import LanguageModel, base_model, load_causal_lm

SCALE_NAMES = ("smoke", "small", "large")


class ExperimentError(ValueError):
    """Bad input to an experiment run: no experiment, a scale it lacks, an unusable model."""


@dataclass(frozen=True)
class Claim:
    statement: str  # the paper's claim, in our words, with the paper's numbers
    predicate: str  # what is measured here, and what counts as reproduced
    checks: Callable[[dict], dict[str, bool | None]]


@dataclass
class Outcome:
    metrics: dict
    plot: Callable  # plot(fig): draws the experiment's figure on a matplotlib Figure
    notes: str = ""


@dataclass
class RunContext:
    slug: str
    scale: str
    seed: int
    settings: dict
    model: str | None = None
    corpus: str | None = None
    trust_remote_code: bool = False
    _lm: LanguageModel | None = field(default=None, repr=False)

    def language_model(self) -> LanguageModel:
        """The user's `--model` if given, else paperzoo's cached base LM for this scale."""
        if self._lm is None:
            if self.model is None:
                self._lm = base_model(self.scale, corpus=self.corpus)
            else:
                from paperzoo.core.corpus import load_corpus

                model, tokenizer = load_causal_lm(self.model, self.trust_remote_code)
                seq_len = min(self.settings.get("seq_len", 256), getattr(model.config, "max_position_embeddings", 256) or 256)
                self._lm = LanguageModel(self.model, model, tokenizer, load_corpus(self.corpus), seq_len)
        return self._lm


def verdict(checks: dict[str, bool | None]) -> str:
    if any(v is False for v in checks.values()):
        return "not-reproduced"
    if checks and all(v is True for v in checks.values()):
        return "reproduced"
    return "inconclusive"


def experiment_module(slug: str) -> ModuleType | None:
    """``paperzoo.experiments.<family>.<slug>``, or None when the paper has no experiment yet."""
    paper = catalog.get(slug)
    name = f"paperzoo.experiments.{paper.family}.{paper.slug.replace('-', '_')}"
    try:
        return importlib.import_module(name) if importlib.util.find_spec(name) else None
    except ModuleNotFoundError:
        return None


def method_module_name(slug: str) -> str | None:
    paper = catalog.get(slug)
    name = f"paperzoo.{paper.family}.{paper.slug.replace('-', '_')}"
    try:
        return name if importlib.util.find_spec(name) else None
    except ModuleNotFoundError:
        return None


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("paperzoo", "torch", "transformers", "peft", "tokenizers", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_experiment(slug: str, scale: str = "small", seed: int = 0, model: str | None = None,
                   corpus: str | None = None, out=None, trust_remote_code: bool = False) -> dict:
    """Run one experiment to a verdict; write and return its record (with '_path')."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    paper = catalog.get(slug)
    module = experiment_module(paper.slug)
    if module is None:
        raise ExperimentError(f"{paper.slug} has no experiment yet (status: {paper.status})")
    if scale not in module.SCALES:
        raise ExperimentError(f"{paper.slug} has no {scale!r} scale (it has: {', '.join(module.SCALES)})")
    ctx = RunContext(paper.slug, scale, seed, dict(module.SCALES[scale]), model, corpus, trust_remote_code)
    seed_everything(seed)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    outcome: Outcome = module.run(ctx)
    wall = time.perf_counter() - t0
    checks = module.CLAIM.checks(outcome.metrics)
    stem = f"{started.strftime('%Y%m%dT%H%M%SZ')}-{scale}-seed{seed}"
    path = results.new_record_path(paper.slug, stem, out)
    fig = Figure(figsize=(13, 4.4), layout="constrained")
    outcome.plot(fig)
    png = path.with_suffix(".png")
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    store.write_atomic(png, buffer.getvalue())
    record = {
        "paper": {"arxiv": paper.arxiv, "slug": paper.slug, "title": paper.title},
        "claim": module.CLAIM.statement,
        "predicate": module.CLAIM.predicate,
        "scale": scale,
        "seed": seed,
        "model": ctx._lm.name if ctx._lm else None,  # None: the experiment used no LM
        "corpus": ctx._lm.corpus.name if ctx._lm else None,
        "settings": ctx.settings,
        "metrics": outcome.metrics,
        "checks": checks,
        "verdict": "smoke" if scale == "smoke" else verdict(checks),
        "notes": outcome.notes,
        "plot": png.name,
        "versions": _versions(),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(wall, 2),
        "settings_hash": store.stable_hash(ctx.settings),
    }
    results.write_record(path, record)
    return {**record, "_path": str(path)}
