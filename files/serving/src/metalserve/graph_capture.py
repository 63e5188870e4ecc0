"""One CUDA graph's capture that leaves torch as it found it when the capture fails.

A step that does what a capture forbids (a host sync, a kernel's first load) invalidates it, and
torch's ``capture_end`` then raises at ``cudaStreamEndCapture``: before it ends the caching
allocator's recording into the graph's memory pool, the random generators' capture state and
``torch.cuda.graph``'s stream context. Left so, every later capture fails ("beginAllocateToPool:
already recording"), ``empty_cache`` asserts, sampling on the device raises ("Offset increment
outside graph capture") and the thread keeps the capture stream as its current stream (BENCHMARKS
round 2 step 32, on an H100). ``capture`` ends all of them, so a failed capture may be retried or
given up without costing the process its device.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch


@functools.cache
def _capture_stream(device: int) -> torch.cuda.Stream:
    """A side stream per device for captures (a capture may not run on the default stream)."""
    return torch.cuda.Stream(device)


def pool_handle() -> Any:
    """A memory pool for graphs to share: given to every capture up front (rather than taken
    from the first graph's), so that a failed first capture's recording can be ended too."""
    return torch.cuda.graph_pool_handle()


@contextlib.contextmanager
def capture(graph: torch.cuda.CUDAGraph, pool: Any) -> Iterator[None]:
    """``torch.cuda.graph(graph, pool=pool)`` around the body, erroring only on this thread's
    unsafe calls (another thread of a serving process, a metrics scrape say, may use the device
    meanwhile); on a failure, the allocator's recording into ``pool`` ended, the graph reset
    (its generators' capture state removed) and the thread's stream restored, then the error
    raised."""
    device = torch.cuda.current_device()
    stream = _capture_stream(device)
    # Ours restores the thread's stream even where torch's context is left mid-way.
    with torch.cuda.stream(stream):
        try:
            with torch.cuda.graph(
                graph, pool=pool, stream=stream, capture_error_mode="thread_local"
            ):
                yield
        except BaseException:
            # Raises where no recording is under way: the capture ended, or never began.
            with contextlib.suppress(RuntimeError):
                torch._C._cuda_endAllocateToPool(device, pool)
            graph.reset()
            raise
