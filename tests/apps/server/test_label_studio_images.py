"""Task images of the Label Studio routes (``gdino.apps.server.label_studio_images``), from a stand-in
for Label Studio on loopback: which URL each kind of task data means, the API key sent as a legacy
``Token`` or, for a personal access token, as the ``Bearer`` access token it is exchanged for (once,
then reused), never to another host nor on a redirect elsewhere, and each failure a clear 4xx."""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed: pip install -e '.[serve]'")
from label_studio_fake import ACCESS, REFRESH, fake_label_studio, jwt

from gdino.apps.server.label_studio_images import LabelStudioImages, LabelStudioSettings, is_jwt
from gdino.apps.server.settings import ApiError

FILES = {"a.png": b"A" * 100, "dir/b.png": b"B" * 10}


@pytest.fixture(scope="module")
def fake():
    with fake_label_studio(FILES) as server:
        yield server


def images(fake, key: str | None = "legacy", max_bytes: int = 1000, url: str | None = "") -> LabelStudioImages:
    return LabelStudioImages(LabelStudioSettings(url=fake.url if url == "" else url, api_key=key), max_bytes)


def test_task_data_kinds_become_label_studio_urls(fake) -> None:
    source = images(fake)
    assert source.url("/data/upload/1/a.png") == f"{fake.url}/data/upload/1/a.png"
    assert source.url("upload/1/a.png") == f"{fake.url}/data/upload/1/a.png", "older imports' form"
    assert source.url("/data/local-files/?d=dir/b.png") == f"{fake.url}/data/local-files/?d=dir/b.png"
    assert source.url("https://example.org/x.jpg") == "https://example.org/x.jpg"
    assert source.url("s3://bucket/x.jpg", 7) == f"{fake.url}/tasks/7/presign/?fileuri=czM6Ly9idWNrZXQveC5qcGc="
    with pytest.raises(ApiError, match="not an http"):
        source.url("ftp://example.org/x.jpg")


def test_a_legacy_token_is_sent_as_token(fake) -> None:
    assert images(fake).fetch("/data/upload/1/a.png") == FILES["a.png"]
    assert images(fake).fetch("/data/local-files/?d=dir/b.png") == FILES["dir/b.png"]
    assert fake.seen[-1] == ("/data/local-files/?d=dir/b.png", "Token legacy")


def test_a_personal_access_token_is_exchanged_once_for_a_bearer_token(fake) -> None:
    assert is_jwt(REFRESH) and not is_jwt("legacy") and not is_jwt("a.b.c")
    source, before = images(fake, REFRESH), fake.refreshes
    assert source.fetch("/data/upload/1/a.png") == FILES["a.png"]
    assert source.fetch("/data/upload/1/a.png") == FILES["a.png"]
    assert fake.refreshes == before + 1, "the access token is reused until it is about to expire"
    assert fake.seen[-1] == ("/data/upload/1/a.png", f"Bearer {ACCESS}")


def test_the_key_goes_to_label_studio_only(fake) -> None:
    other = fake.url.replace("127.0.0.1", "localhost")  # the same server under another origin
    assert images(fake).fetch(f"{other}/open/a.png") == FILES["a.png"]
    assert fake.seen[-1] == ("/open/a.png", None)
    assert images(fake).fetch(f"/redirect?to={other}/open/a.png") == FILES["a.png"]
    assert fake.seen[-2:] == [(f"/redirect?to={other}/open/a.png", "Token legacy"), ("/open/a.png", None)]


@pytest.mark.parametrize(
    ("key", "ref", "kind", "message"),
    [
        ("wrong", "/data/upload/1/a.png", "label_studio_refused_key", "refused the API key"),
        (None, "/data/upload/1/a.png", "label_studio_refused_key", "needs an API key"),
        (jwt({"token_type": "refresh", "exp": 1}), "/data/upload/1/a.png", "label_studio_refused_key", "access token"),
        ("legacy", "/data/upload/1/missing.png", "image_unreachable", "HTTP 404"),
        ("legacy", "/big", "too_large", "larger than 1000 bytes"),
        ("legacy", "/big?nolength=1", "too_large", "larger than 1000 bytes"),
    ],
)
def test_failures_are_clear_4xx(fake, key, ref, kind, message) -> None:
    with pytest.raises(ApiError, match=message) as error:
        images(fake, key).fetch(ref)
    assert error.value.kind == kind and 400 <= error.value.status < 500


def test_an_unreachable_host_and_a_missing_label_studio_url(fake) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(ApiError, match="cannot fetch the image") as error:
        images(fake).fetch(f"http://127.0.0.1:{port}/x.png")
    assert error.value.status == 422 and error.value.kind == "image_unreachable"
    with pytest.raises(ApiError, match="--label-studio-url") as error:
        images(fake, url=None).fetch("/data/upload/1/a.png")
    assert error.value.kind == "label_studio_url_missing"
