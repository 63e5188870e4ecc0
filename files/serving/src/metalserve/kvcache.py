"""A KV cache for a batch whose membership changes between decode steps.

transformers' ``DynamicLayer`` appends with ``torch.cat``, which copies the whole cache of every
layer on every step. ``GrowableLayer`` appends into a preallocated buffer that grows in chunks
instead, and supports the two batch-level edits continuous batching needs: dropping rows (finished
sequences) and concatenating a freshly prefilled group, left-padded to a common length.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

# Extra positions allocated per growth: bounds both copy frequency and wasted memory.
GROW_TOKENS = 256


class GrowableLayer(DynamicLayer):
    """One layer's keys/values [batch, kv_heads, seq, head_dim], as views of a larger buffer."""

    def __init__(self) -> None:
        super().__init__()
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, values
        self._length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        key_buf, value_buf = self._reserve(key_states, value_states, self._length + new)
        key_buf[:, :, self._length : self._length + new] = key_states
        value_buf[:, :, self._length : self._length + new] = value_states
        self._length += new
        self.keys = key_buf[:, :, : self._length]
        self.values = value_buf[:, :, : self._length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values (views, without the spare capacity)."""
        if self._buffers is None:
            raise RuntimeError("empty cache layer")
        keys, values = self._buffers
        return keys[:, :, : self._length], values[:, :, : self._length]

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Set the contents (after a batch edit), keeping room to grow."""
        self._buffers = None
        self._length = 0
        self.is_initialized = False
        self.update(keys, values)

    def _reserve(
        self, keys: torch.Tensor, values: torch.Tensor, needed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._buffers is not None and self._buffers[0].shape[-2] >= needed:
            return self._buffers
        capacity = needed + GROW_TOKENS
        key_buf = keys.new_empty((*keys.shape[:2], capacity, keys.shape[-1]))
        value_buf = values.new_empty((*values.shape[:2], capacity, values.shape[-1]))
        if self._buffers is not None and self._length:
            key_buf[:, :, : self._length] = self._buffers[0][:, :, : self._length]
            value_buf[:, :, : self._length] = self._buffers[1][:, :, : self._length]
        self._buffers = (key_buf, value_buf)
        return self._buffers


def new_cache() -> Cache:
    return Cache(layer_class_to_replicate=GrowableLayer)


def _layers(cache: Cache) -> list[GrowableLayer]:
    layers = []
    for layer in cache.layers:
        if not isinstance(layer, GrowableLayer):
            raise TypeError(f"unexpected cache layer {type(layer).__name__}")
        layers.append(layer)
    return layers


def select_rows(cache: Cache, rows: torch.Tensor, first_column: int) -> None:
    """Keep only ``rows`` of the batch and drop the first ``first_column`` positions."""
    for layer in _layers(cache):
        keys, values = layer.tensors()
        layer.replace(keys[rows, :, first_column:], values[rows, :, first_column:])


def concat_left_padded(old: Cache, new: Cache) -> Cache:
    """Stack two caches along the batch, left-padding the shorter one with zeros.

    Padded positions are masked out by the attention mask, so their (zero) contents never matter.
    """
    merged = new_cache()
    old_len, new_len = old.get_seq_length(), new.get_seq_length()
    length = max(old_len, new_len)
    for old_layer, new_layer in zip(_layers(old), _layers(new), strict=True):
        old_keys, old_values = old_layer.tensors()
        new_keys, new_values = new_layer.tensors()
        keys = torch.cat([_left_pad(old_keys, length), _left_pad(new_keys, length)], dim=0)
        values = torch.cat([_left_pad(old_values, length), _left_pad(new_values, length)], dim=0)
        layer = GrowableLayer()
        layer.update(keys, values)
        merged.layers.append(layer)
    return merged


def left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    return _left_pad(mask, length, dim=1)


def _left_pad(tensor: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
