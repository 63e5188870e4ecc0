"""``metalserve bench serve``: our server against plain transformers generation, in one run.

A Llama-shaped model with seeded random bf16 weights (preset ``850m``: hidden 2048, 16 layers,
32 heads, 8 KV heads, vocab 32000, ~850M parameters; ``tiny`` for tests) and a word-level
tokenizer with one word per id are generated once and published into a store under ``--dir``
(reused while the parameters match). Prompts are random token ids. Every request asks for
exactly ``--new-tokens`` tokens, greedy unless ``--temperature`` (and ``--top-p``) ask to sample
(transformers: ``min_new_tokens = max_new_tokens``; our server: ``ignore_eos``), so every arm
does the same work:

* ``naive``: ``model.generate`` one request at a time;
* ``static``: ``model.generate`` on static batches of ``--clients`` requests;
* ``server``: ``metalserve serve`` as a subprocess on a free loopback port, ``--clients``
  concurrent streaming HTTP clients (``metalserve.bench.sse``) over ``/v1/completions``.

Each arm gets an untimed warm-up first. Tokens/s is generated tokens over the arm's wall time;
TTFT is the time to the first generated token (transformers: the streamer's first token; HTTP:
the first streamed text); latency is the whole request. p50/p99 are nearest-rank
(``common.percentile``). With ``--reload`` a second version of the same shape (weights seeded
``seed + RELOAD_SEED_OFFSET``) is published beside the first, and each server arm hot-reloads it
after its timed run: ``/admin/reload``'s load, verification, decode path and warm-up, timed.

The model generator (:func:`write_model`) and the server subprocess (:class:`ServerProcess`) are
also what the reload check uses.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import torch

import metalserve
from metalserve import store
from metalserve.bench import clients, common
from metalserve.bench.common import LLAMA_PRESETS, percentile
from metalserve.bench.options import BenchServeSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from metalserve.loader import LoadedModel

MODEL = "bench-serve"
MODEL_FORMAT = 1  # bump when the generated model or tokenizer changes
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
SERVER_READY_TIMEOUT = 600.0
# Longest wait after ready for the graphs deferred to the engine's idle moments.
DEFERRED_GRAPHS_TIMEOUT = 60.0
RELOAD_SEED_OFFSET = 1000  # --reload's second version: the same shape, other weights
# --profile-passes: the profile ends after this long even when fewer passes ran.
PROFILE_MAX_SECONDS = 60.0
# ...and its requests' new tokens: with the timed run's 128, a profile of 200 passes held two
# prefills (H200, 2026-12-05; with Python's calls traced a pass took 29 ms to 4 s, not 1-20).
PROFILE_NEW_TOKENS = 2
ADMIN_TOKEN = "bench-serve-admin-token-0123456789"  # noqa: S105 - a server of its own on loopback


class BenchError(Exception):
    """An arm could not run as specified (server failed, wrong token count, ...)."""


@dataclass
class ArmResult(clients.Samples):
    """An arm's samples (the HTTP clients' or the generate() loop's) and what else it reports."""

    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "ttft_p50_s": round(percentile(self.ttft, 50), 4),
            "ttft_p99_s": round(percentile(self.ttft, 99), 4),
            "latency_p50_s": round(percentile(self.latency, 50), 4),
            "latency_p99_s": round(percentile(self.latency, 99), 4),
            "ttft_s": [round(t, 4) for t in self.ttft],
            "latency_s": [round(t, 4) for t in self.latency],
            **self.extra,
        }


def run(options: BenchServeSettings) -> dict[str, Any]:
    """Prepare the model, run every chosen arm, return the report."""
    environment = common.environment(options.device)
    # Measured before any model is on the device: the ceiling the decode steps are compared with.
    bandwidth = common.device_copy_bandwidth(options.device)
    model_info = prepare_model(options)
    _log(
        f"model {model_info['version_id'][:12]} ({model_info['parameters'] / 1e6:.1f}M "
        f"parameters), {'reused' if model_info['reused'] else 'generated'} in "
        f"{model_info['prepare_seconds']:.1f}s"
    )
    store_root = options.dir / "store"
    version_id = str(model_info["version_id"])
    reload_id = None
    if options.reload:
        second = prepare_model(options, beside=version_id)
        reload_id = model_info["reload_version_id"] = str(second["version_id"])
        _log(
            f"reload version {reload_id[:12]} "
            f"{'reused' if second['reused'] else 'generated'} in {second['prepare_seconds']:.1f}s"
        )
    prompts = make_prompts(options, int(LLAMA_PRESETS[options.preset]["vocab_size"]))
    arms: dict[str, ArmResult] = {}
    if "naive" in options.arms or "static" in options.arms:
        from metalserve.loader import load_version

        bundle = load_version(store_root, MODEL, version_id, device=options.device)
        try:
            if "naive" in options.arms:
                arms["naive"] = _generate_arm(bundle, prompts, options, batch=1, arm="naive")
            if "static" in options.arms:
                arms["static"] = _generate_arm(
                    bundle, prompts, options, batch=options.clients, arm="static"
                )
        finally:
            del bundle
            _free_device_memory(options.device)
    for arm, flags in SERVER_ARM_FLAGS.items():
        if arm in options.arms:
            arms[arm] = _server_arm(store_root, version_id, prompts, options, flags, reload_id)
    return _report(options, environment, model_info, arms, bandwidth)


