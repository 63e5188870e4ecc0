"""CUDA graph captures into a shared memory pool that leave torch usable when one fails.

A step that does what a capture forbids (a host sync, a kernel's first load) invalidates the
capture, and torch's ``capture_end`` then raises at ``cudaStreamEndCapture``, before its own
clean-up. Measured with torch 2.11 on an H100 (BENCHMARKS round 2 step 32): the thread keeps the
capture stream as its current stream, the device's random generator stays in capture mode (every
``torch.rand`` after it raises "Offset increment outside graph capture": sampling), and the pool
stays recorded to, so that every later capture into it fails ("beginAllocateToPool: already
recording"), even after ``endAllocateToPool``. A capture into a fresh pool works.
``GraphPool.capture`` restores the stream, resets the generator's state and renews the pool, so
a failed capture may be retried or given up without costing the process its device.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch


@functools.cache
def _capture_stream(device: int) -> torch.cuda.Stream:
    """A side stream per device for captures (a capture may not run on the default stream)."""
    return torch.cuda.Stream(device)


class GraphPool:
    """The memory pool that the graphs captured through it share (later, smaller captures
    reuse the memory of earlier ones), renewed after a failed capture."""

    def __init__(self) -> None:
        self.handle = torch.cuda.graph_pool_handle()

    @contextlib.contextmanager
    def capture(self, graph: torch.cuda.CUDAGraph) -> Iterator[None]:
        """``torch.cuda.graph(graph)`` into this pool around the body, erroring only on this
        thread's unsafe calls (another thread of a serving process, a metrics scrape say, may
        use the device meanwhile); on a failure, torch restored (see the module) before the
        error is raised."""
        device = torch.cuda.current_device()
        stream = _capture_stream(device)
        # Ours restores the thread's stream where torch's context is left mid-way.
        with torch.cuda.stream(stream):
            try:
                with torch.cuda.graph(
                    graph, pool=self.handle, stream=stream, capture_error_mode="thread_local"
                ):
                    yield
            except BaseException:
                # Raises where no recording is under way: the capture never began.
                with contextlib.suppress(RuntimeError):
                    torch._C._cuda_endAllocateToPool(device, self.handle)
                graph.reset()
                generator = torch.cuda.default_generators[device]
                generator.graphsafe_set_state(generator.clone_state())
                self.handle = torch.cuda.graph_pool_handle()
                raise
