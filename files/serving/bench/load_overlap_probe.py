"""Issue 17 item 4: what loading a version beside transformers' import saves at a start.

Fresh interpreters, alternately: "sequential" imports torch and transformers' auto classes and
then calls ``load_version`` (the order before the overlap: nothing left to overlap), "overlapped"
imports torch and calls ``load_version``, which imports transformers while the weights stream.
Each reports seconds from its start to the model loaded, then loads the version a second time in
the same process (what a hot reload's load costs: CUDA, Triton's kernels and the pinned buffers
already made) and reports the GPU hash kernels' first-launch seconds; "cuda-first" starts CUDA
before the load, timed apart; "switch-0.5ms" overlaps with the GIL's switch interval at 0.5 ms.
Run after ``bench serve`` made a store (the weights then in the page cache, as at a warm start):
``python bench/load_overlap_probe.py STORE_ROOT VERSION_ID DEVICE OUT.json [RUNS]``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import gc, json, sys, time
started = time.monotonic()
import torch
if sys.argv[1] == "sequential":
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
if sys.argv[1] == "switch-0.5ms":
    sys.setswitchinterval(0.0005)  # the readers wait less for the GIL the import holds
imported = time.monotonic()
cuda_s = None
if sys.argv[1] == "cuda-first":
    if torch.zeros(1, device=sys.argv[4]).is_cuda:
        torch.cuda.synchronize()
    cuda_s = time.monotonic() - imported
from pathlib import Path
from metalserve import gpu_blake3
from metalserve.bench.serve import MODEL
from metalserve.loader import load_version
def load():
    bundle = load_version(Path(sys.argv[2]), MODEL, sys.argv[3], device=sys.argv[4])
    if bundle.device.type == "cuda":
        torch.cuda.synchronize()
    return bundle
bundle = load()
done = time.monotonic()
first = {"load_seconds": bundle.load_seconds, "weights_seconds": bundle.weights_seconds}
del bundle
gc.collect()
again = load()
print(json.dumps({"imports_s": imported - started, "cuda_s": cuda_s,
                  "to_loaded_s": done - started, **first,
                  "again_load_seconds": again.load_seconds,
                  "again_weights_seconds": again.weights_seconds,
                  "blake3_first_launch_s": gpu_blake3.compile_seconds}))
"""


def run(order: str, root: str, version_id: str, device: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, order, root, version_id, device],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    found: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return found


def main(root: str, version_id: str, device: str, out: str, runs: int) -> None:
    results: dict[str, list[dict[str, float]]] = {
        "sequential": [],
        "overlapped": [],
        "cuda-first": [],
        "switch-0.5ms": [],
    }
    run("sequential", root, version_id, device)  # untimed: page cache, compiled bytecode
    for _ in range(runs):
        for order in results:
            results[order].append(run(order, root, version_id, device))
    medians = {
        order: statistics.median(r["to_loaded_s"] for r in found)
        for order, found in results.items()
    }
    report = {
        "machine": {"node": platform.node(), "cpus": os.cpu_count(), "device": device},
        "runs": results,
        "median_to_loaded_s": medians,
        "overlapped_over_sequential": medians["overlapped"] / medians["sequential"],
    }
    Path(out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:5], runs=int(sys.argv[5]) if len(sys.argv) > 5 else 5)
