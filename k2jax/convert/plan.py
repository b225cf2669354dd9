"""`--dry_run`: what a conversion or export would read and write, from shapes alone (no weights needed).

Works on the 1T config from a config.json alone: tensors, bytes per dtype in and out, output layout,
peak host memory and the time it would take at this machine's measured disk speed.
"""
from __future__ import annotations

import collections
import json
import math
import os
import tempfile
import time
from typing import Any

import jax
import numpy as np

from k2jax import hf, int4
from k2jax import params as params_lib
from k2jax.config import K2Config
from k2jax.convert import layout, streaming
from k2jax.safetensors_io import DTYPES, Checkpoint

_NAMES = {v: k for k, v in DTYPES.items()}
_SPEED_PROBE_BYTES = 64 << 20


def hf_tensor_specs(c: K2Config, form: str) -> list[tuple[str, tuple[int, ...], str]]:
  """(name, shape, safetensors dtype) of every tensor an HF checkpoint of `c` holds, from shapes alone.
  form: "int4" (K2 Thinking), "fp8" (K2-Instruct) or "bf16"."""
  out = []
  for leaf in hf.leaves(c):
    for layer, e in leaf.slices():
      name = leaf.hf_name(layer, e)
      if not leaf.map.linear:
        out.append((name, tuple(leaf.hf_shape), "F32" if leaf.spec.dtype is not None else "BF16"))
        continue
      o, i = leaf.hf_shape
      if form == "int4" and leaf.experts:
        out += [(f"{name}.weight_packed", (o, i // int4.PER_WORD), "I32"),
                (f"{name}.weight_scale", (o, i // int4.GROUP), "BF16"), (f"{name}.weight_shape", (2,), "I64")]
      elif form == "fp8" and leaf.path not in ("lm_head_dv",) and "router" not in leaf.path:
        out += [(f"{name}.weight", (o, i), "F8_E4M3"),
                (f"{name}.weight_scale_inv", (-(-o // hf.FP8_BLOCK), -(-i // hf.FP8_BLOCK)), "F32")]
      else:
        out.append((f"{name}.weight", (o, i), "BF16"))
  return out


def _by_dtype(specs) -> dict[str, int]:
  acc: dict[str, int] = collections.Counter()
  for _, shape, dt in specs:
    acc[dt] += DTYPES[dt].itemsize * math.prod(shape)
  return dict(sorted(acc.items()))


def _form_of(hf_cfg: dict) -> str:
  qc = hf_cfg.get("quantization_config") or {}
  return {"compressed-tensors": "int4", "fp8": "fp8"}.get(qc.get("quant_method"), "bf16")


def disk_speed(folder: str, read_from: str | None = None) -> dict[str, float]:
  """Bytes/s writing (with fsync) a 64 MB probe in `folder`, and reading `read_from` (the first 64 MB)."""
  os.makedirs(folder, exist_ok=True)
  buf = np.random.default_rng(0).integers(0, 255, _SPEED_PROBE_BYTES, np.uint8).tobytes()
  fd, path = tempfile.mkstemp(dir=folder, prefix=".k2jax-speed-")
  try:
    t = time.perf_counter()
    with os.fdopen(fd, "wb") as f:
      f.write(buf)
      f.flush()
      os.fsync(f.fileno())
    write = len(buf) / (time.perf_counter() - t)
    src = read_from or path
    t = time.perf_counter()
    with open(src, "rb", buffering=0) as f:
      n = len(f.read(_SPEED_PROBE_BYTES))
    read = n / max(time.perf_counter() - t, 1e-9)
  finally:
    os.unlink(path)
  return {"write_bytes_per_s": write, "read_bytes_per_s": read}


def _probe_dir(output_dir: str | None) -> str:
  """Where the output would go (its parent folder), for the disk-speed probe."""
  return os.path.dirname(os.path.abspath(output_dir)) if output_dir else os.getcwd()


def _converted_specs(c: K2Config, dtype: str, int4_experts: bool) -> list[tuple[str, tuple[int, ...], str]]:
  like = params_lib.abstract_params(c, params_lib.dtype_from_name(dtype), int4_experts=int4_experts)
  return [(params_lib.path_str(p), tuple(x.shape), _NAMES[np.dtype(x.dtype)])
          for p, x in jax.tree_util.tree_flatten_with_path(like)[0]]


def _leaf_of(name: str) -> str:
  """The parameter leaf of a converted-layout array (an INT4 leaf's packed and scales are one leaf)."""
  return name.rsplit("/", 1)[0] if name.endswith(("/packed", "/scales")) else name


def _leaf_sizes(specs) -> dict[str, int]:
  """Bytes per parameter leaf (INT4 packed + scales summed) of converted-layout specs."""
  out: dict[str, int] = collections.Counter()
  for name, shape, dt in specs:
    out[_leaf_of(name)] += DTYPES[dt].itemsize * math.prod(shape)
  return dict(out)


def _leaves_host_bytes(c: K2Config, specs) -> int:
  """Host memory a one-host conversion holds for leaves: two slabs for those read whole (a batch being
  written, the next assembled), a few layers of a stacked leaf stored in several chunks (written while
  it is read, `streaming`), and the group of chunks being written (tensorstore's copy of it)."""
  stacked = {leaf.path for leaf in hf.leaves(c) if leaf.layer0 is not None}
  arrays: dict[str, list[tuple[tuple[int, ...], int]]] = collections.defaultdict(list)
  for name, shape, dt in specs:
    arrays[_leaf_of(name)].append((shape, DTYPES[dt].itemsize))
  whole, streamed = [layout.BATCH_BYTES], [0]
  for path, arrs in arrays.items():
    gated = layout.sliced(arrs)
    if path in stacked and any(gated):
      rows = arrs[0][0][0]
      row_bytes = [math.prod(shape) * size // rows for shape, size in arrs]
      ahead = streaming.rows_ahead([b for b, g in zip(row_bytes, gated) if g], layout.WRITE_WINDOW_BYTES,
                                   layout.STREAM_AHEAD_BYTES)
      streamed.append(sum(ahead * b if g else rows * b for b, g in zip(row_bytes, gated)))
    else:
      whole.append(sum(math.prod(shape) * size for shape, size in arrs))
  group = max(layout.WRITE_WINDOW_BYTES, layout.CHUNK_BYTES)
  return 2 * max(whole) + max(streamed) + group


def plan_convert(source: str, output_dir: str | None = None, dtype: str = "bfloat16",
                 measure: bool = True) -> dict[str, Any]:
  """The plan of `convert(source, output_dir)`. `source`: an HF folder (headers are read when its
  safetensors are present) or a config.json alone."""
  cfg_path = os.path.join(source, "config.json") if os.path.isdir(source) else source
  with open(cfg_path) as f:
    hf_cfg = json.load(f)
  c = K2Config.from_hf(cfg_path)
  form = _form_of(hf_cfg) if isinstance(hf_cfg, dict) else "bf16"
  have_weights = os.path.isdir(source) and any(f.endswith(".safetensors") for f in os.listdir(source))
  read_from, largest_file = None, None
  if have_weights:
    ckpt = Checkpoint(source)
    hf.validate(ckpt, c)
    specs_in = [(n, ckpt.shape(n), ckpt.dtype_name(n)) for n in ckpt.keys()]
    files = ckpt.files()
    largest_file = max(os.path.getsize(sf.path) for sf in files.values())
    read_from = max(files.values(), key=lambda sf: os.path.getsize(sf.path)).path
  else:
    specs_in = hf_tensor_specs(c, form)
  in_bytes = _by_dtype(specs_in)
  specs_out = _converted_specs(c, dtype, form == "int4")
  out_bytes = _by_dtype(specs_out)
  leaf_sizes = _leaf_sizes(specs_out)
  largest_leaf = max(leaf_sizes.items(), key=lambda kv: kv[1])
  largest_tensor = max(DTYPES[dt].itemsize * math.prod(s) for _, s, dt in specs_in)
  plan = {
      "kind": "convert", "source": os.path.abspath(source), "config": c.name, "input_format": form,
      "weights_present": have_weights, "tensors_in": len(specs_in), "bytes_in": in_bytes,
      "leaves_out": len(leaf_sizes), "bytes_out": out_bytes, "largest_leaf": list(largest_leaf),
      "largest_input_file": largest_file,
      # The leaves' host memory, the slice being read (dequantised to fp32 at worst) and its cast.
      "peak_host_bytes": _leaves_host_bytes(c, specs_out) + 3 * largest_tensor,
      "layout": [f"{output_dir or 'OUT'}/checkpoints/0/params   Orbax tree, {len(leaf_sizes)} leaves "
                 f"({'INT4 experts as packed int32 + scales, ' if form == 'int4' else ''}{dtype} elsewhere, "
                 "router bias fp32)",
                 f"{output_dir or 'OUT'}/checkpoints/0/meta     model config, dtypes, source",
                 f"{output_dir or 'OUT'}/hf/                   config.json, tokenizer and other small files"],
  }
  if measure:
    speed = disk_speed(_probe_dir(output_dir), read_from)
    total_in, total_out = sum(in_bytes.values()), sum(out_bytes.values())
    plan["disk"] = speed
    plan["estimated_seconds"] = total_in / speed["read_bytes_per_s"] + total_out / speed["write_bytes_per_s"]
  return plan


def plan_export(source: str, output_dir: str | None = None, fmt: str = "k2_thinking",
                max_shard_bytes: int = 4 << 30, measure: bool = True) -> dict[str, Any]:
  """The plan of `export(source, output_dir, fmt)`. `source`: a k2jax checkpoint or a config.json alone."""
  if os.path.isfile(source):
    c = K2Config.from_hf(source)
    stored = "int4" if c.expert_quant == "int4" else "dense"
    by_layers = True  # stored as k2-convert would store it
  else:
    from k2jax.convert.orbax_to_hf import open_checkpoint  # noqa: PLC0415
    manager, _, meta, c = open_checkpoint(source)
    manager.close()
    stored = meta.get("expert_format", "dense")
    # A k2-train checkpoint is compressed: its leaves are restored whole (`orbax_to_hf._pieces`).
    by_layers = meta.get("format") == "k2jax"
  from k2jax.convert.orbax_to_hf import RESTORE_BYTES, SLAB_BYTES, layers_per_restore  # noqa: PLC0415
  specs_out = hf_tensor_specs(c, "int4" if fmt == "k2_thinking" else "bf16")
  out_bytes = _by_dtype(specs_out)
  total_out = sum(out_bytes.values())
  specs_in = _converted_specs(c, "bfloat16", stored == "int4")
  leaf_sizes = _leaf_sizes(specs_in)
  largest_leaf = max(leaf_sizes.items(), key=lambda kv: kv[1])
  shards = max(1, math.ceil(total_out / max_shard_bytes))
  largest_tensor = max(DTYPES[dt].itemsize * math.prod(shape) for _, shape, dt in specs_out)
  layers = {_leaf_of(name): shape[0] for name, shape, _ in specs_in
            if name.startswith(("dense_layers/", "moe_layers/"))}

  def restored(leaf: str, size: int) -> int:  # bytes of a leaf's largest restore (`orbax_to_hf._pieces`)
    if not by_layers or leaf not in layers or size <= RESTORE_BYTES:
      return size
    return layers_per_restore(size, layers[leaf], RESTORE_BYTES) * (size // layers[leaf])
  plan = {
      "kind": "export", "source": os.path.abspath(source), "config": c.name, "format": fmt,
      "stored_experts": stored, "tensors_out": len(specs_out), "bytes_out": out_bytes,
      "largest_leaf": list(largest_leaf),
      # The restore being transposed and the next one, which Orbax reads into a buffer and then copies
      # (twice its size while it runs): a leaf, leaves up to RESTORE_BYTES or a run of a stacked leaf's
      # layers; plus the two slabs of tensors on their way to disk (a tensor larger than a slab alone).
      "peak_host_bytes": (3 * max(max(restored(k, v) for k, v in leaf_sizes.items()), RESTORE_BYTES)
                          + 2 * SLAB_BYTES + (largest_tensor if largest_tensor > SLAB_BYTES else 0)),
      "layout": [f"{output_dir or 'OUT'}/model-000NN-of-{shards:05d}.safetensors  ({shards} shards of at most "
                 f"{max_shard_bytes / 2**30:.1f} GiB)", f"{output_dir or 'OUT'}/model.safetensors.index.json",
                 f"{output_dir or 'OUT'}/config.json" + (" (with quantization_config)" if fmt == "k2_thinking" else ""),
                 f"{output_dir or 'OUT'}/tokenizer and other small files of the source"],
  }
  if measure:
    speed = disk_speed(_probe_dir(output_dir))
    plan["disk"] = speed
    plan["estimated_seconds"] = (sum(leaf_sizes.values()) / speed["read_bytes_per_s"]
                                 + total_out / speed["write_bytes_per_s"])
  return plan


def _human(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024:
      return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return f"{n:,.2f} TiB"


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.1f} s"
  return f"{seconds / 60:,.1f} min" if seconds < 7200 else f"{seconds / 3600:,.1f} h"


def render(plan: dict[str, Any]) -> str:
  """The plan as text for a person."""
  gib = _human
  lines = [f"{plan['kind']} plan: {plan['source']} (config {plan['config']})"]
  if plan["kind"] == "convert":
    lines.append(f"  input: {plan['input_format']}, {plan['tensors_in']:,} tensors"
                 + ("" if plan["weights_present"] else " (from config.json: weights not present)"))
    lines += [f"    {dt:8s} {gib(b)}" for dt, b in plan["bytes_in"].items()]
    lines.append(f"  output: {plan['leaves_out']} leaves")
  else:
    lines.append(f"  stored experts: {plan['stored_experts']}; output format {plan['format']}, "
                 f"{plan['tensors_out']:,} tensors")
  lines += [f"    {dt:8s} {gib(b)}" for dt, b in plan["bytes_out"].items()]
  lines.append("  layout:")
  lines += [f"    {line}" for line in plan["layout"]]
  lines.append(f"  largest leaf: {plan['largest_leaf'][0]} ({gib(plan['largest_leaf'][1])})")
  lines.append(f"  peak host memory: about {gib(plan['peak_host_bytes'])} on one host (with --mesh over several "
               "hosts, each holds only its shards of a leaf)")
  if "estimated_seconds" in plan:
    d = plan["disk"]
    lines.append(f"  disk: read {d['read_bytes_per_s'] / 1e6:,.0f} MB/s, write {d['write_bytes_per_s'] / 1e6:,.0f} MB/s "
                 f"-> estimated {_duration(plan['estimated_seconds'])}")
  return "\n".join(lines)
