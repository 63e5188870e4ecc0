"""Tensor parallelism of the static decode path, Megatron-style (issue 21, first step).

A replica of ``world`` ranks runs one process per device under ``torch.distributed`` (NCCL on
CUDA, gloo on CPU). Each rank keeps its share of every decoder layer:

- attention: its ``heads / world`` query heads and ``kv_heads / world`` key/value heads (rows of
  the fused q/k/v projection, the matching columns of o_proj), and their part of the KV cache;
- MLP: its ``intermediate / world`` rows of gate and of up, the matching columns of down.

o_proj's and down's outputs are then partial sums, added up across the ranks (one all-reduce
each per layer); their biases are added on rank 0 only. Norms, the embedding and the LM head are
whole on every rank, so every rank computes the same logits and samples the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from metalserve.staticdecode import LayerShape, LayerWeights


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

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's ``partial`` (in place)."""
        if self.world > 1:
            torch.distributed.all_reduce(partial, group=self.group)
        return partial

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


def _rows(weight: torch.Tensor, parts: list[slice]) -> torch.Tensor:
    """Rows ``parts`` of ``weight``, in one new contiguous tensor."""
    return torch.cat([weight[p] for p in parts]).contiguous()


def _bias_rows(bias: torch.Tensor | None, parts: list[slice]) -> torch.Tensor | None:
    return None if bias is None else _rows(bias, parts)


def shard_layer(w: LayerWeights, shape: LayerShape, tp: TensorParallel) -> LayerWeights:
    """This rank's part of one layer's weights (``shape`` is the whole layer's)."""
    qkv, o_proj, gate_up, down = w.qkv, w.o_proj, w.gate_up, w.down
    if not (
        isinstance(qkv, torch.Tensor)
        and isinstance(o_proj, torch.Tensor)
        and isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
    ):
        raise ValueError("FP8 projections are quantized after the split, not before")
    hd = shape.head_dim
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
    first = tp.rank == 0
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
