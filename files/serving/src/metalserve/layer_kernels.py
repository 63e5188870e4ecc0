# mypy: allow-untyped-defs, allow-incomplete-defs
# (the Triton kernels below take untyped parameters: Triton reads annotations as types)
"""The decode layer's elementwise steps in three Triton kernels (issue 17, item 4).

A decode step's layer is a few large GEMMs and the attention between many small elementwise
steps: RMSNorm (five kernels in eager torch), RoPE on the queries and keys (a per-head norm
first on Qwen3) and the new keys and values written to the cache (nine), the residual add
before the second norm, SiLU times the up projection (two). ``torch.compile`` fuses them
(a decode step 1.23x faster than eager at 8B on an H100, 2026-12-06), and costs a start ~3.5 s
of imports and tracing (its compiled code cached or not). These kernels fuse the same steps
without the compiler:

- ``rms_norm``: ``weight * rms_norm(x.float()).to(x.dtype)``, and ``add_rms_norm``: the
  residual sum first (both returned), one program per row;
- ``rope_store``: per (row, head) of the fused q/k/v projection: the queries normed (where the
  model has per-head norms) and rotated, out; the keys likewise, into the cache at the row's
  position; the values into the cache;
- ``silu_mul``: ``silu(gate) * up`` of the fused gate/up projection.

Each rounds to the model's dtype where eager torch does (the norm's cast, each product and
sum of RoPE): measured on an H100 in bfloat16, the norms and SiLU equal eager's bit for bit, RoPE
within 1-2 units in the last place (its products in float32). On the CPU or
without Triton the same functions run eager torch: the reference the GPU check compares with.
"""

from __future__ import annotations

import torch

try:
    import triton  # type: ignore[import-not-found, unused-ignore]
    import triton.language as tl  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # no Triton: the project's CI and CPU-only hosts
    triton = None
    tl = None

# Elements per program of ``silu_mul``.
SILU_BLOCK = 1024


def triton_available() -> bool:
    """Whether Triton is installed (the kernels then run on CUDA devices)."""
    return triton is not None


def kernels_available(device: torch.device) -> bool:
    """Whether the Triton kernels run on ``device``."""
    return triton is not None and device.type == "cuda"


# --- eager torch: the reference, and the path without Triton ------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalize in float32, cast back, scale."""
    normed = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    weighted: torch.Tensor = weight * normed.to(x.dtype)
    return weighted