# --- the model --------------------------------------------------------------------------------


def build_tokenizer(vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with one word (``w<id>``) per id: every id the model can produce
    decodes to visible text, so the server streams one chunk per token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def prepare_model(options: BenchServeSettings, *, beside: str | None = None) -> dict[str, Any]:
    """Reuse the published bench model under ``options.dir`` if it was made with the same
    parameters, else generate it (on the GPU when the bench runs there: seconds, not minutes)
    and publish it. Returns what the report says about the model. ``beside``: the first
    version's id, and this is ``--reload``'s second version (made after the first; a new first
    version replaces both)."""
    second = beside is not None
    started = time.monotonic()
    base = options.dir
    base.mkdir(parents=True, exist_ok=True)
    store_root = base / "store"
    marker = base / ("model-reload.json" if second else "model.json")
    init_device = "cuda" if options.device.startswith("cuda") else "cpu"
    seed = options.seed + (RELOAD_SEED_OFFSET if second else 0)
    params = {
        "format": MODEL_FORMAT,
        "preset": options.preset,
        "config": LLAMA_PRESETS[options.preset],
        "seed": seed,
        "init_device": init_device,  # CPU and CUDA random streams differ
    }
    old: Any = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, store.StoreError):
        old = json.loads(marker.read_text())
        if old["params"] == params:
            store.read_manifest(store_root, MODEL, str(old["version_id"]))
            return _model_info(old, reused=True, started=started)

    marker.unlink(missing_ok=True)
    if second:
        # Only the second version is replaced (a 16 GB one at 8B), and only a version the store
        # lists that is not the first: a marker's id is never trusted as a path.
        stale = old.get("version_id") if isinstance(old, dict) else None
        if stale != beside and stale in store.list_versions(store_root, MODEL):
            store.remove_tree(store.version_dir(store_root, MODEL, stale))
    else:
        (base / "model-reload.json").unlink(missing_ok=True)
        shutil.rmtree(store.model_dir(store_root, MODEL), ignore_errors=True)
    src = base / "src"
    shutil.rmtree(src, ignore_errors=True)
    try:
        parameters = write_model(src, LLAMA_PRESETS[options.preset], seed, init_device)
        version_id = store.publish(src, store_root, MODEL)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    doc = {"params": params, "version_id": version_id, "parameters": parameters}
    marker.write_text(json.dumps(doc, indent=2) + "\n")
    return _model_info(doc, reused=False, started=started)


def _model_info(doc: dict[str, Any], *, reused: bool, started: float) -> dict[str, Any]:
    return {
        "preset": doc["params"]["preset"],
        "config": doc["params"]["config"],
        "parameters": int(doc["parameters"]),
        "checkpoint_dtype": "bfloat16",
        "version_id": str(doc["version_id"]),
        "reused": reused,
        "prepare_seconds": round(time.monotonic() - started, 2),
    }


def write_model(src: Path, preset: dict[str, Any], seed: int, init_device: str) -> int:
    """Write a Llama model of shape ``preset`` with weights seeded by ``seed`` (made on
    ``init_device``: CPU and CUDA random streams differ) and the word-level tokenizer into
    ``src`` (HF layout); returns its parameter count."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    tokenizer = build_tokenizer(preset["vocab_size"], preset["max_position_embeddings"])
    config = LlamaConfig(
        **preset,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    device = torch.device(init_device)
    rng_devices = [device.index or torch.cuda.current_device()] if device.type == "cuda" else []
    # fork_rng: seeding for reproducible weights must not disturb the caller's RNG.
    with torch.random.fork_rng(devices=rng_devices), device:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    del model
    _free_device_memory(init_device)
    return int(parameters)


def make_prompts(options: BenchServeSettings, vocab_size: int) -> torch.Tensor:
    """Seeded random prompts of ordinary (non-special) token ids, one row per request, each
    after the same ``shared_prefix_tokens``."""
    count = max(options.requests_for(arm) for arm in common.SERVE_ARMS)
    generator = torch.Generator().manual_seed(options.seed + 1)
    own = torch.randint(
        len(SPECIAL_TOKENS), vocab_size, (count, options.prompt_tokens), generator=generator
    )
    shared = torch.randint(
        len(SPECIAL_TOKENS), vocab_size, (1, options.shared_prefix_tokens), generator=generator
    )
    return torch.cat([shared.expand(count, -1), own], dim=1)


def _free_device_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --- transformers arms ------------------------------------------------------------------------


def _generate_arm(
    bundle: LoadedModel, prompts: torch.Tensor, options: BenchServeSettings, *, batch: int, arm: str
) -> ArmResult:
    """``model.generate`` on batches of ``batch`` requests, one batch after another."""
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenTimer(BaseStreamer):
        """generate() hands the prompt over first, then the new tokens of every step."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    # Any: mypy takes nn.Module attribute access for tensors, and generate() for one of them.
    model: Any = bundle.model
    device = bundle.device
    new_tokens = options.new_tokens
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p}
        if options.temperature > 0
        else {"do_sample": False}
    )

    def generate(ids: torch.Tensor, tokens: int, streamer: BaseStreamer | None) -> torch.Tensor:
        ids = ids.to(device)
        with torch.inference_mode():
            output: torch.Tensor = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,  # no early EOS: every arm generates the same tokens
                **sampling,
                pad_token_id=bundle.pad_token_id,
                eos_token_id=sorted(bundle.eos_token_ids),
                streamer=streamer,
            )
        return output

    # Untimed warm-up over the full length: attention backends plan per sequence length (cuDNN's
    # SDPA re-plans for every new one), so a shorter warm-up leaves that cost in the first batch.
    generate(prompts[:batch], new_tokens, None)
    _sync(device)
    result = ArmResult()
    total = options.requests_for(arm)
    started = time.perf_counter()
    for first in range(0, total, batch):
        rows = [(first + i) % len(prompts) for i in range(min(batch, total - first))]
        timer = FirstTokenTimer()
        sent = time.perf_counter()
        output = generate(prompts[rows], new_tokens, timer)
        _sync(device)
        done = time.perf_counter()
        generated = output.shape[1] - options.prompt_length
        if generated != new_tokens or len(timer.times) < 2:
            raise BenchError(f"{arm}: generate() made {generated} tokens, not {new_tokens}")
        result.requests += len(rows)
        result.tokens += generated * len(rows)
        result.ttft += [timer.times[1] - sent] * len(rows)
        result.latency += [done - sent] * len(rows)
        _log(f"{arm}: {result.requests}/{total} requests, {done - sent:.2f}s for this batch")
    result.seconds = time.perf_counter() - started
    result.extra["batch_size"] = batch
    result.extra["dtype"] = str(bundle.dtype).removeprefix("torch.")
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the server arm ---------------------------------------------------------------------------


