"""Daemon threads for long blocking work (model loads, weight streaming and hashing).

Not ThreadPoolExecutor, nor asyncio.to_thread (which uses one): the interpreter joins those
threads at exit, so a SIGTERM during a long load would wait for the load to finish.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class DaemonExecutor:
    """Runs submitted calls on ``threads`` daemon threads (in submission order when it is 1).

    ``shutdown`` lets the threads end once the calls submitted before it have run; nothing waits
    for them, and the process may exit while they still run.
    """

    def __init__(self, name: str, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._threads = threads
        self._shut_down = False
        for number in range(threads):
            thread_name = name if threads == 1 else f"{name}-{number}"
            threading.Thread(target=self._run, name=thread_name, daemon=True).start()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        if self._shut_down:
            raise RuntimeError("cannot submit to a DaemonExecutor after shutdown")
        future: Future[T] = Future()
        self._calls.put((future, functools.partial(fn, *args, **kwargs)))
        return future

    def shutdown(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        for _ in range(self._threads):
            self._calls.put(None)

    def __enter__(self) -> DaemonExecutor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.shutdown()

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)
            else:
                future.set_result(result)


def in_daemon_thread(
    name: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
) -> asyncio.Future[T]:
    """Run one call on a daemon thread of its own; await the result from the event loop."""
    with DaemonExecutor(name) as executor:
        return asyncio.wrap_future(executor.submit(fn, *args, **kwargs))
