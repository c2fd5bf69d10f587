"""The static HTML report: the catalogue with statuses and verdicts, and one page per experiment run or survey map.

Plain HTML and one stylesheet, no JavaScript, so that it opens from disk and can be
served by anything. Each experiment page shows the run `results.latest` picks (the
newest with a verdict), with claim, predicate, checks, numbers and plot; a survey's
page shows its taxonomy mapped onto paperzoo papers (`catalog.survey_maps`).
"""

from __future__ import annotations

import json
from collections import Counter
from html import escape
from pathlib import Path

from paperzoo import catalog
from paperzoo.core import results, store

CSS = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 6px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; position: sticky; top: 0; }
.status { font-weight: 600; white-space: nowrap; }
.reproduced { color: #11772d; } .not-reproduced { color: #b3261e; } .inconclusive { color: #9a6700; }
.implemented { color: #0b6bcb; } .planned { color: #888; } .no-software { color: #7b3fa0; } .smoke { color: #888; }
.mapped { color: #3949ab; } .none { color: #888; font-style: italic; }
pre { background: #f6f6f6; padding: .75rem; overflow-x: auto; font-size: 12px; }
img.plot { max-width: 100%; border: 1px solid #ddd; }
"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<link rel=\"stylesheet\" href=\"style.css\"></head><body>\n{body}\n</body></html>\n")


def _number(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else escape(str(v))


def _is_rows(v) -> bool:
    """A list of flat records (one dict of scalars per row), shown as a table."""
    return (isinstance(v, list) and bool(v) and all(isinstance(r, dict) for r in v)
            and all(isinstance(x, (int, float, str, bool, type(None))) for r in v for x in r.values()))


def _rows_table(rows: list[dict]) -> str:
    head = "".join(f"<th>{escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_number(r.get(k))}</td>" for k in rows[0]) + "</tr>" for r in rows)
    return f"<table class=\"rows\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def survey_map_section(paper: catalog.Paper, pages: set[str]) -> str:
    """The survey's taxonomy as a table: branch, what the survey puts there, the paperzoo papers in it."""
    from paperzoo.catalog.survey_maps import survey_map

    branches = survey_map(paper.slug)
    if branches is None:
        return ""

    def entry(slug: str) -> str:
        q = catalog.get(slug)
        name = f'<a href="{q.slug}.html">{escape(q.slug)}</a>' if q.slug in pages else escape(q.slug)
        return f'{name} <span class="status {q.status}">{q.status}</span>'

    rows = "".join(
        f"<tr><td>{escape(b.group)}</td><td><b>{escape(b.name)}</b></td><td>{escape(b.description)}"
        + (f"<br><small>{escape(b.note)}</small>" if b.note else "") + "</td><td>"
        + ("<br>".join(entry(s) for s in b.slugs) if b.slugs else '<span class="none">none in paperzoo</span>')
        + "</td></tr>" for b in branches)
    built = sum(1 for b in branches if b.slugs)
    return (f'<h2>Survey map</h2><p>{len(branches)} branches of the survey\'s taxonomy, {built} with paperzoo papers; '
            f'statuses as in the catalogue.</p><table id="survey-map"><thead><tr><th>level</th><th>branch</th>'
            f"<th>what the survey puts there</th><th>paperzoo papers</th></tr></thead><tbody>{rows}</tbody></table>")


def paper_page(paper: catalog.Paper, record: dict | None, plot_name: str,
               pages: set[str] | frozenset[str] = frozenset()) -> str:
    """A paper's page: its survey map (surveys only) and the run `results.latest` picks (when one exists)."""
    header = f"""<p><a href="index.html">&larr; catalogue</a></p>
<h1>{escape(paper.title)}</h1>
<p><a href="{paper.url}">arXiv:{paper.arxiv}</a> &middot; {escape(paper.family)} &middot; reviewed {paper.review_date}
&middot; status <span class="status {paper.status}">{paper.status}</span></p>
{survey_map_section(paper, pages)}"""
    if record is None:
        return _page(f"{paper.slug}: {paper.status}", header)
    checks = "".join(f"<li>{'pass' if v else 'undecided' if v is None else 'fail'}: {escape(k)}</li>"
                     for k, v in record["checks"].items())
    scalars = "".join(f"<tr><th>{escape(k)}</th><td>{_number(v)}</td></tr>" for k, v in record["metrics"].items()
                      if isinstance(v, (int, float, str)) and not k.startswith("_"))
    tables = "".join(f"<h3>{escape(k)}</h3>{_rows_table(v)}" for k, v in record["metrics"].items()
                     if not k.startswith("_") and _is_rows(v))
    detail = {k: v for k, v in record["metrics"].items()
              if not k.startswith("_") and not isinstance(v, (int, float, str)) and not _is_rows(v)}
    body = f"""{header}
<h2>Verdict: <span class="status {escape(record['verdict'])}">{escape(record['verdict'])}</span></h2>
<p>scale <b>{escape(record['scale'])}</b>, seed {record['seed']}, model {escape(str(record.get('model')))},
finished {escape(record['finished_at'])}, {record['wall_seconds']:.0f} s</p>
<h3>Claim</h3><p class="claim">{escape(record['claim'])}</p>
<h3>Predicate measured here</h3><p class="predicate">{escape(record['predicate'])}</p>
<ul class="checks">{checks}</ul>
<h3>Plot</h3><img class="plot" src="{escape(plot_name)}" alt="plot for {escape(paper.slug)}">
<h3>Numbers</h3><table>{scalars}</table>
{tables}
<details><summary>All measured values</summary><pre>{escape(json.dumps(detail, indent=1, default=str))}</pre></details>
<p><small>versions: {escape(json.dumps(record['versions']))}</small></p>"""
    return _page(f"{paper.slug}: {record['verdict']}", body)


def build_report(out: Path, results_dir=None) -> Path:
    """Write index.html, style.css and one page (plus plot) per experiment that has run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"report output is not a directory: {out}")
    store.write_atomic(out / "style.css", CSS)
    from paperzoo.catalog.survey_maps import survey_map

    records = {p.slug: results.latest(p.slug, results_dir) for p in catalog.papers()}
    pages = {slug for slug, r in records.items() if r is not None or survey_map(slug) is not None}
    rows = []
    for p in catalog.papers():
        record = records[p.slug]
        verdict = ""
        plot_name = f"{p.slug}.png"
        if record is not None:
            png = Path(record["_path"]).with_suffix(".png")
            if png.exists():
                store.write_atomic(out / plot_name, png.read_bytes())
            verdict = (f'<a href="{p.slug}.html" class="status {escape(record["verdict"])}">{escape(record["verdict"])}</a>'
                       f' <small>({escape(record["scale"])})</small>')
        elif p.slug in pages:
            verdict = f'<a href="{p.slug}.html">survey map</a>'
        if p.slug in pages:
            store.write_atomic(out / f"{p.slug}.html", paper_page(p, record, plot_name, pages))
        rows.append(f'<tr><td><a href="{p.url}">{p.arxiv}</a></td><td>{escape(p.slug)}</td><td>{escape(p.family)}</td>'
                    f'<td class="status {p.status}">{p.status}</td><td>{verdict}</td><td>{escape(p.title)}'
                    f'{"<br><small>" + escape(p.status_note) + "</small>" if p.status_note else ""}</td></tr>')
    counts = Counter(p.status for p in catalog.papers())
    summary = ", ".join(f"{s}: {counts[s]}" for s in catalog.STATUSES if counts[s])
    body = f"""<h1>paperzoo</h1>
<p>{len(catalog.papers())} reviewed papers. {escape(summary)}.</p>
<table id="catalogue"><thead><tr><th>arXiv</th><th>slug</th><th>family</th><th>status</th><th>last run</th><th>title</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>"""
    return store.write_atomic(out / "index.html", _page("paperzoo catalogue", body))
