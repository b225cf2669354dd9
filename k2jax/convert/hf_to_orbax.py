"""HF safetensors -> k2jax's Orbax layout: validated first, streamed leaf by leaf, committed atomically."""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import os
import shutil
from typing import Any

import jax
import numpy as np

from k2jax import hf
from k2jax import params as params_lib
from k2jax.config import K2Config
from k2jax.convert import layout, reading, streaming
from k2jax.safetensors_io import Checkpoint


def _counting(get, leaf: hf.Leaf, ckpt: Checkpoint, bar: layout.ByteBar):
  """`get`, advancing the bar by the checkpoint bytes each slice is read from."""
  def counted(layer, expert):
    out = get(layer, expert)
    bar.update(sum(ckpt.nbytes(n) for n in hf.slice_tensor_names(leaf, ckpt, layer, expert)))
    return out
  return counted


@contextlib.contextmanager
def _frozen_gc():
  """The objects alive so far (JAX's, Orbax's: millions) left out of garbage collections while the
  conversion runs; full collections of them took ~7 % of its CPU time (perf)."""
  gc.freeze()
  try:
    yield
  finally:
    gc.unfreeze()


def _sliced(leaf: hf.Leaf, ckpt: Checkpoint, dtype, keep_int4: bool) -> list[bool]:
  """`layout.sliced` of the host arrays the leaf is read into."""
  arrays = reading.leaf_arrays(leaf, ckpt, dtype, keep_int4)
  return layout.sliced((shape, np.dtype(dt).itemsize) for shape, dt in arrays)


def _streams(leaf: hf.Leaf, ckpt: Checkpoint, dtype, keep_int4: bool) -> bool:
  """Whether a leaf is written while it is read: a stacked one with an array stored in several chunks,
  as every large leaf is; its host memory is then a few layers."""
  return leaf.layer0 is not None and any(_sliced(leaf, ckpt, dtype, keep_int4))


def _convert_streamed(leaf: hf.Leaf, ckpt: Checkpoint, dtype, keep_int4: bool, writer: layout.ParamsWriter,
                      readers, bar: layout.ByteBar) -> int:
  """One large leaf, its write started first and fed layer by layer as the layers are read; returns its
  bytes."""
  from k2jax import int4  # noqa: PLC0415
  rows = leaf.spec.shape[0]
  stream = streaming.RowStream(rows, sum(1 for s in leaf.slices() if s[0] == 0), layout.WRITE_WINDOW_BYTES,
                               layout.STREAM_AHEAD_BYTES)
  arrays = [stream.empty(shape, dt, gated=gated) for (shape, dt), gated in
            zip(reading.leaf_arrays(leaf, ckpt, dtype, keep_int4), _sliced(leaf, ckpt, dtype, keep_int4))]
  given = iter(arrays)
  with stream:
    writer.write_streamed(leaf.path, int4.QuantizedWeight(*arrays) if keep_int4 else arrays[0])
    reading.read_leaf(leaf, ckpt, dtype, keep_int4, lambda shape, dt: next(given), readers, bar.update,
                      stream=stream)
  return sum(a.nbytes for a in arrays)


def _shardings(c: K2Config, mesh, dtype, int4_experts: bool) -> dict[str, Any]:
  """{leaf path: sharding (a QuantizedWeight of them for INT4 experts)} for `mesh`."""
  from k2jax import int4, sharding  # noqa: PLC0415
  like = params_lib.abstract_params(c, dtype, int4_experts=int4_experts)
  tree = sharding.param_shardings(c, mesh, params=like)
  is_qw = lambda x: isinstance(x, int4.QuantizedWeight)
  return {params_lib.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qw)[0]}


