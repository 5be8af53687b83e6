"""A headless Chromium for the tests that open what a user opens: the report and the MLflow UI.

Playwright drives the system's Chromium (Debian's ``chromium`` package, or ``PIPELINE_CHROMIUM``); it
never downloads a browser. Without one the tests that need it are skipped, unless
``PIPELINE_REQUIRE_BROWSER=1`` (set by ``.ci/run``), where that is a failure."""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest


def executable() -> str | None:
    """The Chromium binary: ``PIPELINE_CHROMIUM`` or the first of chromium / chromium-browser on PATH."""
    if os.environ.get("PIPELINE_CHROMIUM"):
        return os.environ["PIPELINE_CHROMIUM"]
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)


def _unavailable(reason: str):
    if os.environ.get("PIPELINE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"a browser is required (PIPELINE_REQUIRE_BROWSER=1) but {reason}")
    pytest.skip(reason)


@contextlib.contextmanager
def page(width: int = 1600, height: int = 1400):
    """A fresh page of a headless Chromium; skipped (or failed, see above) without one."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    binary = executable()
    if binary is None:
        _unavailable("Chromium is not installed (apt-get install chromium, or set PIPELINE_CHROMIUM)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=binary, args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": width, "height": height})
            tab.set_default_timeout(60_000)
            yield tab
        finally:
            browser.close()


def broken_images(tab) -> list[str]:
    """The ``<img>`` elements of the loaded page that did not decode to a picture (start of their src)."""
    return tab.evaluate(
        "[...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 80))")


def expanded_run_names(tab, url: str, parent_prefix: str) -> list[str]:
    """The run names an MLflow 3.17 runs table at ``url`` lists once the parent runs whose name starts
    with ``parent_prefix`` are expanded (child runs are collapsed under their parent)."""
    name_cells = "[role=gridcell][col-id='attributes.`Run Name`']"
    tab.goto(url)
    tab.wait_for_selector(f"{name_cells} >> text=/^{parent_prefix}/")
    parents = tab.locator(name_cells).filter(has_text=parent_prefix)
    for i in range(parents.count()):
        parents.nth(i).locator("button").first.click()
    tab.wait_for_timeout(1000)
    return [text.splitlines()[-1].strip() for text in tab.locator(name_cells).all_inner_texts()]
