"""Device check of the static/CUDA-graph decode path on the bench model: correctness vs
transformers, per-step timings (eager static vs graph replay), capture time."""

import json
import sys
import time
from pathlib import Path

import torch

from metalserve import staticdecode
from metalserve.loader import load_version

base = Path(sys.argv[1])
doc = json.loads((base / "model.json").read_text())
DEVICE = sys.argv[3] if len(sys.argv) > 3 else "cuda"
CUDA = DEVICE.startswith("cuda")
bundle = load_version(base / "store", "bench-serve", doc["version_id"], device=DEVICE)
V = bundle.vocab_size
model = bundle.model
dev = bundle.device
out = {}


def timed(fn, reps=50):
    if not CUDA:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1000
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


with torch.inference_mode():
    t0 = time.monotonic()
    dec = staticdecode.StaticDecoder(
        model,
        slots=64,
        max_length=bundle.max_context,
        device=dev,
        dtype=bundle.dtype,
        cuda_graphs=CUDA,
    )
    out["alloc_s"] = round(time.monotonic() - t0, 3)
    dec.capture_all()
    out["capture_all_s"] = round(dec.capture_seconds, 3)
    out["graphs"] = len(dec._graphs)
    if CUDA:
        out["mem_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        out["mem_reserved_gib"] = round(torch.cuda.memory_reserved() / 2**30, 2)

    # correctness: 8 prompts of 64 tokens, 24 greedy steps, vs HF generate (no padding needed)
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(4, V, (8, 64), generator=g)
    ref = model.generate(
        input_ids=prompts.to(dev),
        attention_mask=torch.ones_like(prompts).to(dev),
        max_new_tokens=24,
        min_new_tokens=24,
        do_sample=False,
        pad_token_id=bundle.pad_token_id,
    )[:, 64:].tolist()
    lengths = torch.full((8,), 64)
    logits = dec.prefill(prompts, lengths, 0)
    hf_logits = model(input_ids=prompts.to(dev)).logits[:, -1]
    out["prefill_logit_maxdiff"] = float((logits.float() - hf_logits.float()).abs().max())
    chosen = logits.argmax(-1)
    dec.admit(0, chosen, lengths)
    ours = [[t] for t in chosen.tolist()]
    for step in range(23):
        lg = dec.decode(8, 64 + step)
        chosen = lg.argmax(-1)
        dec.advance(8, chosen)
        for row, t in enumerate(chosen.tolist()):
            ours[row].append(t)
    agree = [
        next((i for i, (a, b) in enumerate(zip(r, o, strict=True)) if a != b), 24)
        for r, o in zip(ref, ours, strict=True)
    ]
    out["greedy_tokens_equal_prefix_per_row"] = agree

    # timings at B=32, positions ~192 (bench's last steps), graph vs eager static
    dec.positions[:32] = 191
    dec.tokens[:32] = 100
    out["step_ms_graph_b32_l256"] = round(timed(lambda: dec.decode(32, 191)), 3)
    out["step_ms_graph_b64_l256"] = round(timed(lambda: dec.decode(64, 191)), 3)
    out["step_ms_graph_b8_l256"] = round(timed(lambda: dec.decode(8, 191)), 3)
    out["step_ms_eager_b32_l192"] = round(timed(lambda: dec._decode(32, 192)), 3)

    def full_step():
        lg = dec.decode(32, 191)
        c = lg.argmax(-1)
        dec.positions[:32] = 191
        return dec.to_host(c)

    t = time.perf_counter()
    for _ in range(200 if CUDA else 3):
        full_step()
    out["host_step_ms_graph_b32_incl_sync"] = round(
        (time.perf_counter() - t) / (200 if CUDA else 3) * 1000, 3
    )
    ids = torch.randint(4, V, (32, 64))
    out["prefill_ms_32x64"] = round(
        timed(lambda: dec.prefill(ids, torch.full((32,), 64), 0), reps=10), 3
    )
    out["prefill_ms_1x64"] = round(
        timed(lambda: dec.prefill(ids[:1], torch.full((1,), 64), 0), reps=10), 3
    )
print("PROF", json.dumps(out))
Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
