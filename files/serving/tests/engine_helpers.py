"""Shared helpers of the engine tests (test_sequence, test_batches, test_engine_loop and
test_staticdecode). A plain module, not conftest.py: it holds no fixtures."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from metalserve import staticdecode, weights
from metalserve.engine import Engine, Event, Sequence, TextDelta, generate_once
from metalserve.loader import LoadedModel
from metalserve.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [
    "The quick brown fox",
    "Hi",
    "Metal servers hum in the data center while models answer questions",
    "What is two plus two?",
    "Once",
    "Write a short poem about the moon.",
]


class Collector:
    """Sink of one sequence; waits for its terminal event."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()
        self.first = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self.first.set()
        if not isinstance(event, TextDelta):
            self.done.set()

    def wait(self, timeout: float = 30.0) -> Event:
        assert self.done.wait(timeout), "sequence did not finish"
        return self.events[-1]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDelta))


def submit(
    engine: Engine, bundle: LoadedModel, prompt: str, params: SamplingParams = GREEDY
) -> tuple[Sequence, Collector]:
    sink = Collector()
    seq = Sequence(
        bundle=bundle,
        prompt_ids=bundle.encode(prompt, add_special_tokens=True),
        params=params,
        sink=sink,
    )
    engine.submit(seq)
    return seq, sink


def free_bytes_for(
    config: Any, dtype: torch.dtype, context: int, slots: float, pool_tokens: int = 0
) -> int:
    """Free device memory (``staticdecode.free_device_bytes``) whose share for the static
    cache holds ``slots`` slots of ``context`` positions (the spare slot among them) and a
    prefix pool of ``pool_tokens`` (its scratch block beside)."""
    slot = staticdecode.cache_bytes(config, 1, context + 1, dtype)
    blocks = pool_tokens // staticdecode.prefixcache.BLOCK_TOKENS
    pool = (
        staticdecode.cache_bytes(config, blocks + 1, staticdecode.prefixcache.BLOCK_TOKENS, dtype)
        if blocks
        else 0
    )
    return int((slots * slot + pool) / staticdecode.CACHE_MEMORY_FRACTION)


def alone(bundle: LoadedModel, prompt: str, params: SamplingParams = GREEDY) -> str:
    return generate_once(bundle, bundle.encode(prompt, add_special_tokens=True), params)


def llama_relative(model_type: str, **extra: object) -> torch.nn.Module:
    """A tiny float32 model of a Llama relative, with random biases and q/k norm weights (their
    initial zeros and ones would hide a path that skips them)."""
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    configs = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
    }
    config = configs[model_type](
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **extra,
    )
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "q_norm" in name or "k_norm" in name:
                param.add_(torch.randn_like(param) * 0.3)
    return model


# Two right-padded prompts of different lengths (token ids of llama_relative's vocabulary).
SPLIT_IDS = [[5, 9, 17, 33, 2, 8, 41], [7, 3, 99]]


@torch.inference_mode()
def split_greedy(
    model_type: str,
    tp: Any,
    device: torch.device,
    dtype: torch.dtype,
    steps: int,
    *,
    compile_layers: bool = False,
    cuda_graphs: bool = False,
) -> dict[str, Any] | None:
    """llama_relative(model_type) on the static path, split over ``tp`` (a TensorParallel, or
    None): rank 0 (or the one process) prefills SPLIT_IDS and runs ``steps`` greedy decode steps,
    measuring each step's logits against a whole model's own transformers forward; the other
    ranks follow and return None. Returns the tokens and the worst relative logit error."""
    reference = llama_relative(model_type).to(device, dtype)
    decoder = staticdecode.StaticDecoder(
        llama_relative(model_type).to(device, dtype),  # the same seed: the same weights
        slots=2,
        max_length=256,
        device=device,
        dtype=dtype,
        cuda_graphs=cuda_graphs,
        compile_layers=compile_layers,
        tp=tp,
    )
    decoder.capture_all()  # every rank: compiles the layer (the same collectives on each)
    if tp is not None and tp.rank != 0:
        decoder.follow()
        return None
    sequences = [list(p) for p in SPLIT_IDS]
    ids = torch.zeros((2, max(len(p) for p in SPLIT_IDS)), dtype=torch.long)
    for row, prompt in enumerate(SPLIT_IDS):
        ids[row, : len(prompt)] = torch.tensor(prompt)
    lengths = torch.tensor([len(p) for p in SPLIT_IDS])
    logits = decoder.prefill(ids, lengths, 0)
    worst = 0.0
    for step in range(steps):
        for row, seq in enumerate(sequences):
            expected = reference(input_ids=torch.tensor([seq], device=device)).logits[0, -1]
            error = (logits[row].float() - expected.float()).abs().max() / expected.abs().max()
            worst = max(worst, float(error))
        chosen = logits.argmax(-1)
        if step == 0:
            decoder.admit(0, chosen, lengths)
        else:
            decoder.advance(2, chosen)
        for seq, token in zip(sequences, chosen.tolist(), strict=True):
            seq.append(token)
        logits = decoder.decode(2, max(len(s) for s in sequences) - 1)
    decoder.stop_followers()
    tokens = [seq[len(p) :] for seq, p in zip(sequences, SPLIT_IDS, strict=True)]
    return {"tokens": tokens, "worst_rel_err": worst}


# The store's smallest blocks: a tiny layer's tensors then span several, and a rank's rows
# whole blocks of their own.
SMALL_BLOCKS = 4096
SPLIT = "model.layers.0.mlp.gate_proj.weight"  # split on rows: each rank reads half of it


def rank_1_only_block(shard: Path) -> int:
    """A block of ``shard`` that lies inside rank 1's rows of SPLIT (of two ranks)."""
    spec = next(s for s in weights.read_header(shard) if s.name == SPLIT)
    rows = spec.shape[0]
    first = spec.begin + rows // 2 * (spec.nbytes // rows)
    block = -(-first // SMALL_BLOCKS)
    assert (block + 1) * SMALL_BLOCKS <= spec.end, "the tiny model's rows fill no whole block"
    return block


def corrupt_rank_1_only_block(shard: Path) -> int:
    """Flip a byte of ``rank_1_only_block(shard)``; return the block."""
    block = rank_1_only_block(shard)
    data = bytearray(shard.read_bytes())
    data[block * SMALL_BLOCKS + 7] ^= 0xFF
    shard.chmod(0o644)
    shard.write_bytes(data)
    return block


def padded_prompts(bundle: LoadedModel, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` of ``PROMPTS``, encoded and right-padded to one tensor, and their
    lengths (a prefill's arguments)."""
    prompts = [bundle.encode(p, add_special_tokens=True) for p in PROMPTS[:count]]
    ids = torch.full((count, max(len(p) for p in prompts)), bundle.pad_token_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt)
    return ids, torch.tensor([len(p) for p in prompts])
