"""The verdict harness: preconditions, margins, aggregates over seeds, records, caches that heal."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from paperzoo.core import margins, results, store
from paperzoo.core.experiment import aggregate, verdict, verdict_reason


# --- preconditions and verdicts -------------------------------------------------------------------

def test_a_failed_or_undecidable_precondition_is_never_a_negative_verdict():
    assert verdict({"a": False}, {"control learns": False}) == "inconclusive"
    assert verdict({"a": False}, {"control learns": None}) == "inconclusive"
    assert verdict({"a": True}, {"control learns": True}) == "reproduced"
    assert verdict({"a": False}, {"control learns": True}) == "not-reproduced"
    assert "control learns" in verdict_reason({"a": False}, {"control learns": False})


def _run(seed, checks, pre=None, **metrics):
    v = verdict(checks, pre)
    return {"kind": "run", "paper": {"slug": "x"}, "claim": "c", "predicate": "p", "scale": "small", "seed": seed,
            "settings": {}, "metrics": metrics, "checks": checks, "preconditions": pre or {}, "verdict": v,
            "finished_at": f"2026-01-0{seed + 1}", "_path": f"/r/x/run{seed}.json"}


def test_aggregate_verdict_rules():
    agree = [_run(s, {"a": True, "b": True}, {"p": True}, score=s) for s in range(3)]
    a = aggregate(agree)
    assert a["verdict"] == "reproduced" and a["seeds"] == [0, 1, 2]
    assert a["metrics"]["score"]["mean"] == 1.0 and a["metrics"]["score"]["min"] == 0 and a["metrics"]["score"]["max"] == 2
    assert a["checks"]["a"] == [True, True, True] and a["runs"] == ["run0.json", "run1.json", "run2.json"]

    same_failure = [_run(s, {"a": True, "b": False}, {"p": True}) for s in range(3)]
    assert aggregate(same_failure)["verdict"] == "not-reproduced"
    assert aggregate(same_failure)["verdict_reason"] == "every seed fails: b"

    different_failures = [_run(0, {"a": False, "b": True}), _run(1, {"a": True, "b": False}), _run(2, {"a": True, "b": True})]
    assert (aggregate(different_failures)["verdict"], aggregate(different_failures)["verdict_reason"]) == \
        ("inconclusive", "seeds disagree; per seed: 0 not-reproduced, 1 not-reproduced, 2 reproduced")

    always_undecided = [_run(s, {"a": True, "b": None}) for s in range(3)]
    assert aggregate(always_undecided)["verdict_reason"] == "undecidable in every seed: b"

    one_seed_lacks_precondition = [_run(0, {"a": False}, {"p": True}), _run(1, {"a": False}, {"p": False})]
    assert aggregate(one_seed_lacks_precondition)["verdict"] == "inconclusive"
    assert aggregate(one_seed_lacks_precondition)["verdict_reason"] == \
        "precondition not met: p (seed 1); per seed: 0 not-reproduced, 1 inconclusive"


def test_set_up_values_are_chosen_on_the_control_only():
    from paperzoo.core.experiment import choose_on_control

    trained = []

    def train_control(lr):
        trained.append(lr)
        return f"control@{lr}"

    lr, result, tried = choose_on_control([1e-5, 1e-3, 1e-4], train_control, lambda r: (r != "control@0.001", {}))
    assert (lr, result) == (1e-4, "control@0.0001") and trained == [1e-3, 1e-4]  # largest first, stop at the first pass
    assert [t["passes"] for t in tried] == [False, True]
    lr, _, _ = choose_on_control([1e-5, 1e-3], train_control, lambda r: (False, {}))
    assert lr == 1e-5  # none passes: the smallest, and a precondition says so


def test_decided_is_three_way():
    assert margins.decided(margins.Interval(0.1, 0.2, 0.3), at_least=0.15) is True
    assert margins.decided(margins.Interval(-0.3, -0.2, 0.1)) is None
    assert margins.decided(margins.Interval(-0.3, -0.2, -0.1)) is False
    assert margins.decided(margins.Interval(0.01, 0.05, 0.09), at_least=0.10) is False  # clear, but smaller than claimed


# --- margins --------------------------------------------------------------------------------------

def test_paired_bootstrap_needs_a_difference_beyond_noise():
    rng = np.random.default_rng(0)
    base = rng.normal(size=400)
    noise = rng.normal(scale=1.0, size=400)
    assert margins.clearly_greater(base + 0.5 + 0.1 * noise, base)  # a clear, consistent gain
    assert not margins.clearly_greater(base + 0.01 * noise, base)  # no gain
    assert not margins.clearly_greater(base, base + 0.5)  # a loss
    d = margins.paired_difference(base + 1.0, base)
    assert d.low == pytest.approx(1.0) and d.high == pytest.approx(1.0)  # a constant difference has no spread


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_items():
    rng = np.random.default_rng(1)
    small, large = rng.normal(size=20), rng.normal(size=2000)
    a, b = margins.bootstrap_mean(small), margins.bootstrap_mean(large)
    assert a.low < small.mean() < a.high and b.low < large.mean() < b.high
    assert (b.high - b.low) < (a.high - a.low) / 5


def test_seed_spread_rule():
    assert margins.beyond_seed_spread([1.0, 1.1, 0.9])
    assert not margins.beyond_seed_spread([1.0, -0.1, 0.9])  # one seed disagrees
    assert not margins.beyond_seed_spread([0.1, 2.0, 0.2])  # the spread exceeds the mean difference
    with pytest.raises(ValueError, match="empty"):
        margins.bootstrap_mean([])
    with pytest.raises(ValueError, match="same items"):
        margins.paired_difference([1, 2], [1])


# --- records --------------------------------------------------------------------------------------

def _record(i=0):
    return {"paper": {"slug": "x"}, "scale": "smoke", "checks": {}, "metrics": {}, "finished_at": str(i), "verdict": "smoke"}


def test_parallel_writers_never_share_a_record_name(tmp_path):
    script = ("import sys; from pathlib import Path; from paperzoo.core import results\n"
              "for i in range(20): results.write_new_record(Path(sys.argv[1]), 'same-second-stem', "
              "{'paper': {'slug': 'x'}, 'scale': 'smoke', 'checks': {}, 'metrics': {}, 'finished_at': str(i), "
              "'verdict': 'smoke'})\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "x")]) for _ in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert len(list((tmp_path / "x").glob("*.json"))) == 60 and len(results.records("x", tmp_path)) == 60


@pytest.mark.parametrize("content", [b"{}", b"[]", b"\xff\xfe not utf-8", b"{\"paper\": 3}", b"not json"])
def test_a_stray_file_in_a_results_folder_is_skipped_with_a_warning(tmp_path, capsys, content):
    good = results.write_new_record(tmp_path / "x", "run", _record())
    (tmp_path / "x" / "stray.json").write_bytes(content)
    found = results.records("x", tmp_path)
    assert [r["_path"] for r in found] == [str(good)]
    assert "stray.json: not a paperzoo record" in capsys.readouterr().err


def test_unwritable_results_are_refused_before_work(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(results.ResultsError, match="is a file"):
        results.check_writable(tmp_path / "file" / "sub")
    with pytest.raises(results.ResultsError, match="empty path"):
        results.results_dir("")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(results.ResultsError, match="cannot write"):
            results.check_writable(ro / "x")


def test_empty_paperzoo_home_is_refused(monkeypatch):
    monkeypatch.setenv("PAPERZOO_HOME", "")
    with pytest.raises(store.HomeError, match="empty"):
        store.home()


# --- caches that heal -----------------------------------------------------------------------------

def _build_counter(calls):
    def build(tmp):
        calls.append(1)
        (tmp / "weights.bin").write_bytes(b"x" * 1000)
        (tmp / "record.json").write_text(json.dumps({"ok": True}))
    return build


@pytest.mark.parametrize("damage", ["truncate", "empty", "delete", "corrupt", "manifest"])
def test_a_damaged_cache_entry_is_rebuilt_with_a_notice(tmp_path, capsys, damage):
    calls = []
    entry = store.cached_dir(tmp_path / "entry", _build_counter(calls))
    assert store.cached_dir(tmp_path / "entry", _build_counter(calls)) == entry and len(calls) == 1
    f = entry / "weights.bin"
    if damage == "truncate":
        f.write_bytes(b"x" * 10)
    elif damage == "empty":
        f.write_bytes(b"")
    elif damage == "delete":
        f.unlink()
    elif damage == "corrupt":
        f.write_bytes(b"y" * 1000)  # same size, other bytes
    else:
        (entry / store.MANIFEST).unlink()
    store.cached_dir(tmp_path / "entry", _build_counter(calls))
    assert len(calls) == 2 and (entry / "weights.bin").read_bytes() == b"x" * 1000
    err = capsys.readouterr().err
    assert "is damaged" in err and "rebuilding" in err and len(err.strip().splitlines()) == 1


def test_stale_build_directories_of_dead_processes_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".entry.{dead.pid}.abc.tmp"
    live = tmp_path / f".entry.{os.getpid()}.abc.tmp"
    stale.mkdir(), live.mkdir()
    store.cached_dir(tmp_path / "entry", _build_counter([]))
    assert not stale.exists() and live.exists()


def test_damaged_base_model_is_rebuilt(paperzoo_home, tmp_path, monkeypatch, capsys):
    import shutil

    from paperzoo.core.models import base_model

    shared = base_model("smoke")  # built (or found) in the session's home; damaged only in a copy of it
    monkeypatch.setenv("PAPERZOO_HOME", str(tmp_path / "home"))
    shutil.copytree(paperzoo_home, tmp_path / "home")
    entry = next(p for p in (tmp_path / "home" / "models").iterdir() if p.name.startswith("base-smoke-"))
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    lm = base_model("smoke")
    assert "is damaged" in capsys.readouterr().err
    assert lm.model.config.num_hidden_layers == shared.model.config.num_hidden_layers


def test_damaged_corpus_cache_is_rebuilt(tmp_path, monkeypatch, capsys):
    from paperzoo.core.corpus import load_corpus

    monkeypatch.setenv("PAPERZOO_HOME", str(tmp_path))
    before = load_corpus()
    path = next((store.home() / "corpus").glob("stdlib-docstrings-*.json"))
    path.write_text(path.read_text()[:1000])
    after = load_corpus()
    assert after.fingerprint == before.fingerprint and "is damaged" in capsys.readouterr().err
