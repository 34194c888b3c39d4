"""Keep freed host memory in the process for reuse (glibc malloc tuning for CPU inference).

PyTorch's CPU allocator is plain malloc. The V-Net's full-resolution activations are 16-128 MB per
window, so with glibc's defaults every forward maps fresh pages from the kernel and returns them when
freed: about 1.2 GB of page faults per window pair (317k minor faults measured on a 2-core EPYC,
torch 2.13), ~20 % of the CPU forward time. Raising the mmap threshold and keeping a top pad makes
the second and later forwards reuse the same heap (0 faults; 0.976 -> 0.791 s per window pair in
fp32, benchmarks/segment_speed.py shows the effect end to end). This is what jemalloc/tcmalloc via
LD_PRELOAD would give, without an environment variable that must be set before the process starts.

The setting is process-wide and one-way: freed memory below 2 GiB stays with the process (RSS keeps
its high-water mark) instead of going back to the OS. That suits a segmentation run; a library user
who embeds dtml in a long-lived service can turn it off with `BackendOptions(keep_host_memory=False)`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap and are reused
TOP_PAD = 512 << 20  # grow the heap in 512 MiB steps and keep that much free at the top
TRIM_THRESHOLD = 2**31 - 1  # hand the heap's top back to the OS only above 2 GiB free (int max)


@functools.cache
def keep_freed_host_memory() -> bool:
    """Apply the glibc settings once per process; True when they took effect.

    False (and nothing changed) where the C library is not glibc (macOS, Windows, musl).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success.
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TOP_PAD, TOP_PAD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
