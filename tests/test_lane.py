"""The embedding lane (``loom_kernel.api.lane``) against Litestar's full path: the same answers, errors, headers,
metrics and security, for requests that take the lane and for those it hands on. The reference is the app with the
lane switched off, on the same model in the same process; the lane is seen taken (or not) by counting the calls
that reach ``Litestar.__call__``."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from loom_kernel.api import create_app
from loom_kernel.config import Settings

LONG = "hidden states " * 200  # over the MiniLM's 256 tokens

ANSWERS = [
    ("/embed", {"text": "The quick brown fox jumps over the lazy dog."}),
    ("/embed", {"text": "layer three, mean pooled", "layer": 3, "pooling": "mean", "dimensions": 64}),
    ("/embed", {"text": "per-token states", "pooling": "none"}),
    ("/embed", {"text": LONG}),  # truncated
    ("/embed/batch", {"texts": ["one", "two texts here", "and three"]}),
    ("/embed/batch", {"texts": ["ragged", "token states"], "pooling": "none"}),
    ("/v1/embeddings", {"input": ["float", "vectors"]}),
    ("/v1/embeddings", {"input": "base64 vector", "encoding_format": "base64"}),
]
ERRORS = [  # path, fields, status, whether the lane serves it (raises while serving) or hands it to Litestar
    ("/embed", {"text": "x", "layer": 7}, 422, True),  # raised before the pass
    ("/embed", {"text": "x", "pooling": "median"}, 422, True),
    ("/embed", {"text": LONG, "truncate": False}, 422, True),  # raised on the model's thread
    ("/embed/batch", {"texts": ["short", LONG], "truncate": False}, 422, True),
    ("/v1/embeddings", {"input": "x", "pooling": "none"}, 422, True),
    ("/embed", {"text": "x", "model": "nobody/nothing"}, 404, True),
    ("/embed", {"text": "x", "normalise": True}, 422, False),  # does not decode
    ("/embed", {"text": 5}, 422, False),
    ("/embed", {}, 422, False),
]


class Reached:
    """Counts the HTTP requests that reach Litestar's own ``__call__`` (those the lane did not serve)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = Litestar.__call__

        async def counted(app: Any, scope: Any, receive: Any, send: Any) -> None:
            self.count += scope["type"] == "http"
            await original(app, scope, receive, send)

        monkeypatch.setattr(Litestar, "__call__", counted)


@pytest.fixture(scope="module")
def app() -> Any:
    return create_app(settings=Settings(default_device="cpu"))


@pytest.fixture(scope="module")
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app=app, timeout=120) as c:
        yield c


def both(app: Any, client: TestClient, reached: Reached, path: str, **kwargs: Any) -> tuple[Any, Any, int]:
    """(lane's response, full path's response, Litestar calls during the lane's request)."""
    before = reached.count
    lane = client.post(path, **kwargs)
    taken = reached.count - before
    was, app.embedding_lane = app.embedding_lane, False
    try:
        full = client.post(path, **kwargs)
    finally:
        app.embedding_lane = was
    return lane, full, taken


def comparable(body: dict[str, Any]) -> dict[str, Any]:
    """The body without what differs from one request to the next: timing, request id."""
    body = dict(body)
    body.pop("request_id", None)
    if "metadata" in body:
        body["metadata"] = {
            k: v for k, v in body["metadata"].items() if k not in ("inference_time_ms", "tokens_per_second")
        }
    return body


@pytest.mark.parametrize(("path", "fields"), ANSWERS, ids=[f"{p}:{sorted(f)}" for p, f in ANSWERS])
def test_the_lane_answers_as_the_full_path(app, client, monkeypatch, path, fields):
    reached = Reached(monkeypatch)
    lane, full, taken = both(app, client, reached, path, json={"model": "minilm", **fields})
    assert taken == 0, "the request went through Litestar, not the lane"
    assert reached.count == 1  # the lane off: Litestar served the second one
    assert lane.status_code == full.status_code == 200, lane.text
    assert lane.headers["content-type"] == full.headers["content-type"] == "application/json"
    assert int(lane.headers["content-length"]) == len(lane.content)
    assert re.fullmatch(r"[0-9a-f]{16}", lane.headers["x-request-id"])
    assert lane.headers["x-request-id"] != full.headers["x-request-id"]
    assert comparable(lane.json()) == comparable(full.json())
    if fields.get("encoding_format") == "base64":
        vector = np.frombuffer(base64.b64decode(lane.json()["data"][0]["embedding"]), dtype="<f4")
        assert vector.shape == (384,)


