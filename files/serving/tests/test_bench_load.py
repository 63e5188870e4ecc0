"""``metalserve bench load`` on CPU with tiny sizes (the GPU numbers live in BENCHMARKS.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from conftest import run_cli
from metalserve import store
from metalserve.bench import load as bench_load
from metalserve.bench.common import LOAD_ARMS
from metalserve.bench.options import BenchLoadSettings


def _measurement(report: dict[str, Any], arm: str, cache: str) -> dict[str, Any]:
    (found,) = [m for m in report["measurements"] if (m["arm"], m["cache"]) == (arm, cache)]
    return found


@pytest.fixture(scope="module")
def load_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    base = tmp_path_factory.mktemp("bench-load")
    out = base / "results" / "load.json"
    result = run_cli(
        "bench",
        "load",
        "--device",
        "cpu",
        "--size-gib",
        "0.02",
        "--shards",
        "3",
        "--repeats",
        "2",
        "--chunk-mib",
        "1",
        "--dir",
        str(base / "data"),
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text()), result.stdout


def test_bench_load_measures_every_arm(load_run: tuple[dict[str, Any], str]) -> None:
    report, stdout = load_run
    expected = {(arm, cache) for arm in bench_load.FILE_ARMS for cache in ("cold", "warm")}
    assert {(m["arm"], m["cache"]) for m in report["measurements"]} == expected | {
        ("sha256", "-"),
        ("sha256_parallel", "-"),
        ("blake3", "-"),
        ("blake3_parallel", "-"),
    }
    for m in report["measurements"]:
        assert m["gb_per_s"] > 0, m
        assert len(m["seconds"]) == 2
    assert "CUDA" in report["skipped"]["h2d"]
    assert report["checkpoint"]["shards"] == 3
    assert report["checkpoint"]["manifest_format"] == 3
    assert report["checkpoint"]["block_algorithms"] == ["blake3"]
    assert report["checkpoint"]["bytes"] >= 0.02 * 2**30
    assert "posix_fadvise" in report["cache_drop"]["methods"]
    assert report["environment"]["device"] == "cpu"
    # The table, then the JSON report as the rest of stdout.
    table, _, doc = stdout.partition("\n{")
    assert "ours_nohash" in table
    assert "load_file warm" in table
    assert json.loads("{" + doc)["checkpoint"] == report["checkpoint"]
    # The cache arm loaded the node cache's copy: the version is there, complete, verified.
    assert report["node_cache_fill_s"] > 0
    node_cache = Path(report["options"]["dir"]) / "node-cache"
    version = report["checkpoint"]["version_id"]
    assert store.list_versions(node_cache, bench_load.MODEL) == [version]
    assert not store.verify_version(node_cache, bench_load.MODEL, version)


def test_bench_load_ratios_come_from_the_same_run(load_run: tuple[dict[str, Any], str]) -> None:
    report, _ = load_run
    ratios = report["ratios"]

    def rate(arm: str, cache: str) -> float:
        m = _measurement(report, arm, cache)
        return float(m["bytes"] / m["median_s"])

    assert ratios["warm_ours_vs_load_file"] == pytest.approx(
        rate("ours", "warm") / rate("load_file", "warm"), rel=0.01
    )
    assert ratios["cold_ours_vs_raw"] == pytest.approx(
        rate("ours", "cold") / rate("raw", "cold"), rel=0.01
    )
    for cache in ("cold", "warm"):
        hashed = _measurement(report, "ours", cache)["median_s"]
        bare = _measurement(report, "ours_nohash", cache)["median_s"]
        assert ratios[f"hash_overhead_pct_{cache}"] == pytest.approx(
            (hashed / bare - 1) * 100, abs=0.5
        )
    assert ratios["warm_cache_vs_ours"] == pytest.approx(
        rate("cache", "warm") / rate("ours", "warm"), rel=0.01
    )
    target = report["targets"]["warm_ours_vs_load_file"]
    assert target["value"] == ratios["warm_ours_vs_load_file"]
    assert target["met"] == (target["value"] >= 2.0)
    # Hashing on CPU threads beside ours (which hashes on the device on CUDA only).
    assert ratios["warm_ours_vs_ours_host_hash"] == pytest.approx(
        rate("ours", "warm") / rate("ours_host_hash", "warm"), rel=0.01
    )
    hashed = _measurement(report, "ours_host_hash", "warm")["median_s"]
    bare = _measurement(report, "ours_nohash", "warm")["median_s"]
    assert ratios["hash_overhead_pct_warm_host_hash"] == pytest.approx(
        (hashed / bare - 1) * 100, abs=0.5
    )
    assert report["verify_on"]["device"] is False
    assert "CUDA" in report["skipped"]["blake3_gpu"]
    assert report["targets"]["warm_ours_vs_h2d"]["value"] is None  # no h2d on CPU
    assert report["targets"]["cold_ours_vs_raw_item5"]["target"] == ">= 1"


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("load", "--arms", "raw,bogus"), "--arms"),
        (("load", "--size-gib", "-1"), "--size-gib"),
        (("load", "--shards", "0"), "--shards"),
        (("load", "--device", "tpu"), "--device"),
        (("load", "--no-such-flag"), "--no-such-flag"),
    ],
)
def test_bad_bench_flags_exit_2_naming_the_flag(args: tuple[str, ...], flag: str) -> None:
    result = run_cli("bench", *args)
    assert result.returncode == 2
    assert flag in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_on_cuda_without_cuda_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("bench", "load", "--device", "cuda", "--dir", str(tmp_path))
    assert result.returncode == 2
    assert "--device" in result.stderr
    assert "CUDA is not available" in result.stderr


# --- the checkpoint and the settings ---------------------------------------------------------


def test_another_manifest_format_regenerates_the_checkpoint(tmp_path: Path) -> None:
    options = BenchLoadSettings(dir=tmp_path, size_gib=0.002, shards=1, device="cpu")
    first = bench_load.prepare_checkpoint(options)
    older = bench_load.prepare_checkpoint(options.model_copy(update={"manifest_format": 2}))
    assert (first.manifest_format, older.manifest_format) == (3, 2)
    assert not older.reused
    assert older.version_id != first.version_id
    assert {e.blocks.algorithm for e in older.entries if e.blocks is not None} == {"sha256"}
    assert store.list_versions(first.store_root, bench_load.MODEL) == [older.version_id]


def test_settings_defaults_and_subsets() -> None:
    options = BenchLoadSettings()
    assert options.dir == Path("/var/tmp/metalserve-bench/load")
    assert (options.size_gib, options.shards, options.repeats, options.chunk_mib) == (8, 4, 3, 16)
    assert options.device == "cuda"
    assert options.arms == LOAD_ARMS
    assert options.caches == ("cold", "warm")
    assert options.manifest_format == store.MANIFEST_FORMAT
    # Set in code, subsets keep the arms' own order, as the flag does.
    assert BenchLoadSettings(arms=("hash", "raw")).arms == ("raw", "hash")
    for bad in ({"arms": ("raw", "bogus")}, {"caches": ()}, {"shards": 0}, {"size_gib": 0}):
        with pytest.raises(ValidationError):
            BenchLoadSettings(**bad)
