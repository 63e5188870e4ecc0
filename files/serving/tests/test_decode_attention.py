"""Decode attention over each row's own length (``metalserve.decode_attention``) on the CPU: the
operator (torch's attention with a mask here; the Triton kernel on CUDA is checked against the
same reference by ``bench/decode_attention_probe.py``) against attention written out per row."""

from __future__ import annotations

import torch

from metalserve import decode_attention


def _per_row(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: list[int], scale: float
) -> torch.Tensor:
    """Softmax(q k^T) v of each row over its own first ``lengths[b]`` positions, each query
    head reading its key/value head (grouped-query)."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    for row, length in enumerate(lengths):
        for head in range(heads):
            k = keys[row, head // group, :length]
            v = values[row, head // group, :length]
            weights = torch.softmax(k @ q[row, head] * scale, dim=0)
            out[row, head] = weights @ v
    return out


def test_each_row_attends_to_its_own_length_only() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 16, generator=gen)
    keys = torch.randn(5, 2, 40, 16, generator=gen)
    values = torch.randn(5, 2, 40, 16, generator=gen)
    lengths = [1, 17, 40]
    got = decode_attention.attend(q, keys, values, torch.tensor(lengths), 0.25)
    torch.testing.assert_close(got, _per_row(q, keys, values, lengths, 0.25))
    # What lies past a row's length changes nothing.
    keys[0, :, 1:] = 1e4
    values[1, :, 17:] = -1e4
    torch.testing.assert_close(
        decode_attention.attend(q, keys, values, torch.tensor(lengths), 0.25), got
    )


def test_the_operator_compiles_as_one_opaque_step() -> None:
    """The compiled decode layer calls it in a full graph (its fake gives the shape)."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 16, generator=gen)
    keys = torch.randn(3, 2, 24, 16, generator=gen)
    values = torch.randn(3, 2, 24, 16, generator=gen)
    lengths = torch.tensor([5, 24])

    def step(q: torch.Tensor) -> torch.Tensor:
        return decode_attention.attend(q * 2, keys, values, lengths, 0.5) + 1

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(q), step(q))