@pytest.mark.parametrize(
    ("path", "fields", "status", "served"), ERRORS, ids=[f"{p}:{sorted(f)}" for p, f, *_ in ERRORS]
)
def test_errors_are_the_full_paths(app, client, monkeypatch, path, fields, status, served):
    reached = Reached(monkeypatch)
    lane, full, taken = both(app, client, reached, path, json={"model": "minilm", **fields})
    assert taken == (0 if served else 1)
    assert lane.status_code == full.status_code == status, lane.text
    assert lane.headers["content-type"] == full.headers["content-type"] == "application/problem+json"
    got, want = lane.json(), full.json()
    assert got["request_id"] == lane.headers["x-request-id"]
    assert comparable(got) == comparable(want)
    assert client.get("/health").status_code == 200


def test_what_the_lane_hands_on(app, client, monkeypatch):
    """JSON that stops short, a body of no declared length (chunked): Litestar serves them, with the body the lane
    already read handed on, and answers as it does with the lane off. Another content type is refused before
    either path (the guard)."""
    reached = Reached(monkeypatch)
    truncated = b'{"model": "minilm", "text": '
    lane, full, taken = both(
        app, client, reached, "/embed", content=truncated, headers={"content-type": "application/json"}
    )
    assert taken == 1 and lane.status_code == full.status_code == 400
    assert comparable(lane.json()) == comparable(full.json()) and lane.json()["field"] == "body"
    plain = b'{"model": "minilm", "text": "sent as text/plain"}'
    lane, full, taken = both(app, client, reached, "/embed", content=plain, headers={"content-type": "text/plain"})
    assert taken == 0 and lane.status_code == full.status_code == 415
    assert comparable(lane.json()) == comparable(full.json()) and lane.json()["field"] == "content-type"
    before = reached.count
    chunks = iter([b'{"model": "minilm", ', b'"text": "sent as text/plain"}'])
    r = client.post("/embed", content=chunks, headers={"content-type": "application/json"})
    assert reached.count == before + 1 and "content-length" not in r.request.headers
    alone = client.post("/embed", json={"model": "minilm", "text": "sent as text/plain"})
    assert r.status_code == 200 and r.json()["embedding"] == alone.json()["embedding"]


def test_an_api_key_is_checked_on_the_lane_too(monkeypatch):
    reached = Reached(monkeypatch)
    app = create_app(settings=Settings(default_device="cpu", api_key="s3cret"))
    body = {"model": "minilm", "text": "keyed"}
    with TestClient(app=app, timeout=120) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            before = reached.count
            r = c.post("/embed", json=body, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="loom"', headers
            assert reached.count == before + 1  # refused by the full path's middleware
        before = reached.count
        r = c.post("/embed", json=body, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["shape"] == [384]
        assert reached.count == before


def test_too_large_a_body_and_cors_take_the_full_path(monkeypatch):
    reached = Reached(monkeypatch)
    small = create_app(settings=Settings(default_device="cpu", max_body_mb=0.001))
    with TestClient(app=small, timeout=120) as c:
        r = c.post("/embed", json={"model": "minilm", "text": "x" * 2000})
        assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
        assert reached.count == 1
    cors = create_app(settings=Settings(default_device="cpu", cors_origins=["https://notebook.example"]))
    with TestClient(app=cors, timeout=120) as c:
        before = reached.count
        r = c.post("/embed", json={"model": "minilm", "text": "x"}, headers={"Origin": "https://notebook.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://notebook.example"
        assert reached.count == before + 1


def test_the_lanes_requests_are_counted_in_the_metrics(client):
    def count(status: int) -> int:
        text = client.get("/metrics").text
        line = f'loom_http_requests_total{{method="POST",route="/embed",status="{status}"}} '
        return next((int(x.split()[-1]) for x in text.splitlines() if x.startswith(line)), 0)

    def observed() -> int:
        text = client.get("/metrics").text
        line = 'loom_http_request_duration_seconds_count{route="/embed"} '
        return next((int(x.split()[-1]) for x in text.splitlines() if x.startswith(line)), 0)

    ok, missing, seen = count(200), count(404), observed()
    assert client.post("/embed", json={"model": "minilm", "text": "counted"}).status_code == 200
    assert client.post("/embed", json={"model": "nobody/nothing", "text": "x"}).status_code == 404
    assert (count(200), count(404), observed()) == (ok + 1, missing + 1, seen + 2)
