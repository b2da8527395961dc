"""``gdino serve``'s Label Studio ML backend routes (``/label-studio``) with FastAPI's TestClient, the
packaged gdino-shapes model and a stand-in for Label Studio's file routes (tests/apps/server/label_studio_fake.py):
health, setup, webhook and predict as Label Studio calls them; results in percent of the image equal to
``detect``'s boxes, labels from the config's values and ``predicted_values``, a typed prompt's phrases,
brush masks with a segmenter; errors in Label Studio's format (a body that is not its JSON, a config
without labels or with labels the model cannot tell apart, an image that cannot be had, a refused key)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the server extra is not installed: pip install -e '.[serve]'")
from fastapi.testclient import TestClient
from label_studio_fake import fake_label_studio

from brush_rle import decode_brush_rle
from ellipse_segmenter import EllipseSegmenter
from gdino.apps.server.app import Settings, create_app
from gdino.apps.server.label_studio_images import LabelStudioSettings
from gdino.inference.detector import GroundingDinoForObjectDetection
from gdino.training.shapes import ShapesSettings, render

LABELS = '<Label value="orange star"/><Label value="purple square"/><Label value="RT" predicted_values="red triangle"/>'
IMAGE = '<Image name="image" value="$img"/>'
CONFIG = f'<View>{IMAGE}<RectangleLabels name="box" toName="image">{LABELS}</RectangleLabels></View>'
PROMPTS = ["orange star", "purple square", "RT", "red triangle"]  # the label list the config gives
VALUES = ["orange star", "purple square", "RT", "RT"]  # the value each prompt stands for


def png(seed: int) -> bytes:
    scene = render(np.random.default_rng(seed), list(range(24)), ShapesSettings(grain=0.0, backgrounds=("flat",)))
    out = io.BytesIO()
    Image.fromarray(scene.image).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {f"s{seed}.png": png(seed) for seed in (1, 2)}  # seeds whose scenes hold each kind of label


@pytest.fixture(scope="module")
def shapes_model() -> GroundingDinoForObjectDetection:
    return GroundingDinoForObjectDetection.from_pretrained("gdino-shapes").eval()


@pytest.fixture(scope="module")
def fake(files):
    with fake_label_studio(files) as server:
        yield server


def client_for(model, fake, api_key: str | None = None, segmenter=None) -> TestClient:
    label_studio = LabelStudioSettings(url=fake.url, api_key="legacy")
    app = create_app(model, Settings(api_key=api_key), "gdino-shapes", segmenter, "ellipses", label_studio)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(shapes_model, fake):
    with client_for(shapes_model, fake) as c:
        yield c


def task(i: int, ref: str) -> dict:
    return {"id": i, "data": {"img": ref}, "project": 1}


def predict(client, tasks: list[dict], config: str = CONFIG, context=None, **headers):
    body = {"tasks": tasks, "project": "1.1700000000", "label_config": config, "params": {"context": context}}
    return client.post("/label-studio/predict", json=body, headers=headers)


def percent(box: np.ndarray, width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = np.clip(box, 0, [width, height, width, height]).tolist()
    return [100 * x0 / width, 100 * y0 / height, 100 * (x1 - x0) / width, 100 * (y1 - y0) / height]


def test_health_answers_up_without_a_key(shapes_model, fake) -> None:
    with client_for(shapes_model, fake, api_key="k") as client:
        for path in ("/label-studio/health", "/label-studio/", "/label-studio"):
            answer = client.get(path)
            assert answer.status_code == 200 and answer.json()["status"] == "UP", path
        assert answer.json()["model_version"] == "gdino-0.1.0-gdino-shapes"


def test_setup_checks_the_config_and_gives_the_model_version(client) -> None:
    answer = client.post("/label-studio/setup", json={"project": "1.1700000000", "schema": CONFIG})
    assert answer.status_code == 200 and answer.json() == {"model_version": "gdino-0.1.0-gdino-shapes"}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('<View><Image name="image" value="$img"/></View>', "no RectangleLabels or BrushLabels"),
        (CONFIG.replace(LABELS, ""), "has no labels"),
        (CONFIG.replace("<View>", "<View"), "not valid XML"),
        (CONFIG.replace('"RT"', '"orange STAR"'), "same label to the model"),
    ],
)
def test_configs_the_model_cannot_predict_for_are_422_in_label_studios_format(client, config, message) -> None:
    for route, body in (("setup", {"schema": config}), ("predict", {"tasks": [], "label_config": config})):
        answer = client.post(f"/label-studio/{route}", json={"project": "1.1", **body})
        assert answer.status_code == 422, route
        assert answer.json()["status"] == 422 and message in answer.json()["detail"], answer.json()


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"tasks": "x", "label_config": "<View/>"}'])
def test_a_body_that_is_not_label_studios_json_is_400(client, body) -> None:
    answer = client.post("/label-studio/predict", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and answer.json()["status"] == 400 and answer.json()["error"] == "invalid_json"


def test_webhook_events_are_acknowledged(client) -> None:
    assert client.post("/label-studio/webhook", json={"action": "PROJECT_UPDATED"}).json() == {
        "status": "Unknown event"
    }
    answer = client.post("/label-studio/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert answer.status_code == 201 and answer.json()["status"] == "ok"


def test_with_an_api_key_label_studios_basic_auth_passes(shapes_model, fake) -> None:
    with client_for(shapes_model, fake, api_key="k") as client:
        refused = predict(client, [])
        assert refused.status_code == 401 and refused.json()["status"] == 401
        basic = "Basic " + base64.b64encode(b"anyone:k").decode()
        assert predict(client, [], Authorization=basic).json() == {"results": []}
        assert predict(client, [], Authorization="Bearer k").status_code == 200
        wrong = "Basic " + base64.b64encode(b"anyone:x").decode()
        assert predict(client, [], Authorization=wrong).status_code == 401


def test_a_request_whose_tasks_all_fail_is_their_error(client, fake) -> None:
    answer = predict(client, [task(1, "/data/upload/1/missing.png"), task(2, f"{fake.url}/open/missing.png")])
    assert answer.status_code == 422
    body = answer.json()
    assert body["status"] == 422 and body["error"] == "image_unreachable"
    assert "task 1: cannot fetch the image" in body["detail"] and "task 2" in body["detail"]
    answer = predict(client, [{"id": 3, "data": {"other": "x"}}])
    assert answer.status_code == 422 and "no image in its data['img']" in answer.json()["detail"]


def test_predictions_are_detects_boxes_in_percent_with_the_configs_values(client, shapes_model, files) -> None:
    answer = predict(client, [task(1, "/data/upload/1/s1.png"), task(2, "upload/1/s2.png")])
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["results"]
    assert len(predictions) == 2
    for prediction, name in zip(predictions, ("s1.png", "s2.png")):
        found = shapes_model.detect(Image.open(io.BytesIO(files[name])), labels=PROMPTS)
        width, height = found.image_size
        assert len(found) > 0 and len(prediction["result"]) == len(found)
        assert prediction["model_version"] == "gdino-0.1.0-gdino-shapes"
        assert prediction["score"] == pytest.approx(float(np.mean(found.scores)), abs=1e-4)
        for result, box, label_id, score in zip(prediction["result"], found.boxes, found.label_ids, found.scores):
            assert (result["from_name"], result["to_name"], result["type"]) == ("box", "image", "rectanglelabels")
            assert (result["original_width"], result["original_height"]) == (width, height)
            assert result["value"]["rectanglelabels"] == [VALUES[int(label_id)]]
            got = [result["value"][k] for k in ("x", "y", "width", "height")]
            np.testing.assert_allclose(got, percent(box, width, height), atol=1e-6)
            assert result["score"] == round(float(score), 4)
    assert any(r["value"]["rectanglelabels"] == ["RT"] for p in predictions for r in p["result"]), "an alias found"


def test_one_bad_task_leaves_the_others_their_predictions(client, fake, shapes_model, files) -> None:
    answer = predict(client, [task(1, f"{fake.url}/open/s2.png"), task(2, f"{fake.url}/open/missing.png")])
    assert answer.status_code == 200, answer.text
    good, bad = answer.json()["results"]
    assert len(good["result"]) == len(shapes_model.detect(Image.open(io.BytesIO(files["s2.png"])), labels=PROMPTS))
    assert "result" not in bad, "Label Studio logs and skips an entry without result: the task can be retried"
    assert bad["status"] == 422 and "task 2: cannot fetch the image" in bad["detail"] and "HTTP 404" in bad["detail"]


def test_a_typed_prompt_labels_boxes_by_their_phrases(client, shapes_model, files) -> None:
    config = CONFIG.replace("</View>", '<TextArea name="prompt" toName="image"/></View>')
    context = {
        "result": [{"from_name": "prompt", "type": "textarea", "value": {"text": ["orange star. red triangle."]}}]
    }
    answer = predict(client, [task(1, "/data/upload/1/s1.png")], config, context)
    assert answer.status_code == 200, answer.text
    found = shapes_model.detect(Image.open(io.BytesIO(files["s1.png"])), "orange star. red triangle.")
    expected = [{"orange star": "orange star", "red triangle": "RT"}.get(p) for p in found.labels]
    assert len(found) > 0 and expected.count("orange star") > 0
    got = [r["value"]["rectanglelabels"][0] for r in answer.json()["results"][0]["result"]]
    assert got == [v for v in expected if v is not None]


def test_with_a_segmenter_brush_labels_get_brush_masks(shapes_model, fake, files) -> None:
    config = CONFIG.replace(
        "</View>", '<BrushLabels name="paint" toName="image"><Label value="orange star"/></BrushLabels></View>'
    )
    with client_for(shapes_model, fake, segmenter=EllipseSegmenter()) as client:
        answer = predict(client, [task(1, "/data/upload/1/s2.png")], config)
    assert answer.status_code == 200, answer.text
    image = Image.open(io.BytesIO(files["s2.png"]))
    found = EllipseSegmenter().add_masks(image, shapes_model.detect(image, labels=PROMPTS))
    stars = [i for i in range(len(found)) if VALUES[int(found.label_ids[i])] == "orange star"]
    brushes = [r for r in answer.json()["results"][0]["result"] if r["type"] == "brushlabels"]
    assert len(stars) > 0 and len(brushes) == len(stars)
    assert answer.json()["results"][0]["model_version"] == "gdino-0.1.0-gdino-shapes+ellipses"
    for result, i in zip(brushes, stars):
        assert result["from_name"] == "paint" and result["value"]["brushlabels"] == ["orange star"]
        decoded = decode_brush_rle(result["value"]["rle"]).reshape(image.height, image.width, 4)
        np.testing.assert_array_equal(decoded[:, :, 3] == 255, found.masks.mask(i))
