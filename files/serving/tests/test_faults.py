"""Fault injection (POST /admin/fault/wedge-engine), against real servers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ADMIN_TOKEN, MODEL, Server, Store, serve_args, wait_all_ready

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WEDGE = "/admin/fault/wedge-engine"


@pytest.fixture(scope="module")
def faulty_server(
    model_store: Store, admin_token_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    server = Server(
        serve_args(model_store, admin_token_file=admin_token_file, fault_injection=True),
        tmp_path_factory.mktemp("fault-logs") / "faulty.log",
    ).start()
    try:
        wait_all_ready(server)
        yield server
    finally:
        server.stop()


def test_off_by_default(reload_server: Server) -> None:
    """The reload server has the admin token but not the setting: the route does not exist."""
    response = httpx.post(f"{reload_server.url}{WEDGE}", json={"seconds": 1}, headers=AUTH)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": ADMIN_TOKEN}]
)
def test_requires_the_admin_token(faulty_server: Server, headers: dict[str, str]) -> None:
    response = httpx.post(f"{faulty_server.url}{WEDGE}", json={"seconds": 1}, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "body", [{}, {"seconds": 0}, {"seconds": -1}, {"seconds": "5"}, {"seconds": 3601}, [1]]
)
def test_bad_bodies(faulty_server: Server, body: Any) -> None:
    response = httpx.post(f"{faulty_server.url}{WEDGE}", json=body, headers=AUTH)
    assert response.status_code == 400, response.text


def _complete(url: str, result: dict[str, Any]) -> None:
    started = time.monotonic()
    response = httpx.post(
        f"{url}/v1/completions",
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0},
        timeout=30,
    )
    result["status"] = response.status_code
    result["seconds"] = time.monotonic() - started


def test_wedge_blocks_the_engine_not_the_http_server(faulty_server: Server) -> None:
    url = faulty_server.url
    before: dict[str, Any] = {}
    _complete(url, before)
    assert before["status"] == 200
    assert before["seconds"] < 2, "an idle tiny model answers at once"

    # The engine blocks from some moment after this (the request's arrival) for 3 s.
    asked_at = time.monotonic()
    wedged = httpx.post(f"{url}{WEDGE}", json={"seconds": 3}, headers=AUTH)
    assert wedged.status_code == 200, wedged.text
    assert wedged.json() == {"seconds": 3, "engine": "wedged"}
    wedged_at = time.monotonic()

    during: dict[str, Any] = {}
    worker = threading.Thread(target=_complete, args=(url, during))
    worker.start()
    health = httpx.get(f"{url}/healthz", timeout=2)
    assert health.status_code == 200, "the HTTP server answers while the engine is blocked"
    assert time.monotonic() - wedged_at < 2
    worker.join(30)
    assert during["status"] == 200, "the request waited for the engine, then ran"
    assert time.monotonic() - asked_at >= 3
    assert during["seconds"] > 1.5, during

    after: dict[str, Any] = {}
    _complete(url, after)
    assert after["status"] == 200
    assert after["seconds"] < 2
    assert "fault injection: the engine loop resumes" in faulty_server.log()
