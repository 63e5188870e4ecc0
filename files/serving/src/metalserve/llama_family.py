"""Llama-family models (llama, mistral, qwen2, qwen3) built as plain torch modules from their
``config.json``, without transformers' modeling code.

The static decode path (``staticdecode``) runs a model with its own kernels: it reads the
modules' weights, the norms' epsilons, the attention's scaling and the rotary angles, and calls
only the embedding, the LM head and the rotary module. Those containers are built here, laid out
and named as transformers' models are (the checkpoints' tensor names), so that a load needs of
transformers its tokenizer alone: its modeling import (and the torch.compile and
torch.distributed machinery it pulls in) took 4-6 s of an 8B start's critical path on an H100
host and 13-23 s of a lab replica's start on a busy 2-core machine (issue 17, item 4).

These models have no forward of their own: they run on the static path only. ``unsupported``
names what a config asks for that is not built here; the loader then builds transformers' model.
Defaults for fields a ``config.json`` leaves out are transformers' (``DEFAULTS``); the tests
compare both builds' configs, angles and greedy output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# transformers' config defaults (5.x) for the fields a Llama-family config.json may leave out.
_COMMON: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        **_COMMON,
        "intermediate_size": 11008,
        "max_position_embeddings": 2048,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "mistral": {
        **_COMMON,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "sliding_window": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "qwen2": {**_COMMON, "vocab_size": 151936, "intermediate_size": 22016},
    "qwen3": {**_COMMON, "vocab_size": 151936, "intermediate_size": 22016, "head_dim": 128},
}
for _qwen in ("qwen2", "qwen3"):
    # Their configs' default is 32 key/value heads, whatever the number of query heads.
    DEFAULTS[_qwen].update(
        num_key_value_heads=32,
        max_position_embeddings=32768,
        use_sliding_window=False,
        max_window_layers=28,
    )
DEFAULT_ROPE_THETA = 10000.0
# The rotary angles' parameters each supported RoPE type reads (``staticdecode`` supports those
# whose angles depend on the position only).
_ROPE_KEYS = {
    "default": {"rope_type", "rope_theta"},
    "linear": {"rope_type", "rope_theta", "factor"},
    "llama3": {
        "rope_type",
        "rope_theta",
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    },
}


class Unsupported(Exception):
    """The config asks for something these modules do not build."""


@dataclass
class FamilyConfig:
    """The fields of a Llama-family config that the static path and the loader read, with
    transformers' defaults and its standardized ``rope_parameters``."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope_parameters: dict[str, Any]
    sliding_window: int | None
    layer_types: list[str] | None
    bos_token_id: int | list[int] | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def standardize_rope_params(self) -> None:
        """Already standard: transformers' RoPE functions call this on the config they get."""


