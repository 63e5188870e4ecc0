"""Issue 17 item 4: where a replica's start goes after the load, on a GPU. In one process: the
imports, a model of ``bench serve``'s preset built on the device (uninitialized weights: no disk),
the static decoder, and ``capture_all`` (the layer's compilation, every decode and prefill graph)
under cProfile, with dynamo's own compile times and each graph's seconds; then, as a hot reload
of a version of the same shapes would, a new model and decoder twice (the projections' timings
reused, then timed again). Run from the
repository root, twice with one ``TORCHINDUCTOR_CACHE_DIR`` (cold, then warm):
``python3 files/serving/bench/ready_probe.py 8b REPORT.json``.
"""

from __future__ import annotations

import cProfile
import gc
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

from metalserve import skinny_linear, staticdecode  # noqa: E402
from metalserve.bench.common import LLAMA_PRESETS  # noqa: E402

SLOTS = 64  # the server's default max batch


def _timing(method: Any, record: list[tuple[Any, ...]]) -> Any:
    """``method``, recording each call's arguments and seconds (the device's work included)."""

    def timed(*args: Any) -> Any:
        begun = time.monotonic()
        found = method(*args)
        torch.cuda.synchronize()
        record.append((*args, time.monotonic() - begun))
        return found

    return timed


def _model(config: Any, device: torch.device) -> Any:
    """The preset's model on the device, weights uninitialized (no disk, no init kernels)."""
    with no_init_weights(), device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


def _decoder(model: Any, config: Any, device: torch.device) -> staticdecode.StaticDecoder:
    """The server's decoder on CUDA: graphs, the compiled layer, the default batch limit."""
    return staticdecode.StaticDecoder(
        model,
        slots=SLOTS,
        max_length=config.max_position_embeddings,
        device=device,
        dtype=torch.bfloat16,
        cuda_graphs=True,
        compile_layers=True,
    )


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
    model = _model(config, device)
    torch.cuda.synchronize()
    report["build_model_s"] = time.monotonic() - started
    started = time.monotonic()
    decoder = _decoder(model, config, device)
    report["decoder_init_s"] = time.monotonic() - started

    # Each decode graph's, prefill graph's and the tuning's seconds.
    graphs: list[tuple[Any, ...]] = []
    prefills: list[tuple[Any, ...]] = []
    tuning: list[tuple[Any, ...]] = []
    decoder._graph = _timing(decoder._graph, graphs)  # type: ignore[method-assign]
    decoder._prefill_graph = _timing(decoder._prefill_graph, prefills)  # type: ignore[method-assign]
    decoder._tune_projections = _timing(decoder._tune_projections, tuning)  # type: ignore[method-assign]
    profile = cProfile.Profile()
    started = time.monotonic()
    profile.enable()
    decoder.capture_all()
    profile.disable()
    report["capture_all_s"] = time.monotonic() - started
    report["graphs"] = graphs
    report["prefill_graphs"] = prefills
    report["decode_graphs_s"] = sum(g[2] for g in graphs)
    report["prefill_graphs_s"] = sum(g[2] for g in prefills)
    report["tune_s"] = sum(t[-1] for t in tuning)
    report["n_decode_graphs"] = len(decoder._graphs)
    report["n_prefill_graphs"] = len(decoder._prefill_graphs)
    for key, count in (("cumulative", 45), ("tottime", 30)):
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats(key).print_stats(count)
        report[f"profile_{key}"] = text.getvalue()[-9000:]
    from torch._dynamo.utils import compile_times

    report["compile_times"] = compile_times(repr="str", aggregate=True)
    # A hot reload of a version of the same shapes (a new model and decoder in this process),
    # twice: as it runs (the projections' timings reused), and with them timed again.
    for name, forget in (("reload_decode_path_s", False), ("reload_retimed_decode_path_s", True)):
        del decoder, model
        gc.collect()
        torch.cuda.empty_cache()
        if forget:
            skinny_linear._MEASURED.clear()
        started = time.monotonic()
        model = _model(config, device)
        decoder = _decoder(model, config, device)
        decoder.capture_all()
        report[name] = time.monotonic() - started
    report["total_s"] = time.monotonic() - STARTED
    Path(out).write_text(json.dumps(report, indent=1))
    lists = ("graphs", "prefill_graphs")
    summary = {k: v for k, v in report.items() if not k.startswith("profile") and k not in lists}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
