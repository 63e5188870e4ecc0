"""``metalserve.graph_capture`` on a CUDA device: a failed capture leaves torch able to capture,
free its cache and draw random numbers (torch's own ``torch.cuda.graph`` leaves none of them so)."""

from __future__ import annotations

import pytest
import torch

from metalserve import graph_capture

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (real CUDA graphs)"
)


def _invalidated(pool: object) -> None:
    """A capture that a host sync invalidates: torch raises at its end."""
    x = torch.ones(4, device="cuda")
    with pytest.raises(RuntimeError), graph_capture.capture(torch.cuda.CUDAGraph(), pool):
        (x * 2).sum().item()


@pytest.mark.parametrize("first", [True, False], ids=["first-in-its-pool", "after-another"])
def test_a_failed_capture_leaves_torch_as_it_was(first: bool) -> None:
    pool = graph_capture.pool_handle()
    x = torch.ones(4, device="cuda")
    out = torch.empty(4, device="cuda")
    if not first:
        with graph_capture.capture(torch.cuda.CUDAGraph(), pool):
            out.copy_(x + 1)
    stream = torch.cuda.current_stream()
    _invalidated(pool)
    assert torch.cuda.current_stream() == stream
    assert not torch.cuda.is_current_stream_capturing()
    torch.cuda.empty_cache()
    torch.rand(8, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with graph_capture.capture(graph, pool):
        out.copy_(x * 3)
    out.zero_()
    graph.replay()
    torch.testing.assert_close(out, torch.full((4,), 3.0, device="cuda"))
