# mypy: allow-untyped-defs, allow-incomplete-defs
# (the Triton kernel below takes untyped parameters: Triton reads annotations as types)
"""Decode attention over each row's own length (issue 17): one query token per row, grouped-query.

The decode step's attention read, per layer, every row's keys and values up to the attention
length bucket (``scaled_dot_product_attention`` over ``keys[:batch, :, :bucket]`` with a mask):
a row at position 70 in the 256 bucket read 256 positions, and each bucket was a graph of its
own. ``attend`` reads each row's slot up to that row's length only (``lengths``, on the device:
the same kernel serves every length, so one graph per batch size serves every length too).

On CUDA with Triton: one program per (row, key/value head) computes the attention of that head's
``group`` query heads at once (each key and value read once for all of them), an online softmax
over blocks of ``BLOCK_N`` positions, in float32. Elsewhere (the CPU, no Triton) the same result
from ``scaled_dot_product_attention`` with a mask: the reference the kernel is checked against.

``attend`` is a custom operator (``metalserve::decode_attention``), so the compiled decode layer
calls it as one opaque step and CUDA graphs capture its launch.
"""

from __future__ import annotations

import torch

try:
    import triton  # type: ignore[import-not-found, unused-ignore]
    import triton.language as tl  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # no Triton: the project's CI and CPU-only hosts
    triton = None
    tl = None

# Positions per block of the kernel's loop, its warps and pipeline stages: the fastest of those
# tried at the 8B preset's shapes on an H200 (2026-12-04, bench/decode_attention_probe.py). A
# split of each row over several programs (flash-decoding, the last program combining the
# parts) was slower at these lengths, and is not kept.
BLOCK_N = 64
WARPS = 4
STAGES = 3
# tl.dot needs 16 rows at least: the query heads of a group are padded to this many.
MIN_DOT_ROWS = 16


def reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """``attend``'s result by torch's own attention: ``q`` [batch, heads, head_dim] over the
    first ``lengths[b]`` positions of slot ``b`` of ``keys``/``values`` [slots, kv_heads,
    positions, head_dim]; [batch, heads, head_dim]."""
    batch = q.shape[0]
    longest = keys.shape[2]
    visible = torch.arange(longest, device=q.device)[None, :] < lengths[:, None]
    bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)
    bias = bias.masked_fill(~visible, float("-inf"))[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2),
        keys[:batch],
        values[:batch],
        attn_mask=bias,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(2)


def kernel_available(device: torch.device) -> bool:
    """Whether the Triton kernel runs on ``device``."""
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        lengths_ptr,
        out_ptr,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_ob,
        stride_oh,
        scale,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # 64-bit offsets: a layer's cache may hold more than 2**31 elements.
        row = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1).to(tl.int64)
        length = tl.load(lengths_ptr + row).to(tl.int32)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        in_group = g < GROUP
        heads = kv_head * GROUP + g
        q = tl.load(
            q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :],
            mask=in_group[:, None],
            other=0.0,
        )
        k_base = k_ptr + row * stride_kb + kv_head * stride_kh
        v_base = v_ptr + row * stride_vb + kv_head * stride_vh
        best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for start in range(0, length, BLOCK):
            n = start + tl.arange(0, BLOCK)
            visible = n < length
            k = tl.load(
                k_base + n[:, None] * stride_kn + d[None, :], mask=visible[:, None], other=0.0
            )
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            s = tl.where(visible[None, :], s * scale, float("-inf"))
            new_best = tl.maximum(best, tl.max(s, 1))
            rescale = tl.exp(best - new_best)
            p = tl.exp(s - new_best[:, None])
            total = total * rescale + tl.sum(p, 1)
            # Zeros past the length: their weight is 0, and 0 x NaN would not be.
            v = tl.load(
                v_base + n[:, None] * stride_vn + d[None, :], mask=visible[:, None], other=0.0
            )
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            best = new_best
        out = acc / total[:, None]
        tl.store(
            out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=in_group[:, None],
        )


def kernel(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    *,
    block: int = BLOCK_N,
    warps: int = WARPS,
    stages: int = STAGES,
) -> torch.Tensor:
    """The Triton kernel's ``attend`` (CUDA tensors; ``block``, ``warps``, ``stages``: its
    tuning, for the probe)."""
    batch, heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    _decode_attention_kernel[(batch, kv_heads)](
        q,
        keys,
        values,
        lengths,
        out,
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        out.stride(0),
        out.stride(1),
        scale,
        GROUP=group,
        GROUP_PAD=max(MIN_DOT_ROWS, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK=block,
        # float32 products in full precision (TF32's would stray from the reference).
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps,
        num_stages=stages,
    )
    return out


def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of ``q`` [batch, heads, head_dim] (one token per row) over the first
    ``lengths[b]`` positions of slot ``b`` of ``keys``/``values`` [slots, kv_heads, positions,
    head_dim] (``heads`` a multiple of ``kv_heads``; ``lengths`` int64 on the device, each at
    least 1); [batch, heads, head_dim] in ``q``'s dtype."""
    # A custom op only where torch.compile traces it (as ``skinny_linear.linear``): through
    # the op elsewhere, torch would import its compiler at the first call.
    if torch.compiler.is_compiling():
        out: torch.Tensor = _attend_op(q, keys, values, lengths, scale)
        return out
    return _attend(q, keys, values, lengths, scale)


def _attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    if kernel_available(q.device) and q.stride(-1) == 1 and keys.stride(-1) == 1:
        return kernel(q, keys, values, lengths, scale)
    return reference(q, keys, values, lengths, scale)


_attend_op = torch.library.custom_op("metalserve::decode_attention", mutates_args=())(_attend)


@_attend_op.register_fake
def _(q, keys, values, lengths, scale):
    return torch.empty_like(q)


# Head sizes the kernel takes: powers of two (Triton's ranges), at most 128 (its key and value
# tiles, pipelined, fit every GPU's shared memory; larger heads keep torch's attention).
HEAD_DIMS = (16, 32, 64, 128)


def supported(head_dim: int, heads: int, kv_heads: int) -> bool:
    """Whether the kernel takes these shapes."""
    return head_dim in HEAD_DIMS and heads % kv_heads == 0
