"""``metalserve bench decode-check``: the static/CUDA-graph decode path (``staticdecode``) on
``bench serve``'s model, three checks:

* ``verify``: correctness against transformers. In float32, greedy tokens of our path equal
  ``generate()``'s (8 prompts x 24 tokens), teacher-forced and free-running; in bfloat16, the
  relative logits error of our path against a transformers forward, teacher-forced on
  transformers' own greedy tokens, next to transformers' own batch-1 against batch-8 spread.
* ``prof``: timings. One decode step as a graph replay at batch 8, 32 and 64 (attention bucket
  256) and eager, with and without the host sync; prefill; allocation and graph capture
  (CUDA events, median of 50 after 5 warm-ups; on CPU one eager run each).
* ``fp8``: FP8 weights (``--quantization fp8``) against bfloat16 on the same prompts, as the
  server runs both (graphs, fused layer kernels): teacher-forced on bfloat16's greedy tokens, top-1
  agreement, KL divergence and the log-probability of bfloat16's token; free-running greedy
  agreement. Beside it the same figures for float32 against bfloat16: the distance bfloat16's
  own rounding makes, the scale to read FP8's against.

The model is ``bench serve``'s (same ``--dir``, ``--preset``, ``--seed``): reused, or made there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from metalserve import layer_kernels, staticdecode
from metalserve.bench import common, serve
from metalserve.bench.options import BenchServeSettings, DecodeCheckSettings
from metalserve.loader import LoadedModel, load_version

ROWS, STEPS, PROMPT = 8, 24, 64  # verify: prompts, new tokens, prompt length
PROF_SLOTS = 64
PROF_POSITION = 191  # the bench's last steps: 64-token prompts + 128 new tokens
TIMED_REPEATS = 50
WARM_UPS = 5


def run(settings: DecodeCheckSettings) -> dict[str, Any]:
    """Prepare (or reuse) the model, run the chosen checks, return the report."""
    environment = common.environment(settings.device)
    serve_settings = BenchServeSettings(
        dir=settings.dir, preset=settings.preset, seed=settings.seed, device=settings.device
    )
    model_info = serve.prepare_model(serve_settings)
    _log(f"model {model_info['version_id'][:12]} ({model_info['parameters'] / 1e6:.1f}M)")
    store_root = settings.dir / "store"
    version_id = str(model_info["version_id"])
    report: dict[str, Any] = {
        "benchmark": "decode-check",
        "environment": environment,
        "options": {
            "dir": str(settings.dir),
            "preset": settings.preset,
            "seed": settings.seed,
            "device": settings.device,
            "checks": list(settings.checks),
        },
        "model": model_info,
    }
    if "verify" in settings.checks:
        report["verify"] = {
            "method": f"{ROWS} random {PROMPT}-token prompts, {STEPS} steps. Teacher-forced: "
            "transformers' own greedy tokens fed to our path; relative L2 error of our logits "
            "vs a transformers forward over the whole sequence (batch 8), next to "
            "transformers' own batch-1 vs batch-8 error. Free-run: our greedy tokens vs "
            "transformers generate().",
            "result": verify(store_root, version_id, settings.device),
        }
    if "fp8" in settings.checks:
        report["fp8"] = {
            "method": f"{ROWS} random {PROMPT}-token prompts, {STEPS} steps, each variant fed "
            "bfloat16's greedy tokens (teacher-forced); kl_mean: mean KL(bfloat16 || variant) of "
            "the next-token distributions; logprob_abs_diff_mean/max: |log p| differences of the "
            "token bfloat16 chose; free_run: each variant's own greedy tokens vs bfloat16's",
            "result": fp8_check(store_root, version_id, settings.device),
        }
    if "prof" in settings.checks:
        report["prof"] = {
            "method": f"CUDA events, median of {TIMED_REPEATS} after {WARM_UPS} warm-ups "
            "(CPU: one run); step_ms_* = one decode step at batch B, attention length bucket "
            "L; host_step_ms = replay + argmax + host copy and sync, wall clock; prefill eager",
            "result": prof(store_root, version_id, settings.device),
        }
    return report


def _load(store_root: Path, version_id: str, device: str, dtype: str = "auto") -> LoadedModel:
    return load_version(store_root, serve.MODEL, version_id, device=device, dtype=dtype)


def _decoder(
    bundle: LoadedModel, slots: int, quantization: str = "none"
) -> staticdecode.StaticDecoder:
    """The server's static decoder of ``slots`` slots; the checks run batches of up to that
    many, so a device whose memory holds fewer sequences of the model's context is refused."""
    decoder = staticdecode.StaticDecoder(
        bundle.model,
        slots=slots,
        max_length=bundle.max_context,
        device=bundle.device,
        dtype=bundle.dtype,
        cuda_graphs=bundle.device.type == "cuda",
        # The server's default there: fused kernels, compiled without Triton.
        compile_layers=bundle.device.type == "cuda" and not layer_kernels.triton_available(),
        quantization=quantization,
    )
    if decoder.slots < slots:
        raise staticdecode.StaticDecodeUnavailable(
            f"the device's memory holds {decoder.slots} sequences of {bundle.max_context} "
            f"tokens, not the {slots} this check runs"
        )
    return decoder


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _equal_prefix(ours: list[int], reference: list[int]) -> int:
    """How many leading tokens agree."""
    return next(
        (i for i, (a, b) in enumerate(zip(ours, reference, strict=True)) if a != b), len(ours)
    )


