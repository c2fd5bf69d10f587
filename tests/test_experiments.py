"""Every experiment end to end at smoke scale: a record with claim and checks, a plot beside it."""

import json
from pathlib import Path

import pytest

from paperzoo import catalog
from paperzoo.core.experiment import ExperimentError, experiment_module, run_experiment


WITH_EXPERIMENT = [p.slug for p in catalog.papers() if experiment_module(p.slug) is not None]


@pytest.mark.parametrize("slug", WITH_EXPERIMENT)
def test_smoke_run_writes_record_and_plot(slug, smoke_lm, tmp_path):
    record = run_experiment(slug, "smoke", seed=0, out=tmp_path)
    path = Path(record["_path"])
    stored = json.loads(path.read_text())
    assert stored["verdict"] == "smoke" and stored["paper"]["slug"] == slug
    assert stored["claim"] == experiment_module(slug).CLAIM.statement
    assert stored["checks"] and all(v in (True, False, None) for v in stored["checks"].values())
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stored["versions"]["torch"] and stored["wall_seconds"] > 0


def test_layer_pruning_smoke_metrics_are_consistent(smoke_lm, tmp_path):
    m = run_experiment("layer-pruning", "smoke", out=tmp_path)["metrics"]
    assert {r["method"] for r in m["blocks"]} == {"angular", "deepest", "random"}
    for r in m["blocks"]:
        assert 0 <= r["start"] <= m["num_layers"] - r["n"]
        if r["method"] == "angular":  # the chosen block is the minimum of its row
            row = [m["distances"][l][l + r["n"]] for l in range(m["num_layers"] - r["n"] + 1)]
            assert r["angular_distance"] == min(row)


def test_layer_pruning_runs_on_a_users_gpt2_from_a_local_directory(smoke_lm, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(smoke_lm.tokenizer), n_embd=32, n_layer=6, n_head=2, n_positions=128))
    model.save_pretrained(tmp_path / "gpt2")
    smoke_lm.tokenizer.save_pretrained(tmp_path / "gpt2")
    record = run_experiment("layer-pruning", "smoke", model=str(tmp_path / "gpt2"), out=tmp_path / "results")
    assert record["metrics"]["num_layers"] == 6 and record["model"] == str(tmp_path / "gpt2")
    assert {r["n"] for r in record["metrics"]["blocks"]} == {1, 3}


def test_undertrained_tokens_needs_exact_training_counts(tmp_path):
    from paperzoo.core.models import base_model

    lm = base_model("smoke")
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    # The detector is scored against exact training counts, so the experiment takes no --model (only --corpus).
    with pytest.raises(ExperimentError, match="does not take --model"):
        run_experiment("undertrained-tokens", "smoke", model=str(tmp_path / "m"), out=tmp_path)


def test_catalogue_status_matches_the_code():
    from paperzoo.catalog.survey_maps import survey_map
    from paperzoo.core.experiment import method_module_name

    for p in catalog.papers():
        has_method, has_experiment = method_module_name(p.slug) is not None, experiment_module(p.slug) is not None
        if p.status == "planned":
            assert not has_method, f"{p.slug} is implemented but marked planned"
        elif p.status == "implemented":
            assert has_method, f"{p.slug} is marked implemented but has no method module"
        elif p.status in catalog.VERDICTS:
            assert has_method and has_experiment, f"{p.slug} has a verdict but no method or experiment"
        elif p.status == "no-software":
            assert p.status_note and not has_method
        elif p.status == "mapped":  # a survey whose deliverable is its taxonomy mapped onto paperzoo
            assert p.kind == "survey" and survey_map(p.slug), f"{p.slug} is marked mapped but has no survey map"
            assert not has_method, f"{p.slug} has a method: its status is its verdict, not mapped"
