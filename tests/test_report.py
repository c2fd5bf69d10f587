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
    assert index.count("<tr>") >= 151 and 'href="layer-pruning.html"' in index
    assert (report_dir / "layer-pruning.png").exists()
    page = (report_dir / "layer-pruning.html").read_text()
    assert "<h3>blocks</h3>" in page and page.count('<td>angular</td>') == 2  # per-block rows as a table


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
        browser.close()
