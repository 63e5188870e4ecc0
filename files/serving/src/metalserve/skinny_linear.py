# mypy: allow-untyped-defs, allow-incomplete-defs
# (the Triton kernel below takes untyped parameters: Triton reads annotations as types)
"""The decode step's projections at few rows (issue 17): ``x @ w.T`` for ``x`` [rows, in] with
rows at most 64, ``w`` [out, in], bfloat16 or float16.

A decode step reads every weight once and multiplies it by a handful of rows: its time is the
weight bytes over the memory bandwidth. cuBLAS meets that for wide outputs (gate/up), but for
4,096 outputs (o_proj, down at Llama-3-8B's shapes) it splits the inner dimension over several
thread blocks, writes float32 partial sums and runs two more kernels per product (a reduction
and a copy): on an H200 at 8B, 0.24 ms of a 5.1 ms step, besides the products' own shortfall.

Here one kernel does it all: program (i, s) computes output columns ``i*BLOCK_N ...`` over the
``s``-th of ``SPLIT`` parts of the inner dimension, weights as the MMA's wide operand (the rows
are the narrow one). With ``SPLIT`` above 1 each program writes its float32 partial sums, counts
itself in on a per-tile counter, and the last program of a tile adds the parts in a fixed order
(so the result does not depend on which program finished first: the same inputs give the same
bits every time), writes the output and resets the counter for the next call.

``tune`` times cuBLAS and a few tunings of the kernel per product and row count on the device,
over the model's own weights, once before the decode graphs are captured (the choice follows the
timings, so two replicas may choose differently where the two are close: their results then
differ by rounding, which the consistency check counts as a tie, not a difference); ``linear`` (the
custom operator ``metalserve::skinny_linear``, so a compiled layer calls it as one opaque step
and CUDA graphs capture its launch) runs the kernel only where it won, else
``torch.nn.functional.linear``, as everywhere else (the CPU, no Triton, more rows). What ``tune``
measured is kept for the process (a hot reload times nothing again) and, where ``remember_in``
names a file, for the next processes on the same kind of device with the same kernel source and
libraries (a restart's decode path then times nothing either).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from metalserve import graph_timing

try:
    import triton  # type: ignore[import-not-found, unused-ignore]
    import triton.language as tl  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # no Triton: the project's CI and CPU-only hosts
    triton = None
    tl = None

log = logging.getLogger(__name__)

# The most rows the kernel takes (a decode step's batch bucket); more rows: cuBLAS.
MAX_ROWS = 64
# Counters per device, shared by every call (calls on one stream run one after another, and
# each leaves its counters at zero): the most output tiles of one product. Allocated by the
# first call, which ``tune`` makes outside any CUDA-graph capture.
COUNTERS = 1 << 16
DTYPES = (torch.bfloat16, torch.float16)


class Tuning(NamedTuple):
    """The kernel's block of outputs and of the inner dimension, its parts, warps, stages."""

    block_n: int
    block_k: int
    split: int
    warps: int
    stages: int


# What ``tune`` tries per product: the fastest of bench/skinny_linear_probe.py's sweep at
# Llama-3-8B's shapes on an H200 (2026-12-04): 1 part for 4,096 inputs, 2 or 4 for 14,336.
CANDIDATES = (
    Tuning(64, 128, 1, 4, 5),
    Tuning(64, 256, 1, 4, 4),
    Tuning(64, 128, 2, 4, 5),
    Tuning(64, 128, 4, 4, 3),
    Tuning(128, 128, 1, 4, 4),
)
# The kernel is used for a product only where it beat cuBLAS by this much when tuned.
MIN_GAIN = 1.02
# Launches per timing: over several layers' weights, so that L2 (50 MB on an H200) holds none.
TIMED_LAUNCHES = 32
REPLAYS = 3


class Key(NamedTuple):
    device: int
    dtype: torch.dtype
    out_features: int
    in_features: int
    rows: int  # a decode step's batch bucket


# The products ``tune`` found the kernel faster for, and its tuning for each.
_TUNED: dict[Key, Tuning] = {}


def block_rows(rows: int) -> int:
    return max(16, 1 << max(0, rows - 1).bit_length())


