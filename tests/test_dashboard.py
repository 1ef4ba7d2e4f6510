"""The static dashboard in a real headless Chromium: cards render, tokens are escaped, sorting works."""
import os
import shutil

import pytest

from saekit.analysis.dashboard import Example, FeatureCard, write_dashboard

EVIL = "<script>alert(1)</script>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _cards():
    evil = Example([EVIL, "a", "&amp;", '"quoted"'], [2.0, 0.5, 0.0, 1.0], 0, 2.0)
    plain = Example(["the", "cat"], [0.0, 3.0], 1, 3.0)
    return [FeatureCard(7, 0.01, 2.0, 1.1, [evil], [("bin 1", [plain])], "logit lens", [(EVIL, 1.5)],
                        [("x", -1.0)], [0.0, 1.0, 2.0], [3, 1]),
            FeatureCard(3, 0.20, 3.0, 0.9, [plain], hist_edges=[0, 1], hist_counts=[1]),
            FeatureCard(11, 0.05, 9.0, 4.0, [plain])]


def test_html_escapes_every_token(tmp_path):
    page = write_dashboard(_cards(), tmp_path / "index.html", "t<i>tle", {"k": "<b>v</b>"}).read_text()
    assert EVIL not in page and "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>v</b>" not in page and "t<i>tle" not in page
    assert "<script>alert" not in _cards()[0]._repr_html_()


# In CI (.ci/run installs Debian's chromium) a missing browser is a failure, not a skip.
@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="Debian's chromium is not installed")
def test_dashboard_renders_in_headless_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    path = write_dashboard(_cards(), tmp_path / "index.html", "features", {"tokens": 10})
    dialogs = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(path.as_uri())
            assert page.locator("div.card").count() == 3
            assert page.locator("#f7 h3").inner_text() == "Feature 7"
            # The hostile token is visible as text, and no script ran.
            assert EVIL in page.locator("#f7 .ex").first.inner_text()
            assert dialogs == []
            # Sorting the index by density (click twice: descending, then ascending).
            ids = lambda: page.locator("table.index tbody tr td:first-child").all_inner_texts()  # noqa: E731
            page.click("text=density")
            assert ids() == ["3", "11", "7"]
            page.click("text=density")
            assert ids() == ["7", "11", "3"]
            page.screenshot(path=str(tmp_path / "shot.png"))
        finally:
            browser.close()
