"""``metalserve.skinny_linear``: the decode step's projections at few rows. The Triton kernel
itself runs on CUDA only (bench/skinny_linear_probe.py checks it against cuBLAS on the device:
its error, and the same bits twice); here, what decides which products it computes."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
import torch

from metalserve import skinny_linear
from metalserve.skinny_linear import Key, Tuning


@pytest.fixture(autouse=True)
def _empty_table() -> Iterator[None]:
    saved, measured = dict(skinny_linear._TUNED), dict(skinny_linear._MEASURED)
    skinny_linear._TUNED.clear()
    skinny_linear._MEASURED.clear()
    yield
    skinny_linear._TUNED.clear()
    skinny_linear._TUNED.update(saved)
    skinny_linear._MEASURED.clear()
    skinny_linear._MEASURED.update(measured)


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


def test_a_second_tuning_of_the_same_shapes_reuses_the_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hot reload of a version of the same shapes: ``tune`` times nothing again, reports what
    it measured the first time and restores its choices. Timings are stubbed (no GPU here): the
    kernel 10 us, cuBLAS 20 us for one product, 10 us (a tie: cuBLAS kept) for the other."""
    timed: list[object] = []

    def micros(run: functools.partial[None]) -> float:
        timed.append(run)
        product, _, cycle = run.args
        if product is torch.nn.functional.linear:
            return 20.0 if cycle[0].shape[0] == 48 else 10.0
        return 10.0

    monkeypatch.setattr(skinny_linear, "kernel_available", lambda device: True)
    monkeypatch.setattr(skinny_linear, "_micros", micros)
    weights = [
        [torch.randn(48, 32, dtype=torch.bfloat16)],
        [torch.randn(64, 32, dtype=torch.bfloat16)],
    ]
    first = skinny_linear.tune(weights, [1, 8, 32])
    assert len(timed) == 2 * (2 * len(skinny_linear.CANDIDATES) + 3)  # 2 row blocks, 3 counts
    assert [(e["out"], e["rows"], e["used"]) for e in first] == [
        (48, 1, True),
        (48, 8, True),
        (48, 32, True),
        (64, 1, False),
        (64, 8, False),
        (64, 32, False),
    ]
    chosen = dict(skinny_linear._TUNED)
    assert len(chosen) == 3
    skinny_linear._TUNED.clear()
    timed.clear()
    assert skinny_linear.tune(weights, [1, 8, 32]) == first
    assert timed == []
    assert chosen == skinny_linear._TUNED
    # Other row counts are other measurements.
    skinny_linear.tune(weights, [1, 8])
    assert timed != []


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