def kernel_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _store(out_ptr, out_at, residual_at, total, mask, HAS_RESIDUAL: tl.constexpr):
        value = total.to(out_ptr.dtype.element_ty)
        if HAS_RESIDUAL:
            # Rounded as ``residual + (x @ w.T)`` in the model's dtype is: the product first.
            residual = tl.load(residual_at, mask=mask, other=0.0).to(tl.float32)
            value = (value.to(tl.float32) + residual).to(out_ptr.dtype.element_ty)
        tl.store(out_at, value, mask=mask)

    @triton.jit
    def _skinny_gemm_kernel(
        x_ptr,
        w_ptr,
        residual_ptr,
        out_ptr,
        partial_ptr,
        counter_ptr,
        rows,
        n,
        k,
        stride_xm,
        stride_wn,
        stride_rm,
        stride_om,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
    ):
        tile = tl.program_id(0)
        part = tl.program_id(1)
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        ms = tl.arange(0, BLOCK_M)
        ks = tl.arange(0, BLOCK_K)
        per_part = tl.cdiv(tl.cdiv(k, BLOCK_K), SPLIT) * BLOCK_K
        start = part * per_part
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
        x_cols = x_ptr + ms.to(tl.int64)[None, :] * stride_xm
        for k0 in range(start, start + per_part, BLOCK_K):
            kk = k0 + ks
            w = tl.load(
                w_rows + kk[None, :], mask=(cols[:, None] < n) & (kk[None, :] < k), other=0.0
            )
            xt = tl.load(
                x_cols + kk[:, None], mask=(ms[None, :] < rows) & (kk[:, None] < k), other=0.0
            )
            acc = tl.dot(w, xt, acc)
        out_mask = (cols[:, None] < n) & (ms[None, :] < rows)
        out_at = out_ptr + ms.to(tl.int64)[None, :] * stride_om + cols[:, None]
        residual_at = residual_ptr + ms.to(tl.int64)[None, :] * stride_rm + cols[:, None]
        if SPLIT == 1:
            _store(out_ptr, out_at, residual_at, acc, out_mask, HAS_RESIDUAL)
        else:
            # This part's sums, then count in; the last part of the tile adds them all up.
            mine = partial_ptr + (part * BLOCK_M + ms[None, :]) * n + cols[:, None]
            tl.store(mine, acc, mask=out_mask)
            tl.debug_barrier()  # every thread's part is written before the count says so
            arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
            if arrived == SPLIT - 1:
                total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for p in range(SPLIT):  # a fixed order: the same sums whoever comes last
                    theirs = partial_ptr + (p * BLOCK_M + ms[None, :]) * n + cols[:, None]
                    total += tl.load(theirs, mask=out_mask, other=0.0, cache_modifier=".cg")
                _store(out_ptr, out_at, residual_at, total, out_mask, HAS_RESIDUAL)
                tl.atomic_xchg(counter_ptr + tile, 0)


@functools.cache
def _counters(device: torch.device) -> torch.Tensor:
    return torch.zeros(COUNTERS, dtype=torch.int32, device=device)


