"""``metalserve bench serve`` on CPU with tiny sizes (the GPU numbers live in BENCHMARKS.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from conftest import run_cli
from metalserve.bench.common import LLAMA_PRESETS, SERVE_ARMS, SERVE_PRESETS
from metalserve.bench.options import BenchServeSettings


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
        "--new-tokens",
        "8",
        "--clients",
        "3",
        "--dir",
        str(tmp_path / "data"),
        "--out",
        str(out),
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["arms"]) == set(SERVE_ARMS)
    for name, arm in report["arms"].items():
        assert arm["tokens_per_s"] > 0, name
        assert arm["tokens"] == 8 * arm["requests"], name
        assert len(arm["ttft_s"]) == len(arm["latency_s"]) == arm["requests"]
        assert 0 < arm["ttft_p50_s"] <= arm["latency_p99_s"], name
    assert report["arms"]["naive"]["requests"] == 4
    assert report["arms"]["static"]["requests"] == 6  # two batches of --clients
    assert report["arms"]["server"]["requests"] == 12
    assert report["arms"]["server"]["mean_decode_batch"] > 1
    rates = {name: arm["tokens_per_s"] for name, arm in report["arms"].items()}
    assert report["ratios"]["server_vs_static"] == pytest.approx(
        rates["server"] / rates["static"], rel=0.01
    )
    assert report["model"]["parameters"] > 0
    assert "server" in result.stdout
    assert "vs static" in result.stdout


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("serve", "--arms", "static,fast"), "--arms"),
        (("serve", "--clients", "zero"), "--clients"),
        (("serve", "--preset", "70b"), "--preset"),
        (("serve", "--server-args", "'--unclosed"), "--server-args"),
    ],
)
def test_bad_bench_flags_exit_2_naming_the_flag(args: tuple[str, ...], flag: str) -> None:
    result = run_cli("bench", *args)
    assert result.returncode == 2
    assert flag in result.stderr


def test_requests_per_arm() -> None:
    options = BenchServeSettings(clients=32)
    assert [options.requests_for(arm) for arm in SERVE_ARMS] == [4, 64, 128]
    given = BenchServeSettings(clients=3, requests=7)
    # The static arm runs whole batches of --clients.
    assert [given.requests_for(arm) for arm in SERVE_ARMS] == [7, 9, 7]


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
