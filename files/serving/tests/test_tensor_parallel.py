"""Tensor parallelism of the static decode path on the CPU: two gloo ranks in two processes."""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing

from conftest import MODEL, Store
from engine_helpers import (
    PROMPTS,
    SMALL_BLOCKS,
    Collector,
    alone,
    corrupt_rank_1_only_block,
    free_bytes_for,
    llama_relative,
    split_greedy,
)
from metalserve import staticdecode, tensor_parallel
from metalserve.engine import Sequence, StaticBatch
from metalserve.loader import LoadedModel, load_version
from metalserve.sampling import SamplingParams
from metalserve.tensor_parallel import TensorParallel

# A rank whose peer died stops waiting for it (and the test fails) after this long.
PEER_TIMEOUT = datetime.timedelta(seconds=60)
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _join(rank: int, world: int, port: int) -> None:
    """This process as ``rank`` of a gloo group of ``world`` on loopback."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=PEER_TIMEOUT,
    )


def _greedy(model_type: str, tp: TensorParallel | None) -> dict[str, Any] | None:
    """``model_type``'s greedy run; ``llama-compiled``: Llama with the compiled layer (the ranks'
    all-reduce traced into the compiled graph)."""
    kind, _, compiled = model_type.partition("-")
    return split_greedy(
        kind, tp, torch.device("cpu"), torch.float32, STEPS, compile_layers=bool(compiled)
    )


MODEL_TYPES = ["llama", "qwen2", "qwen3", "llama-compiled"]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank's process (torch.multiprocessing.spawn): rank 0's tokens for each model type
    to ``out``."""
    _join(rank, world, port)
    try:
        tokens = {kind: _greedy(kind, TensorParallel(rank, world)) for kind in MODEL_TYPES}
    finally:
        torch.distributed.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(tokens))


def test_two_ranks_decode_as_one(tmp_path: Path) -> None:
    """Llama, Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Llama with the compiled layer split
    over two gloo ranks, rank 1 repeating rank 0's steps: the logits stay within 1e-5
    (relative) of the whole model's transformers forward at each step, and the greedy tokens
    equal one process's (tp=1)."""
    out = tmp_path / "tokens.json"
    torch.multiprocessing.spawn(_rank, args=(2, _free_port(), str(out)), nprocs=2)
    split = json.loads(out.read_text())
    for kind in MODEL_TYPES:
        alone = _greedy(kind, None)
        assert alone is not None
        assert split[kind]["worst_rel_err"] < 1e-5, (kind, split[kind])
        assert split[kind]["tokens"] == alone["tokens"], kind


def _steps_rank(rank: int, world: int, port: int, out: str) -> None:
    """Rank 0 fails to send a step (a tensor with no data to copy), then sends one; the other
    rank writes what it received to ``out``."""
    _join(rank, world, port)
    tp, device = TensorParallel(rank, world), torch.device("cpu")
    try:
        if rank == 0:
            with pytest.raises(NotImplementedError, match="meta tensor"):
                tp.send_step(
                    tensor_parallel.PREFILL, [0], [torch.empty(2, 3, device="meta")], device
                )
            tp.send_step(tensor_parallel.ADVANCE, [3], [torch.tensor([7, 8, 9])], device)
        else:
            op, numbers, tensors = tp.receive_step(device)
            Path(out).write_text(json.dumps([op, numbers, [t.tolist() for t in tensors]]))
    finally:
        torch.distributed.destroy_process_group()


def test_a_step_that_fails_to_send_sends_nothing(tmp_path: Path) -> None:
    """The other ranks receive the next step whole, as if the failed one never was."""
    out = tmp_path / "received.json"
    torch.multiprocessing.spawn(_steps_rank, args=(2, _free_port(), str(out)), nprocs=2)
    assert json.loads(out.read_text()) == [tensor_parallel.ADVANCE, [3], [[7, 8, 9]]]


def test_a_shape_that_does_not_split_is_named() -> None:
    assert tensor_parallel.unsupported_reason(4, 2, 128, 2) is None
    assert (
        tensor_parallel.unsupported_reason(4, 2, 128, 4)
        == "2 key/value heads do not split over 4 ranks"
    )


