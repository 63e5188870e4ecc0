"""Sampled token choice per decode step, side by side: the batched sampler against the one before.

``metalserve.sampling.choose_tokens_tensor`` draws every sampled row of a step together
(temperature and top-p over the batch, the exponential race, each row's noise from its own
generator) without a host sync. Before (commit 03bfef8 and earlier, kept below as
``per_row``), each sampled row ran transformers' warpers and ``torch.multinomial`` on its own:
a dozen kernels a row, and multinomial's checks read values back from the device twice a row.

Each case times the token choice of a batch of sampled rows up to the tokens on the host (what a
decode step waits for), alternating the two, and reports the medians and their ratio.

``python bench/sampling_probe.py OUT.json [cpu|cuda] [REPEATS]`` (default cpu, 30 repeats).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from metalserve.bench.common import environment
from metalserve.sampling import SamplingParams, choose_tokens_tensor, make_generator

# (rows, vocab, temperature, top_p): 850M's and Llama-3-8B's vocabularies, the batch of 32.
CASES = [
    (32, 32000, 0.8, 0.95),
    (32, 128256, 0.8, 0.95),
    (32, 128256, 1.0, 1.0),
    (8, 128256, 0.8, 0.95),
]


def per_row(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> torch.Tensor:
    """The sampler before: transformers' warpers and multinomial, one row at a time."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    chosen = logits.argmax(dim=-1)
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        scores = TemperatureLogitsWarper(p.temperature)(None, logits[row : row + 1].float())
        if p.top_p < 1.0:
            scores = TopPLogitsWarper(p.top_p)(None, scores)
        probs = torch.softmax(scores, dim=-1)
        valid = torch.isfinite(probs).all() & (probs.sum() > 0)
        greedy_only = torch.nn.functional.one_hot(chosen[row : row + 1], probs.shape[-1])
        probs = torch.where(valid, torch.nan_to_num(probs, nan=0.0), greedy_only.to(probs.dtype))
        chosen[row] = torch.multinomial(probs, num_samples=1, generator=generator)[0, 0]
    return chosen


def timed(choose: Any, logits: torch.Tensor, params: Any, generators: Any) -> float:
    started = time.perf_counter()
    choose(logits, params, generators).tolist()  # the step's wait for its tokens
    return time.perf_counter() - started


def main() -> None:
    out = Path(sys.argv[1])
    device = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cpu")
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    torch.manual_seed(0)
    cases = []
    for rows, vocab, temperature, top_p in CASES:
        logits = torch.randn(rows, vocab, device=device, dtype=torch.bfloat16) * 3
        params = [SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p)] * rows
        generators = [make_generator(device, seed) for seed in range(rows)]
        arms: dict[str, list[float]] = {"batched": [], "per_row": []}
        for _ in range(3):  # warm-up: allocator, kernels, lazy imports
            timed(choose_tokens_tensor, logits, params, generators)
            timed(per_row, logits, params, generators)
        for _ in range(repeats):
            arms["batched"].append(timed(choose_tokens_tensor, logits, params, generators))
            arms["per_row"].append(timed(per_row, logits, params, generators))
        medians = {arm: statistics.median(times) for arm, times in arms.items()}
        case = {
            "rows": rows,
            "vocab": vocab,
            "temperature": temperature,
            "top_p": top_p,
            "median_ms": {arm: round(1e3 * m, 3) for arm, m in medians.items()},
            "per_row_vs_batched": round(medians["per_row"] / medians["batched"], 2),
        }
        print(json.dumps(case))
        cases.append(case)
    report = {"environment": environment(str(device)), "repeats": repeats, "cases": cases}
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
