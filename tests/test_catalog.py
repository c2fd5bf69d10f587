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
