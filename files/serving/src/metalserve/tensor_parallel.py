"""Tensor parallelism of the static decode path, Megatron-style (issue 21, first step).

A replica of ``world`` ranks runs one process per device under ``torch.distributed`` (NCCL on
CUDA, gloo on CPU). Each rank keeps its share of every decoder layer:

- attention: its ``heads / world`` query heads and ``kv_heads / world`` key/value heads (rows of
  the fused q/k/v projection, the matching columns of o_proj), and their part of the KV cache;
- MLP: its ``intermediate / world`` rows of gate and of up, the matching columns of down.

o_proj's and down's outputs are then partial sums, added up across the ranks (one all-reduce
each per layer); their biases are added on rank 0 only. Norms, the embedding and the LM head are
whole on every rank, so every rank computes the logits (equal up to rounding: each rank times
its own kernels for its shares, ``skinny_linear``); rank 0's tokens are the ones used.

Rank 0 runs the engine; the others repeat its decoder's steps (``StaticDecoder.follow``): before
each step rank 0 broadcasts what it is (``send_step``: an operation, its numbers and its integer
tensors, such as the prompts or the tokens it chose), so every rank's cache holds the same
sequences and every collective is entered by all ranks in the same order. The prefix cache's
index of blocks lives on rank 0 alone; its copies from the pool into the slots are steps too,
and the pool blocks a prefill writes travel with the prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from metalserve import devices

if TYPE_CHECKING:
    from metalserve.staticdecode import LayerShape, LayerWeights


# A step's header: its operation, numbers and tensor shapes (int64s, broadcast first).
HEADER_LENGTH = 16
# The steps rank 0 announces (StaticDecoder's methods of the same names; PREFIX_COPY and
# PREFILL_AFTER: the prefix cache's copies into slots and a prefill after cached prefixes), the
# end, and the end of a version's steps before the next (a hot reload).
STOP, PREFILL, ADMIT, DECODE, ADVANCE, MOVE, RELOAD, PREFIX_COPY, PREFILL_AFTER = range(9)


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel replica: ``rank`` of ``world``, reducing over
    ``group`` (None: torch.distributed's default group)."""

    rank: int
    world: int
    group: Any = None

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} of {self.world}: need 0 <= rank < world")

    def all_agree(self, yes: bool, device: torch.device) -> bool:
        """Whether every rank says ``yes`` (a collective: every rank asks, in the same order)."""
        return bool(self.least(int(yes), device))

    def least(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's ``value`` (a collective, as ``all_agree``)."""
        if self.world == 1:
            return value
        least = torch.tensor([value], device=device)
        torch.distributed.all_reduce(least, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return int(least.item())

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's ``partial`` (in place)."""
        if self.world > 1:
            torch.distributed.all_reduce(partial, group=self.group)
        return partial

    def send_step(
        self, op: int, numbers: Sequence[int], tensors: Sequence[torch.Tensor], device: torch.device
    ) -> None:
        """Rank 0: tell the other ranks the next step (``receive_step`` reads it). A step is
        sent whole or not at all: whatever can fail here (a header too long, a tensor that
        cannot be copied) fails before the first broadcast. A header sent without its tensors
        would have the other ranks read the next step's header as this step's tensor."""
        header = [op, len(numbers), *numbers, len(tensors)]
        for tensor in tensors:
            header += [tensor.dim(), *tensor.shape]
        if len(header) > HEADER_LENGTH:
            raise ValueError(f"a step header of {len(header)} numbers: {HEADER_LENGTH} at most")
        header += [0] * (HEADER_LENGTH - len(header))
        # Queued, not waited for: rank 0 would otherwise wait for each step's forward.
        wires = [
            devices.upload(t.to(dtype=torch.long).contiguous(), device)
            for t in (torch.tensor(header), *tensors)
        ]
        for wire in wires:
            torch.distributed.broadcast(wire, src=0, group=self.group)

    def receive_step(self, device: torch.device) -> tuple[int, list[int], list[torch.Tensor]]:
        """The other ranks: the step rank 0 sent (``send_step``)."""
        wire = torch.empty(HEADER_LENGTH, dtype=torch.long, device=device)
        torch.distributed.broadcast(wire, src=0, group=self.group)
        header = wire.tolist()
        op, count = header[0], header[1]
        numbers, at = header[2 : 2 + count], 2 + count
        tensors = []
        for _ in range(header[at]):
            ndim = header[at + 1]
            shape = header[at + 2 : at + 2 + ndim]
            at += 1 + ndim
            tensor = torch.empty(shape, dtype=torch.long, device=device)
            torch.distributed.broadcast(tensor, src=0, group=self.group)
            tensors.append(tensor)
        return op, numbers, tensors

    def part(self, count: int) -> slice:
        """This rank's share of ``count`` equal units (heads, MLP rows)."""
        size = count // self.world
        return slice(self.rank * size, (self.rank + 1) * size)


def unsupported_reason(heads: int, kv_heads: int, intermediate: int, world: int) -> str | None:
    """Why a model's layers cannot be split over ``world`` ranks, or None."""
    for name, count in (
        ("attention heads", heads),
        ("key/value heads", kv_heads),
        ("MLP rows", intermediate),
    ):
        if count % world:
            return f"{count} {name} do not split over {world} ranks"
    return None


# A checkpoint's projections by the suffix of their names: split on rows (the output features:
# q/k/v heads, gate/up rows) or on columns (o_proj's and down's inputs), and by which unit.
_PROJECTIONS = {
    "self_attn.q_proj": (0, "heads"),
    "self_attn.k_proj": (0, "kv_heads"),
    "self_attn.v_proj": (0, "kv_heads"),
    "self_attn.o_proj": (1, "heads"),
    "mlp.gate_proj": (0, "intermediate"),
    "mlp.up_proj": (0, "intermediate"),
    "mlp.down_proj": (1, "intermediate"),
}


def checkpoint_part(
    name: str, ndim: int, units: dict[str, int], per_unit: dict[str, int], tp: TensorParallel
) -> tuple[int, int, int] | None:
    """This rank's part ``(dim, start, stop)`` of the checkpoint tensor ``name`` (a layer's
    projection weight, or a bias split with its rows), or None when every rank keeps it whole
    (norms, embeddings, the LM head, o_proj's and down's biases, added on rank 0 only).
    ``units`` counts heads, key/value heads and MLP rows; ``per_unit`` the features of each."""
    module, _, kind = name.rpartition(".")
    for suffix, (dim, unit) in _PROJECTIONS.items():
        if module.endswith("." + suffix) and kind in ("weight", "bias"):
            if dim >= ndim:  # a bias of a column split: whole
                return None
            share = tp.part(units[unit])
            size = per_unit[unit]
            return dim, share.start * size, share.stop * size
    return None


def _rows(weight: torch.Tensor, parts: list[slice]) -> torch.Tensor:
    """Rows ``parts`` of ``weight``, in one new contiguous tensor."""
    return torch.cat([weight[p] for p in parts]).contiguous()


def _bias_rows(bias: torch.Tensor | None, parts: list[slice]) -> torch.Tensor | None:
    return None if bias is None else _rows(bias, parts)


def shard_layer(w: LayerWeights, shape: LayerShape, tp: TensorParallel) -> LayerWeights:
    """This rank's part of one layer's weights (``shape`` is the whole layer's). Weights loaded
    as the rank's part already (``load_version(tensor_parallel=...)``) keep their projections;
    o_proj's and down's biases stay on rank 0 only."""
    qkv, o_proj, gate_up, down = w.qkv, w.o_proj, w.gate_up, w.down
    if not (
        isinstance(qkv, torch.Tensor)
        and isinstance(o_proj, torch.Tensor)
        and isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
    ):
        raise ValueError("FP8 projections are quantized after the split, not before")
    hd = shape.head_dim
    first = tp.rank == 0
    if qkv.shape[0] == (shape.heads + 2 * shape.kv_heads) // tp.world * hd:
        return w._replace(
            o_bias=w.o_bias if first else None, down_bias=w.down_bias if first else None
        )
    q_heads, kv = tp.part(shape.heads), tp.part(shape.kv_heads)
    # Fused q/k/v rows: every query head, then every key head, then every value head.
    keys_at, values_at = shape.heads * hd, (shape.heads + shape.kv_heads) * hd
    qkv_parts = [
        slice(q_heads.start * hd, q_heads.stop * hd),
        slice(keys_at + kv.start * hd, keys_at + kv.stop * hd),
        slice(values_at + kv.start * hd, values_at + kv.stop * hd),
    ]
    # Fused gate/up rows: every gate row, then every up row.
    intermediate = gate_up.shape[0] // 2
    mlp = tp.part(intermediate)
    gate_up_parts = [mlp, slice(intermediate + mlp.start, intermediate + mlp.stop)]
    head_columns = slice(q_heads.start * hd, q_heads.stop * hd)
    return w._replace(
        qkv=_rows(qkv, qkv_parts),
        qkv_bias=_bias_rows(w.qkv_bias, qkv_parts),
        o_proj=o_proj[:, head_columns].contiguous(),
        o_bias=w.o_bias if first else None,
        gate_up=_rows(gate_up, gate_up_parts),
        gate_up_bias=_bias_rows(w.gate_up_bias, gate_up_parts),
        down=down[:, mlp].contiguous(),
        down_bias=w.down_bias if first else None,
    )


def shard_shape(shape: LayerShape, tp: TensorParallel) -> LayerShape:
    """The heads one rank computes."""
    return shape._replace(heads=shape.heads // tp.world, kv_heads=shape.kv_heads // tp.world)
