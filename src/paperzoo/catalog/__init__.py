"""Every reviewed paper as data.

`papers.tsv` beside this file holds one row per paper: facts taken from the review
index (arXiv id, title, review date, the line of the seed file where the review
starts, family, kind, slug) and paperzoo's status for it. The claim an experiment
tests does not live here: it is declared by the experiment itself
(`paperzoo.experiments`), so that the words and the predicate sit beside the code
that measures them.

A verdict status (reproduced / not-reproduced / inconclusive) is never hand-kept:
it is read from the aggregate record over seeds that paperzoo ships in ``results/``
(`shipped_verdict`). The TSV says ``implemented`` for every paper with an
experiment; its note carries the history.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path

# "mapped": a survey whose deliverable is the map of its taxonomy onto paperzoo (catalog/survey_maps.py).
STATUSES = ("planned", "implemented", "reproduced", "not-reproduced", "inconclusive", "mapped", "no-software")
VERDICTS = ("reproduced", "not-reproduced", "inconclusive")


class UnknownPaperError(LookupError):
    """Raised for an id that is neither an arXiv id nor a slug in the catalogue."""


@dataclass(frozen=True)
class Paper:
    arxiv: str
    slug: str
    title: str
    review_date: str
    seed_line: int
    family: str
    kind: str
    status: str
    status_note: str = ""

    @property
    def url(self) -> str:
        return f"https://arxiv.org/abs/{self.arxiv}"


SHIPPED_RESULTS = Path(__file__).resolve().parents[3] / "results"
VERDICT_SCALES = ("small", "large")


def shipped_verdict(slug: str) -> dict | None:
    """The newest aggregate record over seeds shipped in ``results/<slug>/`` at a verdict scale, or None."""
    folder = SHIPPED_RESULTS / slug
    best = None
    for path in sorted(folder.glob("*-aggregate-*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (isinstance(record, dict) and record.get("verdict") in VERDICTS and record.get("scale") in VERDICT_SCALES
                and (best is None or record.get("finished_at", "") >= best.get("finished_at", ""))):
            best = record
    return best


def table_rows() -> tuple[Paper, ...]:
    """papers.tsv as written: facts and the hand-kept status (never a verdict)."""
    text = resources.files(__package__).joinpath("papers.tsv").read_text(encoding="utf-8")
    rows = csv.DictReader(text.splitlines(), delimiter="\t")
    out = tuple(Paper(**{**row, "seed_line": int(row["seed_line"])}) for row in rows)
    for p in out:
        if p.status not in STATUSES:
            raise ValueError(f"papers.tsv: {p.slug} has unknown status {p.status!r}")
    return out


@cache
def papers() -> tuple[Paper, ...]:
    """Every paper, an implemented one carrying the verdict of its shipped aggregate record when there is one."""
    out = []
    for p in table_rows():
        record = shipped_verdict(p.slug) if p.status == "implemented" else None
        if record is not None:
            p = replace(p, status=record["verdict"], status_note=f"{len(record.get('seeds', []))} seeds at "
                        f"{record['scale']}: {record.get('verdict_reason', '')}. {p.status_note}".strip())
        out.append(p)
    return tuple(out)


_ARXIV = re.compile(r"^(?:https?://)?(?:www\.)?(?:export\.)?arxiv\.org/(?:abs|pdf)/(?P<id>[^?#]+?)(?:\.pdf)?/?(?:[?#].*)?$")


def normalise_id(paper_id: str) -> str:
    """'2403.17887', 'arXiv:2403.17887v2', 'https://arxiv.org/abs/2403.17887v2' and a slug's case all agree."""
    key = paper_id.strip()
    if m := _ARXIV.match(key):
        key = m.group("id")
    key = key.lower().removeprefix("arxiv:")
    return re.sub(r"^(\d{4}\.\d{4,5})v\d+$", r"\1", key)


def get(paper_id: str) -> Paper:
    """Look a paper up by arXiv id (versioned, 'arXiv:'-prefixed or as an arxiv.org URL) or by slug."""
    key = normalise_id(paper_id)
    for p in papers():
        if key in (p.arxiv, p.slug):
            return p
    shown = paper_id if len(paper_id) <= 80 else paper_id[:80] + f"... ({len(paper_id)} characters)"
    raise UnknownPaperError(f"unknown paper {shown!r}: not an arXiv id or slug in the catalogue (see `paperzoo list`)")


def families() -> list[str]:
    return sorted({p.family for p in papers()})
