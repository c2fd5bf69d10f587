"""Text corpora: the embedded default, a user's text file, or a Hugging Face dataset.

The default corpus is the docstrings of Python's own standard library, read with
`ast` from the source files (nothing is imported, so no module's side effects
run). It is real technical English, about 2.3 MB, and it is on every machine that
has Python 3.11, with no download. A registry package shipping a text would add an
install step and a licence question for no gain in realism.

The train/validation split is deterministic and made by *module*: a top-level
module (or a ``test/`` sub-package) goes wholly to validation when a hash of its
name says so, about 10% of the text. Splitting by module rather than by line keeps
validation honest (no near-duplicate docstrings across the split), and it leaves
tokens that a tokenizer trained on the whole corpus knows but that a model
trained on the train split never sees, which the under-trained token experiment
needs.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from paperzoo.core import store

VALIDATION_SHARE = 10  # percent of split units sent to validation


class CorpusError(ValueError):
    """A corpus that cannot be read: a missing file, an unknown dataset, no text."""


@dataclass(frozen=True)
class Corpus:
    name: str
    train: tuple[str, ...]
    validation: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        return store.stable_hash([self.name, self.train, self.validation])

    @property
    def all_documents(self) -> tuple[str, ...]:
        return self.train + self.validation


def is_validation_unit(unit: str) -> bool:
    return int(hashlib.sha256(unit.encode()).hexdigest(), 16) % 100 < VALIDATION_SHARE


def _split(units_and_docs: list[tuple[str, str]], name: str) -> Corpus:
    train = tuple(d for u, d in units_and_docs if not is_validation_unit(u))
    val = tuple(d for u, d in units_and_docs if is_validation_unit(u))
    if not train or not val:
        raise CorpusError(f"corpus {name!r} is too small to split into train and validation")
    return Corpus(name, train, val)


def _stdlib_docstrings() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == "site-packages":
            continue
        unit = "/".join(rel.parts[:2]) if rel.parts[0] == "test" else rel.parts[0].removesuffix(".py")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib test files are deliberately malformed
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 20:
                    out.append((unit, doc))
    return out


def stdlib_corpus() -> Corpus:
    """The embedded default corpus, parsed once and cached as JSON."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    path = store.home() / "corpus" / f"stdlib-docstrings-{version}.json"
    units = None
    if path.exists():
        try:
            units = [tuple(x) for x in json.loads(path.read_text())]
        except (OSError, ValueError, TypeError):
            store.notice(f"cache entry {path} is damaged; rebuilding it")
    if units is None:
        units = _stdlib_docstrings()
        store.write_atomic(path, json.dumps(units))
    return _split(units, f"stdlib-docstrings-{version}")


def text_file_corpus(path: Path) -> Corpus:
    """A UTF-8 text file; documents are paragraphs separated by blank lines."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CorpusError(f"corpus file is not UTF-8 text: {path}") from None
    # Documents are paragraphs; a text without blank lines falls back to lines, then to 2,000-character pieces.
    # Units of 20 consecutive documents keep neighbouring text on one side of the split.
    name = f"file:{path.resolve()}"
    candidates = ([p.strip() for p in text.split("\n\n") if p.strip()],
                  [line.strip() for line in text.splitlines() if line.strip()],
                  [text[i:i + 2000].strip() for i in range(0, len(text), 2000) if text[i:i + 2000].strip()])
    for documents in candidates:
        try:
            return _split([(f"{i // 20}", d) for i, d in enumerate(documents)], name)
        except CorpusError:
            continue
    raise CorpusError(f"corpus file {path} is too small ({len(text)} characters) to hold out validation text")


def hf_dataset_corpus(spec: str) -> Corpus:
    """``hf:NAME[:CONFIG]``: the 'text' column of a datasets dataset's train split."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise CorpusError("the `datasets` package is needed for hf: corpora") from None
    name, _, config = spec.removeprefix("hf:").partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:  # datasets raises many types; the user needs one line
        raise CorpusError(f"cannot load dataset {name!r}: {str(e).splitlines()[0]}") from None
    if "text" not in rows.column_names:
        raise CorpusError(f"dataset {name!r} has no 'text' column (columns: {rows.column_names})")
    docs = [t for t in rows["text"] if t and t.strip()]
    return _split([(f"{i // 20}", d) for i, d in enumerate(docs)], f"hf:{name}:{config}")


def check_corpus_spec(spec: str) -> None:
    """Cheap checks of a --corpus value before any work: the file exists, or hf: names a dataset."""
    spec = str(spec)
    if spec == "stdlib":
        return
    if spec.startswith("hf:"):
        if not spec.removeprefix("hf:").partition(":")[0].strip():
            raise CorpusError("hf: corpus needs a dataset name: hf:NAME[:CONFIG]")
        return
    if not Path(spec).expanduser().is_file():
        raise CorpusError(f"corpus file not found: {_short(spec)}")


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def load_corpus(spec: str | Path | None = None) -> Corpus:
    """None or 'stdlib' gives the embedded corpus, 'hf:NAME[:CONFIG]' a dataset, else a file."""
    if spec is None or str(spec) == "stdlib":
        return stdlib_corpus()
    if str(spec).startswith("hf:"):
        return hf_dataset_corpus(str(spec))
    return text_file_corpus(Path(spec))
