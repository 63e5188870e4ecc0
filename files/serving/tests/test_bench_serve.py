"""``metalserve bench serve`` on CPU with tiny sizes (the GPU numbers live in BENCHMARKS.md)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from conftest import run_cli
from metalserve import store
from metalserve.bench import clients
from metalserve.bench.clients import share_of
from metalserve.bench.common import LLAMA_PRESETS, SERVE_ARMS, SERVE_PRESETS
from metalserve.bench.options import BenchServeSettings
from metalserve.bench.serve import MODEL, decode_roofline, prepare_model


def test_bench_serve_runs_every_arm(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    result = run_cli(
        "bench",
        "serve",
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--prompt-tokens",
        "8",
        "--shared-prefix-tokens",
        "32",
        "--new-tokens",
        "8",
        # Sampled: every arm's sampler (transformers' and both server paths') runs here.
        "--temperature",
        "0.7",
        "--top-p",
        "0.9",
        "--clients",
        "3",
        "--arms",
        ",".join(SERVE_ARMS),  # the default, server-fp8 and server-process
        "--reload",
        "--profile-passes",
        "4",
        "--dir",
        str(tmp_path / "data"),
        "--out",
        str(out),
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["arms"]) == set(SERVE_ARMS)
    assert (report["options"]["temperature"], report["options"]["top_p"]) == (0.7, 0.9)
    for name, arm in report["arms"].items():
        assert arm["tokens_per_s"] > 0, name
        assert arm["tokens"] == 8 * arm["requests"], name
        assert len(arm["ttft_s"]) == len(arm["latency_s"]) == arm["requests"]
        assert 0 < arm["ttft_p50_s"] <= arm["latency_p99_s"], name
    assert report["arms"]["naive"]["requests"] == 4
    assert report["arms"]["static"]["requests"] == 6  # two batches of --clients
    assert report["arms"]["server"]["requests"] == 12
    # The same server with FP8 projections (on the CPU: the static path, eager).
    fp8, plain = report["arms"]["server-fp8"], report["arms"]["server"]
    assert (plain["quantization"], fp8["quantization"]) == ("none", "fp8")
    assert fp8["decode_path"] == "static"
    assert 0 < fp8["weight_bytes"] < plain["weight_bytes"]
    # Every prompt starts with the same 32 tokens, two blocks of the static path's prefix cache
    # (the dynamic path has none): after the untimed warm-up requests, every request reuses them.
    assert plain["prefix_cache_tokens"] is None
    assert fp8["prefix_cache_tokens"] == {
        "queried": 40 * fp8["requests"],
        "reused": 32 * fp8["requests"],
    }
    assert report["options"]["shared_prefix_tokens"] == 32
    assert report["ratios"]["server_fp8_vs_server_weight_bytes"] == pytest.approx(
        fp8["weight_bytes"] / plain["weight_bytes"], abs=0.001
    )
    assert report["arms"]["server"]["mean_decode_batch"] > 1
    # On the CPU nothing is deferred (no graphs): the run began at ready.
    for arm in ("server", "server-fp8", "server-process"):
        assert report["arms"][arm]["server_deferred_graphs_wait_seconds"] < 1, arm
    # The same server with its engine in a process of its own: that process's forward passes,
    # counted by the API's metrics, reached the report; its hot reload and profile ran.
    split = report["arms"]["server-process"]
    assert (plain["engine_process"], split["engine_process"]) == (False, True)
    assert split["decode_path"] == plain["decode_path"]
    assert split["mean_decode_batch"] > 1
    assert split["reload_seconds"] > 0
    assert sum(split["engine_profile"]["passes"].values()) >= 4
    assert report["ratios"]["server_process_vs_server"] == pytest.approx(
        split["tokens_per_s"] / plain["tokens_per_s"], abs=0.01
    )
    assert "server-process TTFT means in ms: clients " in result.stdout
    # The processes' CPU per token: the engine's apart where it has a process of its own.
    assert set(plain["server_cpu_us_per_token"]) == {"api"}
    assert set(split["server_cpu_us_per_token"]) == {"api", "engine"}
    assert all(us > 0 for us in split["server_cpu_us_per_token"].values())
    # The server's own step timer (metalserve_forward_pass_duration_seconds) reached the report.
    assert 0 < report["arms"]["server"]["mean_decode_step_s"] < 10
    # ...and its parts: on the CPU no device part, and host plus wait is the step's time.
    for arm in ("server", "server-fp8"):
        parts = report["arms"][arm]["pass_parts_mean_s"]
        assert set(parts) == {"prefill", "decode"}
        assert all(set(p) == {"host", "host_cpu", "wait", "emit"} for p in parts.values()), parts
        # The engine thread's CPU time within the host part cannot exceed it.
        assert all(0 < p["host_cpu"] <= p["host"] + 1e-6 for p in parts.values()), parts
        decode = parts["decode"]
        step = report["arms"][arm]["mean_decode_step_s"]
        assert decode["host"] + decode["wait"] == pytest.approx(step, abs=2e-6), (parts, step)
    assert "server passes, means in ms: prefill host " in result.stdout
    # The clients ran in 3 worker processes (at most one per client) and the server's own TTFT
    # (request received to first token) is beside theirs: it cannot exceed the clients' view.
    server = report["arms"]["server"]
    assert server["client_processes"] == 3
    # Each client process's CPU time over the timed run (wall time), one figure per process.
    assert len(server["client_cpu_busy"]) == 3
    assert all(0 < busy < 2 for busy in server["client_cpu_busy"]), server["client_cpu_busy"]
    assert 0 < server["server_ttft_mean_s"] <= server["ttft_mean_s"]
    assert 0 <= server["server_queue_time_mean_s"] <= server["server_ttft_mean_s"]
    # ...and its first byte (request in to first body byte out) lies between the two.
    first_byte = server["server_first_byte_mean_s"]
    assert server["server_ttft_mean_s"] <= first_byte <= server["ttft_mean_s"]
    # Its wait for the event loop is part of it; the response's head (sent once the request is
    # with the engine) reaches the clients before their first token does.
    assert 0 <= server["server_start_delay_mean_s"] <= first_byte
    assert 0 < server["response_head_mean_s"] <= server["ttft_mean_s"]
    # Every request's tokens came in at most that many events with text, at least one each.
    assert server["requests"] / server["tokens"] <= server["text_events_per_token"] <= 1
    # The server's event loop ticked through the run (0.1 s ticks), each lag a bucket's bound.
    assert server["server_event_loop_lag_mean_s"] >= 0
    assert server["server_event_loop_lag_p99_at_most_s"] in (
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
    )
    assert report["decode_roofline"] == {
        "bandwidth_gb_per_s": None,
        "reason": "needs the server arm on CUDA",
    }
    rates = {name: arm["tokens_per_s"] for name, arm in report["arms"].items()}
    assert report["ratios"]["server_vs_static"] == pytest.approx(
        rates["server"] / rates["static"], rel=0.01
    )
    assert report["model"]["parameters"] > 0
    # --reload: a second version of the same shape, which each server arm hot-reloaded and
    # answered from (the bench checks the answer's fingerprint) after its timed run.
    second = report["model"]["reload_version_id"]
    assert second != report["model"]["version_id"]
    for arm in (plain, fp8):
        assert arm["reload_seconds"] >= arm["reload_load_seconds"] >= arm["reload_weights_seconds"]
        assert arm["reload_weights_seconds"] > 0
    reload_target = report["targets"]["reload_ready_vs_load_time_plus_2s"]
    assert reload_target["value"] == pytest.approx(
        plain["reload_seconds"] / (1.5 * plain["reload_weights_seconds"] + 2.0), abs=0.001
    )
    assert "hot reload ready in" in result.stdout
    assert report["options"]["reload"] is True
    # --profile-passes: each server arm ran again with its first 4 passes profiled.
    for arm in (plain, fp8):
        profile = arm["engine_profile"]
        assert sum(profile["passes"].values()) >= 4, profile
        assert profile["top_host"]
        assert Path(profile["trace"]).is_file()
        assert profile["tokens_per_s_while_profiled"] > 0
    assert "engine profile: " in result.stderr
    assert "engine profile ({" in result.stdout
    assert "client processes' CPU busy " in result.stdout
    assert "server" in result.stdout
    assert "vs static" in result.stdout


def test_the_reload_version_stays_beside_the_first_until_the_first_changes(
    tmp_path: Path,
) -> None:
    root = tmp_path / "store"

    def made_anew(options: BenchServeSettings) -> tuple[str, list[str]]:
        """Both versions generated (none reused), and the store holding them alone."""
        first = prepare_model(options)
        second = prepare_model(options, beside=first["version_id"])
        assert not first["reused"]
        assert not second["reused"]
        versions = sorted([first["version_id"], second["version_id"]])
        assert store.list_versions(root, MODEL) == versions
        return first["version_id"], versions

    options = BenchServeSettings(preset="tiny", device="cpu", dir=tmp_path, reload=True)
    first_id, versions = made_anew(options)
    second_id = next(v for v in versions if v != first_id)
    again = prepare_model(options), prepare_model(options, beside=first_id)
    assert [a["reused"] for a in again] == [True, True]
    # A reload marker that no longer matches, naming no version or a path: only the second
    # version is made again; the first stays, whole.
    marker = tmp_path / "model-reload.json"
    for stale in ("", "..", None, second_id):
        marker.write_text(json.dumps({"params": {}, "version_id": stale}))
        assert not prepare_model(options, beside=first_id)["reused"]
        assert store.list_versions(root, MODEL) == versions
        store.read_manifest(root, MODEL, first_id)
    marker.write_text("[]")
    assert not prepare_model(options, beside=first_id)["reused"]
    # Other weights for the first: both are made again, the old ones gone.
    _, renewed = made_anew(options.model_copy(update={"seed": 7}))
    assert not set(renewed) & set(versions)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("serve", "--arms", "static,fast"), "--arms"),
        (("serve", "--clients", "zero"), "--clients"),
        (("serve", "--preset", "70b"), "--preset"),
        (("serve", "--server-args", "'--unclosed"), "--server-args"),
        (("serve", "--temperature", "-1"), "--temperature"),
        (("serve", "--top-p", "0"), "--top-p"),
    ],
)
def test_bad_bench_flags_exit_2_naming_the_flag(args: tuple[str, ...], flag: str) -> None:
    result = run_cli("bench", *args)
    assert result.returncode == 2
    assert flag in result.stderr


def test_clients_and_requests_split_over_processes_sum_to_the_whole() -> None:
    assert [share_of(10, 4, i) for i in range(4)] == [3, 3, 2, 2]
    assert [share_of(2, 4, i) for i in range(4)] == [1, 1, 0, 0]


@pytest.mark.timeout(120)
def test_a_failing_worker_ends_the_run_instead_of_a_barrier_wait() -> None:
    """Nothing listens on the port: every worker's warm-up fails, and drive raises at once
    (the other workers and this process stop waiting at the barrier)."""
    started = time.monotonic()
    with pytest.raises(httpx.ConnectError):
        clients.drive("http://127.0.0.1:9", "m", [[1, 2]], 4, 2, 1, processes=2)
    assert time.monotonic() - started < 60


def test_requests_per_arm() -> None:
    options = BenchServeSettings(clients=32)
    assert [options.requests_for(arm) for arm in SERVE_ARMS] == [4, 64, 128, 128, 128]
    given = BenchServeSettings(clients=3, requests=7)
    # The static arm runs whole batches of --clients.
    assert [given.requests_for(arm) for arm in SERVE_ARMS] == [7, 9, 7, 7, 7]
    # Both places of the engine; server-fp8 when asked for.
    assert options.arms == ("naive", "static", "server", "server-process")


def test_server_args_are_split_like_a_shell() -> None:
    options = BenchServeSettings(server_args="--decode-mode dynamic --log-level 'info'")
    assert options.server_args == ("--decode-mode", "dynamic", "--log-level", "info")
    assert BenchServeSettings().server_args == ()
    with pytest.raises(ValidationError, match="server_args"):
        BenchServeSettings(server_args="'unclosed")


def test_presets_are_llama_shapes() -> None:
    for name in SERVE_PRESETS:
        assert BenchServeSettings(preset=name).preset == name
        config = LLAMA_PRESETS[name]
        assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
    assert LLAMA_PRESETS["850m"]["hidden_size"] == 2048


def test_decode_roofline_counts_weights_and_kv_at_the_measured_bandwidth() -> None:
    options = BenchServeSettings(preset="8b", prompt_tokens=64, new_tokens=129)
    config = LLAMA_PRESETS["8b"]
    parameters = 8_030_261_248  # Llama-3-8B
    server = {"dtype": "bfloat16", "mean_decode_batch": 32.0, "mean_decode_step_s": 0.0075}
    roof = decode_roofline(options, {"parameters": parameters}, server, 4000.0)
    embedding = config["vocab_size"] * config["hidden_size"]
    assert roof["weight_bytes"] == (parameters - embedding) * 2
    # 32 layers x (K + V) x 8 KV heads x 128 dims x 2 bytes, 32 rows at 64 + 64 tokens.
    assert roof["kv_bytes_per_step"] == 32 * 128 * (32 * 2 * 8 * 128 * 2)
    floor = (roof["weight_bytes"] + roof["kv_bytes_per_step"]) / 4000e9
    assert roof["roofline_step_s"] == pytest.approx(floor, abs=1e-6)
    # The weights as the server reports them (FP8: the projections a byte each) set the floor.
    served = (parameters - embedding) // 2 + embedding * 2
    fp8 = decode_roofline(
        options, {"parameters": parameters}, {**server, "weight_bytes": served}, 4000.0
    )
    assert fp8["weight_bytes"] == served - embedding * 2
    assert roof["efficiency"] == pytest.approx(floor / 0.0075, abs=1e-3)
    assert 0.5 < roof["efficiency"] < 0.6  # 15 GB + 0.5 GB in 7.5 ms at 4 TB/s


def test_a_histograms_quantile_is_the_bound_of_its_bucket() -> None:
    """From the run's bucket deltas (cumulative counts): the first bound holding the share."""
    from metalserve.bench.serve import _bucket_quantile

    deltas = {"lag_count": 100.0, "lag_le_0.01": 90.0, "lag_le_0.1": 99.0, "lag_le_+Inf": 100.0}
    assert _bucket_quantile(deltas, "lag", 0.5) == 0.01
    assert _bucket_quantile(deltas, "lag", 0.99) == 0.1
    assert _bucket_quantile(deltas, "lag", 1.0) is None  # only under +Inf
    assert _bucket_quantile({"lag_count": 0.0}, "lag", 0.99) is None