def convert(hf_dir: str, output_dir: str, *, dtype: str = "bfloat16", mesh=None, check_finite: bool = True,
            strict: bool = True, progress: bool = True) -> dict[str, Any]:
  """Converts an HF checkpoint folder into a k2jax checkpoint at `output_dir`; returns a summary.

  Every tensor's presence, shape and dtype is checked from the headers before anything is written;
  values are checked finite while streaming (`check_finite`). INT4 routed experts stay INT4 (int32 words
  + their scales); other float weights are stored in `dtype` (FP8 dequantised), the router bias in fp32.
  Host memory: a few layers of a large stacked leaf (written while it is read, `streaming`), two slabs of
  the other leaves (under `mesh`: one leaf's local shards), and the slice being read.
  """
  dt = params_lib.dtype_from_name(dtype)
  if not os.path.isdir(hf_dir):
    raise layout.ConvertError(f"{hf_dir} is not a folder; give the HF checkpoint folder (config.json + "
                              "safetensors)")
  layout.check_output(output_dir, hf_dir)  # before the long validation
  c = K2Config.from_hf(hf_dir, strict=strict)
  ckpt = Checkpoint(hf_dir, check_finite=check_finite)
  hf.validate(ckpt, c)
  all_leaves = hf.leaves(c)
  int4_leaves = {leaf.path for leaf in all_leaves if hf.is_int4_leaf(leaf, ckpt)}
  if int4_leaves and len(int4_leaves) != sum(leaf.experts for leaf in all_leaves):
    raise layout.ConvertError(f"{hf_dir}: routed experts are only partly INT4 ({sorted(int4_leaves)})")
  total = sum(ckpt.nbytes(n) for n in ckpt.keys())
  shardings = _shardings(c, mesh, dt, bool(int4_leaves)) if mesh is not None else None
  scale_dtype = None
  if int4_leaves:
    first = next(leaf for leaf in all_leaves if leaf.path in int4_leaves)
    scale_dtype = ckpt.dtype_name(first.hf_name(0, 0) + ".weight_scale")
  # Host bytes of each leaf as read (the mesh path reads into jax arrays instead).
  spans = {leaf.path: layout.Slabs.span_of(reading.leaf_arrays(leaf, ckpt, dt, leaf.path in int4_leaves))
           for leaf in all_leaves}
  # Large stacked leaves are written while they are read (one host); the slabs hold the others.
  streamed = {leaf.path for leaf in all_leaves
              if mesh is None and _streams(leaf, ckpt, dt, leaf.path in int4_leaves)}
  ckpt = ckpt.mapped()
  bar = layout.ByteBar(total, "converting", progress)
  written = 0
  try:
    with (layout.Staging(output_dir) as stage,
          layout.ParamsWriter(stage.tmp, largest_leaf=0 if mesh else max(
              [n for p, n in spans.items() if p not in streamed], default=0)) as writer,
          concurrent.futures.ThreadPoolExecutor(reading.workers(), "k2-convert-read") as readers,
          _frozen_gc()):
      by_path = {leaf.path: leaf for leaf in all_leaves}
      for leaf in (by_path[p] for p in layout.write_order(spans, writer.batch_bytes)):
        bar.leaf(leaf.path)
        keep = leaf.path in int4_leaves
        if leaf.path in streamed and writer.streams():
          written += _convert_streamed(leaf, ckpt, dt, keep, writer, readers, bar)
          continue
        writer.make_room(spans[leaf.path])
        if shardings is None:
          value = reading.read_leaf(leaf, ckpt, dt, keep, writer.empty, readers, bar.update)
        else:
          get = _counting(reading.slice_reader(leaf, ckpt, keep), leaf, ckpt, bar)
          value = hf.load_leaf(leaf, ckpt, dt, shardings[leaf.path], keep, get=get)
          ckpt.release(n for s in leaf.slices() for n in hf.slice_tensor_names(leaf, ckpt, *s))
        written += layout.nbytes(value)
        writer.write(leaf.path, value)
        del value
      meta = {
          "format": "k2jax", "format_version": layout.FORMAT_VERSION,
          "model_config": dataclasses.asdict(c), "param_dtype": dtype,
          "expert_format": "int4" if int4_leaves else "dense", "int4_scale_dtype": scale_dtype,
          "source": {"hf_dir": os.path.basename(os.path.abspath(hf_dir)), "files": len(ckpt.files()),
                     "bytes": total, "check_finite": check_finite},
      }
      step_dir = layout.write_meta(stage.tmp, meta)
      writer.finalize(os.path.join(step_dir, "params"))
      if layout.process_index() == 0:
        os.makedirs(stage.path(layout.HF_FILES))
        for f in layout.side_files(hf_dir):
          shutil.copy2(os.path.join(hf_dir, f), stage.path(layout.HF_FILES, f))
      stage.commit()
  finally:
    seconds = bar.close()
  return {"output_dir": os.path.abspath(output_dir), "bytes_read": total, "bytes_written": written,
          "seconds": seconds, "tensors": len(ckpt.keys()), "leaves": len(all_leaves),
          "expert_format": meta["expert_format"]}


def leaf_bytes_estimate(c: K2Config, dtype: str, int4_experts: bool) -> dict[str, int]:
  """{leaf path: bytes in the converted checkpoint}, from shapes alone."""
  like = params_lib.abstract_params(c, params_lib.dtype_from_name(dtype), int4_experts=int4_experts)
  from k2jax import int4  # noqa: PLC0415
  is_qw = lambda x: isinstance(x, int4.QuantizedWeight)
  return {params_lib.path_str(p): layout.nbytes(x)
          for p, x in jax.tree_util.tree_flatten_with_path(like, is_leaf=is_qw)[0]}

