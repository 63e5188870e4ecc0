"""FP8 weights for the static decode path (``--quantization fp8``).

A decode step at serving batch sizes reads every weight once and does little arithmetic with
it: its time is the weight bytes over the memory bandwidth. FP8 (E4M3) weights halve those bytes
against bfloat16. The quantization is made when a model goes live, from its bfloat16 weights
(the store keeps one checkpoint; no calibration data):

* weights: one scale per output channel (row of ``[out, in]``), its largest magnitude mapped to
  E4M3's largest finite value (448), so an outlier row does not cost the other rows precision;
* activations: one scale per row (token), computed in each step from the row itself;
* the product: ``torch._scaled_mm`` (FP8 tensor cores on Hopper and Ada, CUTLASS's row-wise
  scaled kernel), both scales applied to the float32 accumulator, the result in the model's
  dtype. The CPU runs the same call (torch's reference kernel), so the CPU tests check this path.

Embedding, norms, the LM head and the KV cache stay in the model's dtype (as vLLM's ``fp8``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
QUANTIZATIONS = ("none", "fp8")
# torch._scaled_mm on CUDA: FP8 tensor cores (Ada 8.9, Hopper 9.0 and later).
MIN_CAPABILITY = (8, 9)
# Its row-wise scaled kernel wants the inner and outer sizes in multiples of 16.
ALIGNMENT = 16


class Fp8Weight(NamedTuple):
    """A linear layer's weight in FP8: ``weight`` [out, in] E4M3, ``scale`` [1, out] float32
    (the float value of ``weight[o, i]`` is ``weight[o, i] * scale[0, o]``)."""

    weight: torch.Tensor
    scale: torch.Tensor


def unsupported_reason(
    device: torch.device, dtype: torch.dtype, shapes: list[torch.Size]
) -> str | None:
    """Why FP8 weights cannot run here (None: they can)."""
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return (
                f"FP8 needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or later "
                f"(Ada, Hopper); this device has {capability[0]}.{capability[1]}"
            )
        if dtype != torch.bfloat16:
            return f"FP8 on CUDA needs the model in bfloat16 (--dtype bfloat16 or auto): {dtype}"
        odd = sorted({tuple(s) for s in shapes if s[0] % ALIGNMENT or s[1] % ALIGNMENT})
        if odd:
            return f"FP8 needs weight sizes in multiples of {ALIGNMENT}; these are not: {odd}"
    elif device.type != "cpu":
        return f"FP8 weights run on CUDA or the CPU, not {device.type}"
    return None


def quantize_weight(weight: torch.Tensor) -> Fp8Weight:
    """``weight`` [out, in] as E4M3 with one scale per output channel."""
    amax = weight.abs().amax(dim=1).float().clamp(min=torch.finfo(torch.float32).tiny)
    scale = amax / FP8_MAX
    quantized = (weight.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return Fp8Weight(quantized.contiguous(), scale.view(1, -1).contiguous())


def dequantize(weight: Fp8Weight) -> torch.Tensor:
    """The float32 values an FP8 weight stands for (for checks)."""
    return weight.weight.float() * weight.scale.view(-1, 1)


def linear(
    x: torch.Tensor, weight: torch.Tensor | Fp8Weight, bias: torch.Tensor | None
) -> torch.Tensor:
    """``torch.nn.functional.linear`` for a plain weight or an :class:`Fp8Weight` (``x`` then
    quantized per row, the GEMM on FP8 with both scales, the result in ``x``'s dtype)."""
    if not isinstance(weight, Fp8Weight):
        return torch.nn.functional.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    amax = rows.abs().amax(dim=-1, keepdim=True).float().clamp(min=torch.finfo(torch.float32).tiny)
    row_scale = amax / FP8_MAX
    quantized = (rows.float() / row_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    out = torch._scaled_mm(
        quantized,
        weight.weight.t(),  # column-major [in, out], as the kernel wants its second operand
        scale_a=row_scale,
        scale_b=weight.scale,
        out_dtype=x.dtype,
    )
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], out.shape[-1])
