"""Survey maps: every slug is a catalogue paper, `show` prints the tree, the report renders the table."""

from typer.testing import CliRunner

from paperzoo import catalog
from paperzoo.catalog.survey_maps import (
    SURVEY_MAPS,
    Branch,
    missing_slugs,
    survey_map,
    surveys_covering,
)
from paperzoo.core.experiment import method_module_name


def test_every_mapped_slug_is_in_the_catalogue():
    assert missing_slugs() == {}


def test_missing_slugs_catches_unknown_papers_and_surveys():
    bad = {"efficient-inference-survey": (Branch("g", "b", "d", ("layer-pruning", "no-such-paper")),),
           "no-such-survey": (Branch("g", "b", "d", ("super-weight",)),)}
    assert missing_slugs(bad) == {"efficient-inference-survey": ["no-such-paper"], "no-such-survey": ["no-such-survey"]}


def test_maps_are_well_formed():
    for survey, branches in SURVEY_MAPS.items():
        assert catalog.get(survey).kind == "survey"
        names = [(b.group, b.name) for b in branches]
        assert len(names) == len(set(names)), f"{survey} repeats a branch"
        for b in branches:
            assert b.description and len(set(b.slugs)) == len(b.slugs)
            # only a measured survey (one with a method module of its own) maps onto itself
            assert survey not in b.slugs or method_module_name(survey) is not None


def test_efficient_inference_map_follows_the_survey_and_places_every_built_method():
    branches = survey_map("efficient-inference-survey")
    assert [g for g in dict.fromkeys(b.group for b in branches)] == ["Data level", "Model level", "System level",
                                                                     "Beyond the survey"]
    placed = {s for b in branches for s in b.slugs}
    for slug in ("layer-pruning", "super-weight", "l-mul-multiplication", "efficient-qat", "lottery-ticket",
                 "lynx-expert-selection", "svip-draft-length", "mtp-gated-lora", "deepconf", "budget-forcing",
                 "overthinking-efficiency"):
        assert slug in placed, slug
    by_name = {b.name: b for b in branches}
    assert set(by_name["Speculative decoding"].slugs) == {"svip-draft-length", "mtp-gated-lora"}
    assert by_name["Structure optimization"].slugs == ()  # an explicit "none in paperzoo" branch


def test_surveys_covering_finds_every_branch_naming_a_paper():
    found = {(s, b.name) for s, b in surveys_covering("layer-pruning")}
    assert found == {("efficient-inference-survey", "Sparsification"), ("small-lm-survey", "Sparse SLMs")}
    assert surveys_covering("no-such-paper") == []


def test_show_prints_the_map_with_statuses(monkeypatch):
    from paperzoo.cli import app

    monkeypatch.setenv("COLUMNS", "240")
    r = CliRunner().invoke(app, ["show", "efficient-inference-survey"])
    assert r.exit_code == 0, r.output
    assert "Survey map (15 branches" in r.output and "Speculative decoding" in r.output
    assert r.output.count("none in paperzoo") == sum(1 for b in survey_map("efficient-inference-survey") if not b.slugs)
    assert f"layer-pruning {catalog.get('layer-pruning').status}" in r.output
    r = CliRunner().invoke(app, ["show", "layer-pruning"])
    assert "in survey maps: efficient-inference-survey > Model level > Sparsification" in r.output


def test_report_has_a_page_for_each_survey_map(tmp_path):
    from paperzoo.report import build_report

    build_report(tmp_path / "site", tmp_path / "no-results")
    index = (tmp_path / "site" / "index.html").read_text()
    assert 'href="efficient-inference-survey.html">survey map</a>' in index
    page = (tmp_path / "site" / "efficient-inference-survey.html").read_text()
    assert 'id="survey-map"' in page and page.count("<tr><td>") == len(survey_map("efficient-inference-survey"))
    assert page.count("none in paperzoo") == 5 and "<b>Dynamic inference</b>" in page
    assert f'super-weight <span class="status {catalog.get("super-weight").status}">' in page
    assert not (tmp_path / "site" / "layer-pruning.html").exists()  # no run, no map: no page