# --- verify ---------------------------------------------------------------------------------


def verify(store_root: Path, version_id: str, device: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        bundle = _load(store_root, version_id, device, dtype)
        with torch.inference_mode():
            out[dtype] = _verify_one(bundle)
        del bundle
        _free(device)
        _log(f"verify {dtype}: {out[dtype]}")
    return out


def _verify_one(bundle: LoadedModel) -> dict[str, Any]:
    model: Any = bundle.model
    dev = bundle.device
    dec = _decoder(bundle, ROWS)
    dec.capture_all()
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(4, bundle.vocab_size, (ROWS, PROMPT), generator=g)
    ref: torch.Tensor = model.generate(
        input_ids=prompts.to(dev),
        attention_mask=torch.ones_like(prompts).to(dev),
        max_new_tokens=STEPS,
        min_new_tokens=STEPS,
        do_sample=False,
        pad_token_id=bundle.pad_token_id,
    )
    ref_new = ref[:, PROMPT:]
    lengths = torch.full((ROWS,), PROMPT)
    logits = dec.prefill(prompts, lengths, 0)
    ours_vs_hf: list[float] = []
    hf_b1_vs_b8: list[float] = []
    top1_agree = 0
    for step in range(STEPS):
        seq = ref[:, : PROMPT + step]
        hf = model(input_ids=seq).logits[:, -1]
        hf1 = model(input_ids=seq[:1]).logits[:, -1]
        ours_vs_hf.append(round(_rel(logits, hf), 5))
        hf_b1_vs_b8.append(round(_rel(hf1[0], hf[0]), 5))
        top1_agree += int((logits.argmax(-1) == hf.argmax(-1)).sum())
        forced = ref_new[:, step]  # teacher forcing: feed transformers' token
        if step == 0:
            dec.admit(0, forced, lengths)
        else:
            dec.advance(ROWS, forced)
        logits = dec.decode(ROWS, PROMPT + step)
    # free-running greedy generation on our path vs transformers generate
    ours = torch.tensor(_greedy(dec, prompts))
    reference = ref_new.cpu()
    return {
        "top1_agree": top1_agree,
        "top1_total": ROWS * STEPS,
        "our_vs_hf_rel_max": max(ours_vs_hf),
        "hf_b1_vs_b8_rel_max": max(hf_b1_vs_b8),
        "free_run_tokens_equal": int((ours == reference).sum()),
        "free_run_tokens_total": ROWS * STEPS,
        "free_run_equal_prefix_per_row": [
            _equal_prefix(ours[r].tolist(), reference[r].tolist()) for r in range(ROWS)
        ],
    }


# --- fp8 ------------------------------------------------------------------------------------


def fp8_check(store_root: Path, version_id: str, device: str) -> dict[str, Any]:
    """FP8 and float32 against bfloat16 (see the module's docstring); bfloat16 runs first, its
    greedy tokens are what every variant is fed."""
    g = torch.Generator()
    variants = (
        ("bfloat16", "bfloat16", "none"),
        ("fp8", "bfloat16", "fp8"),
        ("float32", "float32", "none"),
    )
    forced: list[list[int]] | None = None
    runs: dict[str, dict[str, Any]] = {}
    for name, dtype, quantization in variants:
        bundle = _load(store_root, version_id, device, dtype)
        prompts = torch.randint(4, bundle.vocab_size, (ROWS, PROMPT), generator=g.manual_seed(5))
        with torch.inference_mode():
            dec = _decoder(bundle, ROWS, quantization)
            dec.capture_all()
            free_run = _greedy(dec, prompts)
            forced = forced or free_run  # bfloat16's, run first
            runs[name] = {
                "logprobs": _forced_logprobs(dec, prompts, forced),
                "free_run": free_run,
                "weight_bytes": dec.weight_bytes,
            }
        del dec, bundle
        _free(device)
    assert forced is not None
    base = runs["bfloat16"]
    out: dict[str, Any] = {"weight_bytes": {name: r["weight_bytes"] for name, r in runs.items()}}
    for name in ("fp8", "float32"):
        out[f"{name}_vs_bfloat16"] = _distance(runs[name], base, forced)
        _log(f"fp8 check, {name} vs bfloat16: {out[f'{name}_vs_bfloat16']}")
    return out


def _greedy(dec: staticdecode.StaticDecoder, prompts: torch.Tensor) -> list[list[int]]:
    """Each row's greedy tokens (``STEPS``) on ``dec``."""
    lengths = torch.full((ROWS,), PROMPT)
    chosen = dec.prefill(prompts, lengths, 0).argmax(-1)
    dec.admit(0, chosen, lengths)
    tokens = [chosen]
    for step in range(STEPS - 1):
        chosen = dec.decode(ROWS, PROMPT + step).argmax(-1)
        dec.advance(ROWS, chosen)
        tokens.append(chosen)
    rows: list[list[int]] = torch.stack(tokens, 1).tolist()
    return rows


def _forced_logprobs(
    dec: staticdecode.StaticDecoder, prompts: torch.Tensor, forced: list[list[int]]
) -> torch.Tensor:
    """Log-probabilities [ROWS, STEPS, vocab] (float32, host) of each step, fed ``forced``."""
    lengths = torch.full((ROWS,), PROMPT)
    tokens = torch.tensor(forced, device=dec.device)
    steps = [dec.prefill(prompts, lengths, 0).float().log_softmax(-1).cpu()]
    dec.admit(0, tokens[:, 0], lengths)
    for step in range(1, STEPS):
        steps.append(dec.decode(ROWS, PROMPT + step - 1).float().log_softmax(-1).cpu())
        dec.advance(ROWS, tokens[:, step])
    return torch.stack(steps, 1)


def _distance(run: dict[str, Any], base: dict[str, Any], forced: list[list[int]]) -> dict[str, Any]:
    ours, theirs = run["logprobs"], base["logprobs"]
    chosen = torch.tensor(forced).unsqueeze(-1)
    diff = (ours.gather(-1, chosen) - theirs.gather(-1, chosen)).abs()
    kl = (theirs.exp() * (theirs - ours)).sum(-1)
    total = ROWS * STEPS
    return {
        "top1_agree": int((ours.argmax(-1) == theirs.argmax(-1)).sum()),
        "top1_total": total,
        "kl_mean": round(float(kl.mean()), 6),
        "kl_max": round(float(kl.max()), 6),
        "logprob_abs_diff_mean": round(float(diff.mean()), 5),
        "logprob_abs_diff_max": round(float(diff.max()), 5),
        "free_run_tokens_equal": sum(
            a == b
            for ours_row, base_row in zip(run["free_run"], base["free_run"], strict=True)
            for a, b in zip(ours_row, base_row, strict=True)
        ),
        "free_run_tokens_total": total,
        "free_run_equal_prefix_per_row": [
            _equal_prefix(o, b) for o, b in zip(run["free_run"], base["free_run"], strict=True)
        ],
    }


# --- prof -----------------------------------------------------------------------------------


def timed_ms(fn: Callable[[], object], cuda: bool, repeats: int = TIMED_REPEATS) -> float:
    """Milliseconds of ``fn``: on CUDA the median (nearest-rank p50) of ``repeats`` event-timed
    runs after ``WARM_UPS`` untimed ones; on CPU one wall-clock run."""
    if not cuda:
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1000
    for _ in range(WARM_UPS):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return common.percentile(times, 50)


def prof(store_root: Path, version_id: str, device: str) -> dict[str, Any]:
    bundle = _load(store_root, version_id, device)
    out = _prof(bundle)
    del bundle
    _free(device)
    return out


def _prof(bundle: LoadedModel) -> dict[str, Any]:
    cuda = bundle.device.type == "cuda"
    out: dict[str, Any] = {}
    with torch.inference_mode():
        started = time.monotonic()
        dec = _decoder(bundle, PROF_SLOTS)
        out["alloc_s"] = round(time.monotonic() - started, 3)
        dec.capture_all()
        out["capture_all_s"] = round(dec.capture_seconds, 3)
        out["graphs"] = len(dec._graphs)
        if cuda:
            out["mem_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
            out["mem_reserved_gib"] = round(torch.cuda.memory_reserved() / 2**30, 2)
        out.update(_prof_greedy(bundle, dec))

        # timings at B=32, positions ~192 (bench's last steps), graph vs eager static
        position = PROF_POSITION
        dec.positions[:32] = position
        dec.tokens[:32] = 100
        out["step_ms_graph_b32_l256"] = round(timed_ms(lambda: dec.decode(32, position), cuda), 3)
        out["step_ms_graph_b64_l256"] = round(timed_ms(lambda: dec.decode(64, position), cuda), 3)
        out["step_ms_graph_b8_l256"] = round(timed_ms(lambda: dec.decode(8, position), cuda), 3)
        out["step_ms_eager_b32_l192"] = round(
            timed_ms(lambda: dec._decode(32, position + 1), cuda), 3
        )

        if cuda:
            out["kernels_eager_b32_l192"] = kernel_times(lambda: dec._decode(32, position + 1))
            out["kernels_graph_b32_l256"] = graph_kernels(lambda: dec.decode(32, position))

        def full_step() -> list[int]:
            chosen = dec.decode(32, position).argmax(-1)
            dec.positions[:32] = position
            return dec.to_host(chosen)

        steps = 200 if cuda else 3
        started = time.perf_counter()
        for _ in range(steps):
            full_step()
        out["host_step_ms_graph_b32_incl_sync"] = round(
            (time.perf_counter() - started) / steps * 1000, 3
        )
        ids = torch.randint(4, bundle.vocab_size, (32, 64))
        out["prefill_ms_32x64"] = round(
            timed_ms(lambda: dec.prefill(ids, torch.full((32,), 64), 0), cuda, repeats=10), 3
        )
        out["prefill_ms_1x64"] = round(
            timed_ms(lambda: dec.prefill(ids[:1], torch.full((1,), 64), 0), cuda, repeats=10), 3
        )
        # The same prefills eagerly at their own shape (what a group no bucket holds runs).
        slots, ends = (
            torch.arange(32, device=bundle.device),
            torch.full((32,), 63, device=bundle.device),
        )
        on_device = ids.to(bundle.device)
        out["prefill_eager_ms_32x64"] = round(
            timed_ms(lambda: dec._prefill(on_device, slots, ends), cuda, repeats=10), 3
        )
        out["prefill_eager_ms_1x64"] = round(
            timed_ms(lambda: dec._prefill(on_device[:1], slots[:1], ends[:1]), cuda, repeats=10), 3
        )
    _log(f"prof: {out}")
    return out


def kernel_times(fn: Callable[[], object], steps: int = 5, top: int = 12) -> dict[str, Any]:
    """Where one call's device time goes: torch.profiler's CUDA kernels over ``steps`` calls
    (after a warm-up), in milliseconds per call: the total, GEMMs and attention (``_kind``), and
    the ``top`` kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = {}
    for event in prof.key_averages():
        micros = float(getattr(event, "device_time_total", 0.0) or 0.0)
        if micros > 0 and event.key:
            per_kernel[event.key] = per_kernel.get(event.key, 0.0) + micros / 1000 / steps

    def share(kind: str) -> float:
        return round(sum(ms for name, ms in per_kernel.items() if _kind(name) == kind), 3)

    ranked = sorted(per_kernel.items(), key=lambda item: -item[1])
    return {
        "total_ms": round(sum(per_kernel.values()), 3),
        "gemm_ms": share("gemm"),
        "attention_ms": share("attention"),
        "top": [[name[:120], round(ms, 3)] for name, ms in ranked[:top]],
    }


def _kind(name: str) -> str:
    """gemm, attention or other: by the kernel's name (Inductor's fused element-wise kernels,
    ``triton_poi_...``/``triton_red_...``, name the operators they replace)."""
    lowered = name.lower()
    if lowered.startswith(("triton_poi", "triton_red", "triton_per")):
        return "other"
    if any(word in lowered for word in ("gemm", "gemv", "cutlass", "nvjet", "matmul")):
        return "gemm"
    if any(word in lowered for word in ("flash", "sdpa", "attention", "fmha")):
        return "attention"
    return "other"


def graph_kernels(fn: Callable[[], object], steps: int = 5, top: int = 12) -> dict[str, Any]:
    """One call's kernels on the device's timeline (e.g. a CUDA-graph replay, whose kernels the
    profiler sees one by one), the median of ``steps`` calls: how many, their time by kind, and
    the idle time between the first kernel's start and the last one's end (what launching one
    kernel after another costs beyond the kernels' own time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    calls = []
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernels = [
            (event.name, event.time_range.start, event.time_range.end)
            for event in prof.events()
            if event.device_type == DeviceType.CUDA
            and event.time_range.end > event.time_range.start
        ]
        if kernels:
            calls.append(kernels)
    if not calls:
        return {"reason": "the profiler saw no kernels"}
    kernels = sorted(calls, key=lambda ks: max(e for _, _, e in ks) - min(s for _, s, _ in ks))[
        len(calls) // 2
    ]
    span = max(end for _, _, end in kernels) - min(start for _, start, _ in kernels)
    busy = sum(end - start for _, start, end in kernels)
    by_kind: dict[str, list[float]] = {}
    others: dict[str, list[float]] = {}
    for name, start, end in kernels:
        by_kind.setdefault(_kind(name), []).append(end - start)
        if _kind(name) == "other":
            others.setdefault(name, []).append(end - start)
    ranked = sorted(others.items(), key=lambda item: -sum(item[1]))
    return {
        "kernels": len(kernels),
        "span_ms": round(span / 1000, 3),
        "busy_ms": round(busy / 1000, 3),
        "idle_ms": round((span - busy) / 1000, 3),
        "by_kind": {
            kind: {"count": len(times), "ms": round(sum(times) / 1000, 3)}
            for kind, times in sorted(by_kind.items())
        },
        "top_other": [
            [name[:120], len(times), round(sum(times) / 1000, 3)] for name, times in ranked[:top]
        ],
    }


def _prof_greedy(bundle: LoadedModel, dec: staticdecode.StaticDecoder) -> dict[str, Any]:
    """Greedy tokens of our path against ``generate()`` in the served dtype (8 x 24), and the
    prefill logits' largest difference from a transformers forward."""
    model: Any = bundle.model
    dev = bundle.device
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(4, bundle.vocab_size, (ROWS, PROMPT), generator=g)
    ref: list[list[int]] = model.generate(
        input_ids=prompts.to(dev),
        attention_mask=torch.ones_like(prompts).to(dev),
        max_new_tokens=STEPS,
        min_new_tokens=STEPS,
        do_sample=False,
        pad_token_id=bundle.pad_token_id,
    )[:, PROMPT:].tolist()
    lengths = torch.full((ROWS,), PROMPT)
    logits = dec.prefill(prompts, lengths, 0)
    hf_logits = model(input_ids=prompts.to(dev)).logits[:, -1]
    maxdiff = float((logits.float() - hf_logits.float()).abs().max())
    ours = _greedy(dec, prompts)
    return {
        "prefill_logit_maxdiff": maxdiff,
        "greedy_tokens_equal_prefix_per_row": [
            _equal_prefix(o, r) for o, r in zip(ours, ref, strict=True)
        ],
    }


def _free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _log(message: str) -> None:
    common.log("bench decode-check", message)
