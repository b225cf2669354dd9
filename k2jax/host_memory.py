"""Host memory for runs on the CPU backend: a program's scratch space kept mapped from one call to the next.

XLA:CPU takes each executable's temporaries as one block from malloc (768 MB for the small-width train step
in `benchmarks/widths.py`). glibc serves a block that large with a fresh `mmap` and returns it with
`munmap` when the call ends, so every step page-faults and the kernel zeroes its whole scratch space again
(188k faults and ~0.3 CPU-s of a 1.2 s step there). Blocks taken on a worker thread cannot avoid that
(a thread's arena maps anything past 64 MB itself), but on the calling thread malloc can be told to keep
freed memory for the next call: programs then run where they are called (no asynchronous dispatch) and
the main arena grows instead of mapping (the step 0.86x, benchmarks/NOTES.md).
"""
from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# As M_TRIM_THRESHOLD: never return the heap's free top to the system. A finite threshold (at most 2 GiB,
# mallopt takes an int) gave the medium-width train step's scratch back every step: 1.1 M faults a step.
NO_TRIM = -1
OPT_OUT = "K2JAX_DEFAULT_MALLOC"  # set to 1 to leave malloc and JAX's dispatch as they are


def keep_scratch_mapped() -> bool:
  """Before JAX starts its CPU client: runs programs on the calling thread and has glibc's malloc keep
  large freed blocks mapped (the heap is never trimmed). For processes that run the same
  programs many times (training, RL); a process's resident memory then stays near its peak. Returns
  whether it was applied: not without glibc, nor with `K2JAX_DEFAULT_MALLOC=1`."""
  if os.environ.get(OPT_OUT) == "1" or not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # another C library (musl, ...)
    return False
  if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, NO_TRIM)):
    return False
  import jax  # noqa: PLC0415
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True