def kernel(
    x: torch.Tensor, w: torch.Tensor, t: Tuning, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """The Triton kernel's ``x @ w.T`` (CUDA tensors, ``x`` at most ``MAX_ROWS`` rows), plus
    ``residual`` ([rows, out]) if given."""
    rows, k = x.shape
    n = w.shape[0]
    block_m = block_rows(rows)
    tiles = triton.cdiv(n, t.block_n)
    if tiles > COUNTERS:
        raise ValueError(f"{n} outputs need {tiles} counters, more than {COUNTERS}")
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    partial = (
        torch.empty((t.split, block_m, n), dtype=torch.float32, device=x.device)
        if t.split > 1
        else out
    )
    _skinny_gemm_kernel[(tiles, t.split)](
        x,
        w,
        residual if residual is not None else out,
        out,
        partial,
        _counters(x.device),
        rows,
        n,
        k,
        x.stride(0),
        w.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=t.block_n,
        BLOCK_K=t.block_k,
        SPLIT=t.split,
        HAS_RESIDUAL=residual is not None,
        num_warps=t.warps,
        num_stages=t.stages,
    )
    return out


def _key(x: torch.Tensor, w: torch.Tensor) -> Key | None:
    """The product's key in the tuned table, or None where the kernel cannot take it."""
    if not (
        kernel_available(x.device)
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and x.dtype in DTYPES
        and w.dtype == x.dtype
        and x.stride(-1) == 1
        and w.stride(-1) == 1
    ):
        return None
    return Key(x.device.index or 0, x.dtype, w.shape[0], w.shape[1], x.shape[0])


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` (``x`` [rows, in], ``w`` [out, in]) by the kernel where ``tune`` found it
    faster than cuBLAS for this shape, else by ``torch.nn.functional.linear``."""
    if torch.compiler.is_compiling():
        product: torch.Tensor = _linear_op(x, w)
        return product
    return _linear(x, w)


def linear_add(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + x @ w.T`` (a residual connection after a projection) in one kernel where
    ``tune`` found the kernel faster for ``x @ w.T``, else torch's linear and an add."""
    if torch.compiler.is_compiling():
        added: torch.Tensor = _linear_add_op(x, w, residual)
        return added
    return _linear_add(x, w, residual)


# ``linear`` and ``linear_add`` are custom ops only where torch.compile traces them: opaque to
# it, since the kernel's choice reads ``_TUNED`` at run time. Called through the op outside a
# compilation, torch would import its compiler (dynamo, sympy) at the first call: 1.2 s of an
# 8B start's decode path on an H100 (BENCHMARKS round 2 step 30).


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    key = _key(x, w)
    tuning = _TUNED.get(key) if key is not None else None
    if tuning is not None:
        return kernel(x, w, tuning)
    return torch.nn.functional.linear(x, w)


def _linear_add(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    key = _key(x, w)
    tuning = _TUNED.get(key) if key is not None else None
    if tuning is not None and residual.stride(-1) == 1:
        return kernel(x, w, tuning, residual)
    # Rounded as the kernel and the model's own forward round: the product, then the sum.
    return residual + torch.nn.functional.linear(x, w)


_linear_op = torch.library.custom_op("metalserve::skinny_linear", mutates_args=())(_linear)
_linear_add_op = torch.library.custom_op("metalserve::skinny_linear_add", mutates_args=())(
    _linear_add
)


@_linear_op.register_fake
def _(x, w):
    return x.new_empty((x.shape[0], w.shape[0]))


@_linear_add_op.register_fake
def _(x, w, residual):
    return residual.new_empty((x.shape[0], w.shape[0]))


def _each(
    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    weights: list[torch.Tensor],
) -> None:
    for w in weights:
        product(x, w)


def _micros(run: Callable[[], object]) -> float:
    """Microseconds of one of ``run``'s ``TIMED_LAUNCHES`` products, replayed as a graph."""
    return graph_timing.graph_micros(run, REPLAYS) / TIMED_LAUNCHES


class _Measured(NamedTuple):
    device: str  # ``_device_kind``: the same kind of device, kernel and libraries
    dtype: str
    out_features: int
    in_features: int
    rows: tuple[int, ...]


# What ``tune`` measured: a hot reload of a version of the same shapes reuses it instead of
# timing again (its decode path 2.1 s, not 3.8, at 8B on an H200), and so does a restart where
# ``remember_in`` named a file.
_MEASURED: dict[_Measured, list[dict[str, Any]]] = {}
_KINDS: set[str] = set()  # the kinds of device ``tune`` met in this process
_file: Path | None = None


class _Found(BaseModel):
    """One (product, row count) of ``tune``'s report."""

    # A timing that came out infinite (a failed tuning's) is written as such, and read back.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, ser_json_inf_nan="constants")
    out: int = Field(gt=0)
    in_: int = Field(gt=0, alias="in")
    rows: int = Field(gt=0, le=MAX_ROWS)
    cublas_us: float
    kernel_us: float | None
    tuning: tuple[int, int, int, int, int] | None
    used: bool


class _Entry(BaseModel):
    """One product's measurements in the file ``remember_in`` names."""

    model_config = ConfigDict(extra="forbid")
    device: str
    dtype: str
    out: int
    in_: int = Field(alias="in")
    rows: tuple[int, ...]
    found: list[_Found]


_ENTRIES = TypeAdapter(list[_Entry])


@functools.cache
def _device_kind(device: torch.device) -> str:
    """What a measurement holds for: the device's model, this kernel's source (its tunings
    and thresholds included) and the libraries that compile and time it."""
    name = device.type
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = f"{torch.cuda.get_device_name(device)} sm{major}{minor}"
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return (
        f"{name}; kernel {source}; torch {torch.__version__} cuda {torch.version.cuda}; "
        f"triton {getattr(triton, '__version__', None)}"
    )


def remember_in(path: Path | None) -> None:
    """Keep what ``tune`` measures in ``path`` (JSON, rewritten whole after each new
    measurement) and reuse what it holds now: a restart's decode path then times only shapes
    it never timed on this kind of device (``_device_kind``). A file that cannot be read is
    measured over, with a warning. None: this process only."""
    global _file
    _file = path
    if path is None:
        return
    try:
        entries = _ENTRIES.validate_json(path.read_bytes())
    except FileNotFoundError:
        return
    except (OSError, ValueError, ValidationError) as exc:
        log.warning("ignoring the decode projections' timings in %s: %s", path, exc)
        return
    for entry in entries:
        key = _Measured(entry.device, entry.dtype, entry.out, entry.in_, entry.rows)
        _MEASURED[key] = [found.model_dump(by_alias=True, mode="json") for found in entry.found]


def _save() -> None:
    """Write every measurement to the file ``remember_in`` named, atomically (a reader never
    sees half a file); a failure is logged, not raised: the timings are only a shortcut."""
    if _file is None:
        return
    # This process's kinds of device only: a file's timings for a kernel or library replaced
    # since would never be read again.
    kinds = set(_KINDS)
    try:
        entries = [
            _Entry.model_validate(
                {
                    "device": key.device,
                    "dtype": key.dtype,
                    "out": key.out_features,
                    "in": key.in_features,
                    "rows": key.rows,
                    "found": found,
                }
            )
            for key, found in _MEASURED.items()
            if key.device in kinds
        ]
        _file.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=_file.parent, prefix=f".{_file.name}.")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(_ENTRIES.dump_json(entries, by_alias=True, indent=1))
            tmp.replace(_file)
        except BaseException:
            tmp.unlink()
            raise
    except (OSError, ValidationError) as exc:
        log.warning("cannot keep the decode projections' timings in %s: %s", _file, exc)


def tune(weights: list[list[torch.Tensor]], rows: list[int]) -> list[dict[str, Any]]:
    """For each product (``weights``: per product, its weight in several layers): time every
    ``CANDIDATES`` tuning at each row block (its time does not depend on the rows within the
    block), and cuBLAS at each row count of ``rows`` (it picks its algorithm by the row count),
    over the layers' own weights (none of them in L2); use the kernel from now on for a row
    count where its block's fastest tuning beats cuBLAS by ``MIN_GAIN``. Returns what was
    measured (logged by the caller); a product of shapes measured before in this process is
    not timed again (``_MEASURED``)."""
    found: list[dict[str, Any]] = []
    counts = sorted({r for r in rows if 0 < r <= MAX_ROWS})
    timed_any = False
    for layers in weights:
        w0 = layers[0]
        if not kernel_available(w0.device) or w0.dtype not in DTYPES:
            continue
        n, k = w0.shape
        index = w0.device.index or 0
        dtype = str(w0.dtype).removeprefix("torch.")
        kind = _device_kind(w0.device)
        _KINDS.add(kind)
        measured = _Measured(kind, dtype, n, k, tuple(counts))
        if measured in _MEASURED:
            for entry in _MEASURED[measured]:
                key = Key(index, w0.dtype, n, k, entry["rows"])
                if entry["used"]:
                    _TUNED[key] = Tuning(*entry["tuning"])
                else:
                    _TUNED.pop(key, None)
            found += _MEASURED[measured]
            continue
        first = len(found)
        cycle = [layers[i % len(layers)] for i in range(TIMED_LAUNCHES)]
        for block_m in sorted({block_rows(r) for r in counts}):
            x = torch.randn(block_m, k, device=w0.device, dtype=w0.dtype)
            times: dict[Tuning, float] = {}
            for tuning in CANDIDATES:
                try:
                    ours = functools.partial(kernel, t=tuning)
                    times[tuning] = _micros(functools.partial(_each, ours, x, cycle))
                except Exception:  # noqa: BLE001, S112 - a tuning the device cannot run
                    continue
            best = min(times, key=times.__getitem__) if times else None
            for count in (r for r in counts if block_rows(r) == block_m):
                rows_x = x[:count]
                baseline = _micros(
                    functools.partial(_each, torch.nn.functional.linear, rows_x, cycle)
                )
                key = Key(index, w0.dtype, n, k, count)
                used = best is not None and baseline >= MIN_GAIN * times[best]
                if used and best is not None:
                    _TUNED[key] = best
                else:
                    _TUNED.pop(key, None)
                found.append(
                    {
                        "out": n,
                        "in": k,
                        "rows": count,
                        "cublas_us": round(baseline, 2),
                        "kernel_us": round(times[best], 2) if best is not None else None,
                        "tuning": list(best) if best is not None else None,
                        "used": used,
                    }
                )
        _MEASURED[measured] = found[first:]
        timed_any = True
    if timed_any:
        _save()
    return found
