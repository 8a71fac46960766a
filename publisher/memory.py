"""The publisher process's memory set up for the tick path: ``tune_memory()`` at start.

1. glibc's malloc kept from handing the tick path's memory back to the OS on every frame.

The encoder turns each frame into one bytes object of its PUBLISHes and one of its HSET
fields: a frame of 500 full packets is about 850 KB. glibc serves blocks that large with
mmap, or from the top of its heap, which it trims again as soon as they are freed; the next
frame then takes fresh pages from the kernel, a page fault per 4 KB. Measured on the
benchmark's 2-core machine, those faults were about 60% of the compiled encoder's time
for full ticks (docs/benchmarks.md). With fixed thresholds the freed blocks stay in the
heap and the next frame reuses them; the publisher's memory is bounded by its backlog
limits either way, so nothing grows but the peak it held.

2. The objects that exist at start (every imported module, the settings) frozen out of
the garbage collector's way: a full collection walks every tracked object, and with the
modules of redis, websockets and pydantic in the heap it held the event loop for about
8 ms, a tick's latency tail. Frozen, it walks only what was made since.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger("kitebus.memory")

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # blocks below this come from the heap (glibc's own upper bound)
TRIM_THRESHOLD = 128 << 20  # the free top of the heap given back beyond this


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; False where the C library
    has no ``mallopt`` (musl, macOS) or refuses, and nothing changes."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc thresholds fixed" if done else "malloc thresholds left as they were")
    return done


def tune_memory() -> None:
    """Both of the module docstring's settings, for a process that runs a publisher."""
    keep_freed_memory()
    gc.collect()  # what is garbage already is not worth keeping forever
    gc.freeze()
