"""Timing shared by the benchmarks: the median of repeated calls, each synchronised, after a warm-up call."""
import time

import jax
import numpy as np


def median_ms(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))
