"""The fast decode path: a static KV cache and CUDA-graph decode steps (Llama architecture).

Eager transformers decoding launches a few hundred small kernels per step, so at serving batch
sizes a step costs more host time than GPU time. This module runs the same model (its own
``nn.Module`` layers and weights) with a decode step whose shapes never change:

* the KV cache is preallocated once per model: ``[layers, slots, kv_heads, max_context,
  head_dim]`` for keys and for values, one slot per sequence of the batch (``slots`` is the
  engine's ``max_batch_size``). A sequence's token at position ``p`` lives at index ``p`` of its
  slot, so there is no left padding, no merging and no per-step reallocation; a row sees the cache
  entries ``<= its own position`` (its mask) and nothing of its batch mates;
* the active sequences occupy slots ``0..n-1``; when one leaves, the last one moves into its slot
  (one copy of that slot's used cache), so the step always runs over a prefix of the slots;
* a decode step reads its inputs (token and position of every slot) from device buffers and is
  captured as a CUDA graph for every pair of a batch-size bucket and an attention-length bucket;
  the batch is padded to its bucket (padding rows compute on free slots, whose results nobody
  reads) and attention reads the cache up to the length bucket only. A replay is one launch.

Prefill stays eager (one forward per admitted group, right-padded, causal attention through SDPA)
and writes the prompt's keys and values straight into the group's slots. Token choice (greedy
argmax, or temperature/top-p with each sequence's own generator) happens after the graph, eagerly,
so sampling semantics are exactly the engine's. Without CUDA the same code runs eagerly (the CPU
tests use that), which is also what ``decode_mode=static`` gives on a GPU.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch.nn.attention import SDPBackend

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = frozenset({"llama"})
# RoPE variants whose angles depend on the position only (not on the sequence length).
POSITION_ONLY_ROPE = frozenset({"default", "linear", "llama3"})
# Attention-length buckets start here and double up to the model's context.
MIN_LENGTH_BUCKET = 128
# The static cache may take at most this share of the device memory still free after loading.
CACHE_MEMORY_FRACTION = 0.8


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


def bucket(value: int, buckets: list[int]) -> int:
    """The smallest bucket that holds ``value``."""
    for size in buckets:
        if size >= value:
            return size
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


def cache_bytes(config: Any, slots: int, max_length: int, dtype: torch.dtype) -> int:
    """Bytes of the static keys and values of ``slots`` sequences of ``max_length`` tokens."""
    head_dim = _head_dim(config)
    per_token = 2 * int(config.num_hidden_layers) * int(config.num_key_value_heads) * head_dim
    return per_token * slots * max_length * torch.empty((), dtype=dtype).element_size()


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim or config.hidden_size // config.num_attention_heads)


@functools.cache
def _attention_backends() -> list[SDPBackend]:
    """Every SDPA backend but cuDNN's, which plans anew for every new sequence length."""
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``x * cos + rotate_half(x) * sin``, bit for bit, in four kernels: rolling
    by half a head gives ``cat(x2, x1)``, and ``signed_sin`` is ``cat(-sin1, sin2)``."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _rms_norm(module: Any, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm (normalize in float32, cast back, scale) with torch's fused kernel."""
    normed = torch.nn.functional.rms_norm(
        x.float(), (x.shape[-1],), eps=float(module.variance_epsilon)
    )
    weighted: torch.Tensor = module.weight * normed.to(x.dtype)
    return weighted


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
    ) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise StaticDecodeUnavailable(reason)
        if cuda_graphs and device.type != "cuda":
            raise StaticDecodeUnavailable("CUDA graphs need a CUDA device")
        config = model.config
        self.slots = slots
        self.max_length = max_length
        self.device = device
        self.dtype = dtype
        self.cuda_graphs = cuda_graphs
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.groups = self.heads // self.kv_heads
        self.head_dim = _head_dim(config)
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.scaling = float(self.layers[0].self_attn.scaling)
        self.batch_sizes = batch_buckets(slots)
        self.lengths = length_buckets(max_length)
        # Per layer: q, k and v in one GEMM; gate and up in one GEMM.
        with torch.no_grad():
            self.fused = [
                (
                    _fuse_linears(
                        [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
                    ),
                    _fuse_linears([layer.mlp.gate_proj, layer.mlp.up_proj]),
                )
                for layer in self.layers
            ]

        needed = cache_bytes(config, slots, max_length, dtype)
        self._check_memory(needed)
        self.cache_bytes = needed
        shape = (len(self.layers), slots, self.kv_heads, max_length, self.head_dim)
        with torch.inference_mode():
            self.keys = torch.zeros(shape, dtype=dtype, device=device)
            self.values = torch.zeros(shape, dtype=dtype, device=device)
            self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
            self.positions = torch.zeros(slots, dtype=torch.long, device=device)
            self.rows = torch.arange(slots, device=device)
            self.key_index = torch.arange(max_length, device=device)
            # The same angles transformers computes per forward, once for every position.
            anchor = torch.zeros((), dtype=dtype, device=device)
            cos, sin = inner.rotary_emb(anchor, self.key_index[None])
            self.cos = cos[0]  # [max_length, head_dim]
            half = self.head_dim // 2
            self.signed_sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
        self._host = torch.empty(
            slots, dtype=torch.long, pin_memory=device.type == "cuda" and torch.cuda.is_available()
        )
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = None
        self._copied: torch.cuda.Event | None = None
        if device.type == "cuda":
            self._copied = torch.cuda.Event()
        self.capture_seconds = 0.0

    def _check_memory(self, needed: int) -> None:
        if self.device.type != "cuda":
            return
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if needed > CACHE_MEMORY_FRACTION * free:
            raise StaticDecodeUnavailable(
                f"the static KV cache needs {needed / 2**30:.1f} GiB; "
                f"{free / 2**30:.1f} GiB of device memory is free"
            )

    # --- graphs ---------------------------------------------------------------------------

    def capture_all(self) -> None:
        """Capture every (batch bucket, length bucket) graph now, so serving never waits on one.

        Largest first: later (smaller) captures reuse the memory pool of the first.
        """
        if not self.cuda_graphs:
            return
        started = time.monotonic()
        with torch.inference_mode():
            for length in reversed(self.lengths):
                for size in reversed(self.batch_sizes):
                    self._graph(size, length)
        self.capture_seconds = time.monotonic() - started
        log.info(
            "captured %d decode graphs (%d batch x %d length buckets) in %.1fs; static KV cache "
            "%.2f GiB",
            len(self._graphs),
            len(self.batch_sizes),
            len(self.lengths),
            self.capture_seconds,
            self.cache_bytes / 2**30,
        )

    def _graph(self, size: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key = (size, length)
        found = self._graphs.get(key)
        if found is not None:
            return found
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        # Warm-up outside the capture (workspaces, handles). It writes the same keys and values
        # the step itself will write (the inputs are the live ones), so it changes nothing.
        with torch.cuda.stream(side):
            self._decode(size, length)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._decode(size, length)
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[key] = (graph, logits)
        return graph, logits

    # --- steps ----------------------------------------------------------------------------

    def decode(self, batch: int, last_position: int) -> torch.Tensor:
        """Logits ``[batch, vocab]`` of one step over slots ``0..batch-1``, feeding each slot's
        ``tokens`` entry at its ``positions`` entry (``last_position`` is the largest of them)."""
        if not self.cuda_graphs:
            return self._decode(batch, last_position + 1)
        size = bucket(batch, self.batch_sizes)
        length = bucket(last_position + 1, self.lengths)
        graph, logits = self._graph(size, length)
        graph.replay()
        return logits[:batch]

    def _decode(self, batch: int, length: int) -> torch.Tensor:
        """One decode step as plain tensor operations (what a graph captures): per layer two
        fused norms, three GEMMs fewer than transformers (fused q/k/v and gate/up), RoPE on q
        and k together, the new keys and values written at each row's position, and grouped-
        query attention over the first ``length`` cache entries of each row's own slot."""
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        tokens = self.tokens[:batch]
        positions = self.positions[:batch]
        rows = self.rows[:batch]
        x = self.embed(tokens)  # [batch, hidden]
        cos = self.cos[positions].unsqueeze(1)  # [batch, 1, head_dim]
        signed_sin = self.signed_sin[positions].unsqueeze(1)
        # 0 where a row may look, -inf elsewhere (beyond its own position).
        visible = self.key_index[:length].unsqueeze(0) <= positions.unsqueeze(1)
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=x.device)
        bias = bias.masked_fill(~visible, float("-inf"))[:, None, None, :]
        for index, (layer, ((qkv_w, qkv_b), (up_w, up_b))) in enumerate(
            zip(self.layers, self.fused, strict=True)
        ):
            attn = layer.self_attn
            h = _rms_norm(layer.input_layernorm, x)
            qkv = torch.nn.functional.linear(h, qkv_w, qkv_b).view(
                batch, heads + 2 * kv_heads, head_dim
            )
            qk = _rope(qkv[:, : heads + kv_heads], cos, signed_sin)
            q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
            layer_keys, layer_values = self.keys[index], self.values[index]
            layer_keys[rows, :, positions] = k
            layer_values[rows, :, positions] = v
            keys = layer_keys[:batch, :, :length]  # [batch, kv_heads, length, head_dim]
            values = layer_values[:batch, :, :length]
            # Grouped-query attention without repeating the keys: [b, kv, groups, length].
            grouped = q.reshape(batch, kv_heads, self.groups, head_dim)
            scores = torch.matmul(grouped, keys.transpose(-1, -2))
            # bias + scaling * scores, in float32, in one kernel.
            scores = torch.add(bias, scores, alpha=self.scaling)
            probs = torch.softmax(scores, dim=-1).to(q.dtype)
            out = torch.matmul(probs, values)  # [batch, kv_heads, groups, head_dim]
            x = x + attn.o_proj(out.reshape(batch, heads * head_dim))
            gate, up = torch.nn.functional.linear(
                _rms_norm(layer.post_attention_layernorm, x), up_w, up_b
            ).chunk(2, dim=-1)
            x = x + layer.mlp.down_proj(torch.nn.functional.silu(gate) * up)
        logits: torch.Tensor = self.lm_head(_rms_norm(self.norm, x))
        return logits

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, first_slot: int) -> torch.Tensor:
        """Run right-padded prompts ``ids`` ([n, longest], on the host) into slots
        ``first_slot..first_slot+n-1``; return the logits after each prompt's last token."""
        from torch.nn.attention import sdpa_kernel

        count, longest = ids.shape
        if first_slot + count > self.slots:
            raise ValueError(f"{first_slot + count} sequences do not fit {self.slots} slots")
        if longest > self.max_length:
            raise ValueError(f"a prompt of {longest} tokens exceeds the cache ({self.max_length})")
        ids = ids.to(self.device)
        last = (lengths - 1).to(self.device)
        slots = slice(first_slot, first_slot + count)
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        x = self.embed(ids)  # [n, longest, hidden]
        cos, signed_sin = self.cos[:longest], self.signed_sin[:longest]  # over [n, h, longest, d]
        # As the decode step: fused norms, q/k/v and gate/up in one GEMM each, RoPE on q and k
        # together, grouped-query attention without repeated keys. A prefill is launch-bound
        # for short prompts (about 30 ms of launches for an 8B model eagerly): fewer kernels.
        with sdpa_kernel(_attention_backends()):
            for index, (layer, ((qkv_w, qkv_b), (up_w, up_b))) in enumerate(
                zip(self.layers, self.fused, strict=True)
            ):
                h = _rms_norm(layer.input_layernorm, x)
                qkv = (
                    torch.nn.functional.linear(h, qkv_w, qkv_b)
                    .view(count, longest, heads + 2 * kv_heads, head_dim)
                    .transpose(1, 2)
                )  # [n, heads + 2 kv_heads, longest, head_dim]
                qk = _rope(qkv[:, : heads + kv_heads], cos, signed_sin)
                q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
                self.keys[index, slots, :, :longest] = k
                self.values[index, slots, :, :longest] = v
                # Right padding: a real token's causal window holds real tokens only.
                out = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True
                )
                out = out.transpose(1, 2).reshape(count, longest, heads * head_dim)
                x = x + layer.self_attn.o_proj(out)
                gate, up = torch.nn.functional.linear(
                    _rms_norm(layer.post_attention_layernorm, x), up_w, up_b
                ).chunk(2, dim=-1)
                x = x + layer.mlp.down_proj(torch.nn.functional.silu(gate) * up)
        final = x[torch.arange(count, device=self.device), last]  # [n, hidden]
        logits: torch.Tensor = self.lm_head(_rms_norm(self.norm, final))
        return logits

    # --- slot bookkeeping -----------------------------------------------------------------

    def admit(self, first_slot: int, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        """After a prefill: the slots' next inputs are their first tokens at ``lengths``."""
        end = first_slot + tokens.shape[0]
        self.tokens[first_slot:end] = tokens
        self.positions[first_slot:end] = lengths.to(self.device)

    def advance(self, batch: int, tokens: torch.Tensor) -> None:
        """After a decode step: the chosen tokens are the next inputs, one position further."""
        self.tokens[:batch] = tokens
        self.positions[:batch] += 1

    def move(self, sources: list[int], targets: list[int], length: int) -> None:
        """Copy slots ``sources`` (first ``length`` cache entries, inputs) to ``targets``."""
        src = torch.tensor(sources, dtype=torch.long, device=self.device)
        dst = torch.tensor(targets, dtype=torch.long, device=self.device)
        length = min(length, self.max_length)
        self.keys[:, dst, :, :length] = self.keys[:, src, :, :length]
        self.values[:, dst, :, :length] = self.values[:, src, :, :length]
        self.tokens[dst] = self.tokens[src]
        self.positions[dst] = self.positions[src]

    def to_host(self, tokens: torch.Tensor) -> list[int]:
        """The chosen tokens as a list: the step's one host sync (the GIL is free meanwhile)."""
        if self._copied is None:
            values: list[int] = tokens.tolist()
            return values
        host = self._host[: tokens.shape[0]]
        host.copy_(tokens, non_blocking=True)
        self._copied.record()
        self._copied.synchronize()
        copied: list[int] = host.tolist()
        return copied
