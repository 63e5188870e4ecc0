"""Hot reload through POST /admin/reload, against a real server."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import ADMIN_TOKEN, MODEL, Server, Store

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
LOAD_THREADS = 3
MAX_REQUESTS_PER_THREAD = 60
MAX_LOAD_SECONDS = 40.0


@pytest.fixture
def admin(reload_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=reload_server.url, timeout=60.0) as client:
        yield client


def reload(client: httpx.Client, version: str, headers: dict[str, str] = AUTH) -> httpx.Response:
    return client.post("/admin/reload", json={"version": version}, headers=headers)


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_disabled_without_token_file(api_server: Server, model_store: Store) -> None:
    response = httpx.post(
        f"{api_server.url}/admin/reload", json={"version": model_store.v2}, headers=AUTH
    )
    assert response.status_code == 404
    assert "disabled" in error_of(response)["message"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"Authorization": "Bearer"},
    ],
)
def test_requires_the_token(
    admin: httpx.Client, model_store: Store, headers: dict[str, str]
) -> None:
    response = reload(admin, model_store.v2, headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert error_of(response)["type"] == "authentication_error"
    # Authentication comes before body validation: no hints for the unauthenticated.
    bad_body = admin.post("/admin/reload", json={"nope": 1}, headers=headers)
    assert bad_body.status_code == 401


def test_refuses_unknown_versions(admin: httpx.Client) -> None:
    for ref in ("0" * 64, "0" * 12, "abc", "latest"):
        response = reload(admin, ref)
        assert response.status_code == 404, ref
        assert error_of(response)["param"] == "version"
    assert admin.post("/admin/reload", json={}, headers=AUTH).status_code == 400


def test_refuses_a_corrupt_version_and_keeps_serving(
    admin: httpx.Client, model_store: Store
) -> None:
    before = admin.post(
        "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 8, "temperature": 0}
    ).json()
    response = reload(admin, model_store.corrupt)

    assert response.status_code == 409
    error = error_of(response)
    assert error["code"] == "verification_failed"
    assert "model.safetensors" in error["message"]
    assert admin.get("/version").json()["version_id"] == model_store.v1
    assert admin.get("/readyz").status_code == 200
    after = admin.post(
        "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 8, "temperature": 0}
    ).json()
    assert after["choices"] == before["choices"]


def test_reload_same_version_is_a_no_op(admin: httpx.Client, model_store: Store) -> None:
    response = reload(admin, model_store.v1[:12])
    assert response.status_code == 200
    assert response.json() == {"model": MODEL, "version_id": model_store.v1, "changed": False}


def test_hot_reload_under_load(
    admin: httpx.Client, reload_server: Server, model_store: Store
) -> None:
    stop = threading.Event()
    statuses: Counter[int] = Counter()
    texts: defaultdict[str, set[str]] = defaultdict(set)
    errors: list[str] = []
    lock = threading.Lock()

    def load(worker: int) -> None:
        deadline = time.monotonic() + MAX_LOAD_SECONDS
        with httpx.Client(base_url=reload_server.url, timeout=30.0) as client:
            for i in range(MAX_REQUESTS_PER_THREAD):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                body = {
                    "model": MODEL,
                    "prompt": "The quick brown fox",
                    "max_tokens": 10,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                try:
                    response = client.post("/v1/completions", json=body)
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(f"worker {worker} request {i}: {exc!r}")
                    continue
                with lock:
                    statuses[response.status_code] += 1
                    if response.status_code == 200:
                        data = response.json()
                        texts[data["system_fingerprint"]].add(data["choices"][0]["text"])

    workers = [threading.Thread(target=load, args=(i,)) for i in range(LOAD_THREADS)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.5)
        first = reload(admin, model_store.v2)
        assert first.status_code == 200, first.text
        assert first.json()["previous_version_id"] == model_store.v1
        assert admin.get("/version").json()["version_id"] == model_store.v2
        time.sleep(0.5)
        back = reload(admin, model_store.v1)
        assert back.status_code == 200, back.text
        time.sleep(0.3)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)

    assert not errors
    assert set(statuses) == {200}, statuses
    v1_fp, v2_fp = f"{MODEL}@{model_store.v1[:12]}", f"{MODEL}@{model_store.v2[:12]}"
    assert set(texts) == {v1_fp, v2_fp}, "responses came from both versions"
    # Each version answered consistently; the two versions differ.
    assert len(texts[v1_fp]) == 1
    assert len(texts[v2_fp]) == 1
    assert texts[v1_fp] != texts[v2_fp]
    assert admin.get("/version").json()["version_id"] == model_store.v1
    metrics = admin.get("/metrics").text
    assert f'metalserve_model_info{{model="{MODEL}",version="{model_store.v1}"}} 1.0' in metrics
    assert model_store.v2 not in metrics.split("metalserve_model_info", 1)[1].split("# HELP")[0]
