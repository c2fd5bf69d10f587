"""Sweeps: every (paper, seed) of a selection as a Ray task, resumable, with aggregate verdicts.

Ray is the engine (``pip install -e ".[sweep]"``, included in ``.[dev]``): locally it
uses every core with one thread per task; with ``address`` it joins a running Ray
cluster (``ray start --head`` on one machine, ``ray start --address=HEAD:6379`` on the
others, all with the same paperzoo checkout and ``PAPERZOO_HOME`` on a shared disk).

Order of work:
1. every experiment's inputs and the results folder are checked (`experiment.plan`);
2. the shared substrate models the selection needs are built once, here, before the
   fan-out, so tasks read one cache entry instead of racing to train it;
3. (paper, seed) pairs that already have a record from this code (same scale, seed,
   settings and git commit; uncommitted edits are not told apart) are skipped: a
   killed sweep resumes where it stopped;
4. the rest run as Ray tasks (``num_cpus=1``, one torch thread each) under a
   progress bar, the slowest papers first (by the median wall time of their shipped records
   at this scale), so that a long paper does not start last; each writes its own record as it
   finishes;
5. one aggregate record per paper is written over the sweep's seeds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from paperzoo.core import results
from paperzoo.core.experiment import Plan, check_seed, git_commit, plan, write_aggregate


@dataclass(frozen=True)
class SweepSummary:
    ran: int
    skipped: int
    aggregates: list[dict]
    failed: list[str]  # "slug seed N: the error's first line", one per task that raised


def finished_run(p: Plan, seed: int, commit: str) -> dict | None:
    """The newest record of this paper, scale, seed and settings made by this code, if any."""
    from paperzoo.core import store

    settings_hash = store.stable_hash(dict(p.module.SCALES[p.scale]))
    matches = [r for r in results.records(p.paper.slug, p.out, shipped=False)
               if r.get("kind", "run") == "run" and r.get("scale") == p.scale and r.get("seed") == seed
               and r.get("settings_hash") == settings_hash and r.get("git_commit") == commit]
    return matches[-1] if matches else None


def expected_seconds(slug: str, scale: str) -> float:
    """The median wall time of a seed of `slug` at `scale` in the records shipped with paperzoo (0 when none)."""
    import statistics

    walls = [r["wall_seconds"] for r in results.records(slug, results.shipped_dir(), shipped=False)
             if r.get("kind", "run") == "run" and r.get("scale") == scale and "wall_seconds" in r]
    return statistics.median(walls) if walls else 0.0


def _task(slug: str, scale: str, seed: int, out: str) -> dict:
    """One (paper, seed) run inside a Ray worker: one thread, records written by the worker itself."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from paperzoo.core.experiment import run_experiment

    record = run_experiment(slug, scale, seed, out=out)
    return {"_path": record["_path"], "verdict": record["verdict"], "seed": seed, "slug": slug}


def sweep(slugs: Sequence[str], scale: str, seeds: Sequence[int], out=None, address: str | None = None,
          num_cpus: int | None = None, progress: bool | None = None) -> SweepSummary:
    import json
    from pathlib import Path

    from paperzoo.core import substrate

    for s in seeds:
        check_seed(s)
    plans = [plan(slug, scale, out=out) for slug in slugs]
    commit = git_commit()
    substrate.build([n for p in plans for n in getattr(p.module, "SUBSTRATE", ())], scale)
    todo, done, failed = [], {}, []
    for p in plans:
        for seed in seeds:
            prior = finished_run(p, seed, commit)
            if prior is None:
                todo.append((p, seed))
            else:
                done[(p.paper.slug, seed)] = prior
    todo.sort(key=lambda job: -expected_seconds(job[0].paper.slug, scale))  # stable: seeds keep their order
    if todo:
        import ray

        if not ray.is_initialized():
            kwargs = {"address": address} if address else {"num_cpus": num_cpus or os.cpu_count(),
                                                          "include_dashboard": False}
            ray.init(**kwargs, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1",
                                               "PAPERZOO_HOME": str(_home())}})
        remote = ray.remote(num_cpus=1)(_task)
        pending = {remote.remote(p.paper.slug, scale, seed, str(p.out)): (p, seed) for p, seed in todo}
        from paperzoo.core.training import progress as progress_bar

        with progress_bar("sweep", disable=None if progress is None else not progress) as bar:
            task = bar.add_task(f"sweep ({len(done)} already done)", total=len(pending), status="")
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                p, seed = pending.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except Exception as e:  # one broken experiment must not stop the others
                    cause = getattr(e, "cause", None) or e
                    failed.append(f"{p.paper.slug} seed {seed}: {type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}")
                    bar.update(task, advance=1, status=f"{p.paper.slug} seed {seed}: failed")
                    continue
                done[(p.paper.slug, seed)] = {**json.loads(Path(result["_path"]).read_text()), "_path": result["_path"]}
                bar.update(task, advance=1, status=f"{p.paper.slug} seed {seed}: {result['verdict']}")
    aggregates = []
    if len(seeds) > 1:
        for p in plans:
            if any((p.paper.slug, s) not in done for s in seeds):
                continue  # a seed failed: no verdict over seeds for this paper
            runs = [done[(p.paper.slug, s)] for s in seeds]
            names = [Path(r["_path"]).name for r in runs]
            same = [r for r in results.records(p.paper.slug, p.out, shipped=False)
                    if r.get("kind") == "aggregate" and r.get("runs") == names]
            aggregates.append(same[-1] if same else write_aggregate(runs, p.out))
    return SweepSummary(ran=len(todo) - len(failed), skipped=len(plans) * len(seeds) - len(todo),
                        aggregates=aggregates, failed=failed)


def _home():
    from paperzoo.core import store

    return store.home()
