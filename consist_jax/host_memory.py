"""XLA:CPU's per-call buffers kept in the process: glibc's malloc told to reuse freed memory.

XLA:CPU allocates a program's temporaries at each call (one block per device: 42 MB in
the demo's train step) and frees them when the call ends. glibc's malloc serves a block
over 32 MB with a fresh ``mmap`` and gives it back with ``munmap``; a thread's arena also
unmaps a heap once it is empty. So every step the kernel maps the pages again, zeroes them
and takes a fault on each first touch: in the demo's step on 2 cores, ~20,000 faults a
step and a quarter of its time in the kernel (perf). Told to keep what it frees, malloc
hands the same pages back at the next call (the demo's step 92 -> 71 ms; BENCHMARKS.md
"Freed memory kept").

    keep_freed_memory_on("cpu")   # train.py, sample.py, evaluate.py call this once the backend is known

The settings (``mallopt``, as ``GLIBC_TUNABLES`` would set them at start-up):
  * M_MMAP_MAX 0: no block gets its own mapping; all come from the arenas' heaps;
  * M_TRIM_THRESHOLD 2 GiB: no heap's free top is returned to the kernel;
  * M_TOP_PAD 128 MiB (over the 64 MiB of a thread arena's heap): an emptied heap is kept.
The cost: memory the process frees stays in it (its resident size stays at its peak), as
with PyTorch's or TensorFlow's caching allocators. A thread arena still maps a block over
64 MiB on its own (glibc has no setting for that). Accelerator backends are left alone;
``CONSIST_KEEP_FREED_MEMORY=0`` leaves CPU runs alone too.

A malloc preloaded in glibc's place keeps blocks of any size and is faster still (the demo's
step 65 ms; the small UNet of bench/train_step.py, whose temporaries are 199 MB, 0.60 -> 0.50 s):
``pip install cmeel-mimalloc``, then run with ``LD_PRELOAD=<site-packages>/cmeel.prefix/lib/libmimalloc.so.3``
and ``MIMALLOC_PURGE_DELAY=-1`` (never give pages back), or Debian's libjemalloc2 with
``MALLOC_CONF=oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1``. Then
``keep_freed_memory`` names it and leaves glibc's settings alone.
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional

from absl import logging

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # glibc's malloc.h
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 128 << 20))
ENV_VAR = "CONSIST_KEEP_FREED_MEMORY"


def _loaded_symbols() -> object:
    """The symbols loaded into the process (``CDLL(None)``), or a stand-in without any."""
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):
        return object()


def _glibc() -> Optional[ctypes.CDLL]:
    """The process's C library when it is glibc (it has ``gnu_get_libc_version`` and
    ``mallopt`` among the loaded symbols), else None."""
    libc = _loaded_symbols()
    try:
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.mallopt.restype = ctypes.c_int
    except AttributeError:
        return None
    return libc


def preloaded_malloc(libc: object) -> Optional[str]:
    """"mimalloc" or "jemalloc" when one serves malloc in glibc's place (LD_PRELOAD: its own
    entry points are in the process), else None."""
    for name, symbol in (("mimalloc", "mi_version"), ("jemalloc", "mallctl")):
        if hasattr(libc, symbol):
            return name
    return None


def keep_freed_memory() -> str:
    """Sets glibc's malloc to keep the memory it frees (the module docstring says why).
    Returns what was done, one line, and logs it (a warning when nothing could be set);
    raises nothing: a preloaded mimalloc or jemalloc is left to its own settings, and a C
    library other than glibc is left as it is."""
    libc = _glibc()
    preloaded = preloaded_malloc(libc if libc is not None else _loaded_symbols())
    if preloaded:
        message, log = f"host memory: {preloaded} serves malloc (preloaded); glibc's settings not applied", logging.info
    elif libc is None:
        message = "host memory: the C library is not glibc; XLA:CPU's buffers are mapped anew at each call"
        log = logging.warning
    else:
        version = libc.gnu_get_libc_version().decode()
        failed = [option for option, value in SETTINGS if libc.mallopt(option, value) != 1]  # 1: success
        message = (f"host memory: glibc {version} refused mallopt options {failed}" if failed
                   else f"host memory: glibc {version} keeps freed memory")
        log = logging.warning if failed else logging.info
    log(message)
    return message


def keep_freed_memory_on(platform: str) -> Optional[str]:
    """``keep_freed_memory()`` when JAX's ``platform`` is "cpu" and ``CONSIST_KEEP_FREED_MEMORY``
    is not "0"; None (nothing changed) otherwise."""
    if platform != "cpu" or os.environ.get(ENV_VAR, "1") == "0":
        return None
    return keep_freed_memory()
