"""``gdino serve --masks``: ``masks=true`` answers each detection's RLE and mask score, the best
``max_masks`` of them; refused (422) on a server without a segmenter; ``/healthz`` says whether masks
are there; the segmenter runs in the batching worker, so the server answers while it works. The
segmenter is the ellipse stand-in (tests/ellipse_segmenter.py), injected as the detector is."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="python-multipart is not installed: pip install -e '.[serve]'")
pytest.importorskip("pycocotools", reason="the masks extra is not installed: pip install -e '.[masks]'")
from fastapi.testclient import TestClient
from pycocotools import mask as mask_utils

from ellipse_segmenter import EllipseSegmenter, ellipse
from gdino.apps.cli import main
from gdino.apps.server.app import Settings, create_app, serve_in_thread
from gdino.apps.server.batching import Job, run_group
from gdino.apps.server.segmenting import Masked

PROMPT = "a cat. a remote control."
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools' decode


@pytest.fixture(scope="module")
def segmenter() -> EllipseSegmenter:
    return EllipseSegmenter()


@pytest.fixture(scope="module")
def client(fast_model, segmenter):
    app = create_app(fast_model, Settings(api_key="k", max_masks=1000), segmenter=segmenter, segmenter_name="ellipses")
    with TestClient(app, raise_server_exceptions=False, headers={"X-API-Key": "k"}) as c:
        yield c


def post(client, data: bytes, **fields):
    return client.post("/v1/detect", files={"image": ("chelsea.png", data)}, data=fields)


def _decoded(mask: dict) -> np.ndarray:
    return mask_utils.decode({"size": mask["size"], "counts": mask["counts"].encode()}).astype(bool)


def test_masks_true_answers_each_detections_rle_and_score(client, fast_model, data_dir):
    image = data_dir / "chelsea.png"
    answer = post(client, image.read_bytes(), prompt=PROMPT, box_threshold="0.3", masks="true")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    found = fast_model.detect(image, PROMPT, 0.3)
    assert 0 < len(found) <= 1000, "the test model finds boxes at 0.3"
    assert body["masked"] == len(found)
    assert body["detections"] == EllipseSegmenter().add_masks(image, found).to_list()  # as Detections.to_list
    for d in body["detections"]:
        assert d["mask"]["size"] == [body["height"], body["width"]]
        want = ellipse(np.array(d["box"]), body["width"], body["height"])
        assert np.logical_xor(_decoded(d["mask"]), want).sum() <= max(4, 0.05 * want.sum())

    plain = post(client, image.read_bytes(), prompt=PROMPT, box_threshold="0.3", masks="false").json()
    assert "masked" not in plain and all(set(d) == {"box", "score", "label", "label_id"} for d in plain["detections"])
    assert [d["box"] for d in plain["detections"]] == [d["box"] for d in body["detections"]]


def test_json_bodies_ask_for_masks_with_a_boolean(client, data_dir):
    import base64

    data = base64.b64encode((data_dir / "chelsea.png").read_bytes()).decode()
    answer = client.post("/v1/detect", json={"image": data, "prompt": PROMPT, "box_threshold": 0.3, "masks": True})
    assert answer.status_code == 200, answer.text
    assert all("mask" in d and "mask_score" in d for d in answer.json()["detections"])
    for bad in ("maybe", 1, [True]):
        refused = client.post("/v1/detect", json={"image": data, "prompt": PROMPT, "masks": bad})
        assert refused.status_code == 422 and "masks must be true or false" in refused.json()["detail"]


def test_only_the_best_max_masks_detections_are_segmented(fast_model, data_dir):
    seg = EllipseSegmenter()
    app = create_app(fast_model, Settings(max_masks=2), segmenter=seg)
    with TestClient(app, raise_server_exceptions=False) as c:
        body = post(c, (data_dir / "chelsea.png").read_bytes(), prompt=PROMPT, box_threshold="0", masks="1").json()
    detections = body["detections"]
    assert len(detections) > 2 and body["masked"] == 2 and seg.calls == [2]  # the segmenter's work is bounded
    assert all("mask" in d for d in detections[:2]) and not any("mask" in d for d in detections[2:])
    scores = [d["score"] for d in detections]
    assert scores == sorted(scores, reverse=True)  # the masked ones are the best


def test_masks_on_a_server_without_a_segmenter_is_a_422(fast_model, data_dir):
    with TestClient(create_app(fast_model), raise_server_exceptions=False) as c:
        answer = post(c, (data_dir / "chelsea.png").read_bytes(), prompt=PROMPT, masks="true")
        health = c.get("/healthz").json()
    assert answer.status_code == 422 and answer.json()["error"] == "masks_unavailable"
    assert "--masks" in answer.json()["detail"]
    assert health["masks"] == {"available": False}


def test_healthz_says_masks_are_there_and_names_the_model_only_with_the_key(client):
    assert client.get("/healthz").json()["masks"] == {"available": True, "max_per_request": 1000, "model": "ellipses"}
    assert client.get("/healthz", headers={"X-API-Key": "wrong"}).json()["masks"] == {
        "available": True,
        "max_per_request": 1000,
    }
    assert 'id="masks"' in client.get("/").text  # the page's checkbox


def test_jobs_on_one_image_share_one_segment_call(fast_model, data_dir):
    from PIL import Image

    image = Image.open(data_dir / "chelsea.png").convert("RGB")
    seg = EllipseSegmenter()
    jobs = [Job(image, "same", prompt, 0.2, None, True) for prompt in ("a cat.", "a remote control.")]
    jobs.append(Job(image, "same", "a cat.", 0.2, None, False))
    run_group(fast_model, jobs, segmenter=seg, max_masks=100)
    answers = [job.future.result() for job in jobs]
    assert isinstance(answers[0], Masked) and isinstance(answers[1], Masked) and not isinstance(answers[2], Masked)
    assert seg.calls == [len(answers[0].masked) + len(answers[1].masked)]  # one call for the image's two requests
    for job, answer in zip(jobs[:2], answers[:2]):
        alone = EllipseSegmenter().add_masks(image, fast_model.detect(image, job.prompt, 0.2))
        assert answer.to_list() == alone.to_list() and len(answer.unmasked) == 0


def test_the_server_answers_while_the_segmenter_works(fast_model, data_dir):
    started, release = threading.Event(), threading.Event()

    class Slow(EllipseSegmenter):
        def segment(self, image, boxes):
            started.set()
            release.wait(30)
            return super().segment(image, boxes)

    app = create_app(fast_model, segmenter=Slow())
    files = {"image": ("c.png", (data_dir / "chelsea.png").read_bytes())}
    answers: list[httpx.Response] = []
    try:
        with serve_in_thread(app) as base:
            asking = threading.Thread(
                target=lambda: answers.append(
                    httpx.post(base + "/v1/detect", files=files, data={"prompt": PROMPT, "masks": "true"}, timeout=60)
                )
            )
            asking.start()
            assert started.wait(30)
            health = httpx.get(base + "/healthz", timeout=30)  # answered while the worker segments
            assert health.status_code == 200 and health.json()["queue"]["pending"] == 1
            release.set()
            asking.join(60)
    finally:
        release.set()
    assert answers[0].status_code == 200 and "masked" in answers[0].json()


def test_serve_with_a_bad_masks_model_is_one_line(fast_dir, tmp_path, capsys):
    status = main(["serve", "--model", str(fast_dir), "--device", "cpu", "--masks", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("gdino: error: --masks"), err


def test_openapi_documents_the_masks_field(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/detect"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["masks"]["type"] == "boolean"
    assert body["application/json"]["schema"]["properties"]["masks"]["type"] == "boolean"
    assert "mask" in spec["components"]["schemas"]["Detection"]["properties"]


def test_no_detections_give_an_empty_masked_answer(client, data_dir):
    body = post(client, (data_dir / "chelsea.png").read_bytes(), prompt=PROMPT, box_threshold="1", masks="on").json()
    assert body["detections"] == [] and body["masked"] == 0
