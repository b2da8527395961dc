"""The page at ``/`` in a real headless Chromium (Debian's ``chromium``), driven by Playwright.

It uploads an image, types a prompt, and finds the boxes drawn over the image; the threshold
slider re-filters them without a new request. Skipped only when /usr/bin/chromium is absent
(``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.slow  # a browser and a live server
if not CHROMIUM.exists():
    pytest.skip(
        "Debian's chromium is not installed (/usr/bin/chromium): apt-get install chromium", allow_module_level=True
    )
pytest.importorskip("fastapi", reason="the server extra is not installed: pip install -e '.[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")

from test_server import load_bench

from gdino import GroundingDinoForObjectDetection
from gdino.apps.server.app import Settings, create_app, serve_in_thread

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PROMPT = "a cat. a remote control."
LIST_CAP = 25  # rows listed before "show all" (index.html)


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
    assert page.locator("#list li").count() == min(len(shown), LIST_CAP)
    if len(shown) > LIST_CAP:
        page.click("#show-all")
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


def _bad_responses(page) -> list[tuple[str, int]]:
    bad: list[tuple[str, int]] = []
    page.on("response", lambda r: r.status >= 400 and bad.append((r.url, r.status)))
    return bad


def test_page_before_an_image_is_chosen(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    bad = _bad_responses(page)
    page.goto(server + "/")
    assert not page.locator("#stage").is_visible()  # no broken-image icon, no "the chosen image"
    assert page.locator("#stage").bounding_box() is None
    assert not page.locator("#show-all").is_visible()
    icon = page.evaluate(
        "fetch(document.querySelector('link[rel=icon]').href)"
        ".then(async r => [r.status, r.headers.get('content-type'), await r.text()])"
    )
    assert icon[0] == 200 and icon[1] == "image/svg+xml" and icon[2].startswith("<svg")
    page.screenshot(path=str(tmp_path / "before.png"))
    assert bad == []
    page.close()


def test_a_small_image_is_scaled_up_to_the_viewport(server, browser, tmp_path):
    from PIL import Image

    path = tmp_path / "small.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.goto(server + "/")
    page.set_input_files("#file", str(path))
    page.wait_for_function(
        "document.getElementById('image').naturalWidth > 0 && document.getElementById('image').style.width"
    )
    img, svg = page.locator("#image").bounding_box(), page.locator("#overlay").bounding_box()
    room = min(1000 - 2 * 16, 0.75 * 900 * 64 / 48)  # the page's width, 75% of the window's height
    assert room - 2 <= img["width"] <= room + 1 and abs(img["height"] - img["width"] * 48 / 64) <= 2
    assert (svg["width"], svg["height"]) == (img["width"], img["height"])  # boxes land on the image
    page.close()


def _many(width: int, height: int, n: int) -> dict:
    """An answer with ``n`` boxes crowded into the image's top-left quarter."""
    rng = random.Random(0)
    detections = []
    for i in range(n):
        x0, y0 = rng.uniform(0, width / 2), rng.uniform(0, height / 2)
        box = [x0, y0, x0 + rng.uniform(10, width / 3), y0 + rng.uniform(10, height / 3)]
        detections.append({"box": box, "score": rng.uniform(0.05, 0.95), "label": f"thing {i % 7}", "label_id": i % 7})
    return {"image": "chelsea.png", "width": width, "height": height, "detections": detections}


def test_many_boxes_keep_captions_legible_and_the_list_short(server, browser, data_dir, tmp_path):
    from PIL import Image

    image = data_dir / "chelsea.png"
    width, height = Image.open(image).size
    answer = _many(width, height, 300)
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.route(
        "**/v1/detect",
        lambda route: route.fulfill(status=200, content_type="application/json", body=json.dumps(answer)),
    )
    page.goto(server + "/")
    page.set_input_files("#file", str(image))
    page.locator("#stage").screenshot(path=str(tmp_path / "chosen.png"))
    page.click("#run")
    page.wait_for_selector("#overlay g.detection")
    _slide(page, 0)
    assert page.locator("#overlay g.detection").count() == 300
    shown = page.eval_on_selector_all(
        "#overlay g.detection:not(.tucked) text.caption", "ts => ts.map(t => t.getBoundingClientRect().toJSON())"
    )
    assert 5 <= len(shown) < 300
    for i, a in enumerate(shown):  # no caption drawn over another
        for b in shown[i + 1 :]:
            assert not (
                a["left"] < b["right"] - 1
                and b["left"] < a["right"] - 1
                and a["top"] < b["bottom"] - 1
                and b["top"] < a["bottom"] - 1
            ), (a, b)
    tucked = page.locator("#overlay g.tucked text.caption")
    assert tucked.count() == 300 - len(shown) and not tucked.first.is_visible()
    assert "captions would overlap" in page.inner_text("#status")

    assert page.locator("#list li").count() == LIST_CAP
    best = max(answer["detections"], key=lambda d: d["score"])
    assert page.inner_text("#list li >> nth=0").startswith(f"{best['label']} {best['score']:.2f}")
    hidden_row = page.eval_on_selector_all("#list li", "lis => lis.map(li => li.dataset.index)")
    index = next(
        int(i)
        for i in hidden_row
        if page.locator(f'#overlay g[data-index="{i}"]').get_attribute("class").find("tucked") >= 0
    )
    page.hover(f'#list li[data-index="{index}"]')  # hovering its row shows a tucked caption
    assert page.locator(f'#overlay g[data-index="{index}"] text.caption').is_visible()
    page.locator("#stage").screenshot(path=str(tmp_path / "after.png"))
    assert (tmp_path / "after.png").read_bytes() != (tmp_path / "chosen.png").read_bytes()
    page.click("#show-all")
    assert page.locator("#list li").count() == 300 and not page.locator("#show-all").is_visible()
    page.close()
