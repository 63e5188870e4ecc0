from __future__ import annotations

import torch

from metalserve import kvcache


def kv(batch: int, length: int, fill: float) -> torch.Tensor:
    return torch.full((batch, 2, length, 4), fill)


def test_growable_layer_appends_without_reallocating_each_step() -> None:
    layer = kvcache.GrowableLayer()
    layer.update(kv(2, 3, 1.0), kv(2, 3, 1.0))
    buffer_before = layer.tensors()[0].data_ptr()
    for step in range(10):
        keys, _ = layer.update(kv(2, 1, float(step)), kv(2, 1, float(step)))
    assert layer.get_seq_length() == 13
    assert keys.shape == (2, 2, 13, 4)
    assert keys[0, 0, -1, 0] == 9.0
    assert layer.tensors()[0].data_ptr() == buffer_before


def test_concat_left_pads_the_shorter_cache() -> None:
    old, new = kvcache.new_cache(), kvcache.new_cache()
    for layer in range(2):
        old.update(kv(1, 5, 1.0), kv(1, 5, 1.0), layer)
        new.update(kv(2, 3, 2.0), kv(2, 3, 2.0), layer)

    merged = kvcache.concat_left_padded(old, new)

    assert merged.get_seq_length() == 5
    keys, _ = merged.layers[1].tensors()  # type: ignore[attr-defined]
    assert keys.shape == (3, 2, 5, 4)
    assert keys[0].eq(1.0).all()
    assert keys[1:, :, :2].eq(0.0).all()
    assert keys[1:, :, 2:].eq(2.0).all()


def test_select_rows_and_trim_left_columns() -> None:
    cache = kvcache.new_cache()
    keys = torch.arange(3 * 2 * 4 * 4, dtype=torch.float32).reshape(3, 2, 4, 4)
    cache.update(keys, keys.clone(), 0)

    kvcache.select_rows(cache, torch.tensor([0, 2]), first_column=1)

    kept, _ = cache.layers[0].tensors()  # type: ignore[attr-defined]
    torch.testing.assert_close(kept, keys[[0, 2], :, 1:])
    cache.update(kv(2, 1, -1.0), kv(2, 1, -1.0), 0)
    assert cache.get_seq_length() == 4


def test_left_pad_mask() -> None:
    mask = torch.tensor([[1, 1], [0, 1]])
    assert kvcache.left_pad_mask(mask, 4).tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
