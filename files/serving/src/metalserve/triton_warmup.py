"""Triton's once-per-process set-up, begun in a thread of its own at a process's start.

A process's first Triton launch (the loader's BLAKE3 kernels, in the weights' stream) computed
Triton's cache key, a SHA-256 of its compiler library and sources, and imported the modules
its launcher imports lazily: 1.5 s of a 1.9 s weights phase at 850M on an H100 host, the stream
itself 0.4 s (BENCHMARKS round 2 step 32). Begun before torch's import (an engine process) or
after it (``loader.import_libraries``), it runs beside the rest of the start (the hash releases
the interpreter lock); the first launch waits for what is left of it (``wait``) rather than
computing the key a second time. Only a speed-up: where Triton or these internals are missing,
nothing is done and the first launch does it all.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import threading
import time

log = logging.getLogger(__name__)

# Bounds the first launch's wait: past it, the launch computes what it needs itself.
WAIT_SECONDS = 30.0

_thread: threading.Thread | None = None
_lock = threading.Lock()


def begin() -> None:
    """Start the set-up in a daemon thread, once per process, where Triton is installed."""
    global _thread
    with _lock:
        if _thread is not None or importlib.util.find_spec("triton") is None:
            return
        _thread = threading.Thread(target=_warm, name="metalserve-triton-warmup", daemon=True)
        _thread.start()


def wait() -> None:
    """Until ``begin``'s set-up is done (at most ``WAIT_SECONDS``); at once if none began."""
    if _thread is None or not _thread.is_alive():
        return
    started = time.monotonic()
    _thread.join(WAIT_SECONDS)
    log.info("waited %.2fs for Triton's set-up", time.monotonic() - started)


def _warm() -> None:
    # No check for a GPU first: that would import torch, which this may run beside (an engine
    # process begins it first thing). Triton comes with torch's CUDA wheels, not its CPU ones.
    started = time.monotonic()
    with contextlib.suppress(Exception):
        # Triton 3.x: functools-cached, so the launch's own call returns it at once.
        importlib.import_module("triton.runtime.cache").triton_key()
    with contextlib.suppress(Exception):
        # Imported by Triton 3.6's launcher at a kernel's first call.
        importlib.import_module("triton.experimental.gluon")
    log.info("Triton's cache key and launcher modules ready in %.2fs", time.monotonic() - started)


def cache_entries() -> int | None:
    """How many kernels Triton's on-disk cache holds (one directory each): a count that grows
    while kernels compile and not while they are read from it. None: no Triton, or no cache
    directory yet (Triton makes it at its first compile)."""
    try:
        path = importlib.import_module("triton").knobs.cache.dir  # Triton 3.3 and later
        with os.scandir(path) as entries:
            return sum(1 for _ in entries)
    except (ImportError, AttributeError, OSError):
        return None
