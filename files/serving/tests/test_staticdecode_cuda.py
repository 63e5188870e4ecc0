"""The static path's real CUDA graphs (on a CUDA device): the prefill and decode graphs
captured in idle moments, and a capture that fails without its warm-up. The CPU tests
(test_staticdecode.py) stand in for the graphs; these check what the stand-ins cannot:
torch's capture and its allocator after a failed one."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import MODEL, Store
from engine_helpers import padded_prompts
from metalserve import staticdecode, triton_warmup
from metalserve.loader import LoadedModel, load_version

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (real CUDA graphs)"
)


@pytest.fixture(scope="module")
def on_cuda(model_store: Store) -> LoadedModel:
    return load_version(model_store.root, MODEL, model_store.v1, device="cuda")


@pytest.fixture(autouse=True)
def warm_kernel_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's cache as on a restart: nothing compiles, so ``capture_all(defer=True)``
    defers (on a first start, whether it compiles depends on the tests run before)."""
    monkeypatch.setattr(triton_warmup, "cache_entries", lambda: 1)


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
    decoder.capture_all(defer=True)
    # The deferred decode graphs come first: their warm-up steps write the rows' keys at
    # their positions (the engine captures only while no row is live).
    while decoder._deferred_decode:
        decoder.capture_deferred()
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
def test_a_deferred_decode_bucket_replays_the_larger_graph_then_its_own(
    on_cuda: LoadedModel,
) -> None:
    """Until its own is captured, a batch of one replays the largest batch's decode graph
    (its other rows on free slots); both give the eager step's logits."""
    plain = _decoder(on_cuda, cuda_graphs=False)
    decoder = _decoder(on_cuda, cuda_graphs=True)
    decoder.capture_all(defer=True)
    largest = decoder.batch_sizes[-1]
    assert set(decoder._graphs) == {(largest, length) for length in decoder.lengths}
    ids, lengths = padded_prompts(on_cuda, 1)

    def first_step(d: staticdecode.StaticDecoder) -> torch.Tensor:
        logits = d.prefill(ids, lengths, 0)
        d.admit(0, logits.argmax(-1), lengths)
        return d.decode(1, int(lengths[0]))

    reference = first_step(plain)
    torch.testing.assert_close(first_step(decoder), reference)
    assert len(decoder._graphs) == len(decoder.lengths)  # no capture on the way
    while decoder._deferred_decode:  # the engine's idle moments
        decoder.capture_deferred()
    assert not decoder._failed_decode
    assert len(decoder._graphs) == len(decoder.batch_sizes) * len(decoder.lengths)
    torch.testing.assert_close(first_step(decoder), reference)


@torch.inference_mode()
def test_a_cold_kernel_cache_captures_every_decode_graph_at_once(
    on_cuda: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the first captures compiled kernels (Triton's cache grew), the other decode graphs
    are captured now, not in idle moments among the first requests; prefill graphs are
    deferred as ever."""
    counts = iter(range(100))
    monkeypatch.setattr(triton_warmup, "cache_entries", lambda: next(counts))
    decoder = _decoder(on_cuda, cuda_graphs=True)
    decoder.capture_all(defer=True)
    assert len(decoder._graphs) == len(decoder.batch_sizes) * len(decoder.lengths)
    assert not decoder._deferred_decode
    assert decoder._deferred
    assert decoder.deferred_count() == len(decoder._deferred)


def test_the_kernel_cache_count_grows_when_a_kernel_compiles(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the guard above reads: a kernel new to an empty cache directory adds an entry;
    its second launch (read from the process's own cache) adds none."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    monkeypatch.undo()  # the module's warm stand-in
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr) -> None:  # type: ignore[no-untyped-def]
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1, mask=mask)

    before = triton_warmup.cache_entries()
    x = torch.zeros(100, device="cuda")
    add_one[(1,)](x, 100, BLOCK=128)
    after = triton_warmup.cache_entries()
    add_one[(1,)](x, 100, BLOCK=128)
    assert (before or 0) < (after or 0) == triton_warmup.cache_entries()
    assert x[0].item() == 2


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
    decoder.capture_all(defer=True)
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
