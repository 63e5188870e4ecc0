"""Issue 21: the tensor-parallel static path with CUDA tensors, two gloo ranks on one GPU (NCCL
refuses two ranks on one device). For Llama, Qwen2 and Qwen3 shapes in float32 and bfloat16:
each step's logits against the whole model's transformers forward (worst relative error), and
the greedy tokens of tp=2 against tp=1. Run from the repository root:
``python3 files/serving/bench/tp_cuda_check.py REPORT.json`` (exit 1 if float32 tokens differ).
"""

from __future__ import annotations

import datetime
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, "files/serving/tests")

import torch
import torch.multiprocessing

from engine_helpers import split_greedy
from metalserve.tensor_parallel import TensorParallel

STEPS = 8
DEVICE = torch.device("cuda", 0)
CASES = [(kind, dtype) for kind in ("llama", "qwen2", "qwen3") for dtype in ("float32", "bfloat16")]


def greedy(kind: str, tp: TensorParallel | None, dtype: torch.dtype) -> dict[str, Any] | None:
    """The tests' loop (engine_helpers.split_greedy) on the GPU."""
    return split_greedy(kind, tp, DEVICE, dtype, STEPS)


def rank(index: int, port: int, out: str) -> None:
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=index,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    tp = TensorParallel(index, 2)
    results = {f"{k}-{d}": greedy(k, tp, getattr(torch, d)) for k, d in CASES}
    torch.distributed.destroy_process_group()
    if index == 0:
        Path(out).write_text(json.dumps(results))


def main() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out, started = sys.argv[1], time.time()
    torch.multiprocessing.spawn(rank, args=(port, out), nprocs=2)
    split = json.loads(Path(out).read_text())
    whole = {f"{k}-{d}": greedy(k, None, getattr(torch, d)) for k, d in CASES}
    ok = True
    for key, one in whole.items():
        assert one is not None
        same = one["tokens"] == split[key]["tokens"]
        ok &= same or "bfloat16" in key
        print(
            f"{key}: tp=2 tokens == tp=1: {same}; worst relative logit error "
            f"tp=2 {split[key]['worst_rel_err']:.2e}, tp=1 {one['worst_rel_err']:.2e}"
        )
    seconds = time.time() - started
    print(torch.cuda.get_device_name(0), torch.__version__, f"{seconds:.1f}s", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