def rope_reference(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``x * cos + rotate_half(x) * sin``, bit for bit: rolling by half a head
    gives ``cat(x2, x1)``, and ``signed_sin`` is ``cat(-sin1, sin2)``."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def rope_qk_reference(
    qkv: torch.Tensor,
    heads: int,
    kv_heads: int,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """The queries and keys of ``qkv`` (heads on dimension 1, head_dim last) normed per head
    where the model has q/k norms, then rotated: ``[..., heads + kv_heads, ..., head_dim]``."""
    qk = qkv[:, : heads + kv_heads]
    if q_norm is not None and k_norm is not None:
        qk = torch.cat(
            (
                rms_norm_reference(qk[:, :heads], q_norm, eps),
                rms_norm_reference(qk[:, heads:], k_norm, eps),
            ),
            dim=1,
        )
    return rope_reference(qk, cos, signed_sin)


def rope_store_reference(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    heads: int,
    kv_heads: int,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``rope_store`` in eager torch."""
    qk = rope_qk_reference(qkv, heads, kv_heads, cos, signed_sin, q_norm, k_norm, eps)
    rows = torch.arange(qkv.shape[0], device=qkv.device)
    keys[rows, :, positions] = qk[:, heads:]
    values[rows, :, positions] = qkv[:, heads + kv_heads :]
    return qk[:, :heads]


# --- the kernels --------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        add_ptr,
        w_ptr,
        sum_ptr,
        out_ptr,
        stride_x,
        stride_add,
        stride_sum,
        stride_out,
        n,
        eps,
        HAS_ADD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # row x stride: past 2**31 in a long prefill
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_ADD:
            added = tl.load(add_ptr + row * stride_add + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + added.to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
        normed = (xf * rstd).to(x.dtype).to(tl.float32)
        weight = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (weight * normed).to(x.dtype), mask=mask)

    @triton.jit
    def _rope_store_kernel(
        qkv_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        qn_ptr,
        kn_ptr,
        q_ptr,
        k_ptr,
        v_ptr,
        s_qkv_b,
        s_qkv_h,
        s_cos_b,
        s_sin_b,
        s_q_b,
        s_q_h,
        s_k_b,
        s_k_h,
        s_k_p,
        s_v_b,
        s_v_h,
        s_v_p,
        eps,
        HEADS: tl.constexpr,
        KV_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HAS_NORM: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        d = tl.arange(0, HEAD_DIM)
        # The other half of the head, in order: rotate_half's operand.
        rolled = (d + HEAD_DIM // 2) % HEAD_DIM
        row = qkv_ptr + b * s_qkv_b + h * s_qkv_h
        position = tl.load(pos_ptr + b)
        x = tl.load(row + d)
        if h >= HEADS + KV_HEADS:  # a value head: into the cache as it is
            tl.store(v_ptr + b * s_v_b + (h - HEADS - KV_HEADS) * s_v_h + position * s_v_p + d, x)
        else:
            xf = x.to(tl.float32)
            xr = tl.load(row + rolled).to(tl.float32)
            dtype = x.dtype
            if HAS_NORM:
                rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / HEAD_DIM + eps)
                if h < HEADS:
                    w = tl.load(qn_ptr + d).to(tl.float32)
                    wr = tl.load(qn_ptr + rolled).to(tl.float32)
                else:
                    w = tl.load(kn_ptr + d).to(tl.float32)
                    wr = tl.load(kn_ptr + rolled).to(tl.float32)
                xf = (w * (xf * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
                xr = (wr * (xr * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            cos = tl.load(cos_ptr + b * s_cos_b + d).to(tl.float32)
            sin = tl.load(sin_ptr + b * s_sin_b + d).to(tl.float32)
            first = (xf * cos).to(dtype).to(tl.float32)
            second = (xr * sin).to(dtype).to(tl.float32)
            rotated = (first + second).to(dtype)
            if h < HEADS:
                tl.store(q_ptr + b * s_q_b + h * s_q_h + d, rotated)
            else:
                tl.store(k_ptr + b * s_k_b + (h - HEADS) * s_k_h + position * s_k_p + d, rotated)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, s_gu, s_out, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        gate = tl.load(gu_ptr + row * s_gu + cols, mask=mask, other=0.0)
        up = tl.load(gu_ptr + row * s_gu + n + cols, mask=mask, other=0.0).to(tl.float32)
        g = gate.to(tl.float32)
        activated = (g * tl.sigmoid(g)).to(gate.dtype).to(tl.float32)
        tl.store(out_ptr + row * s_out + cols, (activated * up).to(gate.dtype), mask=mask)


def _fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the norm kernel takes ``x`` [rows, n] and ``weight`` [n]: CUDA, rows of
    contiguous elements, one dtype."""
    return (
        kernels_available(x.device)
        and x.stride(-1) == 1
        and weight.is_contiguous()
        and weight.dtype == x.dtype
    )


def _norm_warps(n: int) -> int:
    return 8 if n >= 4096 else 4


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm of each row of ``x`` [rows, n] (``rms_norm_reference``)."""
    if not _fits(x, weight):
        return rms_norm_reference(x, weight, eps)
    rows, n = x.shape
    out = torch.empty_like(x)
    _rms_norm_kernel[(rows,)](
        x,
        x,
        weight,
        out,
        out,
        x.stride(0),
        0,
        0,
        out.stride(0),
        n,
        eps,
        HAS_ADD=False,
        BLOCK=triton.next_power_of_2(n),
        num_warps=_norm_warps(n),
    )
    return out


def add_rms_norm(
    x: torch.Tensor, added: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x + added`` [rows, n] (the residual stream) and its LlamaRMSNorm."""
    if not _fits(x, weight) or added.stride(-1) != 1 or added.dtype != x.dtype:
        total = x + added
        return total, rms_norm_reference(total, weight, eps)
    rows, n = x.shape
    total, out = torch.empty_like(x), torch.empty_like(x)
    _rms_norm_kernel[(rows,)](
        x,
        added,
        weight,
        total,
        out,
        x.stride(0),
        added.stride(0),
        total.stride(0),
        out.stride(0),
        n,
        eps,
        HAS_ADD=True,
        BLOCK=triton.next_power_of_2(n),
        num_warps=_norm_warps(n),
    )
    return total, out


def rope_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    heads: int,
    kv_heads: int,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """The queries of ``qkv`` [batch, heads + 2 x kv_heads, head_dim] (one token per row, at
    ``positions`` [batch]) normed per head (``q_norm``/``k_norm``, Qwen3) and rotated
    (``cos``/``signed_sin`` [batch, 1, head_dim], see ``rope_reference``): [batch, heads,
    head_dim]; its keys, normed and rotated, and its values written to ``keys``/``values``
    [slots, kv_heads, positions, head_dim] at each row's slot and position."""
    batch, _, head_dim = qkv.shape
    has_norm = q_norm is not None and k_norm is not None
    if (
        not kernels_available(qkv.device)
        or any(t.stride(-1) != 1 for t in (qkv, keys, values, cos, signed_sin))
        or not positions.is_contiguous()
        or head_dim & (head_dim - 1)  # tl.arange: a power of two
        or (
            has_norm
            and any(n.dtype != qkv.dtype or not n.is_contiguous() for n in (q_norm, k_norm))  # type: ignore[union-attr]
        )
    ):
        return rope_store_reference(
            qkv, cos, signed_sin, positions, keys, values, heads, kv_heads, q_norm, k_norm, eps
        )
    q = torch.empty((batch, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    _rope_store_kernel[(batch, heads + 2 * kv_heads)](
        qkv,
        cos,
        signed_sin,
        positions,
        q_norm if has_norm else qkv,
        k_norm if has_norm else qkv,
        q,
        keys,
        values,
        qkv.stride(0),
        qkv.stride(1),
        cos.stride(0),
        signed_sin.stride(0),
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        eps,
        HEADS=heads,
        KV_HEADS=kv_heads,
        HEAD_DIM=head_dim,
        HAS_NORM=has_norm,
        num_warps=1 if head_dim <= 128 else 2,
    )
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up`` [rows, 2 x n] (gate first): [rows, n]."""
    rows, width = gate_up.shape
    n = width // 2
    if not kernels_available(gate_up.device) or gate_up.stride(-1) != 1:
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    out = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(rows, triton.cdiv(n, SILU_BLOCK))](
        gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=SILU_BLOCK, num_warps=4
    )
    return out
