"""The engine's profile: ``Engine.profile`` and ``POST /admin/profile`` against a real server."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ADMIN_TOKEN, MODEL, Server
from engine_helpers import submit
from metalserve.engine import Engine
from metalserve.loader import LoadedModel
from metalserve.sampling import SamplingParams

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PROFILE = "/admin/profile"


def _assert_a_profile(summary: dict[str, Any], passes: int) -> None:
    assert sum(summary["passes"].values()) >= passes, summary["passes"]
    assert summary["passes"]["prefill"] >= 1, "the sequence's prefill was recorded"
    assert 0 < summary["host_recorded_s"] <= summary["seconds"], summary
    names = [row["name"] for row in summary["top_host"]]
    assert any(name.startswith("aten::") for name in names), names
    trace = json.loads(Path(summary["trace"]).read_text())
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
    beside = Path(summary["trace"]).with_name(Path(summary["trace"]).stem + "-summary.json")
    assert json.loads(beside.read_text())["passes"] == summary["passes"]


def test_the_engine_records_its_next_passes(
    engine: Engine, v1: LoadedModel, tmp_path: Path
) -> None:
    profile = engine.profile(passes=4, max_seconds=60, directory=tmp_path)
    with pytest.raises(RuntimeError, match="already being recorded"):
        engine.profile(passes=1, max_seconds=1, directory=tmp_path)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    _, sink = submit(engine, v1, "The quick brown fox", params)
    summary = profile.future.result(timeout=60)
    sink.wait()
    _assert_a_profile(summary, passes=4)
    # The first four passes: the prefill and three decode steps, not the sequence's eight.
    assert summary["passes"] == {"prefill": 1, "decode": 3}
    # Done: the next profile may start.
    engine.profile(passes=1, max_seconds=0.2, directory=tmp_path)


def test_python_calls_are_recorded_when_asked(
    engine: Engine, v1: LoadedModel, tmp_path: Path
) -> None:
    profile = engine.profile(passes=2, max_seconds=60, directory=tmp_path, python=True)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    _, sink = submit(engine, v1, "Hi", params)
    summary = profile.future.result(timeout=60)
    sink.wait()
    inclusive = [row["name"] for row in summary["top_host_inclusive"]]
    # The batch's forward, in both passes (its prefill's ``add`` ranks about 19th of the 20
    # rows: on a busy machine other frames can push it out).
    assert any("batches.py" in name and ": _forward" in name for name in inclusive), inclusive
    assert not any("pluggy" in name for name in inclusive), "this thread's calls are not in it"


def test_an_idle_engine_ends_the_profile_empty(engine: Engine, tmp_path: Path) -> None:
    profile = engine.profile(passes=10, max_seconds=0.3, directory=tmp_path)
    with pytest.raises(RuntimeError, match=r"no forward pass ran within 0.3 s"):
        profile.future.result(timeout=10)  # the idle loop wakes at least once a second
    assert not list(tmp_path.iterdir()), "nothing was written"


def test_a_stopped_engine_fails_a_pending_profile(v1: LoadedModel, tmp_path: Path) -> None:
    engine = Engine(max_batch_size=2)
    engine.start()
    engine.swap(v1).result(timeout=10)
    profile = engine.profile(passes=10, max_seconds=60, directory=tmp_path)
    engine.stop()
    with pytest.raises(RuntimeError, match="engine stopped"):
        profile.future.result(timeout=10)
    with pytest.raises(RuntimeError, match="not running"):
        engine.profile(passes=1, max_seconds=1, directory=tmp_path)


@pytest.mark.e2e
def test_off_without_a_profile_dir(api_server: Server) -> None:
    response = httpx.post(f"{api_server.url}{PROFILE}", json={}, headers=AUTH)
    assert response.status_code == 404


@pytest.mark.e2e
@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": ADMIN_TOKEN}]
)
def test_requires_the_admin_token(reload_server: Server, headers: dict[str, str]) -> None:
    response = httpx.post(f"{reload_server.url}{PROFILE}", json={}, headers=headers)
    assert response.status_code == 401


@pytest.mark.e2e
@pytest.mark.parametrize(
    "body",
    [
        {"passes": 0},
        {"passes": 10_001},
        {"passes": "5"},
        {"max_seconds": 0},
        {"max_seconds": 301},
        {"python": "yes"},
        {"steps": 3},
        [1],
    ],
)
def test_bad_bodies(reload_server: Server, body: Any) -> None:
    response = httpx.post(f"{reload_server.url}{PROFILE}", json=body, headers=AUTH)
    assert response.status_code == 400, response.text


@pytest.mark.e2e
def test_a_profile_under_requests(reload_server: Server) -> None:
    url = reload_server.url
    answer: dict[str, Any] = {}

    def profile() -> None:
        response = httpx.post(
            f"{url}{PROFILE}", json={"passes": 6, "max_seconds": 30}, headers=AUTH, timeout=90
        )
        answer["status"], answer["body"] = response.status_code, response.json()

    profiler = threading.Thread(target=profile)
    profiler.start()
    time.sleep(0.5)  # the request is in: the engine records its next passes
    deadline = time.monotonic() + 60
    while profiler.is_alive() and time.monotonic() < deadline:  # bounded: 60 s at most
        completion = httpx.post(
            f"{url}/v1/completions",
            json={"model": MODEL, "prompt": "Hi", "max_tokens": 4, "temperature": 0},
            timeout=30,
        )
        assert completion.status_code == 200, completion.text
    profiler.join(30)
    assert answer.get("status") == 200, answer
    _assert_a_profile(answer["body"], passes=6)
    again = httpx.post(f"{url}{PROFILE}", json={"passes": 1, "max_seconds": 0.2}, headers=AUTH)
    assert again.status_code == 409, "idle: no pass ran"
    assert "no forward pass ran" in again.json()["error"]["message"]


def test_a_caller_that_gave_up_does_not_stop_the_engine(engine: Engine, tmp_path: Path) -> None:
    """The route's timeout cancels nothing, but a cancelled future must not kill the loop."""
    profile = engine.profile(passes=1, max_seconds=0.2, directory=tmp_path)
    assert profile.future.cancel()
    deadline = time.monotonic() + 10
    while engine._profile is not None and time.monotonic() < deadline:  # ends when idle
        time.sleep(0.05)
    assert engine._profile is None
    time.sleep(0.2)
    assert engine.is_alive()
    engine.profile(passes=1, max_seconds=0.2, directory=tmp_path)  # and takes the next one


