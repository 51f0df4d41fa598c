"""CPU memory of slab's own: huge_page_empty, for what a kernel streams through on every call."""

from __future__ import annotations

import mmap

import torch
from torch import Tensor

__all__ = ["huge_page_empty", "HUGE_PAGE"]

HUGE_PAGE = 2 * 2**20


def huge_page_empty(nbytes: int) -> Tensor:
    """``nbytes`` of uninitialized uint8 CPU memory whose whole 2 MiB pages are advised
    for transparent huge pages: on Linux, from 2 MiB on, an anonymous private mapping, 2 MiB-aligned
    (``madvise(MADV_HUGEPAGE)`` on its aligned whole pages; the tail under 2 MiB keeps 4 KB pages, so
    no memory is added); elsewhere, or where the kernel has no transparent huge pages, the same
    bytes on 4 KB pages. The tensor keeps the mapping alive (buffer protocol) and saves, copies and
    frees as any tensor."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    huge = nbytes // HUGE_PAGE * HUGE_PAGE
    if huge == 0 or advice is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    # private: a shared anonymous mapping is shmem, whose huge pages are a separate setting
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(region, dtype=torch.uint8)
    lead = -whole.data_ptr() % HUGE_PAGE
    try:
        region.madvise(advice, lead, huge)
    except OSError:  # a kernel without transparent huge pages
        pass
    return whole[lead : lead + nbytes]
