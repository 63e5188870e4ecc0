"""A tiny, deterministic Llama-architecture causal LM in Hugging Face layout, made offline.

Used by tests, the lab and smoke checks: it has the files a real model has (``config.json``,
``model.safetensors``, ``generation_config.json``, ``tokenizer.json`` with a chat template) and is
served by exactly the same code path, but weighs well under a megabyte. Nothing is downloaded: the
byte-level BPE tokenizer is trained on the built-in corpus below, and the weights come from a seeded
random init, so the same seed always gives the same bytes (and thus the same version id).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A metal server hums in the data center while
models answer questions for people all over the world. Once upon a time there was a tiny
language model that loved to count: one, two, three, four, five, six, seven, eight, nine, ten.
It read about rivers and mountains, about the sea and the sky, about cities, trains and bridges.
The operator rolled out a new version of the model, one host at a time, and nobody noticed.
Load balancers check the health of every replica; a replica that drains says so at once.
Numbers like 0123456789 and symbols like + - * / = ( ) [ ] { } < > are part of the text too.
Questions: what is the capital of France? Paris. What is two plus two? Four. Why is the sky blue?
Because air scatters blue light more than red light. Where do rivers go? Into lakes and the sea.
Write a short poem about the moon. The moon is bright, the night is long, the stars sing along.
"""

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
VOCAB_SIZE = 1024
CONTEXT_LENGTH = 512
# Far above the usual 0.02: with small weights a random network's greedy output collapses onto a
# handful of tokens; larger weights make it depend on the whole context and vary with the seed.
INIT_RANGE = 0.5


def make_tiny_model(out_dir: Path, seed: int = 0) -> list[Path]:
    """Write the tiny model into ``out_dir`` (created if needed); return the files written."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT_LENGTH,
        initializer_range=INIT_RANGE,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    # fork_rng: seeding for reproducible weights must not disturb the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sorted(p for p in out_dir.iterdir() if p.is_file())


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the built-in corpus (deterministic, ~20 ms)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS.splitlines(), trainer)
    bos = "<s>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        model_max_length=CONTEXT_LENGTH,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
