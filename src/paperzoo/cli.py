"""paperzoo's command line: list, show, run, sweep, substrate, report.

Output to a terminal is rich; output to a pipe is never wrapped (a record path or a
table row stays on one line), progress bars go to stderr and only to a terminal, and
`list` and `show` take ``--json`` for programs.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from paperzoo import catalog

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="The executable companion to a year of ML paper reviews.")
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 10_000)
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
    from paperzoo.core.results import ResultsError
    from paperzoo.core.store import HomeError
    from paperzoo.core.training import NonFiniteLossError

    return (catalog.UnknownPaperError, ExperimentError, ModelLoadError, CorpusError, NonFiniteLossError,
            ResultsError, HomeError, FileNotFoundError, NotADirectoryError, PermissionError)


def first_line(e: Exception) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= 300 else line[:300] + "..."


def quiet_libraries() -> None:
    """Library deprecation chatter is for library authors, not paperzoo's users."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|peft)\.")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, default=str) + "\n")


@app.command("list")
def list_papers(
    family: Optional[str] = typer.Option(None, help="Only this family."),
    status: Optional[str] = typer.Option(None, help="Only this status."),
    as_json: bool = typer.Option(False, "--json", help="One JSON list of papers, for programs."),
):
    """The whole catalogue as a table, with counts per status."""
    if family is not None and family not in catalog.families():
        fail(f"unknown family {family!r} (families: {', '.join(catalog.families())})")
    if status is not None and status not in catalog.STATUSES:
        fail(f"unknown status {status!r} (statuses: {', '.join(catalog.STATUSES)})")
    rows = [p for p in catalog.papers() if (family is None or p.family == family) and (status is None or p.status == status)]
    if as_json:
        from dataclasses import asdict

        print_json([{**asdict(p), "url": p.url} for p in rows])
        return
    table = Table(show_lines=False, header_style="bold")
    for col in ("arXiv", "slug", "family", "kind", "status", "title"):
        table.add_column(col, overflow="fold")
    for p in rows:
        table.add_row(p.arxiv, p.slug, p.family, p.kind, f"[{STATUS_STYLE[p.status]}]{p.status}[/]", p.title)
    console.print(table)
    counts = Counter(p.status for p in rows)
    console.print(f"{len(rows)} papers" + (": " if rows else "") + ", ".join(f"{s} {counts[s]}" for s in catalog.STATUSES if counts[s]))


def print_checks(record: dict) -> None:
    """Preconditions, then checks; a smoke run's are shown as code-path results, never as a verdict."""
    smoke = record.get("scale") == "smoke"
    if smoke:
        console.print("  [dim](smoke scale: the values below only show the code runs; they are not a verdict)[/]")

    def mark(value) -> str:
        values = value if isinstance(value, list) else [value]
        words = ["pass" if v is True else "fail" if v is False else "undecided" for v in values]
        return words[0] if len(set(words)) == 1 else "/".join(words) + " (by seed)"

    for title, key in (("precondition", "preconditions"), ("check", "checks")):
        for name, value in (record.get(key) or {}).items():
            console.print(f"  {title} {mark(value)}: {escape(name)}")


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


def describe_run(record: dict) -> str:
    seeds = f"seeds {','.join(map(str, record['seeds']))}" if record.get("kind") == "aggregate" else f"seed {record.get('seed')}"
    return (f"{record['finished_at']} scale={record['scale']} {seeds} ({record.get('wall_seconds', 0):.0f}s), "
            f"model: {record.get('model') or 'none'}, corpus: {record.get('corpus') or 'none'}")


