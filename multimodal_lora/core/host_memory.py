"""Keeping the process's host memory close to what it really holds (glibc's allocator).

Loading a base converts every weight on the host (bf16 to fp32, then to int8
or 4-bit), and training an int8 base on a CPU dequantizes each weight matrix to
fp32 for every matmul (bitsandbytes' CPU path): tens to hundreds of MB
allocated and freed again, thousands of times. glibc serves blocks of that size
from its heap once its *dynamic* mmap threshold has risen (up to 32 MB), and a
heap with live tensors between the freed blocks cannot shrink. On BLIP-2
OPT-2.7B in int8 on a CPU the process held 6.3 GiB after loading 4.2 GiB of
weights, and 8.7 GiB while training; see ``bench/full_size_cpu.py``.

:func:`keep_large_blocks_off_the_heap` fixes the threshold at 4 MB, so that
such blocks are mapped on their own and go back to the system when freed;
:func:`return_freed_memory` hands back what the heap has already kept. Both do
nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
LARGE_BLOCK = 4 * 2**20
# Fixing the mmap threshold also freezes the trim threshold at glibc's 128 KB: the heap's top
# would then be handed back and taken again around every training step (after the feature
# cache's build in the same process, that cost 5-7 ms a step of the tiny recipe). The heap's
# free top may keep this much; return_freed_memory trims it all after a load.
HEAP_SLACK = 128 * 2**20


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist (glibc)
        return libc
    except (OSError, AttributeError):
        return None


def keep_large_blocks_off_the_heap(threshold: int = LARGE_BLOCK) -> bool:
    """Serve blocks of ``threshold`` bytes and more by ``mmap``, so freeing one returns it; ``False`` off glibc.

    Process-wide and lasting: blocks this size are tensors, which cost far more
    to fill than the one system call; smaller objects keep using the heap.
    """
    libc = _glibc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, threshold) and libc.mallopt(M_TRIM_THRESHOLD, HEAP_SLACK))


def return_freed_memory() -> None:
    """Hand the heap's free memory back to the operating system (after loading a base)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
