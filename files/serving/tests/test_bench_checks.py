"""The GPU checks (``metalserve bench reload-check``, ``bench decode-check``): their flags and
logic, and whole runs on CPU with the tiny presets. The GPU runs (BENCHMARKS.md) need CUDA and
are skipped without it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import run_cli
from metalserve.bench import reload_check
from metalserve.bench.common import LLAMA_PRESETS
from metalserve.bench.options import DecodeCheckSettings, ReloadCheckSettings
from metalserve.bench.reload_check import Checker, fingerprint, judge_load

NO_CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the GPU check of BENCHMARKS.md)"
)
A, B = "a" * 64, "b" * 64


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("reload-check", "--preset", "850m"), "--preset"),
        (("reload-check", "--deadline", "0"), "--deadline"),
        (("reload-check", "--device", "tpu"), "--device"),
        (("decode-check", "--checks", "verify,bogus"), "--checks"),
        (("decode-check", "--preset", "160m"), "--preset"),
        (("decode-check", "--no-such-flag"), "--no-such-flag"),
    ],
)
def test_bad_check_flags_exit_2_naming_the_flag(args: tuple[str, ...], flag: str) -> None:
    result = run_cli("bench", *args)
    assert result.returncode == 2
    assert flag in result.stderr


def test_check_settings() -> None:
    reload = ReloadCheckSettings()
    assert (reload.device, reload.preset, reload.out_dir) == ("cuda", "160m", None)
    assert (reload.deadline, reload.ready_timeout) == (330.0, 150.0)
    # The shape the 2026-11-22 reports were made with (then the script's own "gpucheck" preset).
    assert LLAMA_PRESETS["160m"] == {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
    }
    with pytest.raises(ValueError, match="choose from 160m, tiny"):
        ReloadCheckSettings(preset="850m")
    decode = DecodeCheckSettings()
    assert (decode.device, decode.preset) == ("cuda", "850m")
    assert decode.checks == ("verify", "prof", "fp8")
    assert decode.dir == Path("/var/tmp/metalserve-bench/serve")
    assert DecodeCheckSettings(checks=("prof",)).checks == ("prof",)


def test_default_decode_path() -> None:
    assert reload_check.default_decode_path("cuda") == "cuda-graphs"
    assert reload_check.default_decode_path("cuda:1") == "cuda-graphs"
    assert reload_check.default_decode_path("cpu") == "dynamic"


# --- judging one reload under load (synthetic records) --------------------------------------


def record(client: int, start: float, end: float, version: str, **extra: Any) -> dict[str, Any]:
    return {
        "client": client,
        "t_start": start,
        "t_end": end,
        "ok": True,
        "fps": {fingerprint(version)},
        "text": ["x"],
        "finish": "length",
        "tokens": 8,
        "done": True,
        "error": None,
        "sampled": False,
        **extra,
    }


def reload_reply(**changes: Any) -> dict[str, Any]:
    reply = {"version_id": B, "previous_version_id": A, "changed": True, "seconds": 0.5}
    return {"sent": 10.0, "done": 11.0, "status": 200, "reply": {**reply, **changes}}


def judged(records: list[dict[str, Any]], **reply: Any) -> dict[str, bool]:
    checker = Checker(deadline_s=60)
    judge_load(checker, "p", {"records": records, "reload": reload_reply(**reply)}, A, B, 8)
    return {name: a["ok"] for name, a in checker.summary["assertions"].items()}


GOOD = [
    record(0, 1.0, 9.0, A),
    record(0, 9.5, 12.0, B),  # overlaps the reload: either version
    record(0, 12.0, 13.0, B),
    record(1, 2.0, 9.9, A),
    record(1, 11.5, 12.5, B),
]


def test_a_clean_reload_passes() -> None:
    results = judged(GOOD)
    assert len(results) == 9
    assert all(results.values()), results


def test_going_back_to_the_old_version_fails() -> None:
    back = [*GOOD, record(1, 13.0, 14.0, A)]
    results = judged(back)
    assert not results["p: per client, old then new (never back)"]
    assert not results["p: responses started after the reload reply carry new fingerprint"]


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        ({"ok": False, "error": "HTTP 503"}, "p: no request failed"),
        ({"tokens": 7}, "p: every response complete (8 tokens, finish length)"),
        ({"fps": {fingerprint(A), fingerprint(B)}}, "p: one fingerprint per response"),
        ({"fps": {"gpucheck@cccccccccccc"}}, "p: only old/new fingerprints seen"),
    ],
)
def test_bad_responses_fail_their_assertion(change: dict[str, Any], failed: str) -> None:
    records = [*GOOD, record(2, 12.0, 13.0, B, **change)]
    results = judged(records)
    assert not results[failed]


def test_a_failed_reload_fails() -> None:
    results = judged(GOOD, changed=False)
    assert results["p: reload HTTP 200"]
    assert not results["p: reload reply names new/previous version, changed"]


def test_checker_exit_code() -> None:
    checker = Checker(deadline_s=60)
    checker.check("fine", True)
    assert checker.finish(0) == 0
    assert checker.summary["passed"] == 1
    checker.check("broken", False, "why")
    assert checker.finish(0) == 1
    assert checker.summary["failed"] == ["broken"]
    assert checker.summary["assertions"]["broken"] == {"ok": False, "detail": "why"}
    assert Checker(deadline_s=60).finish(1) == 1


# --- whole runs -----------------------------------------------------------------------------


def test_decode_check_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    result = run_cli(
        "bench", "decode-check", "--device", "cpu", "--preset", "tiny",
        "--dir", str(tmp_path / "serve"), "--out", str(out),
        timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert json.loads(result.stdout) == report
    assert report["model"]["preset"] == "tiny"
    float32 = report["verify"]["result"]["float32"]
    # In float32 the static path computes transformers' function: the same greedy tokens.
    assert float32["top1_agree"] == float32["top1_total"] == 192
    assert float32["free_run_tokens_equal"] == float32["free_run_tokens_total"]
    assert float32["free_run_equal_prefix_per_row"] == [24] * 8
    assert report["verify"]["result"]["bfloat16"]["our_vs_hf_rel_max"] < 0.05
    prof = report["prof"]["result"]
    assert prof["graphs"] == 0  # no CUDA graphs on CPU
    assert prof["greedy_tokens_equal_prefix_per_row"] == [24] * 8
    timed = ("step_ms_graph_b32_l256", "step_ms_eager_b32_l192", "prefill_ms_32x64")
    for key in (*timed, "prefill_eager_ms_32x64", "prefill_eager_ms_1x64"):
        assert prof[key] > 0, key
    fp8 = report["fp8"]["result"]
    sizes = fp8["weight_bytes"]
    assert sizes["fp8"] < sizes["bfloat16"] < sizes["float32"]
    for name in ("fp8_vs_bfloat16", "float32_vs_bfloat16"):
        assert fp8[name]["top1_total"] == fp8[name]["free_run_tokens_total"] == 192
        assert 0 <= fp8[name]["kl_mean"] <= fp8[name]["kl_max"]
    # float32 and bfloat16 differ by rounding only; FP8 by more, but still mostly agree.
    assert fp8["float32_vs_bfloat16"]["top1_agree"] >= 180
    assert fp8["fp8_vs_bfloat16"]["top1_agree"] >= 150


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_reload_check_on_cpu(tmp_path: Path) -> None:
    """The whole check with two tiny versions on the dynamic path (about 25 s on 2 cores)."""
    result = run_cli(
        "bench", "reload-check", "--device", "cpu", "--preset", "tiny",
        "--out-dir", str(tmp_path), "--deadline", "200", "--ready-timeout", "90",
        timeout=240,
    )  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert result.returncode == 0, (summary["failed"], summary["errors"], result.stderr[-3000:])
    assert json.loads(result.stdout) == summary
    assert summary["failed"] == []
    assert summary["passed"] == len(summary["assertions"]) == 39
    assert "start: /version on A with decode_path dynamic" in summary["assertions"]
    assert (tmp_path / "server1.log").is_file()
    assert (tmp_path / "server2.log").is_file()


@NO_CUDA
@pytest.mark.e2e
@pytest.mark.timeout(450)
def test_reload_check_on_cuda(tmp_path: Path) -> None:
    result = run_cli("bench", "reload-check", "--out-dir", str(tmp_path), timeout=400)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert result.returncode == 0, (summary["failed"], summary["errors"])
    assert "start: /version on A with decode_path cuda-graphs" in summary["assertions"]


@NO_CUDA
def test_decode_check_on_cuda(tmp_path: Path) -> None:
    result = run_cli(
        "bench", "decode-check", "--preset", "tiny", "--dir", str(tmp_path), timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["prof"]["result"]["graphs"] > 0
    assert report["verify"]["result"]["float32"]["top1_agree"] == 192
