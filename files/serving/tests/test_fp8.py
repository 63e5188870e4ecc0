"""FP8 weights (``--quantization fp8``) on the CPU: the quantization, the scaled GEMM, the static
decode path on FP8 projections, and how the engine and the settings take the option. The CUDA
kernel is the same call (``torch._scaled_mm``); its speed and quality on an 8B model are
``bench serve --arms server,server-fp8`` and ``bench decode-check --checks fp8`` on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from conftest import MODEL, Store
from engine_helpers import GREEDY, PROMPTS, submit
from metalserve import fp8, staticdecode
from metalserve.engine import Engine, Finished, StaticBatch
from metalserve.loader import LoadedModel, LoadError, load_version
from metalserve.settings import ServeSettings


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_weights_get_one_scale_per_output_channel() -> None:
    """A row a million times larger than the others costs them no precision (one scale for the
    whole tensor would flush most of their values to zero)."""
    torch.manual_seed(0)
    weight = torch.randn(64, 32)
    weight[3] *= 1e6
    quantized = fp8.quantize_weight(weight)
    assert quantized.weight.dtype == torch.float8_e4m3fn
    assert quantized.scale.shape == (1, 64)
    restored = fp8.dequantize(quantized)
    # E4M3 keeps 3 mantissa bits: half a step is 1/16 of a value at most.
    errors = [_rel(restored[r], weight[r]) for r in range(64)]
    assert max(errors) < 0.05, errors
    per_tensor = weight.abs().max() / fp8.FP8_MAX
    coarse = (weight / per_tensor).to(fp8.FP8).float() * per_tensor
    assert _rel(coarse[0], weight[0]) > 0.5  # flushed: what per-channel scales avoid


def test_the_scaled_product_is_the_linear_layer() -> None:
    torch.manual_seed(1)
    weight, bias = torch.randn(48, 32), torch.randn(48)
    x = torch.randn(2, 5, 32)
    x[0, 1] *= 50  # a row's own scale: an outlier token does not spoil the others
    expected = torch.nn.functional.linear(x, weight, bias)
    out = fp8.linear(x, fp8.quantize_weight(weight), bias)
    assert out.shape == (2, 5, 48)
    assert out.dtype == x.dtype
    rows = out.reshape(-1, 48), expected.reshape(-1, 48)
    assert max(_rel(a, b) for a, b in zip(*rows, strict=True)) < 0.06
    assert fp8.linear(x.bfloat16(), fp8.quantize_weight(weight), None).dtype == torch.bfloat16
    # A plain weight: torch's own linear.
    torch.testing.assert_close(fp8.linear(x, weight, bias), expected)


def test_where_fp8_cannot_run_is_named() -> None:
    assert fp8.unsupported_reason(torch.device("cpu"), torch.float32, []) is None
    reason = fp8.unsupported_reason(torch.device("meta"), torch.bfloat16, [])
    assert reason is not None
    assert "meta" in reason


@pytest.fixture
def fresh_v1(model_store: Store) -> LoadedModel:
    """A model of its own: quantizing releases its modules' projection weights."""
    return load_version(model_store.root, MODEL, model_store.v1)


@torch.no_grad()
def _tamed(bundle: LoadedModel) -> LoadedModel:
    """The tiny model's projections rescaled to a trained model's gain (std 1/sqrt(fan-in)): its
    own weights (std 0.5 at width 64) make every layer amplify, attention one-hot, and any
    perturbation (FP8's, or float rounding's) chaotic."""
    for layer in bundle.model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            linear.weight.mul_(1 / (linear.weight.std() * linear.weight.shape[1] ** 0.5))
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            linear.weight.mul_(1 / (linear.weight.std() * linear.weight.shape[1] ** 0.5))
    return bundle


def _decoder(
    bundle: LoadedModel, quantization: str, compile_layers: bool = False
) -> staticdecode.StaticDecoder:
    return staticdecode.StaticDecoder(
        bundle.model,
        slots=4,
        max_length=bundle.max_context,
        device=bundle.device,
        dtype=bundle.dtype,
        cuda_graphs=False,
        compile_layers=compile_layers,
        quantization=quantization,
    )


