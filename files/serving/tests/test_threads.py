"""DaemonExecutor and in_daemon_thread: calls on daemon threads, results through futures."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from metalserve.threads import DaemonExecutor, in_daemon_thread


def test_one_thread_runs_calls_in_submission_order() -> None:
    ran: list[int] = []

    def record(i: int, delay: float) -> int:
        time.sleep(delay)
        ran.append(i)
        return i * 10

    with DaemonExecutor("test-serial") as executor:
        # The first call is the slowest: the others still wait for it.
        futures = [executor.submit(record, i, delay=0.05 if i == 0 else 0.0) for i in range(5)]
    assert [f.result(timeout=10) for f in futures] == [0, 10, 20, 30, 40]
    assert ran == [0, 1, 2, 3, 4]


def test_exceptions_reach_the_future() -> None:
    def fail() -> None:
        raise ValueError("broken")

    with DaemonExecutor("test-fail") as executor:
        failed = executor.submit(fail)
        after = executor.submit(lambda: "still running")
    with pytest.raises(ValueError, match="broken"):
        failed.result(timeout=10)
    assert after.result(timeout=10) == "still running"


def test_threads_are_daemons_and_named() -> None:
    started = threading.Barrier(3)

    def which() -> threading.Thread:
        started.wait(timeout=10)  # three calls at once: one per thread
        return threading.current_thread()

    with DaemonExecutor("test-pool", 3) as executor:
        threads = [f.result(timeout=10) for f in [executor.submit(which) for _ in range(3)]]
    assert all(t.daemon for t in threads)
    assert sorted(t.name for t in threads) == ["test-pool-0", "test-pool-1", "test-pool-2"]
    for thread in threads:
        thread.join(timeout=10)  # shutdown lets them end once the calls have run
        assert not thread.is_alive()


def test_no_submissions_after_shutdown() -> None:
    executor = DaemonExecutor("test-closed")
    executor.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        executor.submit(print)
    with pytest.raises(ValueError, match="threads"):
        DaemonExecutor("test-none", 0)


def test_in_daemon_thread_is_awaitable() -> None:
    def shout(text: str) -> tuple[str, str, bool]:
        thread = threading.current_thread()
        return text.upper(), thread.name, thread.daemon

    async def main() -> tuple[str, str, bool]:
        return await in_daemon_thread("test-load", shout, "ok")

    assert asyncio.run(main()) == ("OK", "test-load", True)
