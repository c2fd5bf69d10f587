"""What three seeds per paper cost: wall time per seed of every experiment, read from its records.

Reads the newest records of each paper at one scale (default `small`), from a results
folder (default: the ones shipped in ``results/``), and prints per paper the median
and maximum wall time of one seed, the machine it ran on and its thread count, then
the median over papers. Substrate training is not in these times: records are made
with the substrate already cached. Targets (issue: verdicts that test the paper):
median <= 3 min, none over 10 min, on one thread.

Run: python benchmarks/suite.py [--results DIR] [--scale small]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from paperzoo import catalog
from paperzoo.core import results

TARGET_MEDIAN_S, TARGET_MAX_S = 180, 600


def per_seed_times(folder: Path | None, scale: str) -> dict[str, list[dict]]:
    out = {}
    for p in catalog.papers():
        runs = [r for r in results.records(p.slug, folder) if r.get("kind", "run") == "run" and r.get("scale") == scale]
        if runs:
            newest = {}
            for r in runs:  # the newest record of each seed
                newest[r["seed"]] = r
            out[p.slug] = list(newest.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=None, help="results folder (default: yours, then shipped)")
    parser.add_argument("--scale", default="small")
    args = parser.parse_args()
    times = per_seed_times(args.results, args.scale)
    if not times:
        raise SystemExit(f"no {args.scale} records found")
    medians, over = [], 0
    print(f"{'paper':32} {'seeds':>5} {'median s':>9} {'max s':>7}  machine")
    for slug, runs in sorted(times.items(), key=lambda kv: -statistics.median(r["wall_seconds"] for r in kv[1])):
        walls = [r["wall_seconds"] for r in runs]
        m = runs[0].get("machine", {})
        medians.append(statistics.median(walls))
        over += max(walls) > TARGET_MAX_S
        flag = "  OVER 10 MIN" if max(walls) > TARGET_MAX_S else ""
        print(f"{slug:32} {len(walls):5d} {statistics.median(walls):9.0f} {max(walls):7.0f}  "
              f"{m.get('cpu', '?')}, {m.get('threads', '?')} thread(s){flag}")
    overall = statistics.median(medians)
    print(f"\nmedian over papers: {overall:.0f} s per seed (target <= {TARGET_MEDIAN_S}); "
          f"{over} papers with a seed over {TARGET_MAX_S} s")


if __name__ == "__main__":
    main()
