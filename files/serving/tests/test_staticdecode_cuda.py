"""The static path's real CUDA graphs (on a CUDA device): the prefill graphs captured in idle
moments, and a capture that fails without its warm-up. The CPU tests (test_staticdecode.py)
stand in for the graphs; these check what the stand-ins cannot: torch's capture and its
allocator after a failed one."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import MODEL, Store
from engine_helpers import padded_prompts
from metalserve import staticdecode
from metalserve.loader import LoadedModel, load_version

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (real CUDA graphs)"
)


@pytest.fixture(scope="module")
def on_cuda(model_store: Store) -> LoadedModel:
    return load_version(model_store.root, MODEL, model_store.v1, device="cuda")


def _decoder(bundle: LoadedModel, cuda_graphs: bool) -> staticdecode.StaticDecoder:
    return staticdecode.StaticDecoder(
        bundle.model,
        slots=4,
        max_length=bundle.max_context,
        device=bundle.device,
        dtype=bundle.dtype,
        cuda_graphs=cuda_graphs,
        bucketed_prefill=True,
    )


@torch.inference_mode()
def test_deferred_prefill_graphs_give_the_eager_numbers(on_cuda: LoadedModel) -> None:
    """A bucket whose graph is deferred prefills eagerly; once ``capture_deferred`` captured
    it (without a warm-up), its graph's replay gives the same logits, the live rows of the
    cache untouched by the captures."""
    plain = _decoder(on_cuda, cuda_graphs=False)
    decoder = _decoder(on_cuda, cuda_graphs=True)
    decoder.capture_all(defer_prefill=True)
    ids, lengths = padded_prompts(on_cuda, 2)
    shape = decoder._prefill_bucket(*ids.shape)
    assert shape in decoder._deferred
    reference = plain.prefill(ids, lengths, 0)
    torch.testing.assert_close(decoder.prefill(ids, lengths, 0), reference)
    written = [cache[:2].clone() for cache in (*decoder.keys, *decoder.values)]
    while decoder.capture_deferred():
        pass
    assert shape in decoder._prefill_graphs
    assert not decoder._failed_prefill
    for before, cache in zip(written, (*decoder.keys, *decoder.values), strict=True):
        torch.testing.assert_close(cache[:2], before)
    torch.testing.assert_close(decoder.prefill(ids, lengths, 0), reference)


@torch.inference_mode()
def test_a_capture_that_fails_without_its_warm_up_is_taken_again(
    on_cuda: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deferred capture whose step does what a capture forbids (here a host sync, as a
    kernel's first load may) fails in torch's capture; ``_prefill_graph`` runs the step once
    and captures again, every later capture succeeds, and the graphs give the eager numbers.
    Torch is left as before the failure (``graph_capture``): the thread on its own stream,
    ``empty_cache`` (a hot reload's) and the device's random numbers (sampling's) work."""
    plain = _decoder(on_cuda, cuda_graphs=False)
    decoder = _decoder(on_cuda, cuda_graphs=True)
    decoder.capture_all(defer_prefill=True)
    ids, lengths = padded_prompts(on_cuda, 2)
    shape = decoder._prefill_bucket(*ids.shape)
    prefill = decoder._prefill
    failed: list[tuple[int, int]] = []

    def syncing_once(*args: Any) -> torch.Tensor:
        logits = prefill(*args)
        if torch.cuda.is_current_stream_capturing() and not failed:
            failed.append(tuple(args[0].shape))
            logits.sum().item()  # a host sync: not permitted while the stream captures
        return logits

    monkeypatch.setattr(decoder, "_prefill", syncing_once)
    stream = torch.cuda.current_stream()
    while decoder.capture_deferred():
        pass
    assert failed, "no capture was made to fail"
    assert not decoder._failed_prefill
    assert set(decoder._prefill_graphs) == set(decoder.prefill_shapes)
    assert torch.cuda.current_stream() == stream
    torch.cuda.empty_cache()
    torch.rand(8, device="cuda")
    torch.testing.assert_close(decoder.prefill(ids, lengths, 0), plain.prefill(ids, lengths, 0))
    assert shape in decoder._prefill_graphs
