"""Filters of the model_replica role: which GPUs each multi-GPU replica gets.

    metalserve_gpu_groups(count, size, nvlink_peers=None, numa_nodes=None)
        -> the GPU indices (PCI order) of each replica of ``size`` GPUs, ``count // size`` lists

A tensor-parallel replica all-reduces twice per layer and step, so its GPUs should reach each
other over NVLink (``nvlink_peers``: per GPU, the GPUs it has NVLink to, from ``nvidia-smi topo
-m`` through the hardware fact) and sit on one NUMA node (``numa_nodes``: per GPU, from sysfs).
Contiguous blocks are used when they qualify (every NVSwitch system, and NVLink bridges on
neighbouring cards); else groups are formed greedily in PCI order, NVLink and NUMA first, then
NVLink alone; a topology with no such partition (or no information) keeps contiguous blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def metalserve_gpu_groups(
    count: int,
    size: int,
    nvlink_peers: Sequence[Sequence[int]] | None = None,
    numa_nodes: Sequence[int | None] | None = None,
) -> list[list[int]]:
    count, size = int(count), int(size)
    if size < 1:
        raise ValueError(f"a replica needs at least one GPU, not {size}")
    contiguous = [list(range(first, first + size)) for first in range(0, count - count % size, size)]
    if size == 1 or count < size:
        return contiguous
    peers = None if not nvlink_peers or len(nvlink_peers) < count else [set(p) for p in nvlink_peers]
    nodes = None if not numa_nodes or len(numa_nodes) < count else list(numa_nodes)

    def linked(group: list[int]) -> bool:
        return peers is None or all(b in peers[a] for a in group for b in group if a != b)

    def local(group: list[int]) -> bool:
        return nodes is None or len({nodes[gpu] for gpu in group}) == 1

    if all(linked(g) and local(g) for g in contiguous):
        return contiguous
    for fits in ((lambda g: linked(g) and local(g)), linked):
        groups = _greedy(count, size, fits)
        if groups is not None:
            return groups
    return contiguous


def _greedy(count: int, size: int, fits: Callable[[list[int]], bool]) -> list[list[int]] | None:
    """Each group: the lowest free GPU, then the next free ones that still fit with it."""
    free = list(range(count))
    groups: list[list[int]] = []
    while len(groups) < count // size:
        group = [free[0]]
        for gpu in free[1:]:
            if len(group) < size and fits([*group, gpu]):
                group.append(gpu)
        if len(group) < size:
            return None
        groups.append(group)
        free = [gpu for gpu in free if gpu not in group]
    return groups


class FilterModule:
    def filters(self) -> dict[str, object]:
        return {"metalserve_gpu_groups": metalserve_gpu_groups}