@pytest.mark.parametrize("compile_layers", [False, True], ids=["eager", "compiled"])
@torch.inference_mode()
def test_fp8_decoding_follows_the_full_precision_path(
    model_store: Store, compile_layers: bool
) -> None:
    """Teacher-forced on the full-precision path's greedy tokens, the FP8 path's logits stay
    close (prefill and decode steps) and mostly pick the same token; the projections' weights
    take about a quarter of float32's bytes, and the model's own copies are released."""
    v1 = _tamed(load_version(model_store.root, MODEL, model_store.v1))
    fresh_v1 = _tamed(load_version(model_store.root, MODEL, model_store.v1))
    reference = _decoder(v1, "none")
    quantized = _decoder(fresh_v1, "fp8", compile_layers)
    assert all(isinstance(w.qkv, fp8.Fp8Weight) for w in quantized.layer_weights)
    assert all(p.is_meta for p in fresh_v1.model.model.layers[0].mlp.parameters())
    assert quantized.weight_bytes < reference.weight_bytes
    ids = torch.tensor([v1.encode(PROMPTS[0], add_special_tokens=True)] * 2)
    lengths = torch.tensor([ids.shape[1]] * 2)
    ours, theirs = quantized.prefill(ids, lengths, 0), reference.prefill(ids, lengths, 0)
    errors, agree = [], 0
    for step in range(8):
        errors.append(_rel(ours, theirs))
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        chosen = theirs.argmax(-1)
        for decoder in (quantized, reference):
            if step == 0:
                decoder.admit(0, chosen, lengths)
            else:
                decoder.advance(2, chosen)
        position = ids.shape[1] + step
        ours, theirs = quantized.decode(2, position), reference.decode(2, position)
    assert max(errors) < 0.15, errors
    assert agree >= 14, agree  # of 16


def test_the_engine_serves_fp8_weights_on_the_cpu(fresh_v1: LoadedModel) -> None:
    """``auto`` with FP8 is the static path (eager) on the CPU; generation runs end to end."""
    engine = Engine(max_batch_size=2, quantization="fp8")
    engine.start()
    try:
        engine.swap(fresh_v1).result(timeout=30)
        assert isinstance(engine._batch, StaticBatch)
        assert engine.decode_path == "static"
        assert engine.weight_bytes == engine._batch.decoder.weight_bytes
        _, sink = submit(engine, fresh_v1, PROMPTS[1], GREEDY)
        finished = sink.wait()
        assert isinstance(finished, Finished)
        assert finished.completion_tokens == GREEDY.max_tokens
    finally:
        engine.stop()


def test_fp8_never_falls_back_to_other_weights(
    fresh_v1: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where FP8 cannot run the model does not go live on full-precision weights (twice the
    memory the operator planned for): the swap fails, naming why."""
    monkeypatch.setattr(fp8, "unsupported_reason", lambda *args: "no FP8 tensor cores here")
    engine = Engine(max_batch_size=2, quantization="fp8")
    engine.start()
    try:
        with pytest.raises(LoadError, match="quantization fp8: no FP8 tensor cores here"):
            engine.swap(fresh_v1).result(timeout=30)
    finally:
        engine.stop()
    with pytest.raises(ValueError, match="static decode path"):
        Engine(decode_mode="dynamic", quantization="fp8")
    with pytest.raises(ValueError, match="quantization must be one of"):
        Engine(quantization="int4")


def test_settings_name_what_fp8_needs(tmp_path: Path) -> None:
    base = {"store": tmp_path, "model": MODEL, "version": "a" * 64}
    assert ServeSettings(**base, quantization="fp8").quantization == "fp8"
    with pytest.raises(ValidationError, match="static decode path"):
        ServeSettings(**base, quantization="fp8", decode_mode="dynamic")
    with pytest.raises(ValidationError, match="needs dtype bfloat16"):
        ServeSettings(**base, quantization="fp8", device="cuda", dtype="float16")
    with pytest.raises(ValidationError, match="quantization"):
        ServeSettings(**base, quantization="int8")