@app.command()
def show(paper_id: str = typer.Argument(..., metavar="ID", help="arXiv id (or URL) or slug."),
         out: Optional[str] = typer.Option(None, help="Results directory to read (default: yours, then the shipped ones)."),
         as_json: bool = typer.Option(False, "--json", help="The paper, its claim and its shown record as JSON.")):
    """A paper's facts, claim, code locations and last verdict."""
    from dataclasses import asdict

    from paperzoo.core import results
    from paperzoo.core.experiment import experiment_module, method_module_name

    try:
        p = catalog.get(paper_id)
        record = results.latest(p.slug, out)
    except user_errors() as e:
        fail(first_line(e))
    exp = experiment_module(p.slug)
    if as_json:
        print_json({"paper": {**asdict(p), "url": p.url}, "method": method_module_name(p.slug),
                    "experiment": exp.__name__ if exp else None,
                    "claim": exp.CLAIM.statement if exp else None, "source": exp.CLAIM.source if exp else None,
                    "predicate": exp.CLAIM.predicate if exp else None, "record": record})
        return
    console.print(f"[bold]{escape(p.title)}[/]  ({p.url})")
    console.print(f"slug {p.slug} | family {p.family} | kind {p.kind} | reviewed {p.review_date} (seed line {p.seed_line})")
    console.print(f"status: [{STATUS_STYLE[p.status]}]{p.status}[/]" + (f" - {escape(p.status_note)}" if p.status_note else ""))
    console.print(f"method: {method_module_name(p.slug) or '-'}")
    console.print(f"experiment: {exp.__name__ if exp else '-'}" + (f"  (scales: {', '.join(exp.SCALES)})" if exp else ""))
    if exp:
        console.print(f"\n[bold]Claim[/] {escape(exp.CLAIM.statement)}"
                      + (f"\n[bold]Source[/] {escape(exp.CLAIM.source)}" if exp.CLAIM.source else "")
                      + f"\n[bold]Predicate[/] {escape(exp.CLAIM.predicate)}")
    print_survey_map(p)
    if record is None:
        console.print("\nno runs recorded yet" + (f"; try `paperzoo run {p.slug}`" if exp else ""))
        return
    verdict = record["verdict"]
    console.print(f"\n[bold]{'Verdict over seeds' if record.get('kind') == 'aggregate' else 'Last run'}[/] "
                  f"{escape(describe_run(record))}: [{STATUS_STYLE.get(verdict, 'bold')}]{verdict}[/]"
                  + (f" ({escape(record['verdict_reason'])})" if record.get("verdict_reason") else ""))
    print_checks(record)
    for k, v in record["metrics"].items():
        if isinstance(v, dict) and {"mean", "min", "max"} <= v.keys() and not k.startswith("_"):
            console.print(f"  {k} = {v['mean']:.4g} (over seeds {v['min']:.4g} to {v['max']:.4g})")
    for k, v in _scalar_metrics(record["metrics"]).items():
        console.print(f"  {k} = {v:.4g}" if isinstance(v, float) else f"  {k} = {escape(str(v))}")
    console.print(f"  record: {record['_path']}")


def parse_seeds(seed: Optional[int], seeds: Optional[str], scale: str) -> list[int]:
    from paperzoo.core.experiment import DEFAULT_SEEDS, MAX_SEED

    if seed is not None and seeds is not None:
        fail("give --seed or --seeds, not both")
    if seed is not None:
        values = [seed]
    elif seeds is not None:
        try:
            values = [int(x) for x in seeds.split(",") if x.strip()]
        except ValueError:
            fail(f"--seeds takes comma-separated integers, got {seeds[:80]!r}")
        if not values:
            fail("--seeds is empty")
    else:
        values = list(DEFAULT_SEEDS.get(scale, (0,)))
    for v in values:
        if not 0 <= v <= MAX_SEED:
            fail(f"seed must be an integer from 0 to {MAX_SEED}, got {v}")
    if len(set(values)) != len(values):
        fail(f"--seeds repeats a seed: {seeds}")
    return values


# Rough peak memory of a `large` run on a CPU (the base LM's training), checked before it starts.
LARGE_NEEDS_GIB = 16


def check_machine(scale: str, force: bool) -> None:
    """Refuse, before any work, a scale this machine cannot hold (unless --force)."""
    if scale != "large" or force:
        return
    import torch

    if torch.cuda.is_available():
        return
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        available = float("nan")
    fail(f"--scale large is sized for a GPU and this machine has none ({available:.0f} GiB of memory free, "
         f"about {LARGE_NEEDS_GIB} GiB and hours of CPU needed); use --scale small, or pass --force to run anyway")


