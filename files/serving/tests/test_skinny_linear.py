"""``metalserve.skinny_linear``: the decode step's projections at few rows. The Triton kernel
itself runs on CUDA only (bench/skinny_linear_probe.py checks it against cuBLAS on the device:
its error, and the same bits twice); here, what decides which products it computes."""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

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
    skinny_linear.remember_in(None)
    skinny_linear._TUNED.clear()
    skinny_linear._TUNED.update(saved)
    skinny_linear._MEASURED.clear()
    skinny_linear._MEASURED.update(measured)


def _stub_timings(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Timings stubbed (no GPU here): the kernel 10 us; cuBLAS 20 us for a product of 48
    outputs, 10 us (a tie: cuBLAS kept) for any other. Returns the list of runs timed."""
    timed: list[object] = []

    def micros(run: functools.partial[None]) -> float:
        timed.append(run)
        product, _, cycle = run.args
        if product is torch.nn.functional.linear:
            return 20.0 if cycle[0].shape[0] == 48 else 10.0
        return 10.0

    monkeypatch.setattr(skinny_linear, "kernel_available", lambda device: True)
    monkeypatch.setattr(skinny_linear, "_micros", micros)
    return timed


WEIGHTS = [
    [torch.randn(48, 32, dtype=torch.bfloat16)],
    [torch.randn(64, 32, dtype=torch.bfloat16)],
]


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
    it measured the first time and restores its choices."""
    timed = _stub_timings(monkeypatch)

    first = skinny_linear.tune(WEIGHTS, [1, 8, 32])
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
    assert skinny_linear.tune(WEIGHTS, [1, 8, 32]) == first
    assert timed == []
    assert chosen == skinny_linear._TUNED
    # Other row counts are other measurements.
    skinny_linear.tune(WEIGHTS, [1, 8])
    assert timed != []


def test_untuned_products_are_torch_linear() -> None:
    x, w, residual = torch.randn(8, 32), torch.randn(48, 32), torch.randn(8, 48)
    assert torch.equal(skinny_linear.linear(x, w), torch.nn.functional.linear(x, w))
    added = skinny_linear.linear_add(x, w, residual)
    assert torch.equal(added, residual + torch.nn.functional.linear(x, w))


def test_the_ops_import_no_compiler_unless_compiled() -> None:
    """Called outside torch.compile, the projections and the decode attention run plainly: as
    custom ops there, torch imported its compiler (dynamo, sympy) at the first call, 1.2 s of
    an 8B start on an H100 (BENCHMARKS round 2 step 30). Under torch.compile they are the ops
    (opaque to it), and the same numbers. A fresh interpreter: this one imported it already."""
    script = """
import sys, torch
from metalserve import decode_attention, skinny_linear
x, w, r = torch.randn(3, 8), torch.randn(5, 8), torch.randn(3, 5)
q, kv = torch.randn(3, 4, 16), torch.randn(3, 2, 6, 16)
lengths = torch.tensor([1, 4, 6])
plain = (skinny_linear.linear(x, w), skinny_linear.linear_add(x, w, r),
         decode_attention.attend(q, kv, kv, lengths, 0.25))
assert "torch._dynamo" not in sys.modules, "the compiler was imported"
compiled = torch.compile(lambda: (skinny_linear.linear(x, w), skinny_linear.linear_add(x, w, r),
                                  decode_attention.attend(q, kv, kv, lengths, 0.25)),
                         fullgraph=True, backend="eager")()
assert all(torch.allclose(a, b) for a, b in zip(plain, compiled, strict=True))
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


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


def test_a_restart_reuses_the_timings_kept_in_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With ``remember_in``, a new process (the table emptied) times nothing that an earlier
    one timed on the same kind of device, and makes the same choices; shapes it never timed are
    timed and added to the file."""
    timed = _stub_timings(monkeypatch)
    path = tmp_path / "tuning" / "decode.json"
    skinny_linear.remember_in(path)
    first = skinny_linear.tune(WEIGHTS, [1, 8, 32])
    assert timed != []
    chosen = dict(skinny_linear._TUNED)
    saved = json.loads(path.read_text())
    assert [(e["out"], e["in"], e["rows"]) for e in saved] == [
        (48, 32, [1, 8, 32]),
        (64, 32, [1, 8, 32]),
    ]

    # The next process.
    skinny_linear._TUNED.clear()
    skinny_linear._MEASURED.clear()
    timed.clear()
    skinny_linear.remember_in(path)
    assert skinny_linear.tune(WEIGHTS, [1, 8, 32]) == first
    assert timed == []
    assert chosen == skinny_linear._TUNED
    # A shape never timed: timed, and kept beside the others.
    skinny_linear.tune([[torch.randn(80, 32, dtype=torch.bfloat16)]], [1, 8, 32])
    assert timed != []
    assert [e["out"] for e in json.loads(path.read_text())] == [48, 64, 80]


def test_timings_of_another_kind_of_device_or_kernel_are_not_reused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The file's timings hold for the device, kernel source and libraries that took them
    (``_device_kind``): anything else times again."""
    timed = _stub_timings(monkeypatch)
    path = tmp_path / "decode.json"
    skinny_linear.remember_in(path)
    skinny_linear.tune(WEIGHTS, [1, 8])
    entries = json.loads(path.read_text())
    for entry in entries:
        entry["device"] = entry["device"].replace("kernel ", "kernel 0")
    path.write_text(json.dumps(entries))
    skinny_linear._MEASURED.clear()
    timed.clear()
    skinny_linear.remember_in(path)
    skinny_linear.tune(WEIGHTS, [1, 8])
    assert len(timed) == 2 * (len(skinny_linear.CANDIDATES) + 2)


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'[{"device": "x", "dtype": "bfloat16", "out": 48, "in": 32, "rows": [1]}]',
        b'[{"device": "x", "dtype": "bfloat16", "out": 48, "in": 32, "rows": [1], "found": '
        b'[{"out": 48, "in": 32, "rows": 1, "cublas_us": 1, "kernel_us": 1, "tuning": [1, 2], '
        b'"used": true}]}]',
    ],
    ids=["not-json", "no-found", "short-tuning"],
)
def test_a_file_that_cannot_be_read_is_timed_over_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    content: bytes,
) -> None:
    timed = _stub_timings(monkeypatch)
    path = tmp_path / "decode.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="metalserve.skinny_linear"):
        skinny_linear.remember_in(path)
    assert f"ignoring the decode projections' timings in {path}" in caplog.text
    skinny_linear.tune(WEIGHTS, [1])
    assert timed != []
    assert [e["out"] for e in json.loads(path.read_text())] == [48, 64]


def test_a_file_that_cannot_be_written_costs_a_warning_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _stub_timings(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    skinny_linear.remember_in(blocker / "decode.json")  # its directory cannot be made
    with caplog.at_level(logging.WARNING, logger="metalserve.skinny_linear"):
        found = skinny_linear.tune(WEIGHTS, [1])
    assert [e["used"] for e in found] == [True, False]
    assert "cannot keep the decode projections' timings" in caplog.text
    assert list(tmp_path.iterdir()) == [blocker]


def test_an_infinite_timing_is_kept_and_read_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """JSON has no infinity: written as pydantic's constant and read back, not as null (which
    the next start would refuse, time over and write the same way, every start)."""
    timed = _stub_timings(monkeypatch)
    monkeypatch.setattr(skinny_linear, "_micros", lambda run: timed.append(run) or float("inf"))
    path = tmp_path / "decode.json"
    skinny_linear.remember_in(path)
    first = skinny_linear.tune(WEIGHTS, [1])
    skinny_linear._MEASURED.clear()
    timed.clear()
    with caplog.at_level(logging.WARNING, logger="metalserve.skinny_linear"):
        skinny_linear.remember_in(path)
        again = skinny_linear.tune(WEIGHTS, [1])
    assert caplog.text == ""
    assert timed == []
    assert [e["cublas_us"] for e in again] == [e["cublas_us"] for e in first] == [float("inf")] * 2
