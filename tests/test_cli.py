"""The CLI: bad input gets one line on stderr and a non-zero exit."""

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
