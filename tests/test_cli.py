"""The CLI: bad input gets one line on stderr and a non-zero exit."""

import json
import os
import subprocess
import sys

import pytest

from paperzoo import catalog


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "paperzoo.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=600)


def one_line_error(result, fragment):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_list_shows_every_paper_with_counts():
    r = cli("list")
    assert r.returncode == 0
    for p in catalog.papers():
        assert p.arxiv in r.stdout
    assert f"{len(catalog.papers())} papers:" in r.stdout and "no-software 5" in r.stdout


def test_list_filters():
    status = catalog.get("layer-pruning").status
    r = cli("list", "--family", "compression", "--status", status)
    assert "layer-pruning" in r.stdout and "undertrained-tokens" not in r.stdout  # the latter is phenomena
    expected = sum(p.family == "compression" and p.status == status for p in catalog.papers())
    assert f"{expected} papers:" in r.stdout
    one_line_error(cli("list", "--family", "nonsense"), "unknown family")


def test_show_prints_facts_and_claim():
    r = cli("show", "layer-pruning")
    assert r.returncode == 0 and "2403.17887" in r.stdout and "Predicate" in r.stdout


@pytest.mark.parametrize("args, fragment", [
    (("show", "no-such-paper"), "unknown paper"),
    (("run", "0000.00000"), "unknown paper"),
    (("run", "layer-pruning", "--scale", "enormous"), "unknown scale"),
    (("run", "gnn-theory-position"), "no experiment"),
    (("run", "layer-pruning", "--scale", "smoke", "--model", "/no/such/model"), "not found"),
    (("run", "layer-pruning", "--scale", "smoke", "--corpus", "/no/such/corpus.txt"), "corpus file not found"),
])
def test_bad_input_is_one_line(args, fragment):
    one_line_error(cli(*args), fragment)


def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)).save_pretrained(tmp_path)
    one_line_error(cli("run", "layer-pruning", "--scale", "smoke", "--model", str(tmp_path)), "not a causal LM")


# --- every bad input: one line on stderr, a non-zero exit, no traceback, no work done -------------

def invoke(args, home, extra_env=None):
    from typer.testing import CliRunner

    from paperzoo.cli import app

    env = {"PAPERZOO_HOME": str(home), **(extra_env or {})}
    return CliRunner().invoke(app, list(args), env=env)


def assert_one_line_error(result, fragment, home=None, args=()):
    assert result.exit_code != 0, (args, result.stdout)
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and fragment in lines[0], (args, result.stderr, result.exception)
    assert "Traceback" not in result.stderr and result.exception is None or isinstance(result.exception, SystemExit)
    if home is not None:  # nothing was built or trained before the error
        assert not (home / "models").exists() and not (home / "tokenizers").exists()


