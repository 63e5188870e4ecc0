"""Correctness of the static/CUDA-graph decode path on the GPU, on the bench model.
1) float32: greedy tokens of our graph path == transformers generate (8 prompts x 24 tokens).
2) bfloat16, teacher-forced on transformers' own greedy tokens: relative logits error of our
   graph path vs a transformers forward, next to transformers' own batch-1 vs batch-8 spread."""

import json
import sys
from pathlib import Path

import torch

from metalserve import staticdecode
from metalserve.loader import load_version

base = Path(sys.argv[1])
device = sys.argv[3] if len(sys.argv) > 3 else "cuda"
doc = json.loads((base / "model.json").read_text())
out = {}
ROWS, STEPS, PROMPT = 8, 24, 64


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


for dtype in ("float32", "bfloat16"):
    bundle = load_version(
        base / "store", "bench-serve", doc["version_id"], device=device, dtype=dtype
    )
    with torch.inference_mode():
        model, dev = bundle.model, bundle.device
        dec = staticdecode.StaticDecoder(
            model,
            slots=ROWS,
            max_length=bundle.max_context,
            device=dev,
            dtype=bundle.dtype,
            cuda_graphs=dev.type == "cuda",
        )
        dec.capture_all()
        g = torch.Generator().manual_seed(5)
        prompts = torch.randint(4, bundle.vocab_size, (ROWS, PROMPT), generator=g)
        ref = model.generate(
            input_ids=prompts.to(dev),
            attention_mask=torch.ones_like(prompts).to(dev),
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=False,
            pad_token_id=bundle.pad_token_id,
        )
        ref_new = ref[:, PROMPT:]
        lengths = torch.full((ROWS,), PROMPT)
        logits = dec.prefill(prompts, lengths, 0)
        res = {"our_vs_hf_rel": [], "hf_b1_vs_b8_rel": [], "top1_agree": 0, "top1_total": 0}
        free_run = []
        for step in range(STEPS):
            seq = ref[:, : PROMPT + step]
            hf = model(input_ids=seq).logits[:, -1]
            hf1 = model(input_ids=seq[:1]).logits[:, -1]
            res["our_vs_hf_rel"].append(round(rel(logits, hf), 5))
            res["hf_b1_vs_b8_rel"].append(round(rel(hf1[0], hf[0]), 5))
            res["top1_agree"] += int((logits.argmax(-1) == hf.argmax(-1)).sum())
            res["top1_total"] += ROWS
            forced = ref_new[:, step]  # teacher forcing: feed transformers' token
            if step == 0:
                dec.admit(0, forced, lengths)
            else:
                dec.advance(ROWS, forced)
            logits = dec.decode(ROWS, PROMPT + step)
        res["our_vs_hf_rel_max"] = max(res["our_vs_hf_rel"])
        res["hf_b1_vs_b8_rel_max"] = max(res["hf_b1_vs_b8_rel"])
        # free-running greedy generation on our path vs transformers generate
        logits = dec.prefill(prompts, lengths, 0)
        chosen = logits.argmax(-1)
        dec.admit(0, chosen, lengths)
        ours = [chosen]
        for step in range(STEPS - 1):
            chosen = dec.decode(ROWS, PROMPT + step).argmax(-1)
            dec.advance(ROWS, chosen)
            ours.append(chosen)
        ours = torch.stack(ours, 1)
        res["free_run_tokens_equal"] = int((ours == ref_new).sum())
        res["free_run_tokens_total"] = ROWS * STEPS
        res["free_run_equal_prefix_per_row"] = [
            next((i for i in range(STEPS) if ours[r, i] != ref_new[r, i]), STEPS)
            for r in range(ROWS)
        ]
        del res["our_vs_hf_rel"], res["hf_b1_vs_b8_rel"]
        out[dtype] = res
        del dec, model, bundle
        torch.cuda.empty_cache() if device.startswith("cuda") else None
print("VERIFY", json.dumps(out))
Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
