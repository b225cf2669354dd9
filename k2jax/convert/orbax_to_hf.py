"""k2jax checkpoint (converted, or a k2-train workdir) -> HF safetensors, restored and written leaf by leaf.

Formats: "k2_thinking" (compressed-tensors pack-quantized INT4 routed experts, bf16 elsewhere, the router
bias fp32, `quantization_config` in config.json) and "bf16" (all dense, for transformers'
DeepseekV3ForCausalLM). Dense experts (a training run's master weights) are quantised with the QAT
quantiser, so the exported model is the one QAT trained.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from k2jax import hf, int4
from k2jax.config import ConfigError, K2Config
from k2jax.convert import layout, reading
from k2jax.convert import stored as stored_lib
from k2jax.host_copy import copy_into, copy_packed_to_words
from k2jax.safetensors_io import DTYPES, ShardWriter

_NAMES = {v: k for k, v in DTYPES.items()}

FORMATS = ("k2_thinking", "bf16")


def open_checkpoint(checkpoint: str):
  """(manager, step, meta, K2Config) of a converted checkpoint or k2-train workdir / step folder."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  from k2jax.train import checkpointing  # noqa: PLC0415
  root, step = checkpointing._locate(checkpoint)  # noqa: SLF001  (the one place that knows the layout)
  manager = ocp.CheckpointManager(root, item_names=("params", "meta"))
  try:
    meta = checkpointing._restore_meta(manager, step, root / str(step))  # noqa: SLF001
    c = checkpointing.config_from_dict(meta["model_config"])
  except BaseException:
    manager.close()
    raise
  return manager, step, meta, c


def _restore(manager, step: int, likes: dict[str, Any]) -> dict[str, Any]:
  """Some leaves of the params item (one partial restore: Orbax's per-restore cost is paid once for
  them), as numpy (a QuantizedWeight of numpy for INT4): {leaf path: value}."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  item: dict = {}
  for path, like in likes.items():
    stored = {"packed": like.packed, "scales": like.scales} if isinstance(like, int4.QuantizedWeight) else like
    hf.set_path(item, path, stored)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
  out = manager.restore(step, args=ocp.args.Composite(params=args))["params"]
  values = {}
  for path, like in likes.items():
    v = out
    for k in path.split("/"):
      v = v[k]
    values[path] = (int4.QuantizedWeight(np.asarray(v["packed"]), np.asarray(v["scales"]))
                    if isinstance(like, int4.QuantizedWeight) else np.asarray(v))
  return values


def read_leaves(checkpoint: str):
  """Every leaf of a converted checkpoint (or a k2-train workdir / step) as stored, one restore at a time:
  (leaf path, numpy value or a QuantizedWeight of numpy). For comparing checkpoints without holding one."""
  from k2jax.train import checkpointing  # noqa: PLC0415
  manager, step, meta, c = open_checkpoint(checkpoint)
  try:
    like = checkpointing.abstract_params_of(meta, c)
    for path, leaf in _flat(like, lambda x: isinstance(x, int4.QuantizedWeight)):
      yield path, _restore(manager, step, {path: leaf})[path]
  finally:
    manager.close()


def layers_per_restore(leaf_bytes: int, n_layers: int, batch_bytes: int) -> int:
  """Layers of a stacked leaf read together: up to `batch_bytes`, one at least."""
  return max(1, batch_bytes // (leaf_bytes // n_layers))


@dataclasses.dataclass(frozen=True, eq=False)  # keyed by identity (the export's parts of each piece)
class _Piece:
  """What one restore brings in for a leaf: all of it (through Orbax), or a run of its layers read by
  byte range from its stored arrays (`raws`: packed and scales of an INT4 leaf, else one)."""
  leaf: hf.Leaf
  nbytes: int
  layers: range | None = None
  raws: tuple[stored_lib.RawArray, ...] = ()


def _pieces(leaves: list[hf.Leaf], flat: dict[str, Any], sizes: dict[str, int], stored: stored_lib.StoredArrays,
            batch_bytes: int) -> list[_Piece]:
  """Every leaf whole, except a stacked leaf over `batch_bytes` that is stored uncompressed: runs of
  its layers of up to `batch_bytes` (one layer at least), so host memory never holds it whole."""
  out = []
  for leaf in leaves:
    like, size = flat[leaf.path], sizes[leaf.path]
    arrays = (("packed", like.packed), ("scales", like.scales)) if isinstance(like, int4.QuantizedWeight) else (
        ("", like),)
    raws = []
    if leaf.layer0 is not None and size > batch_bytes:
      name = leaf.path.replace("/", ".")
      raws = [stored.raw(f"{name}.{k}" if k else name, a.shape, a.dtype) for k, a in arrays]
    if not raws or None in raws:
      out.append(_Piece(leaf, size))
      continue
    n = leaf.spec.shape[0]
    step = layers_per_restore(size, n, batch_bytes)
    out += [_Piece(leaf, size * min(n, l0 + step) // n - size * l0 // n, range(l0, min(n, l0 + step)), tuple(raws))
            for l0 in range(0, n, step)]  # the pieces' bytes add up to the leaf's (the progress bar)
  return out


def _batches(pieces: list[_Piece], batch_bytes: int) -> list[list[_Piece]]:
  """Consecutive whole leaves gathered into restores of up to `batch_bytes` (a larger one alone); a run
  of layers alone."""
  out: list[list[_Piece]] = []
  size = batch_bytes
  for piece in pieces:
    if piece.layers is not None or size + piece.nbytes > batch_bytes:
      out.append([])
      size = batch_bytes if piece.layers is not None else 0
    out[-1].append(piece)
    size += piece.nbytes
  return out


def _restore_batch(manager, step: int, stored: stored_lib.StoredArrays, flat: dict[str, Any],
                   batch: list[_Piece]) -> list[Any]:
  """The values of a batch's pieces, in order (numpy, or a QuantizedWeight of numpy)."""
  first = batch[0]
  if first.layers is not None:
    parts = [stored.rows(raw, first.layers.start, first.layers.stop) for raw in first.raws]
    return [int4.QuantizedWeight(*parts) if isinstance(flat[first.leaf.path], int4.QuantizedWeight) else parts[0]]
  values = _restore(manager, step, {piece.leaf.path: flat[piece.leaf.path] for piece in batch})
  return [values[piece.leaf.path] for piece in batch]