def test_the_summary_holds_the_engine_thread_and_the_kernels_once() -> None:
    """torch adds each kernel's device time to the operator that launched it: the device total
    and list hold the device's own events only; the host's are the engine thread's (the one that
    recorded operators), not other threads' Python calls."""
    from torch.autograd import DeviceType

    from metalserve.engine.profiling import summarize

    class Event:
        def __init__(
            self, key: str, thread: int, device: DeviceType, host_us: float, device_us: float
        ) -> None:
            self.key, self.thread, self.device_type = key, thread, device
            self.self_cpu_time_total = self.cpu_time_total = host_us
            self.device_time_total = device_us
            self.is_user_annotation = False

    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    events = [
        Event("aten::mm", 7, cpu, 30.0, 500.0),
        Event("gemm_kernel", 0, cuda, 0.0, 500.0),
        Event("cudaLaunchKernel", 7, cpu, 10.0, 0.0),
        Event("aten::mm", 7, cpu, 30.0, 500.0),
        Event("gemm_kernel", 0, cuda, 0.0, 500.0),
        Event("threading.py(1): wait", 3, cpu, 9000.0, 0.0),  # another thread's Python
        Event("<built-in method acquire of _thread.lock object at 0x7f01>", 7, cpu, 1.0, 0.0),
        Event("<built-in method acquire of _thread.lock object at 0x7f02>", 7, cpu, 1.0, 0.0),
        # The engine loop's Python under another thread number than its operators (torch 2.11).
        Event("metalserve/engine/loop.py(415): _step", 9, cpu, 2.0, 0.0),
    ]
    summary = summarize(events, 1.0, {"prefill": 0, "decode": 1})
    assert summary["device_s"] == 0.001
    assert summary["top_device"] == [{"name": "gemm_kernel", "calls": 2, "device_s": 0.001}]
    assert summary["host_recorded_s"] == 0.000074
    assert [(r["name"], r["calls"]) for r in summary["top_host"]] == [
        ("aten::mm", 2),
        ("cudaLaunchKernel", 1),
        ("<built-in method acquire of _thread.lock object>", 2),  # one row, not one per lock
        ("metalserve/engine/loop.py(415): _step", 1),
    ]
