"""Result records: one JSON file per run, never overwritten, with its plot beside it.

Layout: ``<results>/<slug>/<UTC time>-<scale>-seed<seed>.json`` and ``.png``.
``<results>`` is ``--out`` when given, else ``$PAPERZOO_HOME/results``.
"""

from __future__ import annotations

import json
from pathlib import Path

from paperzoo.core import store


def results_dir(out: Path | str | None = None) -> Path:
    return Path(out).expanduser() if out else store.home() / "results"


def new_record_path(slug: str, stem: str, out: Path | str | None = None) -> Path:
    """A record path that no earlier run has used."""
    folder = results_dir(out) / slug
    path, n = folder / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    return path


def write_record(path: Path, record: dict) -> Path:
    return store.write_atomic(path, json.dumps(record, indent=1, default=float) + "\n")


def records(slug: str, out: Path | str | None = None) -> list[dict]:
    """Every record of `slug`, oldest first, each with its own path under '_path'."""
    folder = results_dir(out) / slug
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            found.append({**json.loads(path.read_text()), "_path": str(path)})
        except json.JSONDecodeError:
            continue  # not ours: our own writes are atomic
    return sorted(found, key=lambda r: (r.get("finished_at", ""), r["_path"]))


def latest(slug: str, out: Path | str | None = None) -> dict | None:
    """The newest record that claims a verdict; the newest smoke run only when there is none."""
    found = records(slug, out)
    verdicts = [r for r in found if r.get("verdict") != "smoke"]
    return (verdicts or found or [None])[-1]
