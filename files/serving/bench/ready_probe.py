"""Issue 17 item 4: where a replica's start goes after the load, on a GPU. In one process: the
imports, a model of ``bench serve``'s preset built on the device (uninitialized weights: no disk),
the static decoder, and ``capture_all`` (the layer's compilation, every decode and prefill graph)
under cProfile, with dynamo's own compile times and each decode graph's seconds. Run from the
repository root, twice with one ``TORCHINDUCTOR_CACHE_DIR`` (cold, then warm):
``python3 files/serving/bench/ready_probe.py 8b REPORT.json``.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

STARTED = time.monotonic()
import torch  # noqa: E402

TORCH_SECONDS = time.monotonic() - STARTED
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402, F401

TRANSFORMERS_SECONDS = time.monotonic() - STARTED - TORCH_SECONDS
from transformers import LlamaConfig  # noqa: E402
from transformers.initialization import no_init_weights  # noqa: E402

from metalserve import staticdecode  # noqa: E402
from metalserve.bench.common import LLAMA_PRESETS  # noqa: E402

SLOTS = 64  # the server's default max batch


def main(preset: str, out: str) -> None:
    report: dict[str, Any] = {
        "preset": preset,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("TORCH", "TRITON"))},
        "import_torch_s": TORCH_SECONDS,
        "import_transformers_auto_s": TRANSFORMERS_SECONDS,
    }
    config = LlamaConfig(**LLAMA_PRESETS[preset], dtype="bfloat16")
    device = torch.device("cuda")
    started = time.monotonic()
    torch.zeros(1, device=device)
    report["cuda_init_s"] = time.monotonic() - started
    started = time.monotonic()
    with no_init_weights(), device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    torch.cuda.synchronize()
    report["build_model_s"] = time.monotonic() - started
    started = time.monotonic()
    decoder = staticdecode.StaticDecoder(
        model,
        slots=SLOTS,
        max_length=config.max_position_embeddings,
        device=device,
        dtype=torch.bfloat16,
        cuda_graphs=True,
        compile_layers=True,
    )
    report["decoder_init_s"] = time.monotonic() - started

    graph = decoder._graph
    graphs: list[tuple[int, int, float]] = []

    def timed(size: int, length: int) -> Any:
        begun = time.monotonic()
        found = graph(size, length)
        torch.cuda.synchronize()
        graphs.append((size, length, time.monotonic() - begun))
        return found

    decoder._graph = timed  # type: ignore[method-assign]
    profile = cProfile.Profile()
    started = time.monotonic()
    profile.enable()
    decoder.capture_all()
    profile.disable()
    report["capture_all_s"] = time.monotonic() - started
    report["graphs"] = graphs
    report["n_decode_graphs"] = len(decoder._graphs)
    report["n_prefill_graphs"] = len(decoder._prefill_graphs)
    for key, count in (("cumulative", 45), ("tottime", 30)):
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats(key).print_stats(count)
        report[f"profile_{key}"] = text.getvalue()[-9000:]
    from torch._dynamo.utils import compile_times

    report["compile_times"] = compile_times(repr="str", aggregate=True)
    report["total_s"] = time.monotonic() - STARTED
    Path(out).write_text(json.dumps(report, indent=1))
    summary = {k: v for k, v in report.items() if not k.startswith(("profile", "graphs"))}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