def parse_config(raw: dict[str, Any]) -> FamilyConfig:
    """``raw`` (a config.json) as a ``FamilyConfig``; ``Unsupported`` names what is not built
    here (then transformers builds the model)."""
    model_type = raw.get("model_type")
    if model_type not in DEFAULTS:
        raise Unsupported(f"model type {model_type!r} is not one of {sorted(DEFAULTS)}")
    # A null is kept (no window, no end id); ``or`` below gives the derived defaults.
    merged = {**DEFAULTS[model_type], **raw}
    try:
        heads = int(merged["num_attention_heads"])
        hidden = int(merged["hidden_size"])
        layers = int(merged["num_hidden_layers"])
        window, layer_types = _window(model_type, merged, layers)
        config = FamilyConfig(
            model_type=model_type,
            vocab_size=int(merged["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(merged["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(merged.get("num_key_value_heads") or heads),
            head_dim=int(merged.get("head_dim") or hidden // heads),
            hidden_act=str(merged["hidden_act"]),
            max_position_embeddings=int(merged["max_position_embeddings"]),
            rms_norm_eps=float(merged["rms_norm_eps"]),
            tie_word_embeddings=bool(merged["tie_word_embeddings"]),
            rope_parameters=_rope_parameters(merged),
            sliding_window=window,
            layer_types=layer_types,
            bos_token_id=merged["bos_token_id"],
            eos_token_id=merged["eos_token_id"],
            pad_token_id=merged["pad_token_id"],
            # Qwen2: biases on q, k and v only; Mistral: none; Llama and Qwen3: attention_bias.
            qkv_bias=model_type == "qwen2"
            or (model_type != "mistral" and bool(merged["attention_bias"])),
            o_bias=model_type in ("llama", "qwen3") and bool(merged["attention_bias"]),
            mlp_bias=model_type == "llama" and bool(merged["mlp_bias"]),
            qk_norm=model_type == "qwen3",
            raw=raw,
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise Unsupported(f"config.json: {exc!r}") from exc
    if config.hidden_act.lower() != "silu":
        raise Unsupported(f"activation {config.hidden_act!r} is not silu")
    return config


def _window(model_type: str, merged: dict[str, Any], layers: int) -> tuple[Any, Any]:
    """The sliding window and per-layer attention kinds, as transformers' configs set them."""
    if model_type not in ("qwen2", "qwen3"):
        window = merged.get("sliding_window")
        return (int(window) if window is not None else None), merged.get("layer_types")
    sliding = bool(merged["use_sliding_window"])
    first_sliding = int(merged["max_window_layers"]) if sliding else layers
    layer_types = merged.get("layer_types") or [
        "sliding_attention" if i >= first_sliding else "full_attention" for i in range(layers)
    ]
    window = merged.get("sliding_window") if sliding else None
    return (int(window) if window is not None else None), list(layer_types)


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """transformers' standardized ``rope_parameters``: written so by transformers 5, from
    ``rope_scaling`` and ``rope_theta`` by earlier versions."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", raw.get("rope_theta", DEFAULT_ROPE_THETA))
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise Unsupported("a partial rotary factor")
    known = _ROPE_KEYS.get(params["rope_type"])
    if known is None:
        raise Unsupported(f"RoPE type {params['rope_type']!r}")
    # transformers' standardization fills it in the same way.
    if params["rope_type"] == "llama3" and params.get("original_max_position_embeddings") is None:
        params["original_max_position_embeddings"] = raw.get("max_position_embeddings")
    extra, missing = set(params) - known, known - set(params)
    if extra:
        raise Unsupported(f"RoPE parameters {sorted(extra)}")
    if missing or any(params[key] is None for key in known):
        raise Unsupported(f"RoPE {params['rope_type']} without {sorted(missing) or 'values'}")
    return params


class RMSNorm(nn.Module):
    """A Llama RMSNorm's weight and epsilon (``staticdecode`` computes it)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, device="meta", dtype=dtype))
        self.variance_epsilon = eps


# Parameters are made on the meta device, uninitialized (the loaded tensors replace them):
# initializing even meta tensors imports torch.compile's machinery (seconds).
def _linear(inputs: int, outputs: int, bias: bool, dtype: torch.dtype) -> nn.Linear:
    return nn.Linear(inputs, outputs, bias=bias, device="meta", dtype=dtype)


class Attention(nn.Module):
    def __init__(self, config: FamilyConfig, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        queries = config.num_attention_heads * head_dim
        kv = config.num_key_value_heads * head_dim
        self.scaling = head_dim**-0.5
        self.q_proj = _linear(hidden, queries, config.qkv_bias, dtype)
        self.k_proj = _linear(hidden, kv, config.qkv_bias, dtype)
        self.v_proj = _linear(hidden, kv, config.qkv_bias, dtype)
        self.o_proj = _linear(queries, hidden, config.o_bias, dtype)
        if config.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype)


class MLP(nn.Module):
    def __init__(self, config: FamilyConfig, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = _linear(hidden, inner, bias, dtype)
        self.up_proj = _linear(hidden, inner, bias, dtype)
        self.down_proj = _linear(inner, hidden, bias, dtype)


class DecoderLayer(nn.Module):
    def __init__(self, config: FamilyConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = Attention(config, dtype)
        self.mlp = MLP(config, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


class RotaryEmbedding(nn.Module):
    """The rotary angles, computed as transformers' Llama-family rotary module computes them."""

    inv_freq: torch.Tensor

    def __init__(self, config: FamilyConfig) -> None:
        super().__init__()
        params = config.rope_parameters
        if params["rope_type"] == "default":
            dim = config.head_dim
            steps = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
            inv_freq, self.attention_scaling = 1.0 / (params["rope_theta"] ** steps), 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inv_freq = self.inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1)
        inv_freq = inv_freq.to(dtype=torch.float, device=x.device)
        positions = position_ids[:, None, :].float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = (inv_freq @ positions).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class Model(nn.Module):
    def __init__(self, config: FamilyConfig, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(
            *shape, _weight=torch.empty(shape, device="meta", dtype=dtype), _freeze=True
        )
        layers = range(config.num_hidden_layers)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype) for _ in layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(config)


class CausalLM(nn.Module):
    """A Llama-family causal LM's modules and weights; it runs on the static path only."""

    static_path_only = True

    def __init__(self, config: FamilyConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.model = Model(config, dtype)
        self.lm_head = _linear(config.hidden_size, config.vocab_size, False, dtype)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def tie_weights(self, missing_keys: set[str] | None = None) -> None:
        """With tied embeddings the LM head is the embedding, stored in a checkpoint as either
        (``missing_keys``: the one it lacks). Where it has both and they differ (a head trained
        apart), both are kept, as transformers keeps them."""
        if not self.config.tie_word_embeddings:
            return
        missing = missing_keys or set()
        embedding, head = self.model.embed_tokens, self.lm_head
        if "model.embed_tokens.weight" in missing:
            embedding.weight = head.weight
        elif "lm_head.weight" in missing or torch.equal(embedding.weight, head.weight):
            head.weight = embedding.weight

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this model runs on the static decode path only")


def build(config: FamilyConfig, dtype: torch.dtype) -> CausalLM:
    """The model of ``config``: its parameters of ``dtype`` on the meta device (the loader
    makes the loaded tensors its parameters), its rotary frequencies computed on the CPU."""
    return CausalLM(config, dtype).eval().requires_grad_(False)
