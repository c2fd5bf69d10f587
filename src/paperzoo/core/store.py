"""Where paperzoo keeps its caches and results, and how it writes them atomically.

Everything lives under one home directory: ``$PAPERZOO_HOME``, or
``~/.cache/paperzoo`` by default. A write goes to a temporary sibling first and is
then renamed into place, which POSIX makes atomic: a run killed at any moment
leaves either the complete file or directory, or nothing.

A cached directory also carries a manifest of its files' sizes and hashes, written
last. An entry whose files no longer match it (truncated, emptied, deleted by hand)
is detected on load and rebuilt with a one-line notice. Temporary directories of
builds whose process died are swept the next time that entry is asked for.

Inside `lookup_only()` nothing is built: asking for an entry that is missing or
damaged raises `NotCached`, which is how `paperzoo substrate` reports what is cached
without training anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path


class HomeError(ValueError):
    """PAPERZOO_HOME is set to something unusable."""


class NotCached(LookupError):
    """A cache entry asked for inside `lookup_only()` does not exist (or is damaged)."""

    def __init__(self, path: Path):
        super().__init__(f"not cached: {path}")
        self.path = path


_LOOKUP_ONLY: ContextVar[bool] = ContextVar("paperzoo_lookup_only", default=False)


@contextmanager
def lookup_only():
    """Within the block, `cached_dir` returns entries that exist and raises `NotCached` instead of building."""
    token = _LOOKUP_ONLY.set(True)
    try:
        yield
    finally:
        _LOOKUP_ONLY.reset(token)


def home() -> Path:
    value = os.environ.get("PAPERZOO_HOME")
    if value is None:
        return Path.home() / ".cache" / "paperzoo"
    if not value.strip():
        raise HomeError("PAPERZOO_HOME is set but empty; unset it or give a directory")
    return Path(value).expanduser()


def notice(message: str) -> None:
    print(f"paperzoo: {message}", file=sys.stderr)


def stable_hash(obj) -> str:
    """A short hash of a JSON-serialisable object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_atomic(path: Path, data: str | bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


MANIFEST = ".paperzoo-manifest.json"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _file_digest(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps(entries, indent=1))


def damage(directory: Path) -> str | None:
    """Why a cached directory no longer matches its manifest, or None when it does."""
    try:
        entries = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable manifest"
    if not isinstance(entries, dict):
        return "no readable manifest"
    for name, want in entries.items():
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want.get("bytes"):
            return f"{name} has {f.stat().st_size} bytes, expected {want.get('bytes')}"
        if _file_digest(f) != want.get("sha256"):
            return f"{name} does not match its hash"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_builds(path: Path) -> None:
    """Remove temporary build directories of `path` left by processes that no longer run."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2:].split(".")
        pid = int(parts[0]) if parts and parts[0].isdigit() else None
        if tmp.is_dir() and (pid is None or not _pid_alive(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def cached_dir(path: Path, build: Callable[[Path], None]) -> Path:
    """Return `path`, first building it with `build(tmp_dir)` if it does not exist or is damaged.

    `build` fills a fresh temporary directory beside `path`; only when it returns
    (and the manifest is written) is that directory renamed to `path`. An
    interrupted build leaves no entry, so the next call builds again instead of
    reading half a model.
    """
    path = Path(path)
    if path.is_dir():
        reason = damage(path)
        if reason is None:
            return path
        if _LOOKUP_ONLY.get():
            raise NotCached(path)
        notice(f"cache entry {path} is damaged ({reason}); rebuilding it")
        trash = path.with_name(f".{path.name}.{os.getpid()}.broken.tmp")
        try:
            os.rename(path, trash)
        except OSError:
            raise HomeError(f"cache entry {path} is damaged ({reason}) and cannot be moved; delete it") from None
        shutil.rmtree(trash, ignore_errors=True)
    if _LOOKUP_ONLY.get():
        raise NotCached(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_builds(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"))
    try:
        build(tmp)
        write_manifest(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished the same entry first: keep theirs
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
