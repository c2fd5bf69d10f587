"""Every reviewed paper as data.

`papers.tsv` beside this file holds one row per paper: facts taken from the review
index (arXiv id, title, review date, the line of the seed file where the review
starts, family, kind, slug) and paperzoo's status for it. The claim an experiment
tests does not live here: it is declared by the experiment itself
(`paperzoo.experiments`), so that the words and the predicate sit beside the code
that measures them.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from importlib import resources

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


@cache
def papers() -> tuple[Paper, ...]:
    text = resources.files(__package__).joinpath("papers.tsv").read_text(encoding="utf-8")
    rows = csv.DictReader(text.splitlines(), delimiter="\t")
    out = tuple(Paper(**{**row, "seed_line": int(row["seed_line"])}) for row in rows)
    for p in out:
        if p.status not in STATUSES:
            raise ValueError(f"papers.tsv: {p.slug} has unknown status {p.status!r}")
    return out


def get(paper_id: str) -> Paper:
    """Look a paper up by arXiv id (with or without the 'arXiv:' prefix) or by slug."""
    key = paper_id.strip().lower().removeprefix("arxiv:")
    for p in papers():
        if key in (p.arxiv, p.slug):
            return p
    raise UnknownPaperError(f"unknown paper {paper_id!r}: not an arXiv id or slug in the catalogue (see `paperzoo list`)")


def families() -> list[str]:
    return sorted({p.family for p in papers()})
