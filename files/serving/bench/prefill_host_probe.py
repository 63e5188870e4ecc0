"""Issue 17 item 3: a prefill's host work outside its forward, and what a busy event loop adds.

On CUDA a bucketed prefill's forward is one graph replay; what else the engine thread does in
``StaticBatch.add`` is torch calls from Python, each of which lets go of the GIL. While the HTTP
event loop takes in a wave of requests (Python, holding the GIL between its own releases), each
such call can cost the engine thread a wait for the loop's current callback. This probe, on the
CPU, builds the static path for the 850M preset's layout (16 layers, 32 heads, 8 KV heads; hidden
256 to stay small) with the prefix cache on, and for one ``add`` of 16 prompts of 64 tokens
reports:

* ``top_level_ops``: torch operators called from Python outside the forward (the forward replaced
  by a stand-in that returns logits: on CUDA it is one graph replay, the pool's blocks included);
* ``host_ms_alone`` / ``host_ms_beside_loop``: that ``add``'s wall time (median of ``ROUNDS``),
  alone and beside a thread that runs Python in bursts of ``BURST_MS`` and lets go of the GIL
  between them (as uvloop does between callbacks), and their ratio.

``python bench/prefill_host_probe.py OUT.json`` (run it on two commits to compare them).
"""

from __future__ import annotations

import collections
import json
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, LlamaConfig

from metalserve import staticdecode
from metalserve.engine.batches import StaticBatch
from metalserve.engine.sequence import Sequence
from metalserve.sampling import SamplingParams

ROWS, PROMPT_TOKENS, VOCAB = 16, 64, 1024
ROUNDS = 30
BURST_MS = 0.3


class _Bundle:
    """What ``StaticBatch`` and ``Sequence`` read of a loaded model."""

    device = torch.device("cpu")
    eos_token_ids: frozenset[int] = frozenset()
    max_context = 512

    class tokenizer:  # LoadedModel's attribute name
        backend = Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))  # noqa: S106


def _batch() -> StaticBatch:
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=VOCAB,
        max_position_embeddings=512,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    decoder = staticdecode.StaticDecoder(
        model,
        slots=32,
        max_length=512,
        device=torch.device("cpu"),
        dtype=torch.float32,
        cuda_graphs=False,
        prefix_cache_tokens=8192,
    )
    logits = torch.zeros(ROWS, VOCAB)

    def forward(ids: torch.Tensor, *args: Any) -> torch.Tensor:  # the graph replay's stand-in
        return logits[: ids.shape[0]]

    decoder._prefill = forward  # type: ignore[method-assign]
    return StaticBatch(_Bundle(), decoder, None)  # type: ignore[arg-type]


def _add(batch: StaticBatch, rng: random.Random) -> float:
    """One ``add`` of new random prompts (nothing cached to reuse), its seconds; then clear."""
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    seqs = [
        Sequence(
            _Bundle(),  # type: ignore[arg-type]
            [rng.randrange(1, VOCAB) for _ in range(PROMPT_TOKENS)],
            params,
            sink=lambda event: None,
        )
        for _ in range(ROWS)
    ]
    started = time.perf_counter()
    with torch.inference_mode():
        batch.add(seqs)
    seconds = time.perf_counter() - started
    batch.clear()
    return seconds


def _count_ops(batch: StaticBatch, rng: random.Random) -> collections.Counter[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _add(batch, rng)
    return collections.Counter(e.name for e in prof.events() if e.cpu_parent is None)


def _beside_loop(batch: StaticBatch, rng: random.Random) -> list[float]:
    stop = threading.Event()

    def loop() -> None:  # Python in bursts, the GIL let go between them
        while not stop.is_set():
            end = time.perf_counter() + BURST_MS / 1e3
            while time.perf_counter() < end:
                pass
            time.sleep(0)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        return [_add(batch, rng) for _ in range(ROUNDS)]
    finally:
        stop.set()
        thread.join()


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    rng = random.Random(0)  # noqa: S311 (prompts, not secrets)
    batch = _batch()
    for _ in range(3):
        _add(batch, rng)  # warm-up
    ops = _count_ops(batch, rng)
    alone = statistics.median(_add(batch, rng) for _ in range(ROUNDS))
    beside = statistics.median(_beside_loop(batch, rng))
    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "torch": torch.__version__,
        "rows": ROWS,
        "prompt_tokens": PROMPT_TOKENS,
        "burst_ms": BURST_MS,
        "top_level_ops": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "host_ms_alone": round(alone * 1e3, 3),
        "host_ms_beside_loop": round(beside * 1e3, 3),
        "beside_vs_alone": round(beside / alone, 2),
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "ops"}, indent=2))


if __name__ == "__main__":
    main()
