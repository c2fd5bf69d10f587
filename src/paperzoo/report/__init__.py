"""The static HTML report: the catalogue with statuses and verdicts, and one page per experiment run or survey map.

Plain HTML, one stylesheet and a few lines of script (only to filter the catalogue
by family and status; everything shows without it), so that it opens from disk and
can be served by anything. Each experiment page shows the record `results.latest`
picks (the newest aggregate over seeds, else the newest run with a verdict), with
claim, source, predicate, preconditions, checks, the model and corpus it measured,
numbers and plot; a survey's page shows its taxonomy mapped onto paperzoo papers
(`catalog.survey_maps`). A substrate page lists the cards of the shared models those
records stood on (size, training cost, validation figures, the reasoner's targets), and
which papers used each. The output folder is written fresh each time: it is built
beside the target and swapped in, and a folder that is not a paperzoo report is
never replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from html import escape
from pathlib import Path

from paperzoo import catalog
from paperzoo.core import results, store

CSS = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
.scroll { overflow-x: auto; }
#filters { margin: .5rem 0; display: flex; gap: 1rem; flex-wrap: wrap; }
@media (max-width: 640px) {
  body { margin: 1rem auto; font-size: 14px; }
  #catalogue th:nth-child(1), #catalogue td:nth-child(1), #catalogue th:nth-child(3), #catalogue td:nth-child(3) { display: none; }
  #catalogue td, #catalogue th { word-break: break-word; }
}
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
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<link rel=\"stylesheet\" href=\"style.css\"></head><body>\n{body}\n</body></html>\n")


MARKER = ".paperzoo-report"
FILTER_SCRIPT = """
<script>
function filterCatalogue() {
  const family = document.getElementById('family').value, status = document.getElementById('status').value;
  for (const row of document.querySelectorAll('#catalogue tbody tr')) {
    row.hidden = (family && row.dataset.family !== family) || (status && row.dataset.status !== status);
  }
}
</script>"""


class ReportError(ValueError):
    """The report cannot be written where asked."""


def _number(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else escape(str(v))


SCALAR = (int, float, str, bool, type(None))


def _is_rows(v) -> bool:
    """A list of records (one dict per row) with at least one scalar column, shown as a table."""
    return (isinstance(v, list) and bool(v) and all(isinstance(r, dict) for r in v)
            and any(isinstance(x, SCALAR) for x in v[0].values()))


def _rows_table(rows: list[dict]) -> str:
    """The rows' scalar columns; per-item lists (the bootstrap's raw material) stay in the JSON record."""
    keys = [k for k in rows[0] if all(isinstance(r.get(k), SCALAR) for r in rows)]
    head = "".join(f"<th>{escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_number(r.get(k))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<div class=\"scroll\"><table class=\"rows\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


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
    def mark(value) -> str:
        values = value if isinstance(value, list) else [value]
        words = ["pass" if v is True else "fail" if v is False else "undecided" for v in values]
        return words[0] if len(set(words)) == 1 else "/".join(words) + " (by seed)"

    smoke = record.get("scale") == "smoke"
    preconditions = "".join(f"<li>{mark(v)}: {escape(k)}</li>" for k, v in (record.get("preconditions") or {}).items())
    checks = "".join(f"<li>{mark(v)}: {escape(k)}</li>" for k, v in record["checks"].items())
    seeds = (f"seeds {', '.join(map(str, record['seeds']))}" if record.get("kind") == "aggregate"
             else f"seed {record.get('seed')}")
    substrate = "; ".join(f"{c.get('name')} ({c.get('parameters', 0):,} parameters)" for c in record.get("substrate") or [])
    def summary(v) -> str:  # an aggregate's metric: mean and range over seeds
        if isinstance(v, dict) and {"mean", "min", "max"} <= v.keys():
            return f"{_number(v['mean'])} <small>({_number(v['min'])} to {_number(v['max'])})</small>"
        return _number(v)

    scalars = "".join(f"<tr><th>{escape(k)}</th><td>{summary(v)}</td></tr>" for k, v in record["metrics"].items()
                      if (isinstance(v, (int, float, str)) or (isinstance(v, dict) and "mean" in v))
                      and not k.startswith("_"))
    tables = "".join(f"<h3>{escape(k)}</h3>{_rows_table(v)}" for k, v in record["metrics"].items()
                     if not k.startswith("_") and _is_rows(v))
    detail = {k: v for k, v in record["metrics"].items()
              if not k.startswith("_") and not isinstance(v, (int, float, str)) and not _is_rows(v)
              and not (isinstance(v, dict) and "mean" in v)}
    body = f"""{header}