# The server arms: the server's flags beyond the bench's own and ``--server-args``.
SERVER_ARM_FLAGS: dict[str, tuple[str, ...]] = {
    "server": ("--no-engine-process",),
    "server-fp8": ("--no-engine-process", "--quantization", "fp8"),
    "server-process": ("--engine-process",),
}


def _server_arm(
    store_root: Path,
    version_id: str,
    prompts: torch.Tensor,
    options: BenchServeSettings,
    flags: tuple[str, ...] = (),
    reload_id: str | None = None,
) -> ArmResult:
    admin: tuple[str, ...] = ()
    if reload_id is not None or options.profile_passes:
        token_file = options.dir / "admin.token"
        token_file.write_text(ADMIN_TOKEN + "\n")
        admin = ("--admin-token-file", str(token_file))
    if options.profile_passes:
        admin += ("--profile-dir", str(options.dir / "profiles"))
    server = ServerProcess.start(
        store_root,
        MODEL,
        version_id,
        device=options.device,
        log_path=options.dir / "server.log",
        extra_args=(
            "--max-new-tokens",
            str(max(options.new_tokens, 16)),
            "--no-access-log",
            "--log-level",
            "warning",
            *flags,
            *admin,
            # Otherwise the server's defaults (batch limit, decode path): those are measured.
            *options.server_args,
        ),
    )
    url = server.url
    try:
        ready_seconds = server.wait_ready(SERVER_READY_TIMEOUT)
        served = httpx.get(f"{url}/version", timeout=10.0).json()
        _log(f"server ready in {ready_seconds:.1f}s")
        graphs_wait = _wait_for_deferred_graphs(url, DEFERRED_GRAPHS_TIMEOUT)
        token_ids = [[int(t) for t in row] for row in prompts.tolist()]
        processes = min(options.client_processes, options.clients)  # at least one client each

        def drive(
            warmed_up: Callable[[], object], new_tokens: int = options.new_tokens
        ) -> clients.Samples:
            try:
                return clients.drive(
                    url,
                    MODEL,
                    token_ids,
                    options.requests_for("server"),
                    options.clients,
                    new_tokens,
                    processes,
                    warmed_up=warmed_up,
                    sampling={"temperature": options.temperature, "top_p": options.top_p},
                )
            except clients.ClientError as exc:
                raise BenchError(str(exc)) from None

        before: dict[str, float] = {}
        cpu_before: dict[str, float] = {}

        def warmed_up() -> None:
            before.update(_scrape(url))
            cpu_before.update(server_cpu_seconds(server.proc.pid))

        # One full-length untimed request per client first, as the generate() arms do; the
        # server's counters are read after it.
        samples = drive(warmed_up)
        after = _scrape(url)
        cpu = {
            name: seconds - cpu_before.get(name, 0.0)
            for name, seconds in server_cpu_seconds(server.proc.pid).items()
        }
        profiled = _profile_run(url, drive, options.profile_passes)
        reloaded = _time_reload(server, reload_id) if reload_id is not None else {}
    finally:
        exit_code = server.stop()
    if exit_code not in (0, None):
        raise BenchError(f"the server exited with {exit_code}:\n{server.tail()}")
    passes = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    decode_passes = passes.get("decode_passes", 0.0)
    result = ArmResult(**vars(samples))
    result.extra.update(
        {
            "clients": options.clients,
            "client_processes": processes,
            # The server's own view (request received to first token queued for sending,
            # waiting for a batch slot, and request in to first body byte out), against the
            # clients' mean: first byte minus TTFT is the server's HTTP side, the rest the
            # clients' and the loopback's.
            "ttft_mean_s": round(sum(samples.ttft) / len(samples.ttft), 4),
            # The clients' mean time to the response's head (sent once the request is with the
            # engine): the request's way in; TTFT minus it, its first token's way out.
            "response_head_mean_s": round(sum(samples.head) / len(samples.head), 4),
            # Each client process's CPU time over the timed run's wall time: near 1, the
            # clients' own work is in their TTFT (the bench, not the server, is the limit).
            "client_cpu_busy": [round(c / samples.seconds, 3) for c in samples.cpu_seconds],
            # Below 1: streams' queued tokens were merged into one event (the loop fell behind).
            "text_events_per_token": round(samples.text_events / max(samples.tokens, 1), 4),
            # The server's processes' CPU time per streamed token over the timed run: "api" the
            # replica's process (with the engine thread, unless the engine has its own process:
            # then "engine" too; with its other API processes, theirs added). The API's share
            # is what its interpreter locks serve.
            "server_cpu_us_per_token": {
                name: round(seconds / max(samples.tokens, 1) * 1e6, 2)
                for name, seconds in cpu.items()
            },
            "server_ttft_mean_s": _mean(passes, "ttft"),
            "server_queue_time_mean_s": _mean(passes, "queue"),
            "server_first_byte_mean_s": _mean(passes, "first_byte"),
            # Of the first byte's time (and every request's): from its arrival to the event loop
            # beginning to handle it.
            "server_start_delay_mean_s": _mean(passes, "start_delay"),
            # How late the server's event loop ran its 0.1 s tick: its backlog of streams'
            # events and requests (the p99 as the bucket bound it falls under).
            "server_event_loop_lag_mean_s": _mean(passes, "loop_lag"),
            "server_event_loop_lag_p99_at_most_s": _bucket_quantile(passes, "loop_lag", 0.99),
            # Garbage collections during the timed run (each stops the engine thread too).
            "server_gc_pauses": {
                f"generation_{g}": {
                    "count": int(passes.get(f"gc{g}_count", 0)),
                    "seconds": round(passes.get(f"gc{g}_sum", 0.0), 4),
                }
                for g in range(3)
            },
            "dtype": served.get("dtype"),
            "quantization": served.get("quantization"),
            "weight_bytes": served.get("weight_bytes"),
            "server_load_seconds": served.get("load_seconds"),
            "server_weights_seconds": served.get("weights_seconds"),
            "server_load_parts_seconds": served.get("load_parts_seconds"),
            "server_command": server.command[1:],
            "server_ready_seconds": round(ready_seconds, 2),
            # From ready until the graphs deferred to idle moments were captured (as HAProxy's
            # first passing checks give a replica in the lab): the first requests come after.
            "server_deferred_graphs_wait_seconds": round(graphs_wait, 2),
            **reloaded,
            **profiled,
            "server_startup_seconds": served.get("startup_seconds"),
            "engine_process": served.get("engine_process"),
            "decode_path": served.get("decode_path"),
            "decode_compiled": served.get("decode_compiled"),
            "decode_gemm": served.get("decode_gemm"),
            "max_batch_size": served.get("max_batch_size"),
            "forward_passes": {
                "prefill": passes.get("prefill_passes", 0.0),
                "decode": decode_passes,
            },
            "mean_decode_batch": (
                round(passes.get("decode_rows", 0.0) / decode_passes, 2) if decode_passes else None
            ),
            "mean_decode_step_s": (
                round(passes.get("decode_seconds", 0.0) / decode_passes, 6)
                if decode_passes
                else None
            ),
            # Prompt tokens the prefix cache saw and reused (None: none seen, no prefix cache).
            "prefix_cache_tokens": (
                {
                    "queried": passes["prefix_queried_tokens"],
                    "reused": passes.get("prefix_reused_tokens", 0.0),
                }
                if passes.get("prefix_queried_tokens")
                else None
            ),
            # Where a pass's time went: "host" (to its last launch; "host_cpu" of it on the
            # engine thread's CPU, the rest waiting for the GIL), "wait" (for its tokens),
            # "device" (CUDA: the forward on the device), "emit" (tokens to text and events).
            "pass_parts_mean_s": _pass_parts(passes),
            "mean_prefill_step_s": (
                round(passes.get("prefill_seconds", 0.0) / passes["prefill_passes"], 6)
                if passes.get("prefill_passes")
                else None
            ),
        }
    )
    return result


