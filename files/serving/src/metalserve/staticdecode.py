"""The fast decode path: a static KV cache and CUDA-graph decode steps (Llama architecture).

Eager transformers decoding launches a few hundred small kernels per step, so at serving batch
sizes a step costs more host time than GPU time. This module runs the same model (its own
``nn.Module`` layers and weights) with a decode step whose shapes never change:

* the KV cache is preallocated once per model: per layer ``[slots, kv_heads, max_context + 1,
  head_dim]`` for keys and for values (one spare position, see ``__init__``), one slot per
  sequence of the batch (the engine's ``max_batch_size``, or as many as the device's memory
  holds where fewer: ``_fit``). A sequence's token at position ``p`` lives at index ``p`` of its
  slot, so there is no left padding, no merging and no per-step reallocation; a row sees the cache
  entries ``<= its own position`` (its mask) and nothing of its batch mates;
* the active sequences occupy slots ``0..n-1``; when one leaves, the last one moves into its slot
  (one copy of that slot's used cache), so the step always runs over a prefix of the slots;
* a decode step reads its inputs (token and position of every slot) from device buffers and is
  captured as a CUDA graph for every batch-size bucket; the batch is padded to its bucket
  (padding rows compute on free slots, whose results nobody reads). Its attention reads each
  row's cache up to the row's own length (``decode_attention``'s kernel, the lengths being device
  data: one graph serves every length); with ``attention="bucketed"`` (or where the kernel does
  not run) torch's attention reads up to an attention-length bucket, and there is a graph for
  every pair of batch and length buckets. A replay is one launch.

Prefill is one forward per admitted group (right-padded, causal attention through SDPA) that
writes the prompt's keys and values straight into the group's slots. With CUDA graphs the group
is padded to a (rows, prompt length) bucket and that bucket's graph replayed: a short prefill
eagerly is hundreds of kernel launches holding the GIL (~15-20 ms at 850M or 8B), which every
new request's time to first token waited for; padding rows write to a spare slot. Groups larger
than every bucket prefill eagerly at their own shape. Token choice (greedy
argmax, or temperature/top-p with each sequence's own generator) happens after the graph, eagerly,
so sampling semantics are exactly the engine's. Without CUDA the same code runs eagerly (the CPU
tests use that), which is also what ``decode_mode=static`` gives on a GPU.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from metalserve import (
    decode_attention,
    devices,
    fp8,
    graph_capture,
    layer_kernels,
    prefixcache,
    skinny_linear,
    tensor_parallel,
    triton_warmup,
)

if TYPE_CHECKING:
    from torch.nn.attention import SDPBackend

log = logging.getLogger(__name__)

# Held while a graph is captured. Deferred captures run on the engine thread after a version
# went live, when a hot reload's caller may release the replaced one's memory on another
# thread: ``torch.cuda.empty_cache()`` during a capture fails torch's allocator (it asserts no
# capture is under way), so it takes this lock first (``host._free_memory``).
CAPTURING = threading.Lock()

# Llama's decoder layer, and its relatives of the same shape: Mistral (Llama's layer), Qwen2 (with
# q/k/v biases), Qwen3 (RMSNorm on each head's queries and keys before RoPE). Sliding-window
# attention is supported while the context fits the window (then it is full attention).
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# RoPE variants whose angles depend on the position only (not on the sequence length).
POSITION_ONLY_ROPE = frozenset({"default", "linear", "llama3"})
# Attention-length buckets start here and double up to the model's context.
MIN_LENGTH_BUCKET = 128
# The static cache may take at most this share of the device memory still free after loading.
CACHE_MEMORY_FRACTION = 0.8
# Prompt-length buckets of the bucketed prefill (with CUDA graphs: one graph per rows x length
# bucket); a group whose padded shape exceeds PREFILL_GRAPH_TOKENS tokens, or whose longest
# prompt exceeds the largest bucket, prefills eagerly at its own shape (compute-bound anyway).
PREFILL_LENGTHS = (16, 32, 64, 128, 256, 512)
PREFILL_GRAPH_TOKENS = 2048  # 32 prompts of 64 tokens; each graph's capture runs it once
# A prefill after cached prefixes masks its attention: rows x query heads per KV head x tokens x
# the longest prompt. Beyond this many mask bytes the group prefills its whole prompts instead
# (no mask: flash attention), so that a long group's mask, and the fused attention over it,
# cannot run the device out of memory (torch's math attention would also hold the scores).
MAX_MASK_BYTES = 256 * 2**20
# What decides between a prefill graph of a group's whole prompts and the eager prefill after
# their cached prefixes (an H200, round 2 steps 13 and 16): the eager pass spends about this long
# a layer launching kernels (8B's 32 layers ~30 ms), and a prefill graph runs the layers'
# projections at about this many FLOP/s (8B: 2,048 tokens in 58 ms). The graph wins while the
# tokens it computes beyond the eager pass's take less than those launches.
EAGER_PREFILL_LAYER_SECONDS = 0.9e-3
PREFILL_GRAPH_FLOPS = 4.9e14


def free_device_bytes(device: torch.device) -> int | None:
    """Device memory free for a new allocation: the driver's free memory and what torch's
    allocator holds unused (None off CUDA, where nothing is measured)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


class StaticDecodeUnavailable(Exception):
    """This model or device cannot use the static path; the engine falls back to the dynamic one."""


def unsupported_reason(model: Any) -> str | None:
    """Why ``model`` cannot run on the static path, or None if it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}"
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type not in POSITION_ONLY_ROPE:
        return f"RoPE type {rope_type!r} is not supported"
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, name) for name in needed):
        return "unexpected module layout"
    if not hasattr(model, "lm_head"):
        return "no lm_head"
    for layer in inner.layers:
        attn = getattr(layer, "self_attn", None)
        parts = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")
        if attn is None or not all(hasattr(attn, name) for name in parts):
            return "unexpected attention layout"
        norms = ("mlp", "input_layernorm", "post_attention_layernorm")
        if not all(hasattr(layer, name) for name in norms):
            return "unexpected decoder layer layout"
        if hasattr(attn, "q_norm") != hasattr(attn, "k_norm"):
            return "a query norm without a key norm (or the reverse)"
        mlp = layer.mlp
        if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
            return "unexpected MLP layout"
        activation = str(getattr(config, "hidden_act", "")).lower()
        if activation != "silu":
            return f"activation {activation!r} is not silu"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not (hasattr(norm, "weight") and hasattr(norm, "variance_epsilon")):
                return "unexpected norm layout"
    return None


def sliding_window(config: Any) -> int | None:
    """The attention window of a model whose layers (some or all) attend to the last N tokens
    only; None when every layer attends to the whole context."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None  # Qwen2/Qwen3 with use_sliding_window off, or its layers all full
    return int(window)