@pytest.mark.parametrize(
    ("world", "flags", "refusal"),
    [
        (4, {}, "do not split over 4 ranks"),
        (2, {"cuda_graphs": True}, "CUDA graphs over tensor-parallel ranks need NCCL, not gloo"),
    ],
    ids=["4-ranks-of-2-kv-heads", "cuda-graphs-over-gloo"],
)
def test_the_decoder_refuses_what_it_cannot_split(
    world: int, flags: dict[str, bool], refusal: str
) -> None:
    settings: dict[str, bool] = {"cuda_graphs": False, **flags}
    # A group of this process alone: its backend is what the decoder asks.
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
    )
    try:
        with pytest.raises(staticdecode.StaticDecodeUnavailable, match=refusal):
            staticdecode.StaticDecoder(
                llama_relative("llama"),
                slots=1,
                max_length=64,
                device=torch.device("cpu"),
                dtype=torch.float32,
                tp=TensorParallel(0, world),
                **settings,
            )
    finally:
        torch.distributed.destroy_process_group()


def _fit_rank(rank: int, world: int, port: int, out: str) -> None:
    """Rank 0's free memory holds 8 slots of 64 positions and a 64-token prefix pool (its
    share of them), rank 1's the pool and 1.5 slots: each writes what its decoder holds."""
    _join(rank, world, port)
    try:
        model = llama_relative("llama")
        fits = {0: (9.5, 64), 1: (1.5, 64)}[rank]
        free = free_bytes_for(model.config, torch.float32, 64, *fits) // world
        staticdecode.free_device_bytes = lambda device: free  # this process's own module
        decoder = staticdecode.StaticDecoder(
            model,
            slots=8,
            max_length=64,
            device=torch.device("cpu"),
            dtype=torch.float32,
            cuda_graphs=False,
            prefix_cache_tokens=64,
            tp=TensorParallel(rank, world),
        )
        held = [decoder.slots, decoder.prefix is not None, decoder.keys[0].shape[0]]
        Path(out, f"rank{rank}.json").write_text(json.dumps(held))
    finally:
        torch.distributed.destroy_process_group()
    os._exit(0)