# --- the server subprocess ------------------------------------------------------------------


def _profile_run(
    url: str, drive: Callable[[Callable[[], object], int], clients.Samples], passes: int
) -> dict[str, Any]:
    """With ``passes``: the timed run's requests again, PROFILE_NEW_TOKENS tokens each (a
    prefill in every few passes: what TTFT waits for), repeated until the profile ends, the
    engine's first ``passes`` forward passes after the clients' warm-up recorded
    (``/admin/profile``); the profile's summary."""
    if not passes:
        return {}
    answer: dict[str, Any] = {}

    def record() -> None:
        try:
            response = httpx.post(
                f"{url}/admin/profile",
                # Python's calls too: the host's share is what the profile is for.
                json={"passes": passes, "max_seconds": PROFILE_MAX_SECONDS, "python": True},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                timeout=PROFILE_MAX_SECONDS + 180,
            )
            answer["status"], answer["body"] = response.status_code, response.text
        except httpx.HTTPError as exc:
            answer["status"], answer["body"] = None, str(exc)

    recorder = threading.Thread(target=record, name="bench-profile", daemon=True)
    samples = drive(recorder.start, PROFILE_NEW_TOKENS)  # the profile begins with them
    # On a busy host the requests can all be answered before the profile's request arrives:
    # the same requests again until it has its passes (it ends itself at PROFILE_MAX_SECONDS).
    while recorder.is_alive():
        drive(lambda: None, PROFILE_NEW_TOKENS)
    recorder.join()
    if answer.get("status") != 200:
        raise BenchError(f"the engine's profile failed: {answer or 'no answer'}")
    profile: dict[str, Any] = json.loads(answer["body"])
    tokens_per_s = round(samples.tokens / samples.seconds, 1) if samples.seconds else 0.0
    _log(
        f"engine profile: {profile['passes']} in {profile['seconds']:.2f}s "
        f"(the run's {tokens_per_s:.0f} tokens/s with the profiler on), "
        f"trace {profile['trace']}"
    )
    return {
        "engine_profile": {
            **profile,
            "new_tokens": PROFILE_NEW_TOKENS,
            "tokens_per_s_while_profiled": tokens_per_s,
        }
    }


