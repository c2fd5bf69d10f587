"""paperzoo's command line: list, show, run, report."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from paperzoo import catalog

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="The executable companion to a year of ML paper reviews.")
console = Console()
STATUS_STYLE = {"planned": "dim", "implemented": "cyan", "reproduced": "green", "not-reproduced": "red",
                "inconclusive": "yellow", "mapped": "blue", "no-software": "magenta", "smoke": "dim"}


def fail(message: str, code: int = 1):
    """One line on stderr, a non-zero exit, no traceback."""
    print(f"paperzoo: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def user_errors():
    from paperzoo.core.corpus import CorpusError
    from paperzoo.core.experiment import ExperimentError
    from paperzoo.core.models import ModelLoadError
    from paperzoo.core.training import NonFiniteLossError

    return (catalog.UnknownPaperError, ExperimentError, ModelLoadError, CorpusError, NonFiniteLossError,
            FileNotFoundError, NotADirectoryError, PermissionError)


@app.command("list")
def list_papers(
    family: Optional[str] = typer.Option(None, help="Only this family."),
    status: Optional[str] = typer.Option(None, help="Only this status."),
):
    """The whole catalogue as a table, with counts per status."""
    if family and family not in catalog.families():
        fail(f"unknown family {family!r} (families: {', '.join(catalog.families())})")
    if status and status not in catalog.STATUSES:
        fail(f"unknown status {status!r} (statuses: {', '.join(catalog.STATUSES)})")
    rows = [p for p in catalog.papers() if (not family or p.family == family) and (not status or p.status == status)]
    table = Table(show_lines=False, header_style="bold")
    for col in ("arXiv", "slug", "family", "kind", "status", "title"):
        table.add_column(col, overflow="fold")
    for p in rows:
        table.add_row(p.arxiv, p.slug, p.family, p.kind, f"[{STATUS_STYLE[p.status]}]{p.status}[/]", p.title)
    console.print(table)
    counts = Counter(p.status for p in rows)
    console.print(f"{len(rows)} papers" + (": " if rows else "") + ", ".join(f"{s} {counts[s]}" for s in catalog.STATUSES if counts[s]))


def print_checks(checks: dict) -> None:
    for name, value in checks.items():
        console.print(f"  {'pass' if value else 'undecided' if value is None else 'fail'}: {name}")


def _scalar_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not k.startswith("_")}


def print_survey_map(p: catalog.Paper) -> None:
    """A survey's taxonomy as a tree of branches and the catalogue papers in each; for other papers, where they appear."""
    from rich.markup import escape
    from rich.tree import Tree

    from paperzoo.catalog import survey_maps

    branches = survey_maps.survey_map(p.slug)
    if branches is None:
        covering = survey_maps.surveys_covering(p.slug)
        if covering:
            console.print("in survey maps: " + "; ".join(escape(f"{s} > {b.group} > {b.name}") for s, b in covering))
        return
    tree = Tree(f"[bold]Survey map[/] ({len(branches)} branches, "
                f"{sum(1 for b in branches if b.slugs)} with paperzoo papers)")
    groups: dict[str, Tree] = {}
    for b in branches:
        group = groups.get(b.group) or groups.setdefault(b.group, tree.add(f"[bold]{escape(b.group)}[/]"))
        node = group.add(f"[bold]{escape(b.name)}[/]: {escape(b.description)}"
                         + (f"\n[italic]{escape(b.note)}[/]" if b.note else ""))
        if not b.slugs:
            node.add("[dim]none in paperzoo[/]")
        for slug in b.slugs:
            q = catalog.get(slug)
            node.add(f"{q.slug} [{STATUS_STYLE[q.status]}]{q.status}[/] {escape(q.title)}")
    console.print(tree)


