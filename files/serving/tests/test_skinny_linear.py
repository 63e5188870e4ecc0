"""``metalserve.skinny_linear``: the decode step's projections at few rows. The Triton kernel
itself runs on CUDA only (bench/skinny_linear_probe.py checks it against cuBLAS on the device:
its error, and the same bits twice); here, what decides which products it computes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from metalserve import skinny_linear
from metalserve.skinny_linear import Key, Tuning


@pytest.fixture(autouse=True)
def _empty_table() -> Iterator[None]:
    saved = dict(skinny_linear._TUNED)
    skinny_linear._TUNED.clear()
    yield
    skinny_linear._TUNED.clear()
    skinny_linear._TUNED.update(saved)


def test_row_blocks() -> None:
    assert [skinny_linear.block_rows(r) for r in (1, 2, 15, 16, 17, 24, 32, 33, 64)] == [
        16,
        16,
        16,
        16,
        32,
        32,
        32,
        64,
        64,
    ]


def test_untuned_products_are_torch_linear() -> None:
    x, w, residual = torch.randn(8, 32), torch.randn(48, 32), torch.randn(8, 48)
    assert torch.equal(skinny_linear.linear(x, w), torch.nn.functional.linear(x, w))
    added = skinny_linear.linear_add(x, w, residual)
    assert torch.equal(added, residual + torch.nn.functional.linear(x, w))


def test_tune_leaves_the_cpu_to_torch() -> None:
    weights = [[torch.randn(48, 32, dtype=torch.bfloat16) for _ in range(2)]]
    assert skinny_linear.tune(weights, [1, 8, 32]) == []
    assert skinny_linear._TUNED == {}


def test_the_kernel_computes_only_the_products_tuned_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The operator looks its product up by (device, dtype, outputs, inputs, rows): the kernel
    for what ``tune`` found faster, torch's linear for anything else (another shape, another
    row count, more rows than the kernel takes, float32)."""
    calls: list[tuple[tuple[int, ...], Tuning]] = []
    residuals: list[torch.Tensor | None] = []

    def fake_kernel(
        x: torch.Tensor, w: torch.Tensor, t: Tuning, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        calls.append((tuple(w.shape), t))
        residuals.append(residual)
        return torch.nn.functional.linear(x, w)

    monkeypatch.setattr(skinny_linear, "kernel_available", lambda device: True)
    monkeypatch.setattr(skinny_linear, "kernel", fake_kernel)
    tuning = skinny_linear.CANDIDATES[1]
    skinny_linear._TUNED[Key(0, torch.bfloat16, 48, 32, 24)] = tuning
    skinny_linear._TUNED[Key(0, torch.bfloat16, 48, 32, 32)] = tuning
    w = torch.randn(48, 32, dtype=torch.bfloat16)
    for rows in (24, 32):
        skinny_linear.linear(torch.randn(rows, 32, dtype=torch.bfloat16), w)
    assert calls == [((48, 32), tuning), ((48, 32), tuning)]
    skinny_linear.linear(torch.randn(16, 32, dtype=torch.bfloat16), w)  # not tuned for 16
    skinny_linear.linear(torch.randn(65, 32, dtype=torch.bfloat16), w)  # too many rows
    skinny_linear.linear(torch.randn(32, 32, dtype=torch.bfloat16), w[:40])  # another shape
    skinny_linear.linear(torch.randn(32, 32), w.float())  # float32
    assert len(calls) == 2
    # With a residual: the same table, the residual handed to the kernel.
    residual = torch.randn(32, 48, dtype=torch.bfloat16)
    skinny_linear.linear_add(torch.randn(32, 32, dtype=torch.bfloat16), w, residual)
    assert len(calls) == 3
    assert residuals[-1] is not None
    assert torch.equal(residuals[-1], residual)
