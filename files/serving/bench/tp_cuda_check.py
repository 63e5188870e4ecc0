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

from engine_helpers import llama_relative
from metalserve import staticdecode
from metalserve.tensor_parallel import TensorParallel

IDS = [[5, 9, 17, 33, 2, 8, 41], [7, 3, 99]]
STEPS = 8
DEVICE = torch.device("cuda", 0)
CASES = [(kind, dtype) for kind in ("llama", "qwen2", "qwen3") for dtype in ("float32", "bfloat16")]


@torch.inference_mode()
def greedy(kind: str, tp: TensorParallel | None, dtype: torch.dtype) -> dict[str, Any] | None:
    """Rank 0 (or tp=1): prefill and STEPS greedy decode steps; the other rank follows."""
    reference = llama_relative(kind).to(DEVICE, dtype)
    decoder = staticdecode.StaticDecoder(
        llama_relative(kind).to(DEVICE, dtype),
        slots=2,
        max_length=256,
        device=DEVICE,
        dtype=dtype,
        cuda_graphs=False,
        tp=tp,
    )
    if tp is not None and tp.rank:
        decoder.follow()
        return None
    sequences = [list(p) for p in IDS]
    ids = torch.zeros((2, max(len(p) for p in IDS)), dtype=torch.long)
    for row, prompt in enumerate(IDS):
        ids[row, : len(prompt)] = torch.tensor(prompt)
    lengths = torch.tensor([len(p) for p in IDS])
    logits = decoder.prefill(ids, lengths, 0)
    worst = 0.0
    for step in range(STEPS):
        for row, seq in enumerate(sequences):
            expected = reference(input_ids=torch.tensor([seq], device=DEVICE)).logits[0, -1]
            error = (logits[row].float() - expected.float()).abs().max() / expected.abs().max()
            worst = max(worst, error.item())
        chosen = logits.argmax(-1)
        if step == 0:
            decoder.admit(0, chosen, lengths)
        else:
            decoder.advance(2, chosen)
        for seq, token in zip(sequences, chosen.tolist(), strict=True):
            seq.append(token)
        logits = decoder.decode(2, max(len(s) for s in sequences) - 1)
    decoder.stop_followers()
    tokens = [seq[len(p) :] for seq, p in zip(sequences, IDS, strict=True)]
    return {"tokens": tokens, "worst_rel_err": worst}


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