def test_every_rank_holds_what_the_fullest_rank_can(tmp_path: Path) -> None:
    """Rank 1 holds no pool beside one slot, so no rank keeps a pool (rank 0's copies of blocks
    are every rank's), and without it rank 1 holds one slot: so do both (rank 0 alone: 8)."""
    torch.multiprocessing.spawn(_fit_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    held = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert held == [[1, False, 2], [1, False, 2]]


# Different lengths: sequences finish at different steps, and the last ones move into the slots
# the finished ones leave (a MOVE step every rank must repeat).
LENGTHS = [5, 17, 9, 12]


# Before each prompt in the prefix-cache variant: more than two 16-token blocks.
SYSTEM = "You are a helpful assistant on metal servers. Answer briefly and kindly, please."


def _prompts(start: str) -> list[str]:
    return [f"{start} {p}" if start else p for p in PROMPTS[: len(LENGTHS)]]


def _batch_rank(
    rank: int, world: int, port: int, root: str, version: str, out: str, start: str
) -> None:
    """Rank 0 serves ``_prompts(start)`` through a StaticBatch on its decoder (a prefix cache
    on every rank); the other ranks follow."""
    _join(rank, world, port)
    try:
        bundle = load_version(Path(root), MODEL, version)
        decoder = staticdecode.StaticDecoder(
            bundle.model,
            slots=4,
            max_length=bundle.max_context,
            device=bundle.device,
            dtype=bundle.dtype,
            cuda_graphs=False,
            prefix_cache_tokens=256,
            tp=TensorParallel(rank, world),
        )
        if rank != 0:
            decoder.follow()
        else:
            texts, reused = _serve(bundle, decoder, _prompts(start))
            decoder.stop_followers()
            Path(out).write_text(json.dumps({"texts": texts, "reused": reused}))
        # No rank tears its group down while another still reads the last step.
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
    # Past its work, a rank leaves at once: the interpreter's teardown of gloo's threads
    # aborted rank 1 now and then ("terminate called without an active exception", SIGABRT).
    os._exit(0)


def _serve(
    bundle: LoadedModel, decoder: staticdecode.StaticDecoder, prompts: list[str]
) -> tuple[list[str], float]:
    """The texts, one prompt admitted after the other, and the prompt tokens reused."""
    from metalserve.metrics import Metrics

    metrics = Metrics()
    batch = StaticBatch(bundle, decoder, metrics)
    sinks = []
    for prompt, length in zip(prompts, LENGTHS, strict=True):
        sink = Collector()
        params = SamplingParams(max_tokens=length, temperature=0.0, ignore_eos=True)
        prompt_ids = bundle.encode(prompt, add_special_tokens=True)
        batch.add([Sequence(bundle=bundle, prompt_ids=prompt_ids, params=params, sink=sink)])
        sinks.append(sink)
    for _ in range(max(LENGTHS)):
        batch.step()
    assert len(batch) == 0
    reused = metrics.registry.get_sample_value("metalserve_prefix_cache_hits_total")
    return [sink.text for sink in sinks], reused or 0.0


@pytest.mark.parametrize("start", ["", SYSTEM], ids=["own-prompts", "shared-system-prompt"])
def test_rank_0_serves_a_batch_the_other_rank_follows(
    model_store: Store, tmp_path: Path, start: str
) -> None:
    """The engine's StaticBatch on rank 0 of two gloo ranks (prefills, decode steps, sequences
    ending at different steps and moving slots; the other rank repeats each step): each text
    equals the whole model's own greedy generation. With a shared system prompt the later
    prompts start from the prefix cache's blocks, copied and prefilled after on every rank."""
    out = tmp_path / "texts.json"
    args = (2, _free_port(), str(model_store.root), model_store.v1, str(out), start)
    torch.multiprocessing.spawn(_batch_rank, args=args, nprocs=2)
    bundle = load_version(model_store.root, MODEL, model_store.v1)
    expected = [
        alone(bundle, prompt, SamplingParams(max_tokens=length, temperature=0.0, ignore_eos=True))
        for prompt, length in zip(_prompts(start), LENGTHS, strict=True)
    ]
    served = json.loads(out.read_text())
    assert served["texts"] == expected
    # Three prompts after the first reuse its two whole blocks of the system prompt.
    assert served["reused"] == (3 * 32 if start else 0)


def test_each_rank_reads_and_verifies_only_its_part(
    model_dirs: dict[int, Path], tmp_path: Path
) -> None:
    """``load_version(tensor_parallel=...)``: every projection holds the rank's rows or columns
    of the whole model's tensor (the rest whole); a block that only rank 1's rows lie in is
    never read by rank 0 (corrupted, rank 0 still loads) and fails rank 1's verification."""
    from metalserve import store

    root = tmp_path / "store"
    version = store.publish(model_dirs[1], root, MODEL, block_size=SMALL_BLOCKS)
    whole = dict(load_version(root, MODEL, version).model.named_parameters())
    shard = store.version_dir(root, MODEL, version) / "model.safetensors"
    block = corrupt_rank_1_only_block(shard)

    part = load_version(root, MODEL, version, tensor_parallel=TensorParallel(0, 2))
    assert part.part_of == (0, 2)
    params = dict(part.model.named_parameters())
    assert params.keys() == whole.keys()
    split = 0
    for name, tensor in params.items():
        expected = whole[name]
        if tensor.shape != expected.shape:
            split += 1
            pairs = enumerate(zip(tensor.shape, expected.shape, strict=True))
            dim = next(d for d, (a, b) in pairs if a != b)
            expected = expected.narrow(dim, 0, tensor.shape[dim])
        assert torch.equal(tensor, expected), name
    # q, k, v, o, gate, up and down of each of the 2 layers
    assert split == 7 * 2

    with pytest.raises(store.VerificationError, match=f"in block {block} "):
        load_version(root, MODEL, version, tensor_parallel=TensorParallel(1, 2))


def test_a_model_that_does_not_split_is_refused_before_loading(model_store: Store) -> None:
    from metalserve.loader import LoadError

    with pytest.raises(LoadError, match="4 attention heads do not split over 3 ranks"):
        load_version(model_store.root, MODEL, model_store.v1, tensor_parallel=TensorParallel(0, 3))
