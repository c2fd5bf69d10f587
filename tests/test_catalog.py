import pytest

from paperzoo import catalog


def test_catalogue_is_complete_and_unique():
    papers = catalog.papers()
    assert len(papers) >= 150
    assert len({p.arxiv for p in papers}) == len(papers) and len({p.slug for p in papers}) == len(papers)
    assert all(p.status in catalog.STATUSES for p in papers)
    assert {p.family for p in papers} >= {"compression", "decoding", "alignment", "phenomena"}


def test_lookup_by_arxiv_id_or_slug():
    assert catalog.get("2403.17887").slug == "layer-pruning"
    assert catalog.get("arXiv:2405.05417").slug == "undertrained-tokens"
    assert catalog.get("Layer-Pruning").arxiv == "2403.17887"
    with pytest.raises(catalog.UnknownPaperError):
        catalog.get("9999.99999")


def test_no_software_entries_give_a_reason():
    none = [p for p in catalog.papers() if p.status == "no-software"]
    assert none and all(len(p.status_note) > 20 for p in none)


def test_verdict_statuses_come_from_shipped_aggregates_only():
    """The TSV never holds a verdict; a verdict status is exactly the newest shipped aggregate's verdict."""
    from paperzoo.core.experiment import experiment_module

    for row in catalog.table_rows():
        assert row.status not in catalog.VERDICTS, f"{row.slug}: papers.tsv holds a verdict; ship an aggregate instead"
    for p in catalog.papers():
        shipped = catalog.shipped_verdict(p.slug)
        if p.status in catalog.VERDICTS:
            assert shipped is not None and shipped["verdict"] == p.status and shipped["kind"] == "aggregate"
            assert experiment_module(p.slug) is not None and len(shipped["seeds"]) >= 3
        elif shipped is not None:
            assert catalog.table_rows()[catalog.papers().index(p)].status != "implemented"


def test_shipped_aggregates_point_at_shipped_runs():
    import json

    for folder in sorted(catalog.SHIPPED_RESULTS.glob("*")) if catalog.SHIPPED_RESULTS.is_dir() else []:
        for path in folder.glob("*-aggregate-*.json"):
            record = json.loads(path.read_text())
            for name in record["runs"]:
                run = json.loads((folder / name).read_text())
                assert run["paper"]["slug"] == folder.name and run["scale"] == record["scale"]
            assert (folder / record["runs"][0]).with_suffix(".png").exists()  # one plot per paper: the first seed's
