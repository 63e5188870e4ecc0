"""``metalserve.graph_capture`` on a CUDA device: a failed capture leaves torch able to capture
again and to draw random numbers on the device (after a failure inside torch's own
``torch.cuda.graph`` it can do neither)."""

from __future__ import annotations

import pytest
import torch

from metalserve import graph_capture

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (real CUDA graphs)"
)


def _invalidated(pool: graph_capture.GraphPool) -> None:
    """A capture that a host sync invalidates: torch raises at its end."""
    x = torch.ones(4, device="cuda")
    with pytest.raises(RuntimeError), pool.capture(torch.cuda.CUDAGraph()):
        (x * 2).sum().item()


@pytest.mark.parametrize("first", [True, False], ids=["first-in-its-pool", "after-another"])
def test_a_failed_capture_leaves_torch_as_it_was(first: bool) -> None:
    """After the failure: the thread's own stream, no capture under way, ``empty_cache``,
    random numbers on the device (sampling's) and a capture through the same ``GraphPool``
    that replays what it captured. Torch's own context fails the last three (step 32)."""
    pool = graph_capture.GraphPool()
    x = torch.ones(4, device="cuda")
    out = torch.empty(4, device="cuda")
    if not first:
        with pool.capture(torch.cuda.CUDAGraph()):
            out.copy_(x + 1)
    stream = torch.cuda.current_stream()
    _invalidated(pool)
    assert torch.cuda.current_stream() == stream
    assert not torch.cuda.is_current_stream_capturing()
    torch.cuda.empty_cache()
    torch.rand(8, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pool.capture(graph):
        out.copy_(x * 3)
    out.zero_()
    graph.replay()
    torch.testing.assert_close(out, torch.full((4,), 3.0, device="cuda"))
