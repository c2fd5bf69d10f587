"""The shared models: what is cached is listed without training, `substrate build` builds one, cards read back."""

import json
import os
import subprocess
import sys

import pytest

from paperzoo.core import store, substrate


def cli(*args, home):
    return subprocess.run([sys.executable, "-m", "paperzoo.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", "PAPERZOO_HOME": str(home)}, timeout=600)


def test_lookup_only_never_builds(tmp_path):
    built = []
    with store.lookup_only(), pytest.raises(store.NotCached):
        store.cached_dir(tmp_path / "entry", lambda d: built.append(d))
    assert not built and not (tmp_path / "entry").exists()
    path = store.cached_dir(tmp_path / "entry", lambda d: (d / "f").write_text("x"))
    with store.lookup_only():
        assert store.cached_dir(path, lambda d: built.append(d)) == path  # cached: returned as is
        (path / "f").write_text("damaged")
        with pytest.raises(store.NotCached):
            store.cached_dir(path, lambda d: built.append(d))
    assert not built


def test_status_lists_without_training_then_build_caches_and_card_reads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERZOO_HOME", str(tmp_path))
    rows = substrate.status(("smoke",))
    assert {r["name"] for r in rows} == set(substrate.BUILDERS) and not any(r["cached"] for r in rows)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").glob("reasoner-*"))
    r = cli("substrate", "build", "reasoner", "--scale", "smoke", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "reasoner (smoke):" in r.stdout and "targets" in r.stdout and "easiest tier greedy accuracy" in r.stdout
    card = substrate.card("reasoner", "smoke")
    assert card["parameters"] > 0 and set(card["targets"]) and "per_problem" not in card
    assert card["problems"] == 8 and card["samples"] == 2
    r = cli("substrate", "--scale", "smoke", "--json", home=tmp_path)
    listed = {row["name"]: row for row in json.loads(r.stdout)}
    assert listed["reasoner"]["cached"] and not listed["draft"]["cached"]
    assert listed["reasoner"]["card"]["targets"] == card["targets"]
    r = cli("substrate", "--scale", "smoke", home=tmp_path)
    assert r.returncode == 0 and "reasoner" in r.stdout and "targets" in r.stdout


@pytest.mark.parametrize("args, fragment", [
    (("substrate", "build", "nope"), "unknown substrate 'nope'"),
    (("substrate", "build", "moe-lm", "--scale", "large"), "moe-lm has no 'large' scale"),
    (("substrate", "--scale", "huge"), "unknown scale 'huge'"),
])
def test_substrate_bad_input_is_one_line(tmp_path, args, fragment):
    r = cli(*args, home=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and fragment in lines[0], r.stderr
