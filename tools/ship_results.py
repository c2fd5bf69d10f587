"""Replace a paper's shipped evidence in results/ with the records of one sweep.

    python tools/ship_results.py SWEEP_DIR [SLUG ...] [--scale small] [--seeds 0,1,2]

For each paper (every folder under SWEEP_DIR when no slug is named): the newest record of
each requested seed at the scale, its plot for the first seed, and a fresh aggregate over
exactly those records. The paper's old files in results/ are removed first (git shows the
change). A paper missing any seed is skipped with a notice, never shipped half.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from paperzoo.core.experiment import write_aggregate
from paperzoo.core.results import records, shipped_dir


def ship(sweep: Path, slug: str, scale: str, seeds: list[int]) -> str:
    runs = [r for r in records(slug, sweep) if r.get("kind", "run") == "run" and r["scale"] == scale]
    newest = {r["seed"]: r for r in runs}  # records come oldest first
    if missing := [s for s in seeds if s not in newest]:
        return f"{slug}: skipped, no {scale} record for seed {missing}"
    target = shipped_dir() / slug
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shipped = []
    for i, s in enumerate(seeds):
        source = Path(newest[s]["_path"])
        record = json.loads(source.read_text())
        if i == 0 and source.with_suffix(".png").exists():
            shutil.copy2(source.with_suffix(".png"), target / source.with_suffix(".png").name)
        else:
            record.pop("plot", None)
        (target / source.name).write_text(json.dumps(record, indent=1) + "\n")
        shipped.append({**record, "_path": str(target / source.name)})
    agg = write_aggregate(shipped, out=target.parent)
    return f"{slug}: {agg['verdict']} ({agg['verdict_reason']})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path)
    p.add_argument("slugs", nargs="*")
    p.add_argument("--scale", default="small")
    p.add_argument("--seeds", default="0,1,2")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    slugs = a.slugs or sorted(d.name for d in a.sweep.iterdir() if d.is_dir())
    if not slugs:
        sys.exit(f"no paper folders under {a.sweep}")
    for slug in slugs:
        print(ship(a.sweep, slug, a.scale, seeds))


if __name__ == "__main__":
    main()