def _quantizer(mode: str):
  # The same jitted quantiser as serving's `params.quantize_experts` (QAT's fake_quant matches it).
  return jax.jit(lambda w: int4.QuantizedWeight.quantize(w, mode))


# One HF tensor of a leaf: (name, HF shape, dtype, value -> the view it is copied from, copy(dst, view)
# into the HF-shaped buffer): a view holding its elements in HF order for `_copy_view`, INT4 words
# [4, in/32, out] for `copy_packed_to_words`.
Part = tuple[str, tuple[int, ...], np.dtype, Callable[[Any], np.ndarray], Callable]


def _copy_view(dst: np.ndarray, view: np.ndarray) -> None:
  copy_into(dst.reshape(view.shape), view)


def _leaf_parts(leaf: hf.Leaf, like: Any, fmt: str, quantize: Callable | None,
                layers: range | None = None) -> list[Part]:
  """The HF tensors of one leaf in the order they are written, from its stored shape and dtype alone;
  with `layers`, those of these layers only, taken from a value that holds just them."""
  bf16 = np.dtype(ml_dtypes.bfloat16)
  parts: list[Part] = []
  quantized: dict = {}  # a dense expert leaf's INT4 form, one layer at a time (the last one kept)

  def int4_of(value, layer):
    if isinstance(value, int4.QuantizedWeight):
      return value
    if layer not in quantized:  # a training run's dense experts, through the jitted QAT quantiser
      quantized.clear()
      q = quantize(jnp.asarray(value[layer if layers is None else layer - layers.start], jnp.float32))
      quantized[layer] = int4.QuantizedWeight(np.asarray(q.packed)[None], np.asarray(q.scales)[None])
    return quantized[layer]

  stored_int4 = isinstance(like, int4.QuantizedWeight)
  for layer, e in leaf.slices():
    if layers is not None and layer not in layers:
      continue
    idx = tuple(i for i in (layer if layers is None else layer - layers.start, e) if i is not None)
    name = leaf.hf_name(layer, e)
    if leaf.map.linear and leaf.experts and fmt == "k2_thinking":
      n_out, n_in = leaf.hf_shape
      scale_dt = np.dtype(like.scales.dtype) if stored_int4 else bf16
      # Per slice: the stored INT4 words [4, K/32, N] / scales [K/32, N], or those of the layer quantised.
      at = idx if stored_int4 else (0,) + idx[1:]

      def words(v, at=at, layer=layer):  # packed [4, K/32, N], copied to HF words [N, K/8]
        return int4_of(v, layer).packed[at]

      def scales(v, at=at, layer=layer):
        return int4_of(v, layer).scales[at].T
      parts += [
          (f"{name}.weight_packed", (n_out, n_in // int4.PER_WORD), np.dtype(np.int32), words,
           copy_packed_to_words),
          (f"{name}.weight_scale", (n_out, n_in // int4.GROUP), scale_dt, scales, _copy_view),
          (f"{name}.weight_shape", (2,), np.dtype(np.int64),
           lambda v, s=(n_out, n_in): np.array(s, np.int64), _copy_view),
      ]
      continue
    dt = np.dtype(like.dtype) if leaf.spec.dtype is not None else bf16

    def dense(v, idx=idx):
      if isinstance(v, int4.QuantizedWeight):  # --format=bf16: dequantised, one slice at a time
        return int4.QuantizedWeight(v.packed[idx], v.scales[idx]).dequantize(np.float32)
      return v[idx] if idx else v
    if leaf.map.linear:
      parts.append((f"{name}.weight", tuple(leaf.hf_shape), dt,
                    lambda v, dense=dense: dense(v).reshape(leaf.hf_shape[::-1]).T, _copy_view))
    else:
      parts.append((name, tuple(leaf.hf_shape), dt, lambda v, dense=dense: dense(v).reshape(leaf.hf_shape),
                    _copy_view))
  return parts


def _config_json(meta: dict, c: K2Config, fmt: str, side: str | None) -> tuple[dict, bool]:
  """(config.json dict, unchanged from the source's). The source's own file is kept (every field) when
  it describes this model; `quantization_config` follows the format."""
  source = None
  if side and os.path.exists(os.path.join(side, "config.json")):
    with open(os.path.join(side, "config.json")) as f:
      source = json.load(f)
    try:
      same = K2Config.from_hf(source, strict=False).replace(name=c.name, expert_quant=c.expert_quant) == c
    except ConfigError:
      same = False
    source = source if same else None
  out = dict(source) if source is not None else c.to_hf()
  if fmt == "k2_thinking":
    from k2jax import quant_config  # noqa: PLC0415
    if (out.get("quantization_config") or {}).get("quant_method") != "compressed-tensors":
      out["quantization_config"] = quant_config.int4_quantization_config()
  else:
    out.pop("quantization_config", None)
  return out, source is not None and out == source


def _write_when_copied(shards: ShardWriter, name: str, buf: np.ndarray, copied: concurrent.futures.Future) -> None:
  copied.result()
  shards.write(name, buf)


SLAB_BYTES = 64 << 20  # host buffers of tensors on their way to disk (two, in turn; larger tensors alone)
RESTORE_BYTES = 256 << 20  # leaves restored together (Orbax's per-restore cost is paid once for them)


def export(checkpoint: str, output_dir: str, *, fmt: str = "k2_thinking", max_shard_bytes: int = 4 << 30,
           progress: bool = True) -> dict[str, Any]:
  """Writes an HF checkpoint folder (sharded safetensors + index, config.json, tokenizer files) from a
  k2jax checkpoint; all or nothing. Returns a summary.

  Streams: Orbax restores the next leaves while this one's tensors are transposed (on a thread per
  core) into one of two host slabs, and a writer thread puts them into the shard files in order (their
  headers are planned from shapes, so nothing is gathered), each shard fsynced in the background every
  `layout.RECYCLE_BYTES` written and when it is complete, its synced pages then dropped from the page
  cache (so little is left to sync at the end, and the writes reuse the pages just freed). Host memory:
  two restores of up to `RESTORE_BYTES` plus the two slabs: a stacked leaf stored uncompressed (as
  `k2-convert` writes it) is read a run of layers at a time (`stored`); one that is not (a `k2-train`
  checkpoint's, compressed) is restored whole by Orbax, which holds it twice while it reads it."""
  if fmt not in FORMATS:
    raise layout.ConvertError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
  from k2jax.train import checkpointing  # noqa: PLC0415
  layout.check_output(output_dir, checkpoint)
  manager, step, meta, c = open_checkpoint(checkpoint)
  try:
    like = checkpointing.abstract_params_of(meta, c)
    is_qw = lambda x: isinstance(x, int4.QuantizedWeight)
    flat = {k: v for k, v in _flat(like, is_qw)}
    leaves = hf.leaves(c)
    sizes = {leaf.path: layout.nbytes(flat[leaf.path]) for leaf in leaves}
    quantize = None
    if fmt == "k2_thinking" and any(leaf.experts and not is_qw(flat[leaf.path]) for leaf in leaves):
      from k2jax.train.train_step import QAT_MODE  # noqa: PLC0415  (imports the model: only when needed)
      quantize = _quantizer(QAT_MODE)
    stored = stored_lib.StoredArrays(str(manager.directory / str(step) / "params"))
    pieces = _pieces(leaves, flat, sizes, stored, RESTORE_BYTES)
    parts = {p: _leaf_parts(p.leaf, flat[p.leaf.path], fmt, quantize, p.layers) for p in pieces}
    specs = [(name, shape, _NAMES[dt]) for p in pieces for name, shape, dt, *_ in parts[p]]
    side = layout.hf_files_dir(checkpoint)
    bar = layout.ByteBar(sum(sizes.values()), f"exporting ({fmt})", progress)
    written = {"bytes": 0, "tensors": 0}
    try:
      with (layout.Staging(output_dir) as stage,
            concurrent.futures.ThreadPoolExecutor(1, "k2-export-restore") as restorer,
            concurrent.futures.ThreadPoolExecutor(reading.workers(), "k2-export-copy") as copiers,
            concurrent.futures.ThreadPoolExecutor(1, "k2-export-write") as writer,
            concurrent.futures.ThreadPoolExecutor(1, "k2-export-fsync") as syncer):
        syncs: list[concurrent.futures.Future] = []
        # Each shard synced and dropped from the page cache every RECYCLE_BYTES, so the writes keep
        # reusing the pages just freed (`layout.Recycler`).
        shards = ShardWriter(stage.tmp, specs, max_shard_bytes, on_file_bytes=layout.RECYCLE_BYTES,
                             on_file=lambda path: syncs.append(syncer.submit(layout.fsync_path, path, True)))
        writes: list[list[concurrent.futures.Future]] = [[], []]  # per slab: its tensors being written
        try:
          slabs = layout.Slabs(SLAB_BYTES)
          batches = _batches(pieces, RESTORE_BYTES)
          pending = restorer.submit(_restore_batch, manager, step, stored, flat, batches[0])
          for i, batch in enumerate(batches):
            values = pending.result()
            if i + 1 < len(batches):
              pending = restorer.submit(_restore_batch, manager, step, stored, flat, batches[i + 1])
            for piece, value in zip(batch, values):
              bar.leaf(piece.leaf.path)
              for name, shape, dt, view_of, copy in parts[piece]:
                src = view_of(value)
                n = layout.Slabs.span(math.prod(shape) * dt.itemsize)
                if not slabs.fits(n):  # the other slab's writes must be done before it is reused
                  for f in writes[1 - slabs.current]:
                    f.result()
                  writes[1 - slabs.current] = []
                  slabs.swap()
                buf = slabs.empty(shape, dt)
                copied = copiers.submit(copy, buf, src)  # `src` keeps its restored array alive
                writes[slabs.current].append(writer.submit(_write_when_copied, shards, name, buf, copied))
                written["bytes"] += buf.nbytes
                written["tensors"] += 1
              bar.update(piece.nbytes)
            del values, value, src  # the copies now hold the only references
          for f in writes[0] + writes[1]:
            f.result()
          shards.close()
        finally:  # no write may still be running when its file is closed
          for f in writes[0] + writes[1]:
            f.cancel()
          concurrent.futures.wait(writes[0] + writes[1])
          shards.abort()
        cfg, unchanged = _config_json(meta, c, fmt, side)
        if unchanged:
          shutil.copy2(os.path.join(side, "config.json"), stage.path("config.json"))
        else:
          with open(stage.path("config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        for f in layout.side_files(side) if side else []:
          if f != "config.json":
            shutil.copy2(os.path.join(side, f), stage.path(f))
        for f in syncs:
          f.result()
        stage.commit()
    finally:
      seconds = bar.close()
  finally:
    manager.close()
  return {"output_dir": str(Path(output_dir).absolute()), "format": fmt, "bytes_written": written["bytes"],
          "tensors": written["tensors"], "seconds": seconds}


def _flat(tree, is_leaf):
  from k2jax import params as params_lib  # noqa: PLC0415
  return [(params_lib.path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]
