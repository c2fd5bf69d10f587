"""Result records: one JSON file per run, never overwritten, with its plot beside it.

Layout: ``<results>/<slug>/<UTC time>-<scale>-seed<seed>-<id>.json`` and ``.png``, and
``<UTC time>-<scale>-seeds<s0-s1-...>-aggregate-<id>.json`` for a verdict over seeds.
``<results>`` is ``--out`` when given, else ``$PAPERZOO_HOME/results``. Names are
claimed with ``O_EXCL``, so parallel runs never overwrite each other.

The repository ships its canonical ``small`` records in ``results/`` at its root
(`shipped_dir`): `show` and the report read the user's own records first and fall
back to those, so a fresh install shows numbers.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path

from paperzoo.core import store

REQUIRED = ("paper", "scale", "verdict", "checks", "metrics", "finished_at")


class ResultsError(ValueError):
    """A results folder that cannot be written or read."""


def results_dir(out: Path | str | None = None) -> Path:
    if out is not None and not str(out).strip():
        raise ResultsError("the results directory is an empty path")
    return Path(out).expanduser() if out is not None else store.home() / "results"


def shipped_dir() -> Path:
    """``results/`` at the root of the paperzoo checkout this package runs from."""
    return Path(__file__).resolve().parents[3] / "results"


def check_writable(folder: Path) -> None:
    """Fail now, with one line, if records cannot be written to `folder` (before any work)."""
    folder = Path(folder)
    try:
        for parent in (folder, *folder.parents):
            if parent.exists():
                if not parent.is_dir():
                    raise ResultsError(f"cannot write results under {folder}: {parent} is a file")
                break
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ResultsError(f"cannot write results to {folder}: {e.strerror or e}") from None


def write_new_record(folder: Path, stem: str, record: dict, png: bytes | None = None) -> Path:
    """Write `record` as JSON (and its plot) under a name no other run can claim; return the JSON path."""
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        path = folder / f"{stem}-{secrets.token_hex(3)}.json"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # claims the name
        except FileExistsError:
            continue
        os.close(fd)
        break
    if png is not None:
        store.write_atomic(path.with_suffix(".png"), png)
        record = {**record, "plot": path.with_suffix(".png").name}
    store.write_atomic(path, json.dumps(record, indent=1, default=float) + "\n")
    return path


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict) or not all(k in data for k in REQUIRED) or not isinstance(data["paper"], dict):
        if path.stat().st_size:  # an empty file is a name claimed by a run still writing
            store.notice(f"skipping {path}: not a paperzoo record")
        return None
    return {**data, "_path": str(path)}


def records(slug: str, out: Path | str | None = None, shipped: bool = True) -> list[dict]:
    """Every record of `slug`, oldest first, each with its own path under '_path'.

    Without `out`, the user's records; when they have none, the records shipped with paperzoo.
    """
    folders = [results_dir(out) / slug]
    if out is None and shipped:
        folders.append(shipped_dir() / slug)
    for folder in folders:
        found = [r for r in (_read(p) for p in sorted(folder.glob("*.json"))) if r is not None] if folder.is_dir() else []
        if found:
            return sorted(found, key=lambda r: (r.get("finished_at", ""), r["_path"]))
    return []


def latest(slug: str, out: Path | str | None = None) -> dict | None:
    """The record to show: the newest aggregate with a verdict, else the newest single run with one,
    else the newest smoke run."""
    found = records(slug, out)
    verdicts = [r for r in found if r.get("verdict") != "smoke"]
    aggregates = [r for r in verdicts if r.get("kind") == "aggregate"]
    return (aggregates or verdicts or found or [None])[-1]
