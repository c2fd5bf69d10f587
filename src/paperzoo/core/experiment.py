"""Claims as data, and the harness that runs an experiment to a verdict.

An experiment module (``paperzoo/experiments/<family>/<slug>.py``) declares its
claim and its inputs as data and writes one function:

- ``CLAIM``: a `Claim` -- the paper's statement with its numbers and where the paper
  states it (`source`), the predicate measured here in words, `preconditions`
  (named checks that this set-up *can* test the claim: the control learns, the
  phenomenon exists, the baseline is off its ceiling) and `checks` (the claim's
  sub-predicates). Both turn measured metrics into named True/False/None
  (undecidable). It is fixed before anything runs.
- ``SCALES``: the settings for each supported scale (`smoke`, `small`, `large`).
- ``INPUTS``: which user inputs it takes, a subset of {"model", "corpus"}; any other
  is refused before work starts.
- ``SEED_VARIES``: what the seed changes (data order, sampled problems, the
  initialisation of models the experiment trains).
- ``SUBSTRATE``: names of the shared cached models it uses (`paperzoo.core.substrate`),
  built once before a sweep fans out.
- ``run(ctx) -> Outcome``: measure, and return the metrics and a plot.

Name preconditions and checks with words that do not change from seed to seed (no
chosen budget or learning rate in a name): the aggregate matches them across seeds by name.

`run_experiment` does the rest, once for every paper: seeding, timing, the
verdict, an atomic JSON record that is never overwritten, and the plot beside it.
A failed or undecidable precondition makes the verdict `inconclusive`, never
`not-reproduced`. `run_seeds` runs several seeds, each its own record, and writes an
aggregate record with one verdict (`aggregate`). A `smoke` run checks that the code
runs end to end and claims no verdict.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import platform
import random
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from paperzoo import catalog
from paperzoo.core import results, store
from paperzoo.core.models import LanguageModel, base_model, load_causal_lm, substrate_used

SCALE_NAMES = ("smoke", "small", "large")
INPUT_NAMES = ("model", "corpus")
# Seeds a run uses when none are given: three at `small` (a verdict rests on more than one), one elsewhere.
DEFAULT_SEEDS = {"smoke": (0,), "small": (0, 1, 2), "large": (0,)}
MAX_SEED = 2**32 - 1


class ExperimentError(ValueError):
    """Bad input to an experiment run: no experiment, a scale it lacks, an unusable model."""


def no_preconditions(metrics: dict) -> dict[str, bool | None]:
    return {}


@dataclass(frozen=True)
class Claim:
    statement: str  # the paper's claim, in our words, with the paper's numbers
    predicate: str  # what is measured here, and what counts as reproduced
    checks: Callable[[dict], dict[str, bool | None]]
    preconditions: Callable[[dict], dict[str, bool | None]] = no_preconditions
    source: str = ""  # where the paper (or its official code) states the claim: section, table, file


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

    def measure_on(self, lm: LanguageModel) -> None:
        """Name the model the experiment really measured (e.g. a model it built from the base LM) in the record."""
        self._lm = lm

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


def choose_on_control(grid, train_control, passes):
    """Pick a set-up hyper-parameter by looking at the control arm only (never the treatment).

    Tries `grid` from the largest value down; `train_control(value)` trains or runs the
    control, `passes(result)` returns (ok, record). Returns the first value whose control
    passes (the smallest when none does), its result, and every value tried with its record.
    """
    if not grid:
        raise ValueError("the grid must hold at least one value")
    tried = []
    for value in sorted(grid, reverse=True):
        result = train_control(value)
        ok, record = passes(result)
        tried.append({"lr": value, "passes": ok, **record})
        if ok:
            break
    return value, result, tried


def verdict(checks: dict[str, bool | None], preconditions: dict[str, bool | None] | None = None) -> str:
    """`inconclusive` unless every precondition holds; then `not-reproduced` if a check fails, `reproduced` if all pass."""
    if preconditions and not all(v is True for v in preconditions.values()):
        return "inconclusive"
    if any(v is False for v in checks.values()):
        return "not-reproduced"
    if checks and all(v is True for v in checks.values()):
        return "reproduced"
    return "inconclusive"


def verdict_reason(checks: dict, preconditions: dict | None) -> str:
    failed = [k for k, v in (preconditions or {}).items() if v is not True]
    if failed:
        return "precondition not met: " + "; ".join(failed)
    if any(v is False for v in checks.values()):
        return "check failed: " + "; ".join(k for k, v in checks.items() if v is False)
    undecided = [k for k, v in checks.items() if v is None]
    return ("undecidable: " + "; ".join(undecided)) if undecided else "every check passed"


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


def git_commit() -> str:
    """paperzoo's git commit (with '+dirty' when tracked files differ from it), or 'unknown'."""
    source = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "diff", "--quiet", "HEAD", "--", "src"],
                               capture_output=True, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "") if head else "unknown"


