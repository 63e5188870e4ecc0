"""Timing a short run of CUDA kernels as a decode step runs them: captured in a CUDA graph and
replayed, so that the kernels run back to back on the device (timed eagerly, a run of short
kernels measures the host's launches instead)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from metalserve import graph_capture


def graph_micros(run: Callable[[], object], replays: int) -> float:
    """Microseconds of one ``run`` on the current CUDA device: run once outside any capture
    (compiling its kernels, allocating workspaces; an error, e.g. a kernel that does not fit
    the device, is raised here), captured, then replayed ``replays`` times between two
    events."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with graph_capture.GraphPool().capture(graph):
        run()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    micros: float = start.elapsed_time(end) * 1000 / replays
    return micros
