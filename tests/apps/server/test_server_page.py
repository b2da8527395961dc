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
    page.wait_for_load_state("networkidle")  # /healthz read: this server has no segmenter
    assert not page.locator("#masks-option").is_visible()
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


# --------------------------------------------------------------------------- masks


@pytest.fixture(scope="module")
def masks_server(model):
    from ellipse_segmenter import EllipseSegmenter

    with serve_in_thread(create_app(model, Settings(), segmenter=EllipseSegmenter())) as url:
        yield url


def _page_colours() -> list[tuple[int, int, int]]:
    import re

    from gdino.apps.server import app as app_module

    html = (Path(app_module.__file__).parent / "static" / "index.html").read_text()
    line = re.search(r"const COLORS = \[(.*?)\];", html).group(1)
    return [tuple(int(h[i : i + 2], 16) for i in (1, 3, 5)) for h in re.findall(r'"(#[0-9a-f]{6})"', line)]


def _expected_masks(detections: list[dict], threshold: float, width: int, height: int):
    """The mask layer the page should paint: (H, W, 4) RGBA, each pixel the best covering mask's
    colour, alpha 115 inside and 255 on its outline (where a 4-neighbour belongs to another mask or none)."""
    import numpy as np
    from pycocotools import mask as mask_utils

    shown = sorted((d for d in detections if d["score"] >= threshold), key=lambda d: -d["score"])
    masked = [d for d in shown if "mask" in d]
    owner = np.zeros((height, width), np.int32)
    for k in reversed(range(len(masked))):
        rle = {"size": masked[k]["mask"]["size"], "counts": masked[k]["mask"]["counts"].encode()}
        owner[mask_utils.decode(rle).astype(bool)] = k + 1
    pad = np.pad(owner, 1, constant_values=-1)
    edge = (pad[:-2, 1:-1] != owner) | (pad[2:, 1:-1] != owner) | (pad[1:-1, :-2] != owner) | (pad[1:-1, 2:] != owner)
    colours = _page_colours()
    rgba = np.zeros((height, width, 4), np.int64)
    for k, d in enumerate(masked):
        rgba[owner == k + 1, :3] = colours[d["label_id"] % len(colours)]
    rgba[..., 3] = np.where(owner > 0, np.where(edge, 255, 115), 0)
    return rgba


def _mask_layer(page, width: int, height: int):
    import numpy as np

    data = page.evaluate(
        "() => { const c = document.getElementById('mask-layer');"
        " return c.width ? Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data) : []; }"
    )
    return np.array(data, np.int64).reshape(height, width, 4) if data else np.zeros((height, width, 4), np.int64)


def _assert_layer(got, want) -> None:
    import numpy as np

    assert (got[..., 3] == want[..., 3]).all()  # alpha is kept exactly; colours go through premultiplied alpha
    painted = want[..., 3] > 0
    assert painted.any()
    assert np.abs(got[painted, :3] - want[painted, :3]).max() <= 3


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
def test_page_draws_masks_and_the_slider_filters_them(masks_server, browser, data_dir):
    pytest.importorskip("pycocotools", reason="the masks extra is not installed: pip install -e '.[masks]'")
    from PIL import Image

    image = data_dir / "chelsea.png"
    width, height = Image.open(image).size
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.goto(masks_server + "/")
    page.locator("#masks-option").wait_for(state="visible")  # /healthz says the server has a segmenter
    page.check("#masks")
    page.set_input_files("#file", str(image))
    page.fill("#prompt", PROMPT)
    page.click("#run")
    page.wait_for_selector("#overlay g.detection", timeout=60_000)
    answer = page.evaluate("result")
    assert answer["masked"] == len(answer["detections"]) > 2 and all("mask" in d for d in answer["detections"])

    _slide(page, 0)
    _assert_layer(_mask_layer(page, width, height), _expected_masks(answer["detections"], 0, width, height))
    with_masks = page.locator("#stage").screenshot()
    assert "with masks" in page.inner_text("#status")

    scores = sorted(d["score"] for d in answer["detections"])
    cut = round(scores[len(scores) // 2], 2)
    _slide(page, cut)
    want = _expected_masks(answer["detections"], cut, width, height)
    _assert_layer(_mask_layer(page, width, height), want)
    assert (want[..., 3] > 0).sum() < (_expected_masks(answer["detections"], 0, width, height)[..., 3] > 0).sum()

    _slide(page, 1)
    assert (_mask_layer(page, width, height)[..., 3] == 0).all() and _boxes(page) == []
    assert page.locator("#stage").screenshot() != with_masks
    page.close()


def test_the_pages_rle_decoder_reads_pycocotools_counts(masks_server, browser):
    np = pytest.importorskip("numpy")
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    masks = [rng.random((37, 53)) < 0.5, np.zeros((9, 7), bool), np.ones((5, 4), bool)]
    big = np.zeros((3000, 4000), bool)
    big[100:2900, 1000:3999] = True
    masks.append(big)  # counts of millions: several characters each, negative differences
    page = browser.new_page()
    page.goto(masks_server + "/")
    for mask in masks:
        counts = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
        flat = mask.flatten(order="F").astype(np.int8)  # column-major, as COCO's runs
        changes = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
        if flat[0]:
            runs = [0, *runs]  # the runs start with zeros
        assert page.evaluate("decodeRle", counts) == runs
    page.close()