@app.command()
def show(paper_id: str = typer.Argument(..., metavar="ID", help="arXiv id or slug."),
         out: Optional[Path] = typer.Option(None, help="Results directory to read (default: $PAPERZOO_HOME/results).")):
    """A paper's facts, claim, code locations and last verdict."""
    from paperzoo.core import results
    from paperzoo.core.experiment import experiment_module, method_module_name

    try:
        p = catalog.get(paper_id)
    except catalog.UnknownPaperError as e:
        fail(str(e))
    console.print(f"[bold]{p.title}[/]  ({p.url})")
    console.print(f"slug {p.slug} | family {p.family} | kind {p.kind} | reviewed {p.review_date} (seed line {p.seed_line})")
    console.print(f"status: [{STATUS_STYLE[p.status]}]{p.status}[/]" + (f" - {p.status_note}" if p.status_note else ""))
    exp = experiment_module(p.slug)
    console.print(f"method: {method_module_name(p.slug) or '-'}")
    console.print(f"experiment: {exp.__name__ if exp else '-'}" + (f"  (scales: {', '.join(exp.SCALES)})" if exp else ""))
    if exp:
        console.print(f"\n[bold]Claim[/] {exp.CLAIM.statement}\n[bold]Predicate[/] {exp.CLAIM.predicate}")
    print_survey_map(p)
    record = results.latest(p.slug, out)
    if record is None:
        console.print("\nno runs recorded yet" + (f"; try `paperzoo run {p.slug}`" if exp else ""))
        return
    console.print(f"\n[bold]Last run[/] {record['finished_at']} scale={record['scale']} seed={record['seed']} "
                  f"({record['wall_seconds']:.0f}s): [{STATUS_STYLE.get(record['verdict'], 'bold')}]{record['verdict']}[/]")
    print_checks(record["checks"])
    for k, v in _scalar_metrics(record["metrics"]).items():
        console.print(f"  {k} = {v:.4g}" if isinstance(v, float) else f"  {k} = {v}")
    console.print(f"  record: {record['_path']}")


@app.command()
def run(
    paper_id: str = typer.Argument(..., metavar="ID", help="arXiv id or slug."),
    scale: str = typer.Option("small", help="smoke (seconds, no verdict), small (minutes on a CPU) or large (GPU)."),
    seed: int = typer.Option(0),
    model: Optional[str] = typer.Option(None, help="A HF causal LM: local directory or hub name."),
    corpus: Optional[str] = typer.Option(None, help="A UTF-8 text file, or hf:NAME[:CONFIG]; default: the embedded corpus."),
    out: Optional[Path] = typer.Option(None, help="Results directory (default: $PAPERZOO_HOME/results)."),
    trust_remote_code: bool = typer.Option(False, help="Allow a model's own code to run when loading it."),
):
    """Run a paper's experiment to a verdict, writing a JSON record and a plot."""
    from paperzoo.core.experiment import SCALE_NAMES, run_experiment

    if scale not in SCALE_NAMES:
        fail(f"unknown scale {scale!r} (scales: {', '.join(SCALE_NAMES)})")
    try:
        record = run_experiment(paper_id, scale, seed, model, corpus, out, trust_remote_code)
    except user_errors() as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    style = STATUS_STYLE.get(record["verdict"], "bold")
    console.print(f"[bold]{record['paper']['slug']}[/] ({record['scale']}, seed {record['seed']}): [{style}]{record['verdict']}[/]")
    print_checks(record["checks"])
    console.print(f"record: {record['_path']}\nplot:   {Path(record['_path']).with_suffix('.png')}")


@app.command()
def report(out: Path = typer.Option(Path("report"), help="Directory to write the HTML site into."),
           results_dir: Optional[Path] = typer.Option(None, "--results", help="Results directory to read.")):
    """Write the static HTML report: the catalogue, and a page per experiment that ran."""
    from paperzoo.report import build_report

    try:
        index = build_report(out, results_dir)
    except (FileExistsError, NotADirectoryError, PermissionError) as e:
        fail(str(e))
    console.print(f"report written: {index}")


if __name__ == "__main__":  # pragma: no cover
    app()
