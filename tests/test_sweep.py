"""Sweeps on Ray: every (paper, seed) a task, substrate built first, resumable."""

import pytest

ray = pytest.importorskip("ray")


def test_sweep_runs_each_pair_once_and_resumes(smoke_lm, tmp_path):
    from paperzoo.core.results import records
    from paperzoo.core.sweep import sweep

    try:
        first = sweep(["lottery-ticket", "layer-pruning"], "smoke", [0, 1], out=tmp_path, num_cpus=2, progress=False)
        assert (first.ran, first.skipped) == (4, 0)
        runs = {slug: [r for r in records(slug, tmp_path) if r["kind"] == "run"] for slug in ("lottery-ticket", "layer-pruning")}
        assert {slug: sorted(r["seed"] for r in rs) for slug, rs in runs.items()} == \
            {"lottery-ticket": [0, 1], "layer-pruning": [0, 1]}
        assert all(r["machine"]["threads"] == 1 for rs in runs.values() for r in rs)  # one thread per task
        assert runs["layer-pruning"][0]["substrate"][0]["name"].startswith("base-smoke-")
        assert [a["seeds"] for a in first.aggregates] == [[0, 1], [0, 1]]

        second = sweep(["lottery-ticket", "layer-pruning"], "smoke", [0, 1], out=tmp_path, num_cpus=2, progress=False)
        assert (second.ran, second.skipped) == (0, 4)
        assert [a["_path"] for a in second.aggregates] == [a["_path"] for a in first.aggregates]  # nothing new written
        assert len(list(tmp_path.glob("*/*.json"))) == 6
    finally:
        ray.shutdown()
