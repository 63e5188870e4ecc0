"""``metalserve.layer_kernels``: the Triton kernels against their eager torch references (on a
CUDA device with Triton; the CPU tests run the decoder through the references themselves)."""

from __future__ import annotations

import pytest
import torch

from metalserve import layer_kernels

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and layer_kernels.triton_available()),
    reason="needs a CUDA device and Triton (the kernels run only there)",
)

# Llama-3-8B's widths and a width that is no power of two; 8B's heads and Qwen3's head norms.
HIDDEN = (4096, 1000)
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    value: torch.dtype = request.param
    return value


def _close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal up to the float32 products where eager rounds each one (RoPE: 1-2 ulp)."""
    atol = 1e-5 if ours.dtype == torch.float32 else 0.13
    torch.testing.assert_close(ours.float(), reference.float(), rtol=0, atol=atol)


@pytest.mark.parametrize("n", HIDDEN)
def test_norms_and_silu(dtype: torch.dtype, n: int) -> None:
    torch.manual_seed(0)
    x, added = (torch.randn(33, n, dtype=dtype, device="cuda") for _ in range(2))
    weight = torch.randn(n, dtype=dtype, device="cuda")
    torch.testing.assert_close(
        layer_kernels.rms_norm(x, weight, 1e-5), layer_kernels.rms_norm_reference(x, weight, 1e-5)
    )
    total, normed = layer_kernels.add_rms_norm(x, added, weight, 1e-5)
    torch.testing.assert_close(total, x + added)
    torch.testing.assert_close(normed, layer_kernels.rms_norm_reference(x + added, weight, 1e-5))
    gate_up = torch.randn(33, 2 * n, dtype=dtype, device="cuda")
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(layer_kernels.silu_mul(gate_up), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("norms", [False, True], ids=["llama", "qwen3-norms"])
def test_rope_and_the_cache_writes(dtype: torch.dtype, norms: bool) -> None:
    torch.manual_seed(0)
    batch, slots, positions = 32, 40, 300
    qkv = torch.randn(batch, HEADS + 2 * KV_HEADS, HEAD_DIM, dtype=dtype, device="cuda")
    cos, signed_sin = (torch.randn(batch, 1, HEAD_DIM, dtype=dtype, device="cuda") for _ in "cs")
    at = torch.randint(0, positions, (batch,), device="cuda")
    q_norm, k_norm = (
        (torch.randn(HEAD_DIM, dtype=dtype, device="cuda") for _ in "qk") if norms else (None, None)
    )
    caches = [
        torch.zeros(slots, KV_HEADS, positions, HEAD_DIM, dtype=dtype, device="cuda")
        for _ in range(4)
    ]
    common = (HEADS, KV_HEADS, q_norm, k_norm, 1e-6)
    ours = layer_kernels.rope_store(qkv, cos, signed_sin, at, caches[0], caches[1], *common)
    reference = layer_kernels.rope_store_reference(
        qkv, cos, signed_sin, at, caches[2], caches[3], *common
    )
    _close(ours, reference)
    _close(caches[0], caches[2])  # the keys, rotated
    torch.testing.assert_close(caches[1], caches[3])  # the values, as they were
