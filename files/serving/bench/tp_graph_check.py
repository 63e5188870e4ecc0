"""Issue 21: NCCL's all-reduce inside the compiled decode layer and the captured CUDA graphs of
a tensor-parallel rank, on the one GPU a machine of one GPU has. NCCL refuses two ranks on one
device, so this is rank 0 of ``TensorParallel(0, 2)`` (half the heads and MLP rows) reducing over
an NCCL group of one process: its logits are not the whole model's, but the graphs (compiled
layer, NCCL collectives captured) must give the tokens and logits of the same rank run eagerly.
It shows that the collectives trace and capture; what they sum over two GPUs is issue 22's run.
Run from the repository root: ``python3 files/serving/bench/tp_graph_check.py REPORT.json``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, "files/serving/tests")

import torch
import torch.distributed

from engine_helpers import split_greedy
from metalserve.tensor_parallel import TensorParallel

STEPS = 8
DEVICE = torch.device("cuda", 0)


def main() -> int:
    out, started = sys.argv[1], time.time()
    torch.cuda.set_device(DEVICE)
    with tempfile.TemporaryDirectory() as rendezvous:
        torch.distributed.init_process_group(
            "nccl", init_method=f"file://{rendezvous}/group", rank=0, world_size=1
        )
        tp = TensorParallel(0, 2)
        report = {}
        for dtype in ("float32", "bfloat16"):
            runs = {}
            for mode, graphs in (("eager", False), ("graphs", True)):
                began = time.time()
                result = split_greedy(
                    "llama",
                    tp,
                    DEVICE,
                    getattr(torch, dtype),
                    STEPS,
                    compile_layers=graphs,
                    cuda_graphs=graphs,
                )
                assert result is not None
                runs[mode] = {**result, "seconds": time.time() - began}
            report[dtype] = {
                **runs,
                "tokens_equal": runs["eager"]["tokens"] == runs["graphs"]["tokens"],
            }
        torch.distributed.destroy_process_group()
    report["environment"] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "seconds": time.time() - started,
    }
    Path(out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if report["float32"]["tokens_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
