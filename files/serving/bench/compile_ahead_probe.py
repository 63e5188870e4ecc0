"""Issue 17 item 4: a replica's start with the decode layer compiled beside the load
(``--decode-compile-ahead``) and after it (the default, ``--no-decode-compile-ahead``), alternately,
RUNS starts each after an untimed one, on ``bench serve``'s model of PRESET under DIR (made there
if it is not). Each start's phases (``/version``'s ``startup_seconds``) go to REPORT.json with the
medians of both and their ratio. Further arguments are the server's (``--engine-process``;
``--decode-mode static --decode-compile on`` on the CPU). Run from the repository root:
``python3 files/serving/bench/compile_ahead_probe.py DIR PRESET RUNS REPORT.json [FLAGS...]``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from metalserve.bench import common
from metalserve.bench.options import BenchServeSettings
from metalserve.bench.serve import MODEL, SERVER_READY_TIMEOUT, ServerProcess, prepare_model

ARMS = {"ahead": "--decode-compile-ahead", "after": "--no-decode-compile-ahead"}


def start_once(store_root: Path, version_id: str, device: str, log: Path, flags: list[str]) -> Any:
    server = ServerProcess.start(
        store_root, MODEL, version_id, device=device, log_path=log, extra_args=flags
    )
    try:
        ready = server.wait_ready(SERVER_READY_TIMEOUT)
        served = httpx.get(f"{server.url}/version", timeout=10.0).json()
    finally:
        server.stop()
    return {
        "ready_seconds": round(ready, 3),
        "startup_seconds": served.get("startup_seconds"),
        "load_parts_seconds": served.get("load_parts_seconds"),
    }


def main(folder: str, preset: str, runs: int, out: str, flags: list[str]) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = BenchServeSettings(dir=Path(folder), preset=preset, device=device)
    model = prepare_model(options)
    store_root, version_id = options.dir / "store", str(model["version_id"])
    # Untimed: the first start of a machine compiles with a cold Inductor cache and reads the
    # weights from disk; the timed ones then find both warm, whichever goes first.
    first = start_once(
        store_root, version_id, device, options.dir / "compile-ahead-first.log", flags
    )
    print("untimed", json.dumps(first), flush=True)
    starts: dict[str, list[Any]] = {arm: [] for arm in ARMS}
    for run in range(runs):
        for arm, flag in ARMS.items():
            log = options.dir / f"compile-ahead-{arm}-{run}.log"
            found = start_once(store_root, version_id, device, log, [flag, *flags])
            starts[arm].append(found)
            print(arm, run, json.dumps(found), flush=True)
    medians = {
        arm: statistics.median(s["startup_seconds"]["ready"] for s in found)
        for arm, found in starts.items()
    }
    report = {
        "probe": "compile_ahead",
        "environment": common.environment(device),
        "preset": preset,
        "flags": flags,
        "model": model,
        "untimed_first_start": first,
        "starts": starts,
        "median_ready_seconds": medians,
        "ready_ahead_vs_after": common.ratio(medians["ahead"], medians["after"]),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    Path(out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("median_ready_seconds", "ready_ahead_vs_after")}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:])