def _time_reload(server: ServerProcess, version_id: str) -> dict[str, Any]:
    """Hot-reload ``version_id`` into the idle server after its timed run (``/admin/reload``
    answers once the version is loaded, verified, its decode path built and a warm-up passed,
    and swapped in) and check that it answers from it; the reload's times."""
    url = server.url
    try:
        started = time.monotonic()
        answer = httpx.post(
            f"{url}/admin/reload",
            json={"version": version_id},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=SERVER_READY_TIMEOUT,
        )
        seconds = time.monotonic() - started
        if answer.status_code != 200:
            raise BenchError(f"the hot reload failed: {answer.status_code} {answer.text}")
        served = httpx.get(f"{url}/version", timeout=10.0).json()
        if served.get("version_id") != version_id:
            raise BenchError(f"after the reload /version says {served.get('version_id')}")
        completion = httpx.post(
            f"{url}/v1/completions",
            json={"model": MODEL, "prompt": "w10 w11", "max_tokens": 4},
            timeout=60.0,
        )
        fingerprint = completion.json().get("system_fingerprint", "")
        if completion.status_code != 200 or not fingerprint.endswith(version_id[:12]):
            raise BenchError(
                f"a completion after the reload: {completion.status_code} {completion.text}"
            )
    except (httpx.HTTPError, ValueError) as exc:  # ValueError: an answer that is not JSON
        raise BenchError(f"the hot reload: {exc}\n{server.tail()}") from None
    _log(f"hot reload to {version_id[:12]} ready in {seconds:.1f}s")
    return {
        "reload_seconds": round(seconds, 3),
        "reload_load_seconds": served.get("load_seconds"),
        "reload_weights_seconds": served.get("weights_seconds"),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """``metalserve serve`` as a subprocess on a free loopback port, running this very code
    (installed or not), its output in ``log_path``."""

    command: list[str]
    url: str
    log_path: Path
    proc: subprocess.Popen[bytes]
    started: float

    @classmethod
    def start(
        cls,
        store_root: Path,
        model: str,
        version_id: str,
        *,
        device: str,
        log_path: Path,
        extra_args: Sequence[str] = (),
    ) -> ServerProcess:
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "metalserve",
            "serve",
            "--store",
            str(store_root),
            "--model",
            model,
            "--version",
            version_id,
            "--device",
            device,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *extra_args,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("METALSERVE_")}
        package_root = str(Path(metalserve.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env["HF_HUB_OFFLINE"] = "1"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        return cls(command, f"http://127.0.0.1:{port}", log_path, proc, time.monotonic())

    def wait_ready(self, timeout: float) -> float:
        """Seconds from the start until ``/readyz`` answered 200; BenchError if the server
        exited or was not ready within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise BenchError(
                        f"the server exited with {self.proc.returncode}:\n{self.tail()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return time.monotonic() - self.started
                time.sleep(0.2)
        raise BenchError(f"the server was not ready after {timeout:.0f}s")

    def stop(self) -> int | None:
        """SIGTERM (the server drains), then a kill after 60 s; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def server_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user and system) so far of the server process ``pid`` with its other API
    processes (``--api-processes``, its children running ``metalserve.api.workers``: "api")
    and of its engine process where it has one ("engine": its child running
    ``metalserve.core.process``)."""
    seconds = {"api": _cpu_seconds(pid)}
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else []:
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"metalserve.core.process" in command:
                seconds["engine"] = _cpu_seconds(int(child))
            elif b"metalserve.api.workers" in command:
                seconds["api"] += _cpu_seconds(int(child))
    return seconds


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _wait_for_deferred_graphs(url: str, timeout: float) -> float:
    """Seconds until the server's ``metalserve_deferred_graphs`` read 0 (at most ``timeout``:
    then the run goes on, and says so)."""
    started = time.monotonic()
    while True:
        left = _scrape(url).get("deferred_graphs", 0.0)
        waited = time.monotonic() - started
        if left == 0:
            return waited
        if waited > timeout:
            _log(f"{left:.0f} deferred graphs still not captured after {timeout:.0f}s; going on")
            return waited
        time.sleep(0.1)


def _scrape(url: str) -> dict[str, float]:
    """Forward passes, their seconds, decode batch rows, and the sums and counts of the TTFT,
    queue-time and GC-pause histograms so far, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10.0).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            phase = sample.labels.get("phase")
            if sample.name == "metalserve_forward_passes_total" and phase:
                values[f"{phase}_passes"] = sample.value
            elif sample.name == "metalserve_batch_size_sum" and phase == "decode":
                values["decode_rows"] = sample.value
            elif sample.name == "metalserve_forward_pass_duration_seconds_sum" and phase:
                values[f"{phase}_seconds"] = sample.value
            elif sample.name.startswith("metalserve_forward_pass_part_seconds_") and phase:
                kind = sample.name.rsplit("_", 1)[1]  # sum or count (buckets: not kept)
                if kind in ("sum", "count"):
                    values[f"part_{phase}_{sample.labels['part']}_{kind}"] = sample.value
            elif sample.name in _COUNTERS:
                values[_COUNTERS[sample.name]] = sample.value
            elif sample.name in _MEANS:
                key = _MEANS[sample.name]
                values[key] = values.get(key, 0.0) + sample.value
            elif sample.name == "metalserve_event_loop_lag_seconds_bucket":
                values[f"loop_lag_le_{sample.labels['le']}"] = sample.value
            elif sample.name.startswith("metalserve_gc_pause_seconds_") and not sample.labels.get(
                "le"
            ):
                kind = sample.name.rsplit("_", 1)[1]  # sum or count
                values[f"gc{sample.labels['generation']}_{kind}"] = sample.value
    return values