def batch_buckets(slots: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every 8 up to 64, every 32 up to 256,
    every 128 beyond; always ending at ``slots``."""
    sizes = [1, 2, 4, 8]
    step_limits = ((8, 64), (32, 256), (128, None))
    size = 8
    for step, limit in step_limits:
        while size < slots and (limit is None or size < limit):
            size += step
            sizes.append(size)
    return sorted({s for s in sizes if s < slots} | {slots})


def length_buckets(max_length: int) -> list[int]:
    """Attention lengths that get a graph: doubling from MIN_LENGTH_BUCKET up to the context."""
    lengths = []
    length = MIN_LENGTH_BUCKET
    while length < max_length:
        lengths.append(length)
        length *= 2
    lengths.append(max_length)
    return lengths


def prefill_shapes(slots: int, max_length: int) -> list[tuple[int, int]]:
    """(rows, length) buckets of the bucketed prefill: rows in powers of two up to ``slots``,
    lengths from PREFILL_LENGTHS up to the context, at most PREFILL_GRAPH_TOKENS tokens each."""
    rows = sorted({2**i for i in range(slots.bit_length()) if 2**i < slots} | {slots})
    lengths = [length for length in PREFILL_LENGTHS if length <= max_length]
    return [(r, n) for r in rows for n in lengths if r * n <= PREFILL_GRAPH_TOKENS]


def bucket(value: int, buckets: list[int]) -> int:
    """The smallest bucket that holds ``value``."""
    for size in buckets:
        if size >= value:
            return size
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


def cache_bytes(config: Any, slots: int, max_length: int, dtype: torch.dtype) -> int:
    """Bytes of the static keys and values of ``slots`` sequences of ``max_length`` tokens."""
    head_dim = config_head_dim(config)
    per_token = 2 * int(config.num_hidden_layers) * int(config.num_key_value_heads) * head_dim
    return per_token * slots * max_length * torch.empty((), dtype=dtype).element_size()


def config_head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim or config.hidden_size // config.num_attention_heads)


class _After(NamedTuple):
    """A prefill after cached prefixes: row ``i`` (slot ``rows.start + i``) holds its first
    ``starts[i]`` positions already, and no row is longer than ``span`` in all (the positions
    its queries read)."""

    starts: torch.Tensor
    span: int
    rows: slice


def _right_padded(prompts: list[list[int]]) -> torch.Tensor:
    """``prompts`` as one [n, longest] tensor, right-padded (with zeros: causal attention keeps
    every real token from reading the padding)."""
    longest = max(map(len, prompts))
    # One tensor from one list: a copy per row would be a torch call per row, each letting go
    # of the GIL that the HTTP event loop then holds (a prefill runs beside a wave of requests).
    return torch.tensor([p + [0] * (longest - len(p)) for p in prompts], dtype=torch.long)


@functools.cache
def _attention_backends() -> list[SDPBackend]:
    """Every SDPA backend but cuDNN's, which plans anew for every new sequence length."""
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


_rms_norm_of = layer_kernels.rms_norm_reference


def _rms_norm(module: Any, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm of ``module``'s weight and epsilon (see ``_rms_norm_of``)."""
    return _rms_norm_of(x, module.weight, float(module.variance_epsilon))


class LayerShape(NamedTuple):
    """What every decoder layer of a model shares (``own_lengths``: the decode step's attention
    reads each row up to its own length, ``decode_attention``, not the length bucket;
    ``skinny``: its projections go through ``skinny_linear``'s operator, which runs its kernel
    where ``tune`` found it faster; ``fused``: its elementwise steps run ``layer_kernels``' fused
    kernels, where the layer is not compiled)."""

    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    own_lengths: bool = False
    skinny: bool = False
    fused: bool = False


# The decode step's attention (``StaticDecoder(attention=...)``).
ATTENTIONS = ("auto", "bucketed", "own")
# The decode step's projections (``StaticDecoder(gemm=...)``): "auto" tunes ``skinny_linear``'s
# kernel against cuBLAS per product where it runs; "torch" is torch's linear (cuBLAS) always.
GEMMS = ("auto", "torch")


class LayerWeights(NamedTuple):
    """One decoder layer's parameters, q/k/v and gate/up fused (views of the model's own, or
    with ``--quantization fp8`` the four projections in FP8)."""

    input_norm: torch.Tensor
    input_eps: float
    qkv: torch.Tensor | fp8.Fp8Weight
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor | fp8.Fp8Weight
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    post_eps: float
    # Qwen3: RMSNorm of each head's queries and keys (over head_dim) before RoPE; else None.
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    qk_eps: float
    gate_up: torch.Tensor | fp8.Fp8Weight
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor | fp8.Fp8Weight
    down_bias: torch.Tensor | None

    def projections(self) -> list[torch.Tensor | fp8.Fp8Weight]:
        return [self.qkv, self.o_proj, self.gate_up, self.down]

    def in_fp8(self) -> LayerWeights:
        """The same layer with its projections quantized to FP8 (per output channel)."""

        def quantized(w: torch.Tensor | fp8.Fp8Weight) -> fp8.Fp8Weight:
            return w if isinstance(w, fp8.Fp8Weight) else fp8.quantize_weight(w)

        return self._replace(
            qkv=quantized(self.qkv),
            o_proj=quantized(self.o_proj),
            gate_up=quantized(self.gate_up),
            down=quantized(self.down),
        )


def decode_layer(
    x: torch.Tensor,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    bias: torch.Tensor,
    positions: torch.Tensor,
    w: LayerWeights,
    keys: torch.Tensor,
    values: torch.Tensor,
    shape: LayerShape,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One decoder layer of a decode step over rows ``0..batch-1`` (``x``: [batch, hidden]):
    fused norm, one q/k/v GEMM, RoPE on q and k together, the new keys and values written at
    each row's position of its own slot (``keys``/``values``: the layer's whole cache), grouped-
    query attention over the first ``bias.shape[-1]`` entries (``bias``: 0 or -inf per entry,
    ``[batch, 1, 1, length]``),
    o_proj, fused norm, one gate/up GEMM, SiLU, down_proj. A pure function of its arguments
    but for the cache writes, so ``torch.compile`` compiles it once for every layer. With tensor
    parallelism ``reduce`` sums o_proj's and down's partial outputs over the ranks."""
    heads, kv_heads, head_dim = shape.heads, shape.kv_heads, shape.head_dim
    batch, length = x.shape[0], bias.shape[-1]
    # Fused: one kernel each; else eager torch (what the compiled layer traces).
    norm = layer_kernels.rms_norm if shape.fused else _rms_norm_of
    rope_store = layer_kernels.rope_store if shape.fused else layer_kernels.rope_store_reference
    h = norm(x, w.input_norm, w.input_eps)
    qkv = _project(h, w.qkv, w.qkv_bias, shape).view(batch, heads + 2 * kv_heads, head_dim)
    q = rope_store(
        qkv, cos, signed_sin, positions, keys, values, heads, kv_heads, w.q_norm, w.k_norm, w.qk_eps
    )
    if shape.own_lengths:
        out = decode_attention.attend(q, keys, values, positions + 1, shape.scaling)
        return _decode_layer_rest(x, out.reshape(batch, heads * head_dim), w, shape, reduce)
    # Grouped-query attention of each row's one query over its slot's first ``length`` entries,
    # masked beyond its own position (measured on an H200 at 8B: a little faster than matmul,
    # masked softmax, matmul, compiled or not).
    out = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2),  # [batch, heads, 1, head_dim]
        keys[:batch, :, :length],  # [batch, kv_heads, length, head_dim]
        values[:batch, :, :length],
        attn_mask=bias.to(q.dtype),
        scale=shape.scaling,
        enable_gqa=True,
    )
    return _decode_layer_rest(x, out.reshape(batch, heads * head_dim), w, shape, reduce)


def _project(
    x: torch.Tensor,
    w: torch.Tensor | fp8.Fp8Weight,
    bias: torch.Tensor | None,
    shape: LayerShape,
) -> torch.Tensor:
    """One projection of a decode step: ``skinny_linear``'s operator for the model's own
    weights without a bias where the decoder tuned it, else ``fp8.linear``."""
    if shape.skinny and bias is None and isinstance(w, torch.Tensor):
        result: torch.Tensor = skinny_linear.linear(x, w)
        return result
    return fp8.linear(x, w, bias)


def _decode_layer_rest(
    x: torch.Tensor,
    out: torch.Tensor,
    w: LayerWeights,
    shape: LayerShape,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """``decode_layer`` after the attention (``out``: [batch, heads x head_dim])."""
    attended = _project(out, w.o_proj, w.o_bias, shape)
    if reduce is not None:
        attended = reduce(attended)
    if shape.fused:
        x, normed = layer_kernels.add_rms_norm(x, attended, w.post_norm, w.post_eps)
        activated = layer_kernels.silu_mul(_project(normed, w.gate_up, w.gate_up_bias, shape))
    else:
        x = x + attended
        normed = _rms_norm_of(x, w.post_norm, w.post_eps)
        gate, up = _project(normed, w.gate_up, w.gate_up_bias, shape).chunk(2, dim=-1)
        activated = torch.nn.functional.silu(gate) * up
    if shape.skinny and reduce is None and w.down_bias is None and isinstance(w.down, torch.Tensor):
        # The residual added by the projection's own kernel (no kernel of its own).
        added: torch.Tensor = skinny_linear.linear_add(activated, w.down, x)
        return added
    out_mlp = _project(activated, w.down, w.down_bias, shape)
    result: torch.Tensor = x + (out_mlp if reduce is None else reduce(out_mlp))
    return result


@functools.cache
def compiled_decode_layer() -> Any:
    """``decode_layer`` compiled, once per process: one compilation serves every layer, every
    model of the same shapes and dtype (a hot reload compiles nothing) and, with the batch's
    rows and the attention length dynamic, every bucket (batch 1 gets its own). It fuses each
    layer's norms, RoPE with the cache writes, SiLU with the product: a decode step launches far
    fewer kernels."""
    import torch.fx.experimental._config as fx_config

    # Static sizes but for the dimensions ``step`` marks: with every size symbolic
    # (``dynamic=True``: the weights' and the cache's too) dynamo and AOTAutograd spent most of
    # a start reasoning about them with sympy, even with the compiled code cached (850M on an
    # H200, 2026-12-04: 27 of the 38 s of the decode path).
    compiled = torch.compile(decode_layer, fullgraph=True)

    def step(
        x: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        bias: torch.Tensor,
        positions: torch.Tensor,
        *rest: Any,
    ) -> Any:
        # The batch's rows (a size of 1 is always specialized: batch 1 compiles apart) and the
        # attention length vary; nothing else does.
        if x.shape[0] > 1:
            for rows in (x, cos, signed_sin, bias, positions):
                torch._dynamo.mark_dynamic(rows, 0)
        torch._dynamo.mark_dynamic(bias, 3)
        # Without duck sizing: a batch bucket equal to a length bucket would become a guard,
        # and a recompilation for every bucket that breaks it.
        with fx_config.patch(use_duck_shape=False):  # type: ignore[attr-defined]
            return compiled(x, cos, signed_sin, bias, positions, *rest)

    return step


def _layer_weights(layer: Any) -> LayerWeights:
    """Fuse ``layer``'s q/k/v and gate/up projections; collect what ``decode_layer`` needs."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv, qkv_bias = _fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
    gate_up, gate_up_bias = _fuse_linears([mlp.gate_proj, mlp.up_proj])
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return LayerWeights(
        input_norm=layer.input_layernorm.weight.detach(),
        input_eps=float(layer.input_layernorm.variance_epsilon),
        qkv=qkv,
        qkv_bias=qkv_bias,
        o_proj=attn.o_proj.weight.detach(),
        o_bias=_detached(attn.o_proj.bias),
        post_norm=layer.post_attention_layernorm.weight.detach(),
        post_eps=float(layer.post_attention_layernorm.variance_epsilon),
        q_norm=q_norm.weight.detach() if q_norm is not None else None,
        k_norm=k_norm.weight.detach() if k_norm is not None else None,
        qk_eps=float(q_norm.variance_epsilon) if q_norm is not None else 0.0,
        gate_up=gate_up,
        gate_up_bias=gate_up_bias,
        down=mlp.down_proj.weight.detach(),
        down_bias=_detached(mlp.down_proj.bias),
    )


def _release_projections(layer: Any) -> None:
    """Give the memory of a layer's projection weights back (they are on ``meta`` after)."""
    attn, mlp = layer.self_attn, layer.mlp
    projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
    for linear in (*projections, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        linear.weight = torch.nn.Parameter(linear.weight.to("meta"), requires_grad=False)


def _weight_bytes(model: Any, layers: list[LayerWeights]) -> int:
    """Bytes the model's weights take on its device: its parameters (shared ones once, released
    ones not) and the projections it no longer holds (FP8 ones with their scales, a tensor-
    parallel rank's parts); projections that are views of its parameters count once."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    released = bool(layers) and model.model.layers[0].self_attn.q_proj.weight.is_meta
    own = sum(
        t.numel() * t.element_size()
        for w in layers
        for p in w.projections()
        if released or isinstance(p, fp8.Fp8Weight)
        for t in (p if isinstance(p, fp8.Fp8Weight) else (p,))
    )
    return int(params + own)


def _detached(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach()


def _fuse_linears(linears: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several ``nn.Linear`` of the same input: the modules' own
    parameters become views into it, so the model keeps working and no memory is duplicated.
    One GEMM then replaces several small ones in the decode step."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    biases = [linear.bias for linear in linears]
    bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
    if bias is None and any(b is not None for b in biases):
        raise StaticDecodeUnavailable("some projections have a bias and some have none")
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = torch.nn.Parameter(weight[start : start + rows], requires_grad=False)
        if bias is not None:
            linear.bias = torch.nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    return weight, bias


class StaticDecoder:
    """A model's static KV cache, its decode-step inputs and (on CUDA) its captured graphs.

    Used by one thread at a time (the engine's). Slots ``0..n-1`` hold the active sequences.
    """

    def __init__(
        self,
        model: Any,
        *,
        slots: int,
        max_length: int,
        device: torch.device,
        dtype: torch.dtype,
        cuda_graphs: bool,
        compile_layers: bool = False,
        bucketed_prefill: bool | None = None,
        quantization: str = "none",
        attention: str = "auto",
        gemm: str = "auto",
        prefix_cache_tokens: int = 0,
        tp: tensor_parallel.TensorParallel | None = None,
        reserve_bytes: int = 0,
    ) -> None:
        """``attention``, the decode step's: "auto" reads each row up to its own length where
        the kernel runs (CUDA with Triton: ``decode_attention``), "bucketed" up to the length
        bucket, "own" each row's own length everywhere (without the kernel: torch's attention
        over the whole cache, masked; slow, for tests). ``gemm``, its projections' (``GEMMS``;
        "auto" tunes ``skinny_linear`` in ``capture_all``, with CUDA graphs and the model's own
        bfloat16 or float16 weights). ``prefix_cache_tokens``: the keys and values of up to this
        many prompt tokens kept for prompts that start alike (``prefill_prompts``), where the
        device memory holds them beside the cache (with tensor parallelism: every rank's), else
        none. ``reserve_bytes``: device memory the cache leaves free (a hot reload's next
        version loads there)."""
        if quantization not in fp8.QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(fp8.QUANTIZATIONS)}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}")
        if gemm not in GEMMS:
            raise ValueError(f"gemm must be one of {', '.join(GEMMS)}")
        self.tp = tp if tp is not None and tp.world > 1 else None
        if self.tp is not None and cuda_graphs:
            backend = torch.distributed.get_backend(self.tp.group)
            if backend != "nccl":
                # NCCL's collectives can be captured in a CUDA graph; gloo's run on the host.
                raise StaticDecodeUnavailable(
                    f"CUDA graphs over tensor-parallel ranks need NCCL, not {backend}"
                )
        reason = unsupported_reason(model)
        if reason is not None:
            raise StaticDecodeUnavailable(reason)
        window = sliding_window(model.config)
        if window is not None and max_length > window:
            raise StaticDecodeUnavailable(
                f"sliding-window attention ({window} tokens) over a context of {max_length}: "
                "the static path attends to the whole context"
            )
        if cuda_graphs and device.type != "cuda":
            raise StaticDecodeUnavailable("CUDA graphs need a CUDA device")
        config = model.config
        self.max_length = max_length
        self.device = device
        self.dtype = dtype
        self.cuda_graphs = cuda_graphs
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = config_head_dim(config)
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.scaling = float(self.layers[0].self_attn.scaling)
        # Each row's own length where the kernel runs: then one length bucket (one graph per
        # batch size), as every length runs the same kernel.
        self.own_lengths = attention == "own" or (
            attention == "auto"
            and decode_attention.kernel_available(device)
            and decode_attention.supported(self.head_dim, self.heads, self.kv_heads)
        )
        self.lengths = [max_length] if self.own_lengths else length_buckets(max_length)
        # Per layer: q, k and v in one GEMM; gate and up in one GEMM.
        with torch.no_grad():
            self.layer_weights = [_layer_weights(layer) for layer in self.layers]
        if self.tp is not None:
            self._split_layers(self.tp, int(config.intermediate_size))
        self.quantization = quantization
        if quantization == "fp8":
            self._quantize_layers()
        self.skinny = (
            gemm == "auto"
            and cuda_graphs
            and quantization == "none"
            and dtype in skinny_linear.DTYPES
            and skinny_linear.kernel_available(device)
        )
        self.gemm_tuning: list[dict[str, Any]] = []
        self.compiled = compile_layers
        self._layer_step: Any = compiled_decode_layer() if compile_layers else decode_layer
        # Uncompiled, the layer's elementwise steps run fused kernels where they run.
        self.fused = not compile_layers and layer_kernels.kernels_available(device)
        # decode_layer's last argument: the sum over the ranks, with tensor parallelism.
        self._layer_reduce: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = (
            (self.tp.reduce,) if self.tp is not None else ()
        )

        # One spare position: no attention slice is then the whole cache. A whole slice is
        # contiguous and a partial one is not, and the compiled layer would be compiled for each.
        cached_positions = max_length + 1
        world = self.tp.world if self.tp is not None else 1
        slot_bytes = cache_bytes(config, 1, cached_positions, dtype) // world
        blocks = prefix_cache_tokens // prefixcache.BLOCK_TOKENS
        # One more pool block than the index names: the scratch block, where a prefill's blocks
        # that are not to be kept go (a graph writes every block of its rows, kept or not).
        pool_bytes = cache_bytes(config, blocks + 1, prefixcache.BLOCK_TOKENS, dtype) // world
        slots, blocks = self._fit(slots, slot_bytes, blocks, pool_bytes, reserve_bytes)
        pool_bytes = pool_bytes if blocks else 0
        self.slots = slots
        self.batch_sizes = batch_buckets(slots)

        # Prefills padded to (rows, length) buckets (default: with CUDA graphs, where each
        # bucket is one graph: a prefill is then one launch, not hundreds of eager kernels).
        self.bucketed_prefill = cuda_graphs if bucketed_prefill is None else bucketed_prefill
        self.prefill_shapes = prefill_shapes(slots, max_length) if self.bucketed_prefill else []
        # Whether a group that a prefill graph holds may run as that graph, its cached prefixes
        # unused (still cached), where the eager prefill after them would cost more
        # (``_graph_beats_prefix``).
        self.graph_before_prefix = cuda_graphs and self.bucketed_prefill

        # One spare slot: a bucketed prefill's padding rows write their keys and values there.
        self.spare_slot = slots
        self.cache_bytes = (slots + 1) * slot_bytes
        self.prefix = prefixcache.PrefixIndex(blocks) if blocks else None
        self.prefix_cache_bytes = pool_bytes
        self.scratch_block = blocks
        # One tensor per layer, not one for all: a compiled layer step then sees the same
        # tensor layout (no storage offset) in every layer, and compiles once.
        shape = (slots + 1, self.kv_heads, cached_positions, self.head_dim)
        with torch.inference_mode():
            self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
            self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
            # The prefix cache's pool: per layer [block, position in block, kv_heads, head_dim]
            # (the order in which ``_copy_blocks`` indexes a slot's block), the scratch last.
            pool = (
                blocks + 1 if blocks else 0,
                prefixcache.BLOCK_TOKENS,
                self.kv_heads,
                self.head_dim,
            )
            self.pool_keys = [torch.zeros(pool, dtype=dtype, device=device) for _ in self.layers]
            self.pool_values = [torch.zeros(pool, dtype=dtype, device=device) for _ in self.layers]
            self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
            self.positions = torch.zeros(slots, dtype=torch.long, device=device)
            self.key_index = torch.arange(max_length, device=device)
            # With graphs and each row's own length, one length bucket: the decode step's mask
            # is never read, and a step need not build it (a few kernels a step).
            self._unread_mask = (
                torch.zeros((slots, 1, 1, max_length), dtype=torch.float32, device=device)
                if self.own_lengths and cuda_graphs
                else None
            )
            # The same angles transformers computes per forward, once for every position.
            anchor = torch.zeros((), dtype=dtype, device=device)
            cos, sin = inner.rotary_emb(anchor, self.key_index[None])
            self.cos = cos[0]  # [max_length, head_dim]
            half = self.head_dim // 2
            self.signed_sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
            # The bucketed prefill's inputs: token ids, each row's slot and last prompt index.
            rows = max((r for r, _ in self.prefill_shapes), default=0)
            longest = max((n for _, n in self.prefill_shapes), default=0)
            self._prefill_ids = torch.zeros((rows, longest), dtype=torch.long, device=device)
            # And the rest, one upload for all: each row's slot (the spare slot for padding
            # rows), its last prompt index and, with a prefix cache, the pool block each of its
            # whole blocks goes to (``_store_blocks``; the scratch block for those not kept).
            kept_blocks = longest // prefixcache.BLOCK_TOKENS if self.prefix is not None else 0
            self._prefill_table = torch.zeros(
                (2 + kept_blocks, rows), dtype=torch.long, device=device
            )
            self._prefill_table[0] = slots
            self._prefill_table[2:] = self.scratch_block
        self._host = torch.empty(
            slots, dtype=torch.long, pin_memory=device.type == "cuda" and torch.cuda.is_available()
        )
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._prefill_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Prefill buckets whose graphs ``capture_deferred`` captures later (largest first: they
        # run eagerly until then), and those whose capture failed there (a larger bucket, whose
        # graph exists, takes their groups: their own step may be what failed).
        self._deferred: list[tuple[int, int]] = []
        self._failed_prefill: set[tuple[int, int]] = set()
        # The same for decode steps' (batch, length) buckets: until theirs is captured (or
        # where its capture failed) a step runs in the next larger captured batch bucket.
        self._deferred_decode: list[tuple[int, int]] = []
        self._failed_decode: set[tuple[int, int]] = set()
        self._pool: graph_capture.GraphPool | None = None
        self._copied: torch.cuda.Event | None = None
        if device.type == "cuda":
            self._copied = torch.cuda.Event()
        self.capture_seconds = 0.0
        self.weight_bytes = _weight_bytes(model, self.layer_weights)
        # A token's FLOPs (2 a multiply-add) through the layers' projections (this rank's share).
        self.prefill_flop_per_token = 2 * sum(
            (p.weight if isinstance(p, fp8.Fp8Weight) else p).numel()
            for w in self.layer_weights
            for p in w.projections()
        )

    def _split_layers(self, tp: tensor_parallel.TensorParallel, intermediate: int) -> None:
        """Keep this rank's heads and MLP rows of every layer (``tensor_parallel``); the
        model's whole projections are released, as after FP8 quantization."""
        reason = tensor_parallel.unsupported_reason(
            self.heads, self.kv_heads, intermediate, tp.world
        )
        if reason is not None:
            raise StaticDecodeUnavailable(reason)
        whole = LayerShape(self.heads, self.kv_heads, self.head_dim, self.scaling, self.own_lengths)
        with torch.no_grad():
            for index, layer in enumerate(self.layers):
                self.layer_weights[index] = tensor_parallel.shard_layer(
                    self.layer_weights[index], whole, tp
                )
                _release_projections(layer)
        part = tensor_parallel.shard_shape(whole, tp)
        self.heads, self.kv_heads = part.heads, part.kv_heads

    def _announce(self, op: int, numbers: list[int], tensors: list[torch.Tensor]) -> None:
        """Rank 0 of a tensor-parallel replica: send the step about to run to the other ranks."""
        if self.tp is not None and self.tp.rank == 0:
            self.tp.send_step(op, numbers, tensors, self.device)

    def follow(self) -> int:
        """Ranks other than 0: run rank 0's steps as it announces them, until it stops (STOP)
        or swaps versions (RELOAD); returns which."""
        if self.tp is None or self.tp.rank == 0:
            raise RuntimeError("only a tensor-parallel rank other than 0 follows")
        steps = {
            tensor_parallel.PREFILL: lambda n, t: self.prefill(
                t[0].cpu(), t[1].cpu(), n[0], t[2].cpu() if len(t) > 2 else None
            ),
            tensor_parallel.ADMIT: lambda n, t: self.admit(n[0], t[0], t[1]),
            tensor_parallel.DECODE: lambda n, t: self.decode(n[0], n[1]),
            tensor_parallel.ADVANCE: lambda n, t: self.advance(n[0], t[0]),
            tensor_parallel.MOVE: lambda n, t: self.move(t[0].tolist(), t[1].tolist(), n[0]),
            tensor_parallel.PREFIX_COPY: lambda n, t: self._copy_where(t[0]),
            tensor_parallel.PREFILL_AFTER: lambda n, t: self._prefill_after_tensors(
                t[0], t[1], t[2], n[0], n[1], t[3].cpu()
            ),
        }
        with torch.inference_mode():
            while True:
                op, numbers, tensors = self.tp.receive_step(self.device)
                if op in (tensor_parallel.STOP, tensor_parallel.RELOAD):
                    return op
                steps[op](numbers, tensors)

    def stop_followers(self) -> None:
        """Rank 0: end the other ranks' ``follow`` (the replica stops or swaps models)."""
        self._announce(tensor_parallel.STOP, [], [])

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """o_proj's or down's output summed over the ranks (itself without tensor parallelism)."""
        return partial if self.tp is None else self.tp.reduce(partial)

    def _quantize_layers(self) -> None:
        """Every layer's projections in FP8, layer by layer, each layer's bfloat16 projections
        released as soon as it is done (the peak is one layer over the model): afterwards the
        model's own modules cannot run a forward; the static path never asks them to."""
        shapes = [
            p.shape
            for w in self.layer_weights
            for p in w.projections()
            if isinstance(p, torch.Tensor)
        ]
        reason = fp8.unsupported_reason(self.device, self.dtype, shapes)
        if reason is not None:
            raise StaticDecodeUnavailable(reason)
        with torch.no_grad():
            for index, layer in enumerate(self.layers):
                self.layer_weights[index] = self.layer_weights[index].in_fp8()
                _release_projections(layer)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _fit(
        self, wanted: int, slot_bytes: int, blocks: int, pool_bytes: int, reserve: int
    ) -> tuple[int, int]:
        """The slots (up to ``wanted``) and prefix pool blocks (``blocks`` or none) that the
        device's memory holds, ``reserve`` bytes of it aside (unless that leaves no slot: a
        replica that serves beats one whose hot reloads fit), the pool as asked where at
        least one slot fits beside it (a default that does not fit must not cost the static
        path), the slots as many as fit, so that a model whose slots x context exceed the
        device still serves on this path (as vLLM sizes its KV blocks to the memory left);
        with tensor parallelism, what every rank holds."""
        free = free_device_bytes(self.device)

        def fitting(pool: int, aside: int) -> int:
            if free is None:
                return wanted
            budget = max(0, free - aside) * CACHE_MEMORY_FRACTION
            # One spare slot beside them (``spare_slot``).
            return max(0, min(wanted, int((budget - pool) // slot_bytes) - 1))

        if reserve and fitting(0, reserve) < 1:
            log.warning(
                "no room for a hot reload's next version (%.1f GiB) beside one sequence's keys "
                "and values: a reload will fail to load; a lower --max-context leaves room",
                reserve / 2**30,
            )
            reserve = 0
        keep_pool = bool(blocks) and fitting(pool_bytes, reserve) >= 1
        # Ranks hold the same blocks (rank 0's copies are every rank's): all of them or none.
        if blocks and self.tp is not None:
            keep_pool = self.tp.all_agree(keep_pool, self.device)
        if blocks and not keep_pool:
            log.warning(
                "no prefix cache: its %.1f GiB leave no room for one sequence's keys and values",
                pool_bytes / 2**30,
            )
        slots = fitting(pool_bytes if keep_pool else 0, reserve)
        if self.tp is not None:
            slots = self.tp.least(slots, self.device)
        budget = max(0, (free or 0) - reserve) * CACHE_MEMORY_FRACTION
        kept = f", {reserve / 2**30:.1f} GiB aside for a hot reload" if reserve else ""
        if slots < 1:
            raise StaticDecodeUnavailable(
                f"one sequence of {self.max_length} tokens needs {2 * slot_bytes / 2**30:.1f} GiB "
                f"of keys and values (with the spare slot); the cache may take "
                f"{budget / 2**30:.1f} GiB ({CACHE_MEMORY_FRACTION:.0%} of the free device "
                f"memory{kept})"
                f"{' here (the rank with the least decides)' if self.tp is not None else ''}: "
                "lower --max-context"
            )
        if slots < wanted:
            log.warning(
                "the static KV cache holds %d sequences of %d tokens, not %d: %.1f GiB each, "
                "%.1f GiB for them (%.0f%% of the free device memory%s); a lower --max-context "
                "holds more",
                slots,
                self.max_length,
                wanted,
                slot_bytes / 2**30,
                budget / 2**30,
                CACHE_MEMORY_FRACTION * 100,
                kept,
            )
        return slots, blocks if keep_pool else 0

    # --- graphs ---------------------------------------------------------------------------

    def use_eager_layers(self) -> None:
        """Run the decoder layer in plain torch from now on, neither compiled nor fused (after
        a failed compilation or fused kernel): the graphs captured so far are dropped."""
        self.compiled = False
        self._layer_step = decode_layer
        self.fused = False
        self._graphs.clear()
        self._prefill_graphs.clear()
        self._deferred.clear()
        self._failed_prefill.clear()
        self._deferred_decode.clear()
        self._failed_decode.clear()
        self._pool = None

    def compiling_steps(self) -> list[tuple[int, int]]:
        """The (batch, length) steps that compile the layer, in ``capture_all``'s order: with
        graphs the largest batch (the batch dynamic) and batch 1 (specialized) at the longest
        length, as the captures meet them first; without, batch 1 and 2."""
        if self.cuda_graphs:
            longest = self.lengths[-1]
            steps = [(self.slots, longest), (1, longest)]
        else:
            steps = [(1, self.lengths[0]), (min(2, self.slots), self.lengths[0])]
        return list(dict.fromkeys(steps))

    def capture_all(self, defer: bool = False) -> None:
        """Capture every (batch bucket, length bucket) graph now, so serving never waits on one
        (without graphs: compile the layer now, if compiled, by its ``compiling_steps``).
        ``defer``: only the graphs every step can fall back on now, the largest batch bucket's
        decode graph at each length bucket and the largest prefill graph; the others by
        ``capture_deferred`` in the engine's idle moments, not on the way to ready. Until then
        a decode step runs in the next larger captured batch bucket (more padding rows on free
        slots) and a prefill eagerly on the same buffers (the same numbers). Under tensor
        parallelism every decode graph now: the ranks' steps must run the same bucket.

        Largest first: later (smaller) captures reuse the memory pool of the first.
        """
        if not self.cuda_graphs:
            if self.compiled:
                with torch.inference_mode():
                    for size, length in self.compiling_steps():
                        self._decode(size, length)
            return
        started = time.monotonic()
        first: float | None = None
        decode_shapes = [
            (size, length)
            for length in reversed(self.lengths)
            for size in reversed(self.batch_sizes)
        ]
        now = decode_shapes
        if defer and self.tp is None:
            now = [shape for shape in decode_shapes if shape[0] == self.batch_sizes[-1]]
        kernels = triton_warmup.cache_entries()
        with torch.inference_mode():
            if self.skinny:
                try:
                    self._tune_projections()
                except Exception:
                    # Not a reason to lose the static path: cuBLAS for every projection.
                    log.exception("timing the decode projections failed; cuBLAS runs them all")
                    self.skinny = False
            for size, length in now:
                self._graph(size, length)
                first = first or time.monotonic() - started
            if now != decode_shapes and triton_warmup.cache_entries() != kernels:
                # Kernels compiled, not read from Triton's cache (a first start): the other
                # buckets' would compile in the idle moments, among the first requests (850M
                # on an H100: 5,728 tokens/s against 16,796, TTFT p99 505 ms; BENCHMARKS round
                # 2 step 34). Every decode graph now, as without deferring.
                log.info("Triton compiled kernels (its cache was cold): every decode graph now")
                for size, length in decode_shapes:
                    self._graph(size, length)
                now = decode_shapes
            decode_seconds = time.monotonic() - started
            # Largest first, as above; nothing is live yet, so padding rows (the spare slot)
            # are the only rows the captures' warm-up runs write. Only the first runs its
            # step before capturing it: the others' kernels and workspaces are the same
            # (8B on an H100: the decode path 1.0-1.5 s shorter; BENCHMARKS round 2 step 29).
            shapes = sorted(self.prefill_shapes, key=lambda s: -s[0] * s[1])
            for index, (rows, length) in enumerate(shapes[:1] if defer else shapes):
                self._prefill_graph(rows, length, warm_up=index == 0)
            self._deferred_decode = [shape for shape in decode_shapes if shape not in now]
            self._deferred = shapes[1:] if defer else []
        self.capture_seconds = time.monotonic() - started
        log.info(
            "captured %d decode graphs (of %d batch x %d length buckets) in %.1fs, the first "
            "(compiling the layer, if compiled) %.1fs, and %d prefill graphs in %.1fs (%d "
            "decode and %d prefill graphs more when idle); static KV cache %.2f GiB",
            len(self._graphs),
            len(self.batch_sizes),
            len(self.lengths),
            decode_seconds,
            first or 0.0,
            len(self._prefill_graphs),
            self.capture_seconds - decode_seconds,
            len(self._deferred_decode),
            len(self._deferred),
            self.cache_bytes / 2**30,
        )

    def deferred_count(self) -> int:
        """The graphs ``capture_deferred`` has yet to capture."""
        return len(self._deferred_decode) + len(self._deferred)

    def capture_deferred(self) -> bool:
        """Capture the next graph that ``capture_all(defer=True)`` left, decode graphs first
        (the engine calls it while no sequence is active); whether any is left. One that fails
        is logged and its bucket is no longer used (a larger one takes its steps or groups)."""
        if not (self._deferred_decode or self._deferred):
            return False
        started = time.monotonic()
        if self._deferred_decode:
            queue, failed, what = self._deferred_decode, self._failed_decode, "decode graph"
            size, length = queue[0]

            def capture() -> None:
                # Its warm-up step writes rows 0..size-1: free slots, as nothing is active.
                self._graph(size, length)
        else:
            queue, failed, what = self._deferred, self._failed_prefill, "prefill graph"
            rows, length = queue[0]

            def capture() -> None:
                # A capture that fails without a warm-up runs its step once (``_prefill_graph``):
                # on the spare slot and the scratch block alone, not on the last prefill's rows.
                self._prefill_table[0] = self.spare_slot
                self._prefill_table[1] = 0
                self._prefill_table[2:] = self.scratch_block
                self._prefill_graph(rows, length, warm_up=False)

        try:
            with torch.inference_mode():
                capture()
        except Exception:
            log.exception("%s %s failed to capture; a larger bucket takes its work", what, queue[0])
            failed.add(queue[0])
        del queue[0]
        if not (self._deferred_decode or self._deferred):
            log.info(
                "the deferred graphs are captured (%d decode, %d prefill; the last in %.3fs)",
                len(self._graphs),
                len(self._prefill_graphs),
                time.monotonic() - started,
            )
            return False
        return True

    def _tune_projections(self) -> None:
        """Time ``skinny_linear``'s kernel against cuBLAS for each projection and the LM head
        at the batch buckets, over the layers' own weights (before any capture: the graphs
        capture whichever won)."""
        started = time.monotonic()
        first = self.layer_weights[0]
        products = [
            [getattr(w, name) for w in self.layer_weights]
            for name, bias in (
                ("qkv", first.qkv_bias),
                ("o_proj", first.o_bias),
                ("gate_up", first.gate_up_bias),
                ("down", first.down_bias),
            )
            if bias is None  # with a bias: torch's linear (cuBLAS adds it in its epilogue)
        ]
        if self.lm_head.bias is None:
            products.append([self.lm_head.weight])
        self.gemm_tuning = skinny_linear.tune(products, self.batch_sizes)
        log.info(
            "decode projections tuned in %.1fs: the kernel for %d of %d (shape, batch), "
            "cuBLAS for the others: %s",
            time.monotonic() - started,
            sum(1 for t in self.gemm_tuning if t["used"]),
            len(self.gemm_tuning),
            self.gemm_tuning,
        )

    def _graph(self, size: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key = (size, length)
        found = self._graphs.get(key)
        if found is None:
            found = self._graphs[key] = self._capture(lambda: self._decode(size, length))
        return found

    def _prefill_graph(
        self, rows: int, length: int, warm_up: bool = True
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key = (rows, length)
        found = self._prefill_graphs.get(key)
        if found is None:

            def run() -> torch.Tensor:
                return self._prefill(*self._prefill_inputs(rows, length))

            try:
                found = self._capture(run, warm_up=warm_up)
            except RuntimeError:
                if warm_up:
                    raise
                # Something this shape alone needed first (a kernel's first load, a
                # workspace): the capture again, after the step ran once.
                log.warning("prefill graph %s failed without a warm-up; warming it up", key)
                torch.cuda.synchronize(self.device)
                found = self._capture(run)
            self._prefill_graphs[key] = found
        return found

    def _capture(self, run: Any, warm_up: bool = True) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """``run`` (a step reading only device buffers) captured as a graph in the shared pool."""
        current = torch.cuda.current_stream(self.device)
        if warm_up:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            # Warm-up outside the capture (workspaces, handles). It writes the same keys and
            # values the step itself will write (the inputs are the live ones): no change.
            with torch.cuda.stream(side):
                run()
            current.wait_stream(side)
        if self._pool is None:
            self._pool = graph_capture.GraphPool()
        graph = torch.cuda.CUDAGraph()
        with CAPTURING, self._pool.capture(graph):
            logits: torch.Tensor = run()
        return graph, logits

    # --- steps ----------------------------------------------------------------------------

    def decode(self, batch: int, last_position: int) -> torch.Tensor:
        """Logits ``[batch, vocab]`` of one step over slots ``0..batch-1``, feeding each slot's
        ``tokens`` entry at its ``positions`` entry (``last_position`` is the largest of them)."""
        self._announce(tensor_parallel.DECODE, [batch, last_position], [])
        if not self.cuda_graphs:
            return self._decode(batch, last_position + 1)
        size = bucket(batch, self.batch_sizes)
        length = bucket(last_position + 1, self.lengths)
        graph, logits = self._decode_graph(size, length)
        graph.replay()
        return logits[:batch]

    def _decode_graph(self, size: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The graph that runs a step of batch bucket ``size``: its own, or while that one is
        deferred (or failed) the next larger captured one, whose extra rows compute on free
        slots (active sequences hold slots ``0..batch-1``) and are not read."""
        found = self._graphs.get((size, length))
        if found is not None:
            return found
        if (size, length) in self._deferred_decode or (size, length) in self._failed_decode:
            for larger in self.batch_sizes:
                if larger > size and (larger, length) in self._graphs:
                    return self._graphs[(larger, length)]
        return self._graph(size, length)

    def _decode(self, batch: int, length: int) -> torch.Tensor:
        """One decode step as plain tensor operations (what a graph captures): the embedding,
        ``decode_layer`` per layer (compiled where ``compile_layers`` asked), the final norm and
        the LM head over slots ``0..batch-1``, attending to the first ``length`` cache entries."""
        tokens = self.tokens[:batch]
        positions = self.positions[:batch]
        x = self.embed(tokens)  # [batch, hidden]
        cos = self.cos[positions].unsqueeze(1)  # [batch, 1, head_dim]
        signed_sin = self.signed_sin[positions].unsqueeze(1)
        if self._unread_mask is not None:
            # Each row's own length (the kernel's): the mask is not read, only its sizes.
            bias = self._unread_mask[:batch]
        else:
            # 0 where a row may look, -inf elsewhere (beyond its own position).
            visible = self.key_index[:length].unsqueeze(0) <= positions.unsqueeze(1)
            bias = torch.zeros(visible.shape, dtype=torch.float32, device=x.device)
            bias = bias.masked_fill(~visible, float("-inf"))[:, None, None, :]
        shape = LayerShape(
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.scaling,
            self.own_lengths,
            self.skinny,
            self.fused,
        )
        for index in range(len(self.layers)):
            x = self._layer_step(
                x,
                cos,
                signed_sin,
                bias,
                positions,
                self.layer_weights[index],
                self.keys[index],
                self.values[index],
                shape,
                *self._layer_reduce,
            )
        normed = _rms_norm(self.norm, x)
        if self.skinny and self.lm_head.bias is None:
            head: torch.Tensor = skinny_linear.linear(normed, self.lm_head.weight)
            return head
        logits: torch.Tensor = self.lm_head(normed)
        return logits

    def prefill_prompts(
        self, prompts: list[list[int]], first_slot: int
    ) -> tuple[torch.Tensor, int]:
        """Prefill ``prompts`` into slots ``first_slot..``: the logits after each prompt's last
        token, and how many prompt tokens came from the prefix cache.

        With a prefix cache, each prompt's longest cached run of whole blocks (all but its last
        token at most) is copied into its slot, and only the rest runs through the model
        (``_prefill`` after ``starts``: eagerly, not as a graph), unless the group's prefill
        graph would be sooner (``_graph_beats_prefix``); the forward writes the prompts' blocks
        that were not cached yet into the pool (claimed before it). Reused keys and values were
        computed in another prefill, whose shape may round them differently in the last bits (as
        any batch change does)."""
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        if self.prefix is None:
            return self.prefill(_right_padded(prompts), lengths, first_slot), 0
        if first_slot + len(prompts) > self.slots:
            raise ValueError(f"{first_slot + len(prompts)} sequences do not fit {self.slots} slots")
        size = self.prefix.block_tokens
        names = [self.prefix.names(p) for p in prompts]
        longest = max(map(len, prompts))
        found = [
            self.prefix.match(n[: (len(p) - 1) // size])
            for n, p in zip(names, prompts, strict=True)
        ]
        starts = [len(blocks) * size for blocks in found]
        rest = max(len(p) - start for p, start in zip(prompts, starts, strict=True))
        mask_bytes = len(prompts) * (self.heads // self.kv_heads) * rest * longest
        if mask_bytes * self.dtype.itemsize > MAX_MASK_BYTES or self._graph_beats_prefix(
            len(prompts), longest, len(prompts) * rest
        ):
            found, starts = [[] for _ in prompts], [0 for _ in prompts]  # whole prompts
        self._copy_blocks(
            [
                (first_slot + row, number, block)
                for row, blocks in enumerate(found)
                for number, block in enumerate(blocks)
            ]
        )
        # The blocks not cached yet are claimed now and written by the forward itself: each
        # row's blocks after its start, [rows, blocks after the start] (-1: not kept). Blocks
        # before it are the forward's input, not its output: one that another row's claim
        # evicted just now (already copied into its slot) is not cached again.
        claimed: set[int] = set()
        width = max(
            1, max(len(p) - start for p, start in zip(prompts, starts, strict=True)) // size
        )
        kept = [[-1] * width for _ in prompts]
        try:
            for row, row_names in enumerate(names):
                for number, block in self.prefix.claim(row_names[starts[row] // size :], claimed):
                    kept[row][number] = block
            stored = torch.tensor(kept, dtype=torch.long)
            if any(starts):
                logits = self._prefill_after(prompts, starts, first_slot, stored)
            else:
                logits = self.prefill(_right_padded(prompts), lengths, first_slot, stored)
        except BaseException:
            self.prefix.forget(claimed)  # named, but not (wholly) written
            raise
        return logits, sum(starts)

    def _graph_beats_prefix(self, rows: int, longest: int, after_tokens: int) -> bool:
        """Whether ``rows`` prompts of up to ``longest`` tokens prefill sooner whole, as their
        bucket's graph, than eagerly after their cached prefixes (``after_tokens`` padded
        tokens left), by the estimates above."""
        shape = self._prefill_bucket(rows, longest) if self.graph_before_prefix else None
        if shape is None or shape in self._deferred:  # no graph (yet): eager either way
            return False
        extra = (shape[0] * shape[1] - after_tokens) * self.prefill_flop_per_token
        return extra / PREFILL_GRAPH_FLOPS < EAGER_PREFILL_LAYER_SECONDS * len(self.layer_weights)

    def _copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        """Copy cached blocks into slots, as (slot, block number, pool block) triples: one
        indexed copy per layer and tensor for all of them."""
        if not copies:
            return
        where = torch.tensor(copies, dtype=torch.long)
        self._announce(tensor_parallel.PREFIX_COPY, [], [where])
        self._copy_where(self._upload(where))

    def _copy_where(self, where: torch.Tensor) -> None:
        """``_copy_blocks`` of ``where`` ([copies, 3] on the device)."""
        size = prefixcache.BLOCK_TOKENS
        slots = where[:, 0, None]  # [copies, 1]
        positions = where[:, 1, None] * size + torch.arange(size, device=self.device)
        blocks = where[:, 2]
        caches = zip((*self.keys, *self.values), (*self.pool_keys, *self.pool_values), strict=True)
        for cache, pool in caches:
            # cache[slots, :, positions]: [copies, size, kv_heads, head_dim], a pool block each.
            cache[slots, :, positions] = pool[blocks]

    def _store_rows(self, stored: torch.Tensor | None, rows: int, blocks: int) -> list[list[int]]:
        """The pool block of each of ``rows`` rows' first ``blocks`` blocks, [blocks][rows]:
        ``stored``'s ([prompts, width] on the host, -1: not kept), the scratch block elsewhere
        (padding rows, blocks not kept, none asked)."""
        table = [[self.scratch_block] * rows for _ in range(blocks)]
        for row, row_blocks in enumerate([] if stored is None else stored.tolist()):
            for number, block in enumerate(row_blocks[:blocks]):
                if block >= 0:
                    table[number][row] = block
        return table

    def _store_blocks(
        self, index: int, keys: torch.Tensor, values: torch.Tensor, stores: torch.Tensor
    ) -> None:
        """Layer ``index``'s new ``keys`` and ``values`` ([rows, kv_heads, tokens, head_dim]) into
        the prefix pool, whole blocks: row ``r``'s block ``b`` into pool block ``stores[b, r]``."""
        blocks, rows = stores.shape
        where = stores.transpose(0, 1).reshape(-1)  # row by row, as the blocks below
        for new, pool in ((keys, self.pool_keys[index]), (values, self.pool_values[index])):
            whole = new[:, :, : blocks * prefixcache.BLOCK_TOKENS].transpose(1, 2)
            pool.index_copy_(0, where, whole.reshape(rows * blocks, *pool.shape[1:]))

    def _prefill_after(
        self, prompts: list[list[int]], starts: list[int], first_slot: int, stored: torch.Tensor
    ) -> torch.Tensor:
        """Prefill what follows each prompt's first ``starts`` tokens (already in its slot);
        ``stored``: the pool blocks its whole blocks after them go to (``prefill_prompts``)."""
        rests = [p[start:] for p, start in zip(prompts, starts, strict=True)]
        span = max(len(p) for p in prompts)
        if span > self.max_length:
            raise ValueError(f"a prompt of {span} tokens exceeds the cache ({self.max_length})")
        last = torch.tensor([len(r) - 1 for r in rests])
        return self._prefill_after_tensors(
            _right_padded(rests), torch.tensor(starts), last, first_slot, span, stored
        )

    def _prefill_after_tensors(
        self,
        ids: torch.Tensor,
        starts: torch.Tensor,
        last: torch.Tensor,
        first_slot: int,
        span: int,
        stored: torch.Tensor,
    ) -> torch.Tensor:
        """``_prefill_after`` of right-padded ``ids`` after ``starts``, logits at ``last``."""
        self._announce(
            tensor_parallel.PREFILL_AFTER, [first_slot, span], [ids, starts, last, stored]
        )
        count, device = ids.shape[0], self.device
        slots = torch.arange(first_slot, first_slot + count, device=device)
        after = _After(self._upload(starts), span, slice(first_slot, first_slot + count))
        stores = self._stores(stored, count, ids.shape[1])
        return self._prefill(self._upload(ids), slots, self._upload(last), after, stores)

    def _stores(self, stored: torch.Tensor | None, rows: int, tokens: int) -> torch.Tensor | None:
        """An eager prefill's ``stores`` (``_store_blocks``) on the device, or None (no pool,
        no whole block, or none to keep: unlike a graph, an eager pass need not write any)."""
        blocks = tokens // prefixcache.BLOCK_TOKENS
        if self.prefix is None or stored is None or not blocks:
            return None
        return self._upload(torch.tensor(self._store_rows(stored, rows, blocks), dtype=torch.long))

    def prefill(
        self,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        first_slot: int,
        stored: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run right-padded prompts ``ids`` ([n, longest], on the host) into slots
        ``first_slot..first_slot+n-1``; return the logits after each prompt's last token. With
        a prefix cache, their whole blocks go to the pool blocks ``stored`` names ([n, width]
        on the host, -1: not kept).

        Bucketed (the default with CUDA graphs): the group is padded to the smallest (rows,
        length) bucket that holds it, its padding rows written to the spare slot, and (with
        graphs) the bucket's graph replayed. Otherwise, or when no bucket holds the group, one
        eager forward at its own shape."""
        count, longest = ids.shape
        if first_slot + count > self.slots:
            raise ValueError(f"{first_slot + count} sequences do not fit {self.slots} slots")
        if longest > self.max_length:
            raise ValueError(f"a prompt of {longest} tokens exceeds the cache ({self.max_length})")
        self._announce(
            tensor_parallel.PREFILL,
            [first_slot],
            [ids, lengths, *([stored] if stored is not None else [])],
        )
        shape = self._prefill_bucket(count, longest)
        if shape is None:
            slots = torch.arange(first_slot, first_slot + count, device=self.device)
            stores = self._stores(stored, count, longest)
            return self._prefill(self._upload(ids), slots, self._upload(lengths - 1), None, stores)
        rows, length = shape
        # Few torch calls, each of which lets the HTTP event loop take the GIL: the rows' table
        # as one tensor from lists, and one upload each for it and the tokens.
        table = [
            [*range(first_slot, first_slot + count), *[self.spare_slot] * (rows - count)],
            [*(lengths - 1).tolist(), *[0] * (rows - count)],
        ]
        if self.prefix is not None:
            table += self._store_rows(stored, rows, length // prefixcache.BLOCK_TOKENS)
        # Tokens beyond a row's prompt are whatever the buffer held: right padding that no real
        # token attends to (causal), written to cache positions that decode steps overwrite
        # before any row reads them.
        self._upload(ids, into=self._prefill_ids[:count, :longest])
        self._upload(
            torch.tensor(table, dtype=torch.long), into=self._prefill_table[: len(table), :rows]
        )
        if self.cuda_graphs and shape not in self._deferred:
            graph, logits = self._prefill_graph(rows, length)
            graph.replay()
        else:
            logits = self._prefill(*self._prefill_inputs(rows, length))
        return logits[:count]

    def _prefill_inputs(
        self, rows: int, length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, torch.Tensor | None]:
        """A bucket's ``_prefill`` arguments, views of the bucketed prefill's buffers."""
        blocks = length // prefixcache.BLOCK_TOKENS if self.prefix is not None else 0
        return (
            self._prefill_ids[:rows, :length],
            self._prefill_table[0, :rows],
            self._prefill_table[1, :rows],
            None,
            self._prefill_table[2 : 2 + blocks, :rows] if blocks else None,
        )

    def _prefill_bucket(self, count: int, longest: int) -> tuple[int, int] | None:
        """The smallest prefill bucket that holds ``count`` prompts of ``longest`` tokens."""
        fitting = [
            (r, n)
            for r, n in self.prefill_shapes
            if r >= count and n >= longest and (r, n) not in self._failed_prefill
        ]
        return min(fitting, key=lambda s: s[0] * s[1], default=None)

    def _prefill(
        self,
        ids: torch.Tensor,
        slots: torch.Tensor,
        last: torch.Tensor,
        after: _After | None = None,
        stores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The prefill forward as plain tensor operations (what a prefill graph captures): token
        ``ids`` [n, length] into cache slots ``slots`` [n]; logits at index ``last`` [n] of each
        row. ``after`` (its ``slots`` then contiguous): each row's tokens follow positions it
        already holds (``_After``). ``stores`` ([blocks, n]): each layer's keys and values of
        the rows' whole blocks also go to the prefix pool (``_store_blocks``)."""
        from torch.nn.attention import sdpa_kernel

        count, longest = ids.shape
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        x = self.embed(ids)  # [n, longest, hidden]
        cos, signed_sin = self.cos[:longest], self.signed_sin[:longest]  # over [n, h, longest, d]
        mask: torch.Tensor | None = None
        if after is not None:
            positions = after.starts[:, None] + torch.arange(longest, device=self.device)
            # A padding token beyond the cache writes to the spare position (nobody reads it).
            written = positions.clamp(max=self.max_length)
            rotated = positions.clamp(max=self.max_length - 1)
            cos, signed_sin = self.cos[rotated][:, None], self.signed_sin[rotated][:, None]
            # Grouped-query attention as one query head per key/value head, each of ``groups``
            # times the queries (torch's fused attention takes no grouped heads with a mask, and
            # its math path runs in float32: a 32-row 8B prefill 140 ms, not 85, on an H200).
            # Each query reads its slot up to its own position: [n, 1, groups x longest, span].
            groups = heads // kv_heads
            hidden = self.key_index[: after.span] > positions[:, None, :, None]
            mask = torch.zeros(hidden.shape, dtype=x.dtype, device=self.device)
            mask = mask.masked_fill_(hidden, -torch.inf).repeat(1, 1, groups, 1)
            rows = torch.arange(count, device=self.device)[:, None]
        # As the decode step: fused norms, q/k/v and gate/up in one GEMM each, RoPE on q and k
        # together, grouped-query attention without repeated keys. A prefill is launch-bound
        # for short prompts (about 30 ms of launches for an 8B model eagerly): fewer kernels.
        with sdpa_kernel(_attention_backends()):
            for index, w in enumerate(self.layer_weights):
                h = self._norm(x, w.input_norm, w.input_eps)
                qkv = (
                    fp8.linear(h, w.qkv, w.qkv_bias)
                    .view(count, longest, heads + 2 * kv_heads, head_dim)
                    .transpose(1, 2)
                )  # [n, heads + 2 kv_heads, longest, head_dim]
                qk = layer_kernels.rope_qk_reference(
                    qkv, heads, kv_heads, cos, signed_sin, w.q_norm, w.k_norm, w.qk_eps
                )
                q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
                if stores is not None:
                    self._store_blocks(index, k, v, stores)
                if mask is None:
                    self.keys[index][slots, :, :longest] = k
                    self.values[index][slots, :, :longest] = v
                    # Right padding: a real token's causal window holds real tokens only.
                    out = torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True
                    )
                else:
                    assert after is not None
                    keys, values = self.keys[index][after.rows], self.values[index][after.rows]
                    keys[rows, :, written] = k.transpose(1, 2)
                    values[rows, :, written] = v.transpose(1, 2)
                    out = torch.nn.functional.scaled_dot_product_attention(
                        q.reshape(count, kv_heads, groups * longest, head_dim),
                        keys[:, :, : after.span],
                        values[:, :, : after.span],
                        attn_mask=mask,
                        scale=self.scaling,
                    ).reshape(count, heads, longest, head_dim)
                out = out.transpose(1, 2).reshape(count, longest, heads * head_dim)
                attended = self._reduce(fp8.linear(out, w.o_proj, w.o_bias))
                if self.fused:
                    x, normed = layer_kernels.add_rms_norm(
                        x.view(-1, x.shape[-1]),
                        attended.view(-1, x.shape[-1]),
                        w.post_norm,
                        w.post_eps,
                    )
                    x, normed = x.view(attended.shape), normed.view(attended.shape)
                    gate_up = fp8.linear(normed, w.gate_up, w.gate_up_bias)
                    activated = layer_kernels.silu_mul(gate_up.view(-1, gate_up.shape[-1]))
                    activated = activated.view(count, longest, -1)
                else:
                    x = x + attended
                    gate, up = fp8.linear(
                        _rms_norm_of(x, w.post_norm, w.post_eps), w.gate_up, w.gate_up_bias
                    ).chunk(2, dim=-1)
                    activated = torch.nn.functional.silu(gate) * up
                x = x + self._reduce(fp8.linear(activated, w.down, w.down_bias))
        final = x[torch.arange(count, device=self.device), last]  # [n, hidden]
        logits: torch.Tensor = self.lm_head(_rms_norm(self.norm, final))
        return logits

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """LlamaRMSNorm over ``x``'s last dimension: ``layer_kernels``' where fused."""
        if not self.fused:
            return _rms_norm_of(x, weight, eps)
        return layer_kernels.rms_norm(x.view(-1, x.shape[-1]), weight, eps).view(x.shape)

    # --- slot bookkeeping -----------------------------------------------------------------

    def admit(self, first_slot: int, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        """After a prefill: the slots' next inputs are their first tokens at ``lengths``."""
        self._announce(tensor_parallel.ADMIT, [first_slot], [tokens, lengths])
        end = first_slot + tokens.shape[0]
        self.tokens[first_slot:end] = tokens
        self.positions[first_slot:end] = self._upload(lengths)

    def advance(self, batch: int, tokens: torch.Tensor) -> None:
        """After a decode step: the chosen tokens are the next inputs, one position further."""
        self._announce(tensor_parallel.ADVANCE, [batch], [tokens])
        self.tokens[:batch] = tokens
        self.positions[:batch] += 1

    def move(self, sources: list[int], targets: list[int], length: int) -> None:
        """Copy slots ``sources`` (first ``length`` cache entries, inputs) to ``targets``."""
        src = self._upload(torch.tensor(sources, dtype=torch.long))
        dst = self._upload(torch.tensor(targets, dtype=torch.long))
        self._announce(tensor_parallel.MOVE, [length], [src, dst])
        length = min(length, self.max_length)
        for cache in (*self.keys, *self.values):
            cache[dst, :, :length] = cache[src, :, :length]
        self.tokens[dst] = self.tokens[src]
        self.positions[dst] = self.positions[src]

    def _upload(self, tensor: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """``tensor`` from the host on the device without a host sync (``devices.upload``)."""
        return devices.upload(tensor, self.device, into)

    def to_host(self, tokens: torch.Tensor) -> list[int]:
        """The chosen tokens as a list: the step's one host sync (the GIL is free meanwhile)."""
        if self._copied is None:
            values: list[int] = tokens.tolist()
            return values
        host = self._host[: tokens.shape[0]]
        host.copy_(tokens, non_blocking=True)
        self._copied.record(torch.cuda.current_stream(self.device))
        self._copied.synchronize()
        copied: list[int] = host.tolist()
        return copied