def machine() -> dict:
    """What makes runs bit-identical or not: the CPU and the thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ExperimentError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    return seed


@dataclass(frozen=True)
class Plan:
    """A validated request to run one experiment: everything checked before any work starts."""

    paper: catalog.Paper
    module: ModuleType
    scale: str
    model: str | None
    corpus: str | None
    out: Path


def plan(slug: str, scale: str = "small", model: str | None = None, corpus: str | None = None,
         out=None) -> Plan:
    """Check a run's inputs and its output folder before anything is computed; raise one-line errors."""
    paper = catalog.get(slug)
    module = experiment_module(paper.slug)
    if module is None:
        raise ExperimentError(f"{paper.slug} has no experiment yet (status: {paper.status})")
    if scale not in SCALE_NAMES:
        raise ExperimentError(f"unknown scale {scale!r} (scales: {', '.join(SCALE_NAMES)})")
    if scale not in module.SCALES:
        raise ExperimentError(f"{paper.slug} has no {scale!r} scale (it has: {', '.join(module.SCALES)})")
    accepted = set(getattr(module, "INPUTS", ()))
    for name, value in (("model", model), ("corpus", corpus)):
        if value is not None and name not in accepted:
            method = method_module_name(paper.slug)
            raise ExperimentError(f"{paper.slug} does not take --{name}: it runs on its own "
                                  f"{', '.join(getattr(module, 'SUBSTRATE', ())) or 'models'}"
                                  + (f" (to apply the method to yours, import {method})" if method else ""))
    if corpus is not None:
        from paperzoo.core.corpus import check_corpus_spec

        check_corpus_spec(corpus)
    if model is not None:
        from paperzoo.core.models import check_model_spec

        check_model_spec(model)
    folder = results.results_dir(out) / paper.slug
    results.check_writable(folder)
    return Plan(paper, module, scale, model, corpus, folder.parent)


def run_experiment(slug: str, scale: str = "small", seed: int = 0, model: str | None = None,
                   corpus: str | None = None, out=None, trust_remote_code: bool = False) -> dict:
    """Run one experiment to a verdict; write and return its record (with '_path')."""
    check_seed(seed)
    p = plan(slug, scale, model, corpus, out)
    return _run(p, seed, trust_remote_code)


def _run(p: Plan, seed: int, trust_remote_code: bool = False) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    module, paper, scale = p.module, p.paper, p.scale
    ctx = RunContext(paper.slug, scale, seed, dict(module.SCALES[scale]), p.model, p.corpus, trust_remote_code)
    seed_everything(seed)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    with substrate_used() as substrate:
        outcome: Outcome = module.run(ctx)
    wall = time.perf_counter() - t0
    preconditions = module.CLAIM.preconditions(outcome.metrics)
    checks = module.CLAIM.checks(outcome.metrics)
    fig = Figure(figsize=(13, 4.4), layout="constrained")
    outcome.plot(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    lm = ctx._lm
    record = {
        "kind": "run",
        "paper": {"arxiv": paper.arxiv, "slug": paper.slug, "title": paper.title},
        "claim": module.CLAIM.statement,
        "source": module.CLAIM.source,
        "predicate": module.CLAIM.predicate,
        "scale": scale,
        "seed": seed,
        "seed_varies": getattr(module, "SEED_VARIES", ""),
        # What was really measured: the user's model and corpus, or paperzoo's own substrate.
        "model": lm.name if lm else None,
        "corpus": lm.corpus.name if lm else p.corpus,
        "substrate": substrate,
        "settings": ctx.settings,
        "metrics": outcome.metrics,
        "preconditions": preconditions,
        "checks": checks,
        "verdict": "smoke" if scale == "smoke" else verdict(checks, preconditions),
        "verdict_reason": ("smoke runs claim no verdict" if scale == "smoke"
                           else verdict_reason(checks, preconditions)),
        "notes": outcome.notes,
        "versions": _versions(),
        "git_commit": git_commit(),
        "machine": machine(),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(wall, 2),
        "settings_hash": store.stable_hash(ctx.settings),
    }
    path = results.write_new_record(p.out / paper.slug, f"{started.strftime('%Y%m%dT%H%M%SZ')}-{scale}-seed{seed}",
                                    record, png=buffer.getvalue())
    return {**record, "_path": str(path)}


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("_")}


