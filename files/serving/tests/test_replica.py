"""The replica's state without a running engine: admission, reload guards, in-flight tracking."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conftest import MODEL, Store
from metalserve.errors import ApiError
from metalserve.replica import Replica, read_token
from metalserve.settings import ServeSettings


@pytest.fixture
def replica(model_store: Store) -> Replica:
    settings = ServeSettings(store=model_store.root, model=MODEL, version=model_store.v1)
    return Replica(settings, model_store.v1)


def test_read_token(tmp_path: Path) -> None:
    assert read_token(None) is None
    path = tmp_path / "token"
    path.write_text("  secret\n")
    assert read_token(path) == "secret"
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token(path)


def test_admission_needs_a_ready_replica(replica: Replica) -> None:
    assert replica.state() == "engine-dead"  # the engine thread was never started
    assert not replica.ready
    with pytest.raises(ApiError) as excinfo:
        replica.admit(MODEL)
    assert (excinfo.value.status, excinfo.value.code) == (503, "not_ready")
    replica.draining = True
    assert replica.state() == "draining"
    with pytest.raises(ApiError) as excinfo:
        replica.admit(MODEL)
    assert (excinfo.value.status, excinfo.value.code) == (503, "draining")


def test_reload_only_while_ready(replica: Replica) -> None:
    with pytest.raises(ApiError) as excinfo:
        asyncio.run(replica.reload("anything"))
    assert (excinfo.value.status, excinfo.value.code) == (409, "not_ready")
    replica.draining = True
    with pytest.raises(ApiError) as excinfo:
        asyncio.run(replica.reload("anything"))
    assert (excinfo.value.status, excinfo.value.code) == (503, "draining")


def test_wait_idle_follows_in_flight_requests(replica: Replica) -> None:
    async def main() -> None:
        assert await replica.wait_idle(0.01)
        replica.enter()
        assert not await replica.wait_idle(0.01)
        waiter = asyncio.create_task(replica.wait_idle(5))
        await asyncio.sleep(0)
        replica.leave()
        assert await waiter
        assert replica.in_flight == 0

    asyncio.run(main())
