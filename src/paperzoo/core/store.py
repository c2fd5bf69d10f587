"""Where paperzoo keeps its caches and results, and how it writes them atomically.

Everything lives under one home directory: ``$PAPERZOO_HOME``, or
``~/.cache/paperzoo`` by default. A write goes to a temporary sibling first and is
then renamed into place, which POSIX makes atomic: a run killed at any moment
leaves either the complete file or directory, or nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("PAPERZOO_HOME", Path.home() / ".cache" / "paperzoo")).expanduser()


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


def cached_dir(path: Path, build: Callable[[Path], None]) -> Path:
    """Return `path`, first building it with `build(tmp_dir)` if it does not exist.

    `build` fills a fresh temporary directory beside `path`; only when it returns is
    that directory renamed to `path`. An interrupted build leaves no entry, so the
    next call builds again instead of reading half a model.
    """
    path = Path(path)
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        build(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished the same entry first: keep theirs
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