_COUNTERS = {
    "metalserve_prefix_cache_queries_total": "prefix_queried_tokens",
    "metalserve_prefix_cache_hits_total": "prefix_reused_tokens",
    "metalserve_deferred_graphs": "deferred_graphs",
}
# Histograms whose mean over the timed run the report shows (summed over their labels).
_MEANS = {
    "metalserve_time_to_first_token_seconds_sum": "ttft_sum",
    "metalserve_time_to_first_token_seconds_count": "ttft_count",
    "metalserve_request_queue_time_seconds_sum": "queue_sum",
    "metalserve_request_queue_time_seconds_count": "queue_count",
    "metalserve_time_to_first_byte_seconds_sum": "first_byte_sum",
    "metalserve_time_to_first_byte_seconds_count": "first_byte_count",
    "metalserve_request_start_delay_seconds_sum": "start_delay_sum",
    "metalserve_request_start_delay_seconds_count": "start_delay_count",
    "metalserve_event_loop_lag_seconds_sum": "loop_lag_sum",
    "metalserve_event_loop_lag_seconds_count": "loop_lag_count",
}


def _bucket_quantile(deltas: dict[str, float], name: str, q: float) -> float | None:
    """The smallest bucket bound of histogram ``name`` under which a ``q`` share of the run's
    samples fell (None: no samples, or above every finite bound)."""
    count = deltas.get(f"{name}_count", 0.0)
    if not count:
        return None
    prefix = f"{name}_le_"
    bounds = sorted(
        (float(key.removeprefix(prefix)), value)
        for key, value in deltas.items()
        if key.startswith(prefix)
    )
    for bound, cumulative in bounds:
        if cumulative >= q * count:
            return bound if bound != float("inf") else None
    return None


def _mean(deltas: dict[str, float], name: str, digits: int = 4) -> float | None:
    count = deltas.get(f"{name}_count", 0.0)
    return round(deltas.get(f"{name}_sum", 0.0) / count, digits) if count else None


