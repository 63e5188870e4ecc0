"""Host-to-device copies that do not wait for the device.

A copy from pageable host memory to CUDA waits for everything already queued on the stream: the
host then cannot launch the next work while the device runs the last (a prefill pass's graph, a
tensor-parallel step's forward). From pinned memory the copy is queued like a kernel; PyTorch's
pinned allocator keeps the temporary until the copy has run.
"""

from __future__ import annotations

import torch


def upload(
    tensor: torch.Tensor, device: torch.device, into: torch.Tensor | None = None
) -> torch.Tensor:
    """``tensor`` on ``device`` (copied ``into`` a tensor there, if given) without waiting for
    the device; a tensor already on a device is copied as ever."""
    pinned = device.type == "cuda" and tensor.device.type == "cpu"
    source = tensor.pin_memory() if pinned else tensor
    if into is None:
        return source.to(device, non_blocking=pinned)
    return into.copy_(source, non_blocking=pinned)