<h2>Verdict: <span class="status {escape(record['verdict'])}">{escape(record['verdict'])}</span>
<small>{escape(record.get('verdict_reason', ''))}</small></h2>
{'<p class="smoke"><b>Smoke scale:</b> these checks only show that the code runs; they are not a verdict.</p>' if smoke else ''}
<p>scale <b>{escape(record['scale'])}</b>, {seeds}; model measured: {escape(str(record.get('model') or 'none'))};
corpus: {escape(str(record.get('corpus') or 'none'))}; finished {escape(record['finished_at'])},
{record.get('wall_seconds', 0):.0f} s; commit {escape(str(record.get('git_commit', 'unknown')))}</p>
{f"<p>substrate: {escape(substrate)}</p>" if substrate else ""}
<h3>Claim</h3><p class="claim">{escape(record['claim'])}</p>
{f"<p><small>source: {escape(record['source'])}</small></p>" if record.get('source') else ""}
<h3>Predicate measured here</h3><p class="predicate">{escape(record['predicate'])}</p>
{f'<h3>Preconditions</h3><ul class="preconditions">{preconditions}</ul>' if preconditions else ''}
<h3>Checks</h3><ul class="checks">{checks}</ul>
<h3>Plot</h3><img class="plot" src="{escape(plot_name)}" alt="plot for {escape(paper.slug)}">
<h3>Numbers</h3><div class="scroll"><table>{scalars}</table></div>
{tables}
<details><summary>All measured values</summary><pre>{escape(json.dumps(detail, indent=1, default=str))}</pre></details>
<p><small>versions: {escape(json.dumps(record.get('versions', {})))}; machine:
{escape(json.dumps(record.get('machine', {})))}</small></p>"""
    return _page(f"{paper.slug}: {record['verdict']}", body)


def _plot_of(record: dict) -> Path | None:
    """A run's plot is beside it; an aggregate shows the plot of its first seed."""
    path = Path(record["_path"])
    if record.get("kind") == "aggregate":
        runs = record.get("runs") or []
        return path.with_name(runs[0]).with_suffix(".png") if runs else None
    return path.with_suffix(".png")


def build_report(out: Path, results_dir=None) -> Path:
    """Write index.html, style.css and one page (plus plot) per experiment that has run, replacing `out`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"report output is not a directory: {out}")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ReportError(f"{out} is not empty and holds no paperzoo report; choose an empty or new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        _write_report(tmp, results_dir)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old.tmp")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"


def _card_cell(value) -> str:
    if isinstance(value, dict) and value and all(isinstance(v, dict) and "pass" in v for v in value.values()):
        return "<br>".join(f'<span class="{"reproduced" if v["pass"] else "not-reproduced"}">'
                           f'{"pass" if v["pass"] else "FAIL"}</span> {escape(k)}: {escape(json.dumps(v["value"]))} '
                           f'(target {escape(v["target"])})' for k, v in value.items())
    if isinstance(value, (dict, list)):
        return f"<pre>{escape(json.dumps(value, indent=1))}</pre>"
    return _number(value)


def substrate_page(records: dict[str, dict | None]) -> str:
    """The cards of every shared model the shown records stood on, with the papers that used each."""
    cards: dict[str, dict] = {}
    users: dict[str, list[str]] = {}
    for slug, record in records.items():
        for card in (record or {}).get("substrate") or []:
            cards.setdefault(card["name"], card)
            users.setdefault(card["name"], []).append(slug)
    sections = []
    for name, card in sorted(cards.items()):
        rows = "".join(f"<tr><th>{escape(k)}</th><td>{_card_cell(v)}</td></tr>" for k, v in card.items() if k != "name")
        used = ", ".join(f'<a href="{u}.html">{escape(u)}</a>' for u in users[name])
        sections.append(f"<h2>{escape(name)}</h2><p>used by {used}</p><div class=\"scroll\"><table>{rows}</table></div>")
    body = ("<p><a href=\"index.html\">&larr; catalogue</a></p><h1>Substrate</h1>"
            "<p>The shared models paperzoo trains and caches, as the records shown in this report name them "
            "(cache key, size, training time, validation figures; the reasoner's card against its targets). "
            "<code>paperzoo substrate</code> lists what is cached on this machine.</p>"
            + ("".join(sections) or "<p class=\"none\">No record names a shared model.</p>"))
    return _page("paperzoo substrate", body)


def _write_report(out: Path, results_dir=None) -> None:
    (out / MARKER).write_text("written by paperzoo report; the whole folder is replaced on the next report\n")
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
            png = _plot_of(record)
            if png is not None and png.exists():
                store.write_atomic(out / plot_name, png.read_bytes())
            verdict = (f'<a href="{p.slug}.html" class="status {escape(record["verdict"])}">{escape(record["verdict"])}</a>'
                       f' <small>({escape(record["scale"])})</small>')
        elif p.slug in pages:
            verdict = f'<a href="{p.slug}.html">survey map</a>'
        if p.slug in pages:
            store.write_atomic(out / f"{p.slug}.html", paper_page(p, record, plot_name, pages))
        rows.append(f'<tr data-family="{escape(p.family)}" data-status="{p.status}"><td><a href="{p.url}">{p.arxiv}</a></td>'
                    f'<td>{escape(p.slug)}</td><td>{escape(p.family)}</td>'
                    f'<td class="status {p.status}">{p.status}</td><td>{verdict}</td><td>{escape(p.title)}'
                    f'{"<br><small>" + escape(p.status_note) + "</small>" if p.status_note else ""}</td></tr>')
    store.write_atomic(out / "substrate.html", substrate_page(records))
    counts = Counter(p.status for p in catalog.papers())
    summary = ", ".join(f"{s}: {counts[s]}" for s in catalog.STATUSES if counts[s])
    families = "".join(f'<option value="{escape(f)}">{escape(f)}</option>' for f in catalog.families())
    statuses = "".join(f'<option value="{s}">{s}</option>' for s in catalog.STATUSES if counts[s])
    body = f"""<h1>paperzoo</h1>
<p>{len(catalog.papers())} reviewed papers. {escape(summary)}. The models the verdicts stand on:
<a href="substrate.html">substrate</a>.</p>
<form id="filters" onchange="filterCatalogue()">
<label>family <select id="family"><option value="">all</option>{families}</select></label>
<label>status <select id="status"><option value="">all</option>{statuses}</select></label>
</form>
<div class="scroll"><table id="catalogue"><thead><tr><th>arXiv</th><th>slug</th><th>family</th><th>status</th><th>last run</th><th>title</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table></div>{FILTER_SCRIPT}"""
    store.write_atomic(out / "index.html", _page("paperzoo catalogue", body))