def _bad_inputs(tmp):
    (tmp / "a-file").write_text("x")
    (tmp / "empty-dir").mkdir(exist_ok=True)
    return [
        (("show", "no-such-paper"), "unknown paper", {}),
        (("show", "x" * 100_000), "(100000 characters)", {}),
        (("run", "2403.1788"), "unknown paper", {}),
        (("run", "layer-pruning", "--scale", "enormous"), "unknown scale", {}),
        (("run", "layer-pruning", "--seed", "-1"), "seed must be an integer from 0", {}),
        (("run", "layer-pruning", "--seed", str(2**32)), "seed must be an integer from 0", {}),
        (("run", "layer-pruning", "--seeds", "a,b"), "comma-separated integers", {}),
        (("run", "layer-pruning", "--seeds", "1,1"), "repeats", {}),
        (("run", "layer-pruning", "--seed", "1", "--seeds", "2"), "not both", {}),
        (("run", "layer-pruning", "--scale", "smoke", "--out", str(tmp / "a-file")), "is a file", {}),
        (("run", "layer-pruning", "--scale", "smoke", "--out", str(tmp / "a-file" / "sub")), "is a file", {}),
        (("run", "layer-pruning", "--scale", "smoke", "--out", ""), "empty path", {}),
        (("run", "layer-pruning", "--scale", "smoke", "--out", str(tmp / ("n" * 300))), "cannot write", {}),
        (("run", "layer-pruning", "--scale", "smoke", "--model", "/no/such/model"), "not found", {}),
        (("run", "layer-pruning", "--scale", "smoke", "--model", str(tmp / "empty-dir")), "no config.json", {}),
        (("run", "layer-pruning", "--scale", "smoke", "--model", ""), "empty", {}),
        (("run", "lottery-ticket", "--scale", "smoke", "--model", "/nonexistent"), "does not take --model", {}),
        (("run", "lottery-ticket", "--scale", "smoke", "--corpus", "/nonexistent"), "does not take --corpus", {}),
        (("run", "svip-draft-length", "--scale", "smoke", "--corpus", "/nonexistent"), "does not take --corpus", {}),
        (("run", "lynx-expert-selection", "--scale", "smoke", "--model", str(tmp / "empty-dir")), "does not take --model", {}),
        (("run", "layer-pruning", "--scale", "smoke", "--corpus", "/no/such/corpus.txt"), "corpus file not found", {}),
        (("run", "layer-pruning", "--scale", "smoke", "--corpus", "hf:"), "needs a dataset name", {}),
        (("run", "layer-pruning", "--scale", "smoke"), "PAPERZOO_HOME is set but empty", {"PAPERZOO_HOME": ""}),
        (("run", "layer-pruning", "--scale", "smoke"), "is a file", {"PAPERZOO_HOME": str(tmp / "a-file")}),
        (("run", "layer-pruning", "--scale", "large"), "sized for a GPU", {}),
        (("list", "--family", ""), "unknown family", {}),
        (("list", "--status", "great"), "unknown status", {}),
        (("report", "--results", str(tmp / "nothing-here")), "results directory not found", {}),
        (("report", "--out", ""), "--out is empty", {}),
        (("report", "--out", str(tmp / "a-file")), "not a directory", {}),
        (("sweep",), "exactly one", {}),
        (("sweep", "--family", "nonsense"), "unknown family", {}),
        (("sweep", "layer-pruning", "--seeds", "-3"), "seed must be", {}),
    ]


def test_every_bad_input_is_one_line_before_any_work(tmp_path):
    import torch

    for args, fragment, env in _bad_inputs(tmp_path):
        if "large" in args and torch.cuda.is_available():
            continue
        home = tmp_path / "home"
        result = invoke(args, home, env)
        assert_one_line_error(result, fragment, home, args)


def test_ids_accept_versions_and_urls():
    for form in ("2403.17887v2", "https://arxiv.org/abs/2403.17887", "arXiv:2403.17887", "https://arxiv.org/pdf/2403.17887v1"):
        assert catalog.get(form).slug == "layer-pruning"


def test_piped_output_is_never_wrapped_and_json_is_available():
    r = cli("list", env={"COLUMNS": "80"})
    assert sum("layer-pruning" in line for line in r.stdout.splitlines()) == 1
    line = next(line for line in r.stdout.splitlines() if "layer-pruning" in line)
    assert "The Unreasonable Ineffectiveness of the Deeper Layers" in line
    papers = json.loads(cli("list", "--json", "--family", "compression").stdout)
    assert {p["family"] for p in papers} == {"compression"} and any(p["slug"] == "layer-pruning" for p in papers)
    shown = json.loads(cli("show", "2403.17887v2", "--json").stdout)
    assert shown["paper"]["slug"] == "layer-pruning" and shown["predicate"]


def test_a_smoke_run_is_quiet_when_piped_and_names_what_it_measured(smoke_lm, tmp_path):
    r = cli("run", "lottery-ticket", "--scale", "smoke", "--out", str(tmp_path))
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    path = next(line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith("record: "))
    record = json.loads(open(path).read())
    assert record["model"] is None and record["git_commit"] and record["machine"]["threads"] >= 1
    assert "not a verdict" in r.stdout


def test_concurrent_smoke_runs_keep_every_record(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", "paperzoo.cli", "run", "lottery-ticket", "--scale", "smoke",
                               "--out", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(3)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    assert len(list((tmp_path / "lottery-ticket").glob("*.json"))) == 3
