"""Tensor parallelism of the static decode path on the CPU: two gloo ranks in two processes."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing

from engine_helpers import llama_relative
from metalserve import staticdecode, tensor_parallel
from metalserve.tensor_parallel import TensorParallel

PROMPTS = [[5, 9, 17, 33, 2, 8, 41], [7, 3, 99]]
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@torch.inference_mode()
def _greedy(model_type: str, tp: TensorParallel | None) -> list[list[int]]:
    """Prefill then greedy decode steps of PROMPTS on the static path (split over ``tp``),
    each step's logits checked against a whole model's own transformers forward."""
    reference = llama_relative(model_type)
    decoder = staticdecode.StaticDecoder(
        llama_relative(model_type),  # the same seed: the same weights
        slots=2,
        max_length=256,
        device=torch.device("cpu"),
        dtype=torch.float32,
        cuda_graphs=False,
        tp=tp,
    )
    sequences = [list(p) for p in PROMPTS]
    ids = torch.zeros((2, max(len(p) for p in PROMPTS)), dtype=torch.long)
    for row, prompt in enumerate(PROMPTS):
        ids[row, : len(prompt)] = torch.tensor(prompt)
    lengths = torch.tensor([len(p) for p in PROMPTS])
    logits = decoder.prefill(ids, lengths, 0)
    for step in range(STEPS):
        for row, seq in enumerate(sequences):
            expected = reference(input_ids=torch.tensor([seq])).logits[0, -1]
            torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4)
        chosen = logits.argmax(-1)
        if step == 0:
            decoder.admit(0, chosen, lengths)
        else:
            decoder.advance(2, chosen)
        for seq, token in zip(sequences, chosen.tolist(), strict=True):
            seq.append(token)
        logits = decoder.decode(2, max(len(s) for s in sequences) - 1)
    return [seq[len(prompt) :] for seq, prompt in zip(sequences, PROMPTS, strict=True)]


MODEL_TYPES = ["llama", "qwen2", "qwen3"]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank's process (torch.multiprocessing.spawn): its tokens for each model type to
    ``out``.<rank>."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        tokens = {kind: _greedy(kind, TensorParallel(rank, world)) for kind in MODEL_TYPES}
    finally:
        torch.distributed.destroy_process_group()
    Path(f"{out}.{rank}").write_text(json.dumps(tokens))


def test_two_ranks_decode_as_one(tmp_path: Path) -> None:
    """Llama, Qwen2 (q/k/v biases) and Qwen3 (q/k norms) split over two gloo ranks: every
    rank's logits match the whole model's transformers forward at each step, and both ranks'
    greedy tokens equal one process's (tp=1)."""
    out = str(tmp_path / "tokens")
    torch.multiprocessing.spawn(_rank, args=(2, _free_port(), out), nprocs=2)
    alone = {kind: _greedy(kind, None) for kind in MODEL_TYPES}
    for rank in range(2):
        assert json.loads(Path(f"{out}.{rank}").read_text()) == alone


def test_a_shape_that_does_not_split_is_named() -> None:
    assert tensor_parallel.unsupported_reason(4, 2, 128, 2) is None
    assert (
        tensor_parallel.unsupported_reason(4, 2, 128, 4)
        == "2 key/value heads do not split over 4 ranks"
    )
    with pytest.raises(staticdecode.StaticDecodeUnavailable, match="do not split over 4 ranks"):
        staticdecode.StaticDecoder(
            llama_relative("llama"),
            slots=1,
            max_length=64,
            device=torch.device("cpu"),
            dtype=torch.float32,
            cuda_graphs=False,
            tp=TensorParallel(0, 4),
        )


def test_graphs_and_the_compiled_layer_are_refused_for_now() -> None:
    with pytest.raises(staticdecode.StaticDecodeUnavailable, match="eagerly for now"):
        staticdecode.StaticDecoder(
            llama_relative("llama"),
            slots=1,
            max_length=64,
            device=torch.device("cpu"),
            dtype=torch.float32,
            cuda_graphs=False,
            compile_layers=True,
            tp=TensorParallel(0, 2),
        )
