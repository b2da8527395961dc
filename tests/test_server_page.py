"""The page at ``/`` in a real headless Chromium (Debian's ``chromium``), driven by Playwright.

It uploads an image, types a prompt, and finds the boxes drawn over the image; the threshold
slider re-filters them without a new request. Skipped only when /usr/bin/chromium is absent
(``.ci/run`` installs it).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.slow  # a browser and a live server
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (/usr/bin/chromium): apt-get install chromium",
                allow_module_level=True)  # fmt: skip
pytest.importorskip("fastapi", reason="the server extra is not installed: pip install -e '.[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")

from gdino import GroundingDinoForObjectDetection  # noqa: E402
from gdino.server.app import Settings, create_app, serve_in_thread  # noqa: E402
from test_server import load_bench  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
PROMPT = "a cat. a remote control."


@pytest.fixture(scope="module")
def model(small_dir, tmp_path_factory):
    fast = load_bench().fast_copy(small_dir, tmp_path_factory.mktemp("small-160"))
    return GroundingDinoForObjectDetection.from_pretrained(fast).eval()


@pytest.fixture(scope="module")
def server(model):
    with serve_in_thread(create_app(model, Settings(api_key="page-key"))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


def _boxes(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#overlay g.detection",
        "gs => gs.map(g => ({label: g.dataset.label, score: Number(g.dataset.score),"
        " text: g.querySelector('text').textContent, w: Number(g.querySelector('rect.box').getAttribute('width'))}))",
    )


def _slide(page, value: float) -> None:
    page.locator("#threshold").fill(str(value))


def test_page_draws_the_boxes_and_filters_them_without_a_new_request(server, browser, model, data_dir):
    image = data_dir / "chelsea.png"
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server + "/")
    page.set_input_files("#file", str(image))
    page.fill("#prompt", PROMPT)
    page.click("summary")  # the API key field
    page.fill("#key", "page-key")
    page.click("#run")
    page.wait_for_selector("#overlay g.detection", timeout=60_000)

    want = model.detect(image, PROMPT, box_threshold=0.0, text_threshold=0.25)
    _slide(page, 0)
    drawn = _boxes(page)
    assert len(drawn) == len(want) > 0  # asked with box_threshold 0: every box, filtered here
    assert {d["label"] for d in drawn} <= {"a cat", "a remote control"}
    assert all(d["text"].startswith(d["label"] + " ") and d["w"] >= 0 for d in drawn)

    cut = float(sorted(want.scores)[len(want) // 2])
    _slide(page, round(cut, 2))
    shown = _boxes(page)
    assert 0 < len(shown) < len(drawn)
    assert all(d["score"] >= round(cut, 2) for d in shown)
    assert len(shown) == sum(d["score"] >= round(cut, 2) for d in want.to_list())
    assert page.locator("#list li").count() == len(shown)
    assert f"{len(shown)} of {len(drawn)} boxes" in page.inner_text("#status")

    with_boxes = page.locator("#stage").screenshot()
    _slide(page, 1)
    assert _boxes(page) == []
    assert page.locator("#stage").screenshot() != with_boxes  # the boxes were pixels on the screen

    detects = [u for u in requests if urlparse(u).path == "/v1/detect"]
    assert len(detects) == 1  # the slider did not ask the server again
    assert all(urlparse(u).hostname == "127.0.0.1" or u.startswith("blob:") for u in requests)
    page.close()


def test_page_shows_errors(server, browser, data_dir):
    page = browser.new_page()
    page.goto(server + "/")
    page.set_input_files("#file", str(data_dir / "chelsea.png"))
    page.fill("#prompt", "a cat.")
    page.click("#run")  # no key
    page.wait_for_selector("#status.error")
    assert "401" in page.inner_text("#status")
    page.fill("#key", "page-key")  # the 401 opened the key field
    page.fill("#prompt", "   ")
    page.click("#run")
    page.locator("#status.error", has_text="422").wait_for()
    assert page.locator("#overlay g.detection").count() == 0
    page.close()
