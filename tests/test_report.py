"""The HTML report renders in headless Chromium, plots included."""

import os
import shutil

import pytest

from paperzoo.core.experiment import run_experiment
from paperzoo.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report_dir(smoke_lm, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    run_experiment("layer-pruning", "smoke", out=results)
    out = tmp_path_factory.mktemp("report")
    build_report(out, results)
    return out


def test_report_files(report_dir):
    index = (report_dir / "index.html").read_text()
    assert index.count("<tr data-family") >= 151 and 'href="layer-pruning.html"' in index
    assert (report_dir / "layer-pruning.png").exists()
    page = (report_dir / "layer-pruning.html").read_text()
    assert "<h3>blocks</h3>" in page and page.count('<td>angular</td>') == 2  # per-block rows as a table


def test_substrate_page_lists_the_cards_records_stood_on(report_dir):
    page = (report_dir / "substrate.html").read_text()
    assert "<h2>base-smoke-" in page and 'href="layer-pruning.html"' in page  # the smoke run's base LM and its user
    assert "parameters" in page and 'href="substrate.html"' in (report_dir / "index.html").read_text()


def test_report_is_written_fresh_and_never_over_a_foreign_folder(report_dir, tmp_path):
    from paperzoo.report import ReportError

    out = tmp_path / "site"
    build_report(out, tmp_path / "no-results-here")
    (out / "stale-page.html").write_text("old")
    build_report(out, tmp_path / "no-results-here")
    assert not (out / "stale-page.html").exists() and (out / "index.html").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ReportError, match="holds no paperzoo report"):
        build_report(foreign, tmp_path / "no-results-here")
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_smoke_pages_say_they_are_not_a_verdict(report_dir):
    page = (report_dir / "layer-pruning.html").read_text()
    assert "they are not a verdict" in page and "model measured:" in page


@pytest.mark.skipif(not CHROMIUM and not os.environ.get("CI"), reason="chromium not installed (.ci/run installs it)")
def test_report_renders_in_chromium(report_dir):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CI must have Debian's chromium"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        page.goto((report_dir / "index.html").as_uri())
        assert page.locator("#catalogue tbody tr").count() >= 150
        assert page.locator("text=layer-pruning").first.is_visible()
        page.click("a[href='layer-pruning.html']")
        page.wait_for_load_state("load")
        assert "Predicate measured here" in page.content()
        width = page.eval_on_selector("img.plot", "img => img.complete ? img.naturalWidth : 0")
        assert width > 200
        # A phone: nothing overflows the viewport, and the reader can filter by family and status.
        phone = browser.new_page(viewport={"width": 420, "height": 800})
        phone.goto((report_dir / "index.html").as_uri())
        assert phone.evaluate("document.documentElement.scrollWidth") <= 420
        phone.select_option("#family", "compression")
        visible = phone.locator("#catalogue tbody tr:not([hidden])")
        assert 0 < visible.count() < 150
        assert all(f == "compression" for f in visible.evaluate_all("rows => rows.map(r => r.dataset.family)"))
        browser.close()