def _pass_parts(deltas: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """The mean of each part of a forward pass over the timed run, by phase (the server's
    ``metalserve_forward_pass_part_seconds``: host, host_cpu, wait, device where CUDA, emit)."""
    parts: dict[str, dict[str, float | None]] = {}
    for key in sorted(deltas):
        if key.startswith("part_") and key.endswith("_count"):
            phase, part = key.removeprefix("part_").removesuffix("_count").split("_", 1)
            parts.setdefault(phase, {})[part] = _mean(deltas, f"part_{phase}_{part}", 6)
    return parts


# --- the report -------------------------------------------------------------------------------


def _report(
    options: BenchServeSettings,
    environment: dict[str, Any],
    model_info: dict[str, Any],
    arms: dict[str, ArmResult],
    bandwidth: float | None,
) -> dict[str, Any]:
    def rate(arm: str) -> float | None:
        return arms[arm].tokens_per_s if arm in arms else None

    server_vs_static = common.ratio(rate("server"), rate("static"))
    server = arms["server"].as_json() if "server" in arms else None
    roofline = decode_roofline(options, model_info, server, bandwidth)
    fp8 = arms["server-fp8"].as_json() if "server-fp8" in arms else None
    static_ttft = percentile(arms["static"].ttft, 50) if "static" in arms else None

    def ttft_p99(arm: str) -> float | None:
        return percentile(arms[arm].ttft, 99) if arm in arms else None

    ready = server.get("server_ready_seconds") if server else None
    # The weight-load time of item 4: the weights' stream, which the rest of the load runs
    # beside (a server without the figure: its whole load).
    load = (
        (server.get("server_weights_seconds") or server.get("server_load_seconds"))
        if server
        else None
    )
    return {
        "benchmark": "serve",
        "environment": environment,
        "options": {
            "dir": str(options.dir),
            "preset": options.preset,
            "prompt_tokens": options.prompt_tokens,
            "shared_prefix_tokens": options.shared_prefix_tokens,
            "new_tokens": options.new_tokens,
            "temperature": options.temperature,
            "top_p": options.top_p,
            "clients": options.clients,
            "requests": {arm: options.requests_for(arm) for arm in options.arms},
            "device": options.device,
            "arms": list(options.arms),
            "seed": options.seed,
            "reload": options.reload,
            "server_args": list(options.server_args),
        },
        "model": model_info,
        "arms": {name: result.as_json() for name, result in arms.items()},
        "ratios": {
            "server_vs_static": server_vs_static,
            "static_vs_naive": common.ratio(rate("static"), rate("naive")),
            "server_vs_naive": common.ratio(rate("server"), rate("naive")),
            "server_fp8_vs_server": common.ratio(rate("server-fp8"), rate("server")),
            "server_fp8_vs_server_weight_bytes": common.ratio(
                fp8.get("weight_bytes") if fp8 else None,
                server.get("weight_bytes") if server else None,
            ),
            # The engine in a process of its own against the engine thread beside HTTP.
            "server_process_vs_server": common.ratio(rate("server-process"), rate("server")),
            "server_process_ttft_p99_vs_server": common.ratio(
                ttft_p99("server-process"), ttft_p99("server")
            ),
        },
        "decode_roofline": roofline,
        **(
            {"decode_roofline_fp8": decode_roofline(options, model_info, fp8, bandwidth)}
            if fp8
            else {}
        ),
        "targets": {
            "server_vs_static_1x": common.target(server_vs_static, ">=", 1.0),
            "server_vs_static_2x": common.target(server_vs_static, ">=", 2.0),
            "decode_roofline_efficiency": common.target(roofline.get("efficiency"), ">=", 0.75),
            "server_ttft_p99_vs_static_ttft": common.target(
                common.ratio(server["ttft_p99_s"] if server else None, static_ttft), "<=", 2.0
            ),
            "server_process_ttft_p99_vs_static_ttft": common.target(
                common.ratio(ttft_p99("server-process"), static_ttft), "<=", 2.0
            ),
            "ready_vs_load_time_plus_2s": _ready_target(ready, load),
            # The same bound for a running replica that hot-reloads a new version.
            "reload_ready_vs_load_time_plus_2s": _ready_target(
                server.get("reload_seconds") if server else None,
                (server.get("reload_weights_seconds") or server.get("reload_load_seconds"))
                if server
                else None,
            ),
        },
    }


def _ready_target(ready: float | None, load: float | None) -> dict[str, Any]:
    """Item 4: ready within 1.5x the weight-load time plus 2 s."""
    return common.target(
        common.ratio(ready, 1.5 * load + 2.0 if load is not None else None), "<=", 1.0
    )


def decode_roofline(
    options: BenchServeSettings,
    model_info: dict[str, Any],
    server: dict[str, Any] | None,
    bandwidth: float | None,
) -> dict[str, Any]:
    """The server's mean decode step against the fewest bytes a step must read from device
    memory at the bandwidth measured in the same run: every weight but the input embedding's
    (only the batch's rows of it are read), and the keys and values of every row's context at
    its mean length (prompt + half the new tokens). Efficiency = that floor / the measured step."""
    if server is None or bandwidth is None or not server.get("mean_decode_step_s"):
        return {"bandwidth_gb_per_s": bandwidth, "reason": "needs the server arm on CUDA"}
    config = LLAMA_PRESETS[options.preset]
    hidden, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    head_dim = hidden // int(config["num_attention_heads"])
    element = 4 if server.get("dtype") == "float32" else 2
    # The weights as served (FP8 projections: a byte each), else the checkpoint's parameters.
    served = server.get("weight_bytes")
    weight_bytes = (
        int(served) - vocab * hidden * element
        if served
        else (int(model_info["parameters"]) - vocab * hidden) * element
    )
    kv_per_token = (
        int(config["num_hidden_layers"]) * 2 * int(config["num_key_value_heads"]) * head_dim
    ) * element
    rows = float(server["mean_decode_batch"])
    context = options.prompt_length + (options.new_tokens - 1) / 2
    kv_bytes = rows * context * kv_per_token
    floor_s = (weight_bytes + kv_bytes) / (bandwidth * common.GB)
    step_s = float(server["mean_decode_step_s"])
    return {
        "bandwidth_gb_per_s": bandwidth,
        "weight_bytes": weight_bytes,
        "kv_bytes_per_step": round(kv_bytes),
        "mean_decode_batch": rows,
        "roofline_step_s": round(floor_s, 6),
        "mean_decode_step_s": step_s,
        "efficiency": round(floor_s / step_s, 3),
    }


def render(report: dict[str, Any]) -> str:
    rows = [
        [
            "arm",
            "requests",
            "tokens",
            "seconds",
            "tokens/s",
            "TTFT p50",
            "TTFT p99",
            "latency p50",
            "latency p99",
            "vs static",
        ]
    ]
    static = report["arms"].get("static")
    for name, arm in report["arms"].items():
        rows.append(
            [
                name,
                str(arm["requests"]),
                str(arm["tokens"]),
                f"{arm['seconds']:.2f}",
                f"{arm['tokens_per_s']:.1f}",
                f"{arm['ttft_p50_s'] * 1000:.0f} ms",
                f"{arm['ttft_p99_s'] * 1000:.0f} ms",
                f"{arm['latency_p50_s']:.2f} s",
                f"{arm['latency_p99_s']:.2f} s",
                f"{arm['tokens_per_s'] / static['tokens_per_s']:.2f}x" if static else "",
            ]
        )
    env, model, opts = report["environment"], report["model"], report["options"]
    shared = opts.get("shared_prefix_tokens")
    shared = f" after {shared} shared ones" if shared else ""
    lines = [
        f"metalserve bench serve on {env['device_name']} ({env['device']}), {env['date']}",
        f"model: {model['preset']} ({model['parameters'] / 1e6:.1f}M parameters, bf16 checkpoint, "
        f"run in {', '.join(sorted({a.get('dtype', '?') for a in report['arms'].values()}))}), "
        f"{opts['prompt_tokens']}-token prompts{shared}, {opts['new_tokens']} new tokens, "
        f"{opts['clients']} clients / batch",
        common.render_table(rows),
        *(
            [
                f"server: decode path {server.get('decode_path')}, max batch "
                f"{server.get('max_batch_size')}, ready in {server.get('server_ready_seconds')}s, "
                f"mean decode batch {server.get('mean_decode_batch')}"
                + (
                    f", hot reload ready in {server['reload_seconds']}s"
                    if "reload_seconds" in server
                    else ""
                )
            ]
            if (server := report["arms"].get("server"))
            else []
        ),
        *(
            _render_ttft_means(name, arm)
            for name, arm in report["arms"].items()
            if arm.get("server_first_byte_mean_s") is not None
        ),
        *(
            [f"server passes, means in ms: {_render_parts(parts)}"]
            if server is not None and (parts := server.get("pass_parts_mean_s"))
            else []
        ),
        *(
            [_render_profile(profile)]
            if server is not None and (profile := server.get("engine_profile"))
            else []
        ),
        *(
            [
                f"decode step {roof['mean_decode_step_s'] * 1000:.2f} ms against a roofline of "
                f"{roof['roofline_step_s'] * 1000:.2f} ms ({roof['weight_bytes'] / 1e9:.2f} GB "
                f"weights + {roof['kv_bytes_per_step'] / 1e9:.3f} GB KV at "
                f"{roof['bandwidth_gb_per_s']} GB/s measured): efficiency {roof['efficiency']}"
            ]
            if "efficiency" in (roof := report.get("decode_roofline", {}))
            else []
        ),
        *(
            [
                f"server-fp8: {ratios['server_fp8_vs_server']}x the server's tokens/s with "
                f"{ratios['server_fp8_vs_server_weight_bytes']}x its weight bytes; decode step "
                f"{roof8['mean_decode_step_s'] * 1000:.2f} ms against its roofline of "
                f"{roof8['roofline_step_s'] * 1000:.2f} ms: efficiency {roof8['efficiency']}"
            ]
            if "efficiency" in (roof8 := report.get("decode_roofline_fp8", {}))
            and (ratios := report["ratios"])
            else []
        ),
        "targets: "
        + "; ".join(
            f"{name} {t['value']} ({t['target']}: "
            f"{'n/a' if t['met'] is None else ('met' if t['met'] else 'MISSED')})"
            for name, t in report["targets"].items()
            if t["value"] is not None
        ),
    ]
    return "\n".join(lines)


def _render_profile(profile: dict[str, Any]) -> str:
    """The engine profile's headline: its passes, and the engine thread's costliest calls."""
    ms = 1000 / max(sum(profile["passes"].values()), 1)
    calls = ", ".join(
        f"{row['name']} {row['self_host_s'] * ms:.2f}" for row in profile["top_host"][:5]
    )
    return (
        f"engine profile ({profile['passes']}, profiler on), per pass in ms: recorded on the "
        f"host {profile['host_recorded_s'] * ms:.2f}, device {profile['device_s'] * ms:.2f} "
        f"of {profile['seconds'] * ms:.2f}; top own host time: {calls}"
    )


def _render_ttft_means(name: str, arm: dict[str, Any]) -> str:
    """Where a server arm's clients' TTFT went, means in milliseconds."""
    cpu_per_token = arm.get("server_cpu_us_per_token", {})
    return (
        f"{name} TTFT means in ms: clients {arm['ttft_mean_s'] * 1000:.1f} (their "
        f"response head {arm['response_head_mean_s'] * 1000:.1f}), server's "
        f"first byte {arm['server_first_byte_mean_s'] * 1000:.1f} (waiting for "
        f"the loop {(arm.get('server_start_delay_mean_s') or 0) * 1000:.1f}), its TTFT "
        f"{arm['server_ttft_mean_s'] * 1000:.1f} (queued "
        f"{arm['server_queue_time_mean_s'] * 1000:.1f}); client processes' CPU busy "
        + ", ".join(f"{busy:.2f}" for busy in arm["client_cpu_busy"])
        + "; server CPU per token: "
        + ", ".join(f"{process} {us} us" for process, us in cpu_per_token.items())
    )


def _render_parts(parts: dict[str, dict[str, float | None]]) -> str:
    """``prefill host 3.10 / wait 0.50 / ...; decode ...``, in milliseconds."""
    order = ("host", "host_cpu", "wait", "device", "emit")
    return "; ".join(
        f"{phase} "
        + " / ".join(
            f"{part} {seconds * 1000:.2f}"
            for part in order
            if (seconds := times.get(part)) is not None
        )
        for phase, times in sorted(parts.items(), reverse=True)
    )


def _log(message: str) -> None:
    common.log("bench serve", message)
