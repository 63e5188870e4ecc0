"""Where a prefill after a cached prefix spends its time, against the prefill of the whole
prompts and against prefills of the suffix alone (graph and eager), on one CUDA device.

Random weights of a ``metalserve.bench.common.LLAMA_PRESETS`` shape; writes a JSON report:
``python bench/prefix_prefill_probe.py OUT.json [8b|850m]``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from metalserve import staticdecode
from metalserve.bench.common import LLAMA_PRESETS

ROWS, SHARED, OWN, REPEATS = 32, 512, 64, 5


def timed(run: object) -> float:
    """Median seconds of ``run`` over REPEATS calls after one untimed call."""
    run()  # type: ignore[operator]
    torch.cuda.synchronize()
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        run()  # type: ignore[operator]
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def _questions(vocab: int) -> list[list[int]]:
    return [[0] * SHARED + torch.randint(10, vocab, (OWN,)).tolist() for _ in range(ROWS)]


def main() -> None:
    out, preset = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "8b"
    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_PRESETS[preset], torch_dtype="bfloat16")
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    decoder = staticdecode.StaticDecoder(
        model,
        slots=ROWS,
        max_length=config.max_position_embeddings,
        device=torch.device("cuda"),
        dtype=torch.bfloat16,
        cuda_graphs=True,
        prefix_cache_tokens=4096,
    )
    decoder.capture_all()
    shared = torch.randint(10, config.vocab_size, (SHARED,)).tolist()
    prompts = [shared + torch.randint(10, config.vocab_size, (OWN,)).tolist() for _ in range(ROWS)]
    suffixes = [p[SHARED:] for p in prompts]
    report: dict[str, object] = {"preset": preset, "rows": ROWS, "shared": SHARED, "own": OWN}
    with torch.inference_mode():
        decoder.prefill_prompts(prompts[:1], 0)  # the shared blocks are cached from now on
        assert decoder.prefix is not None
        whole = staticdecode._right_padded(prompts)
        lengths = torch.tensor([len(p) for p in prompts])
        report["whole_eager_s"] = timed(lambda: decoder.prefill(whole, lengths, 0))
        # New questions each call (a call caches its own blocks too): REPEATS + 1 sets.
        fresh = iter(
            [
                [shared + q[SHARED:] for q in _questions(config.vocab_size)]
                for _ in range(REPEATS + 2)
            ]
        )
        report["after_prefix_s"] = timed(lambda: decoder.prefill_prompts(next(fresh), 0))
        own = staticdecode._right_padded(suffixes)
        own_lengths = torch.tensor([len(p) for p in suffixes])
        report["own_graph_s"] = timed(lambda: decoder.prefill(own, own_lengths, 0))
        # The same size, never seen: what the cache costs where nothing matches (names, the
        # blocks' copies into the pool) beside the graph's prefill above.
        unseen = iter([_questions(config.vocab_size) for _ in range(REPEATS + 2)])
        report["own_unseen_via_cache_s"] = timed(
            lambda: decoder.prefill_prompts([q[SHARED:] for q in next(unseen)], 0)
        )
        decoder.cuda_graphs = False
        decoder.prefill_shapes = []
        report["own_eager_s"] = timed(lambda: decoder.prefill(own, own_lengths, 0))
        decoder.cuda_graphs = True
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            decoder.prefill_prompts(next(fresh), 0)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
        report["after_prefix_profile"] = table.splitlines()
    print(json.dumps({k: v for k, v in report.items() if k != "after_prefix_profile"}))
    print(table)
    Path(out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