@app.command()
def run(
    paper_id: str = typer.Argument(..., metavar="ID", help="arXiv id (or URL) or slug."),
    scale: str = typer.Option("small", help="smoke (seconds, no verdict), small (minutes on a CPU) or large (GPU)."),
    seed: Optional[int] = typer.Option(None, help="One seed (default: 0,1,2 at small, 0 otherwise)."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds, each its own record, then an aggregate verdict."),
    model: Optional[str] = typer.Option(None, help="A HF causal LM: local directory or hub name (experiments that take one)."),
    corpus: Optional[str] = typer.Option(None, help="A UTF-8 text file, or hf:NAME[:CONFIG]; default: the embedded corpus."),
    out: Optional[str] = typer.Option(None, help="Results directory (default: $PAPERZOO_HOME/results)."),
    trust_remote_code: bool = typer.Option(False, help="Allow a model's own code to run when loading it."),
    force: bool = typer.Option(False, help="Run a scale this machine looks too small for."),
):
    """Run a paper's experiment to a verdict: one JSON record and plot per seed, and an aggregate over seeds."""
    from paperzoo.core import store
    from paperzoo.core.experiment import SCALE_NAMES, plan, run_seeds

    quiet_libraries()
    if scale not in SCALE_NAMES:
        fail(f"unknown scale {scale!r} (scales: {', '.join(SCALE_NAMES)})")
    seed_list = parse_seeds(seed, seeds, scale)
    try:
        from paperzoo.core.results import check_writable

        plan(paper_id, scale, model, corpus, out)
        check_writable(store.home())  # caches live there even when --out points elsewhere
        check_machine(scale, force)

        def report_seed(record: dict) -> None:
            style = STATUS_STYLE.get(record["verdict"], "bold")
            console.print(f"[bold]{record['paper']['slug']}[/] ({record['scale']}, seed {record['seed']}): "
                          f"[{style}]{record['verdict']}[/]")
            print_checks(record)
            console.print(f"record: {record['_path']}\nplot:   {Path(record['_path']).with_suffix('.png')}")

        _, aggregate = run_seeds(paper_id, scale, seed_list, model, corpus, out,
                                 trust_remote_code, on_record=report_seed)
    except user_errors() as e:
        fail(first_line(e))
    if aggregate is not None:
        style = STATUS_STYLE.get(aggregate["verdict"], "bold")
        console.print(f"[bold]{aggregate['paper']['slug']}[/] over seeds {','.join(map(str, aggregate['seeds']))}: "
                      f"[{style}]{aggregate['verdict']}[/] ({escape(aggregate['verdict_reason'])})")
        console.print(f"aggregate: {aggregate['_path']}")


@app.command()
def sweep(
    papers: Optional[list[str]] = typer.Argument(None, metavar="[ID]...", help="Papers to run (ids or slugs)."),
    family: Optional[str] = typer.Option(None, help="Every paper of this family that has an experiment."),
    all_papers: bool = typer.Option(False, "--all", help="Every paper that has an experiment."),
    scale: str = typer.Option("small", help="smoke, small or large."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds."),
    address: Optional[str] = typer.Option(None, help="A running Ray cluster's address (default: a local Ray on every core)."),
    cpus: Optional[int] = typer.Option(None, help="Local cores to use (default: all)."),
    out: Optional[str] = typer.Option(None, help="Results directory (default: $PAPERZOO_HOME/results)."),
    force: bool = typer.Option(False, help="Run a scale this machine looks too small for."),
):
    """Run every (paper, seed) as a Ray task; resumes a killed sweep; writes one aggregate verdict per paper."""
    from paperzoo.core.experiment import SCALE_NAMES, experiment_module

    quiet_libraries()
    if scale not in SCALE_NAMES:
        fail(f"unknown scale {scale!r} (scales: {', '.join(SCALE_NAMES)})")
    if sum(bool(x) for x in (papers, family is not None, all_papers)) != 1:
        fail("name papers, or give --family F, or --all (exactly one of them)")
    if family is not None and family not in catalog.families():
        fail(f"unknown family {family!r} (families: {', '.join(catalog.families())})")
    if cpus is not None and cpus < 1:
        fail(f"--cpus must be at least 1, got {cpus}")
    seed_list = parse_seeds(None, seeds, scale)
    try:
        if papers:
            slugs = list(dict.fromkeys(catalog.get(x).slug for x in papers))
        else:
            slugs = [p.slug for p in catalog.papers() if (all_papers or p.family == family) and experiment_module(p.slug)]
        if not slugs:
            fail(f"no paper with an experiment in family {family!r}")
        check_machine(scale, force)
        from paperzoo.core.sweep import sweep as run_sweep

        summary = run_sweep(slugs, scale, seed_list, out, address, cpus)
    except user_errors() as e:
        fail(first_line(e))
    except ImportError as e:
        fail(f"sweeps need Ray: pip install -e \".[sweep]\" ({first_line(e)})")
    console.print(f"sweep: {summary.ran} runs, {summary.skipped} already done, {len(summary.failed)} failed")
    for line in summary.failed:
        print(f"paperzoo: failed: {line}", file=sys.stderr)
    for a in summary.aggregates:
        style = STATUS_STYLE.get(a["verdict"], "bold")
        console.print(f"{a['paper']['slug']}: [{style}]{a['verdict']}[/] ({escape(a['verdict_reason'])})  {a['_path']}")
    if summary.failed:
        raise typer.Exit(1)


substrate_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, invoke_without_command=True,
                            help="The shared models experiments stand on: cached or not, their cards; build one.")
app.add_typer(substrate_app, name="substrate")


def _card_summary(card: dict | None) -> str:
    if card is None:
        return ""
    parts = ([f"{card['parameters'] / 1e6:.2f}M params"] if "parameters" in card else []) + \
        [f"trained {card['train_seconds']:.0f} s"]
    val = card.get("validation", {})
    if "perplexity" in val:
        parts.append(f"val ppl {val['perplexity']:.3g}")
    if "greedy_accuracy" in card:
        parts.append(f"greedy {card['greedy_accuracy']:.2f}")
    targets = card.get("targets")
    if targets:
        failed = [k for k, v in targets.items() if not v["pass"]]
        parts.append(f"targets {len(targets) - len(failed)}/{len(targets)}" + (f" (fails: {'; '.join(failed)})"
                                                                               if failed else ""))
    return ", ".join(parts)


@substrate_app.callback()
def substrate(ctx: typer.Context,
              scale: Optional[str] = typer.Option(None, help="Only this scale (default: smoke and small)."),
              as_json: bool = typer.Option(False, "--json", help="Every card in full, as JSON.")):
    """List every shared model at each scale: cached or not, and its card. Trains nothing."""
    if ctx.invoked_subcommand is not None:
        return
    from paperzoo.core.experiment import SCALE_NAMES
    from paperzoo.core.substrate import status

    quiet_libraries()
    if scale is not None and scale not in SCALE_NAMES:
        fail(f"unknown scale {scale!r} (scales: {', '.join(SCALE_NAMES)})")
    try:
        rows = status((scale,) if scale else ("smoke", "small"))
    except user_errors() as e:
        fail(first_line(e))
    if as_json:
        print_json(rows)
        return
    table = Table("name", "scale", "cached", "card", "what it is", show_lines=False)
    for r in rows:
        table.add_row(r["name"], r["scale"], "[green]yes[/]" if r["cached"] else "[dim]no[/]",
                      escape(_card_summary(r["card"])), escape(r["description"]))
    console.print(table)
    console.print("build one: paperzoo substrate build NAME --scale SCALE")


@substrate_app.command("build")
def substrate_build(name: str = typer.Argument(..., metavar="NAME", help="base-lm, reasoner, draft, reasoner-controls or moe-lm."),
                    scale: str = typer.Option("small", help="smoke, small or large."),
                    force: bool = typer.Option(False, help="Build a scale this machine looks too small for.")):
    """Build one shared model (with a progress bar), or find it cached, and print its card."""
    from paperzoo.core.substrate import BUILDERS, SCALES, build, card

    quiet_libraries()
    if name not in BUILDERS:
        fail(f"unknown substrate {name!r} (known: {', '.join(BUILDERS)})")
    if scale not in SCALES[name]:
        fail(f"{name} has no {scale!r} scale (it has: {', '.join(SCALES[name])})")
    check_machine(scale, force)
    try:
        build([name], scale)
        c = card(name, scale)
    except user_errors() as e:
        fail(first_line(e))
    console.print(f"{name} ({scale}): {escape(_card_summary(c))}")
    for target, v in (c or {}).get("targets", {}).items():
        mark = "[green]pass[/]" if v["pass"] else "[red]FAIL[/]"
        console.print(f"  {mark} {escape(target)}: {escape(str(v['value']))} (target {escape(v['target'])})")


@app.command()
def report(out: str = typer.Option("report", help="Directory to write the HTML site into (replaced)."),
           results_dir: Optional[str] = typer.Option(None, "--results", help="Results directory to read.")):
    """Write the static HTML report: the catalogue, and a page per experiment that ran."""
    from paperzoo.report import ReportError, build_report

    if not out.strip():
        fail("--out is empty; give the report's directory")
    if results_dir is not None and not Path(results_dir).expanduser().is_dir():
        fail(f"results directory not found: {results_dir}")
    try:
        index = build_report(Path(out).expanduser(), results_dir)
    except (ReportError, FileExistsError, NotADirectoryError, PermissionError) as e:
        fail(first_line(e))
    except user_errors() as e:
        fail(first_line(e))
    console.print(f"report written: {index}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        print("paperzoo: interrupted; finished records are kept", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