def aggregate(runs: Sequence[dict]) -> dict:
    """One verdict from per-seed records of one paper and scale.

    `reproduced` if every seed reproduces; `not-reproduced` if every seed fails one
    and the same check (with every precondition met); otherwise `inconclusive`,
    saying why: a precondition not met, or seeds that disagree.
    """
    if not runs:
        raise ValueError("no runs to aggregate")
    first = runs[0]
    seeds = [r["seed"] for r in runs]
    per_metric: dict[str, dict] = {}
    for k in _scalars(first["metrics"]):
        values = [_scalars(r["metrics"]).get(k) for r in runs]
        if all(v is not None for v in values):
            per_metric[k] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                             "min": float(min(values)), "max": float(max(values)), "values": values}
    names = list(dict.fromkeys(k for r in runs for k in r["checks"]))
    checks = {k: [r["checks"].get(k) for r in runs] for k in names}
    pre_names = list(dict.fromkeys(k for r in runs for k in r.get("preconditions", {})))
    preconditions = {k: [r.get("preconditions", {}).get(k) for r in runs] for k in pre_names}
    if first["scale"] == "smoke":
        verdict_, reason = "smoke", "smoke runs claim no verdict"
    elif unmet := [k for k, v in preconditions.items() if not all(x is True for x in v)]:
        verdict_, reason = "inconclusive", "precondition not met: " + "; ".join(
            f"{k} (seed {', '.join(str(s) for s, x in zip(seeds, preconditions[k]) if x is not True)})" for k in unmet)
    elif all(r["verdict"] == "reproduced" for r in runs):
        verdict_, reason = "reproduced", f"every seed reproduces ({len(runs)} seeds)"
    elif common := [k for k, v in checks.items() if all(x is False for x in v)]:
        verdict_, reason = "not-reproduced", "every seed fails: " + "; ".join(common)
    elif all(r["verdict"] == "inconclusive" for r in runs) and (
            open_ := [k for k, v in checks.items() if all(x is None for x in v)]):
        verdict_, reason = "inconclusive", "undecidable in every seed: " + "; ".join(open_)
    else:
        verdict_, reason = "inconclusive", "seeds disagree"
    if len({r["verdict"] for r in runs}) > 1:
        reason += "; per seed: " + ", ".join(f"{r['seed']} {r['verdict']}" for r in runs)
    return {
        "kind": "aggregate",
        "paper": first["paper"], "claim": first["claim"], "source": first.get("source", ""),
        "predicate": first["predicate"], "scale": first["scale"], "seeds": seeds,
        "seed_varies": first.get("seed_varies", ""),
        "model": first.get("model"), "corpus": first.get("corpus"), "substrate": first.get("substrate", []),
        "settings": first["settings"], "settings_hash": first.get("settings_hash"),
        "metrics": per_metric, "checks": checks, "preconditions": preconditions,
        "verdict": verdict_, "verdict_reason": reason,
        "runs": [Path(r["_path"]).name for r in runs if "_path" in r],
        "wall_seconds": round(sum(r.get("wall_seconds", 0) for r in runs), 2),
        "versions": first.get("versions", {}), "git_commit": first.get("git_commit", "unknown"),
        "machine": first.get("machine", {}),
        "finished_at": max(r["finished_at"] for r in runs),
    }


def write_aggregate(runs: Sequence[dict], out=None) -> dict:
    record = aggregate(runs)
    slug, scale = record["paper"]["slug"], record["scale"]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    seeds = "-".join(str(s) for s in record["seeds"])
    path = results.write_new_record(results.results_dir(out) / slug, f"{stamp}-{scale}-seeds{seeds}-aggregate", record)
    return {**record, "_path": str(path)}


def run_seeds(slug: str, scale: str = "small", seeds: Sequence[int] | None = None, model: str | None = None,
              corpus: str | None = None, out=None, trust_remote_code: bool = False,
              on_record: Callable[[dict], None] | None = None) -> tuple[list[dict], dict | None]:
    """Run each seed as its own record; with more than one seed, write their aggregate. Returns (runs, aggregate)."""
    seeds = list(DEFAULT_SEEDS[scale] if seeds is None and scale in DEFAULT_SEEDS else seeds or [0])
    for s in seeds:
        check_seed(s)
    if len(set(seeds)) != len(seeds):
        raise ExperimentError(f"seeds repeat: {seeds}")
    p = plan(slug, scale, model, corpus, out)
    runs = []
    for s in seeds:
        runs.append(_run(p, s, trust_remote_code))
        if on_record:
            on_record(runs[-1])
    return runs, (write_aggregate(runs, p.out) if len(runs) > 1 else None)
