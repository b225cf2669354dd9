"""HF slices into host leaves, fast: slices read through memory maps of the page cache on a thread pool,
transposed into place a tile at a time (`host_copy`)."""
from __future__ import annotations

import concurrent.futures
import os
from typing import Callable

import numpy as np

from k2jax import hf, int4
from k2jax.host_copy import copy_into, copy_words_to_packed
from k2jax.safetensors_io import DTYPES, Checkpoint


def workers() -> int:
  """Threads that read and transpose slices (numpy and file reads release the GIL)."""
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  return max(1, min(4, cpus))


def _results(futures: list[concurrent.futures.Future]):
  """Each future's result in order; on the first error the rest are cancelled and the running ones
  waited for (none may write into a buffer after this leaf is given up)."""
  try:
    for f in futures:
      yield f.result()
  finally:
    for f in futures:
      f.cancel()
    concurrent.futures.wait(futures)


def slice_views(leaf: hf.Leaf, ckpt: Checkpoint, layer, expert, keep_int4: bool) -> tuple[np.ndarray, ...]:
  """One layer/expert slice of `leaf` in our layout, as views of the arrays read (not yet copied or cast):
  (packed, scales) of an INT4 linear kept INT4, else one array."""
  name = leaf.hf_name(layer, expert)
  per = leaf.spec.shape[leaf.batch_dims:]
  if keep_int4:
    w = int4.read_hf(ckpt, name, copy=False)
    return w.packed, w.scales
  if not leaf.map.linear:
    return (ckpt.get(name).reshape(per),)
  return (hf.read_linear(ckpt, name, as_stored=True).T.reshape(per),)


def slice_reader(leaf: hf.Leaf, ckpt: Checkpoint, keep_int4: bool) -> Callable:
  """`get(layer, expert)` for `hf.load_leaf`: a slice as views of what was read (an INT4 QuantizedWeight
  of them with `keep_int4`), which its `_fill` copies into place (and casts) in tiles."""
  def get(layer, expert):
    views = slice_views(leaf, ckpt, layer, expert, keep_int4)
    return int4.QuantizedWeight(*views) if keep_int4 else views[0]
  return get


def leaf_arrays(leaf: hf.Leaf, ckpt: Checkpoint, dtype, keep_int4: bool) -> list[tuple[tuple[int, ...], np.dtype]]:
  """(shape, dtype) of the host arrays a leaf is read into: (packed, scales) of an INT4 leaf, else one."""
  batch = tuple(leaf.spec.shape[:leaf.batch_dims])
  per = tuple(leaf.spec.shape[leaf.batch_dims:])
  if keep_int4:
    k, n = per
    scale_dt = DTYPES[ckpt.dtype_name(leaf.hf_name(0, 0) + ".weight_scale")]
    return [(batch + (int4.WORDS_PER_GROUP, k // int4.GROUP, n), np.dtype(np.int32)),
            (batch + (k // int4.GROUP, n), scale_dt)]
  return [(batch + per, np.dtype(leaf.spec.dtype or dtype))]


def _streamed(slices, one: Callable, pool, stream, on_slice):
  """Slices submitted as the stream admits their layers; the bytes of those done, as they finish in
  order (the progress bar moves while a large leaf streams)."""
  futures: list[concurrent.futures.Future] = []
  reported = 0
  try:
    for s in slices:
      stream.admit(s[0])
      futures.append(pool.submit(one, *s))
      while reported < len(futures) and futures[reported].done():
        n = futures[reported].result()
        reported += 1
        if on_slice is not None:
          on_slice(n)
  except BaseException:
    for f in futures:
      f.cancel()
    concurrent.futures.wait(futures)
    raise
  return _results(futures[reported:])


def read_leaf(leaf: hf.Leaf, ckpt: Checkpoint, dtype, keep_int4: bool, empty: Callable = np.empty,
              pool: concurrent.futures.Executor | None = None, on_slice: Callable[[int], None] | None = None,
              stream=None):
  """A whole leaf in host memory (numpy, or an INT4 QuantizedWeight of numpy) in buffers from
  `empty(shape, dtype)`, each slice read and copied into place once, slices in parallel on `pool`.
  `on_slice(n)`: called with the checkpoint bytes of each slice done (progress). `stream`: a
  `streaming.RowStream` over the buffers, being written meanwhile (with a `pool`): a layer's slices are
  read only once it admits them, and each one done is reported to it."""
  outs = tuple(empty(shape, dt) for shape, dt in leaf_arrays(leaf, ckpt, dtype, keep_int4))

  def one(layer, expert) -> int:
    pos = tuple(i for i in (layer, expert) if i is not None)
    for i, (o, part) in enumerate(zip(outs, slice_views(leaf, ckpt, layer, expert, keep_int4))):
      (copy_words_to_packed if keep_int4 and i == 0 else copy_into)(o[pos], part)
    names = hf.slice_tensor_names(leaf, ckpt, layer, expert)
    ckpt.release(names)  # copied: a mapped slice's pages need not stay resident
    if stream is not None:
      stream.slice_done(layer)
    return sum(ckpt.nbytes(t) for t in names)

  slices = list(leaf.slices())
  if stream is not None:
    done = _streamed(slices, one, pool, stream, on_slice)
  elif pool is None or len(slices) == 1:
    done = (one(*s) for s in slices)
  else:
    futures = [pool.submit(one, *s) for s in slices]
    done = _results(futures)
  for n in done:
    if on_slice is not None:
      on_slice(n)
  return int4.QuantizedWeight(*outs) if keep_int4 else outs[0]
