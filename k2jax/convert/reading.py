"""HF slices into host leaves, fast: slices read through memory maps of the page cache on a thread pool,
transposed into place a tile at a time.

A linear weight is stored [out, in] in HF and [in, out] here, so every byte of a checkpoint is transposed
on conversion. numpy copies a transposed view element by element along the destination's rows, which
for a large weight touches a new page of the source at every element; done in narrow column tiles the
source rows of a tile stay in cache and the copy runs several times faster. bf16 (an ml_dtypes type) is
copied as uint16, which numpy copies natively rather than through the type's per-element hook.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Callable

import numpy as np

from k2jax import hf, int4
from k2jax.safetensors_io import DTYPES, Checkpoint

# Tile of a transposed copy: destination rows (axis 0) x destination columns (source rows kept in
# cache); a tile of about TILE_ROWS x TILE_COLS elements, made wider where rows are few or the middle
# axes many (INT4 words [4, K/32, N]), so numpy's per-call overhead is paid on enough elements.
TILE_COLS = 64
TILE_ROWS = 512


def tile(shape: tuple[int, ...]) -> tuple[int, int]:
  """(rows, columns) of the tiles a transposed copy into a `shape` array goes by."""
  rows = min(shape[0], TILE_ROWS)
  per_row = int(np.prod(shape[1:-1]))  # the middle axes go whole into every tile
  return rows, max(TILE_COLS, TILE_ROWS * TILE_COLS // max(1, rows * per_row))


def workers() -> int:
  """Threads that read and transpose slices (numpy and file reads release the GIL)."""
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  return max(1, min(4, cpus))


def _bits(a: np.ndarray) -> np.ndarray:
  """`a` viewed as unsigned integers of its width (a bit-exact copy of those is a plain numpy copy)."""
  return a.view(f"u{a.dtype.itemsize}")


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
  """dst[...] = src, cast to dst's dtype; `dst` is C-contiguous, `src` any view of the same shape (a
  transposed one is copied in tiles)."""
  if src.shape != dst.shape:
    raise ValueError(f"copy of a {src.shape} slice into a {dst.shape} place")
  if src.dtype == dst.dtype:
    dst, src = _bits(dst), _bits(src)
  if src.ndim < 2 or src.flags.c_contiguous or src.strides[-1] == src.itemsize:
    np.copyto(dst, src, casting="unsafe")
    return
  tr, tc = tile(dst.shape)
  for i in range(0, dst.shape[0], tr):
    for j in range(0, dst.shape[-1], tc):
      np.copyto(dst[i:i + tr, ..., j:j + tc], src[i:i + tr, ..., j:j + tc], casting="unsafe")


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


def read_leaf(leaf: hf.Leaf, ckpt: Checkpoint, dtype, keep_int4: bool, empty: Callable = np.empty,
              pool: concurrent.futures.Executor | None = None, on_slice: Callable[[int], None] | None = None):
  """A whole leaf in host memory (numpy, or an INT4 QuantizedWeight of numpy) in buffers from
  `empty(shape, dtype)`, each slice read and copied into place once, slices in parallel on `pool`.
  `on_slice(n)`: called with the checkpoint bytes of each slice done (progress)."""
  outs = tuple(empty(shape, dt) for shape, dt in leaf_arrays(leaf, ckpt, dtype, keep_int4))

  def one(layer, expert) -> int:
    pos = tuple(i for i in (layer, expert) if i is not None)
    for o, part in zip(outs, slice_views(leaf, ckpt, layer, expert, keep_int4)):
      copy_into(o[pos], part)
    return sum(ckpt.nbytes(t) for t in hf.slice_tensor_names(leaf, ckpt, layer, expert))

  slices = list(leaf.slices())
  if pool is None or len(slices) == 1:
    done = (one(*s) for s in slices)
  else:
    futures = [pool.submit(one, *s) for s in slices]
    done = _results(futures)
  for n in done:
    if on_slice is not None:
      on_slice(n)
  return int4.QuantizedWeight(*outs) if keep_int4 else outs[0]
