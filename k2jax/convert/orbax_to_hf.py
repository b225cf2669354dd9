"""k2jax checkpoint (converted, or a k2-train workdir) -> HF safetensors, restored and written leaf by leaf.

Formats: "k2_thinking" (compressed-tensors pack-quantized INT4 routed experts, bf16 elsewhere, the router
bias fp32, `quantization_config` in config.json) and "bf16" (all dense, for transformers'
DeepseekV3ForCausalLM). Dense experts (a training run's master weights) are quantised with the QAT
quantiser, so the exported model is the one QAT trained.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from k2jax import hf, int4
from k2jax.config import ConfigError, K2Config
from k2jax.convert import layout
from k2jax.safetensors_io import save_sharded

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


def _restore_leaf(manager, step: int, leaf_path: str, like: Any) -> Any:
  """One leaf of the params item (partial restore), as numpy (a QuantizedWeight of numpy for INT4)."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  stored = {"packed": like.packed, "scales": like.scales} if isinstance(like, int4.QuantizedWeight) else like
  item: dict = {}
  hf.set_path(item, leaf_path, stored)
  args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                partial_restore=True)
  out = manager.restore(step, args=ocp.args.Composite(params=args))["params"]
  for k in leaf_path.split("/"):
    out = out[k]
  if isinstance(like, int4.QuantizedWeight):
    return int4.QuantizedWeight(np.asarray(out["packed"]), np.asarray(out["scales"]))
  return np.asarray(out)


def _quantizer(mode: str):
  # The same jitted quantiser as serving's `params.quantize_experts` (QAT's fake_quant matches it).
  return jax.jit(lambda w: int4.QuantizedWeight.quantize(w, mode))


def _leaf_tensors(leaf: hf.Leaf, value: Any, fmt: str, quantize) -> Iterator[tuple[str, np.ndarray]]:
  if fmt == "k2_thinking" and leaf.experts and not isinstance(value, int4.QuantizedWeight):
    for layer in range(value.shape[0]):  # one layer of experts at a time through the jitted quantiser
      q = quantize(jnp.asarray(value[layer], jnp.float32))
      q = int4.QuantizedWeight(np.asarray(q.packed)[None], np.asarray(q.scales)[None])
      for name, t in hf.leaf_hf_tensors(_one_layer(leaf, layer), q):
        yield name, t
    return
  yield from hf.leaf_hf_tensors(leaf, value, ml_dtypes.bfloat16, dequantize=(fmt == "bf16"))


def _one_layer(leaf: hf.Leaf, layer: int) -> hf.Leaf:
  """The leaf restricted to one layer of its stack (for per-layer streaming)."""
  import dataclasses  # noqa: PLC0415
  spec = dataclasses.replace(leaf.spec, shape=(1,) + tuple(leaf.spec.shape[1:]))
  return dataclasses.replace(leaf, spec=spec, layer0=leaf.layer0 + layer)


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


def export(checkpoint: str, output_dir: str, *, fmt: str = "k2_thinking", max_shard_bytes: int = 4 << 30,
           progress: bool = True) -> dict[str, Any]:
  """Writes an HF checkpoint folder (sharded safetensors + index, config.json, tokenizer files) from a
  k2jax checkpoint; all or nothing. Returns a summary."""
  if fmt not in FORMATS:
    raise layout.ConvertError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
  from k2jax.train import checkpointing  # noqa: PLC0415
  from k2jax.train.train_step import QAT_MODE  # noqa: PLC0415
  layout.check_output(output_dir)
  manager, step, meta, c = open_checkpoint(checkpoint)
  try:
    like = checkpointing.abstract_params_of(meta, c)
    is_qw = lambda x: isinstance(x, int4.QuantizedWeight)
    flat = {k: v for k, v in _flat(like, is_qw)}
    leaves = hf.leaves(c)
    total = sum(layout.nbytes(flat[leaf.path]) for leaf in leaves)
    quantize = _quantizer(QAT_MODE)
    side = layout.hf_files_dir(checkpoint)
    bar = layout.ByteBar(total, f"exporting ({fmt})", progress)
    written = {"bytes": 0, "tensors": 0}

    def tensors():
      for leaf in leaves:
        bar.leaf(leaf.path)
        value = _restore_leaf(manager, step, leaf.path, flat[leaf.path])
        for name, t in _leaf_tensors(leaf, value, fmt, quantize):
          written["bytes"] += t.nbytes
          written["tensors"] += 1
          yield name, t
        bar.update(layout.nbytes(flat[leaf.path]))
        del value

    try:
      with layout.Staging(output_dir) as stage:
        save_sharded(tensors(), stage.tmp, max_shard_bytes)
        cfg, unchanged = _config_json(meta, c, fmt, side)
        if unchanged:
          shutil.copy2(os.path.join(side, "config.json"), stage.path("config.json"))
        else:
          with open(stage.path("config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        for f in layout.side_files(side) if side else []:
          if f != "config.json":
            shutil.copy2(os.path.join(side, f), stage.path(f))
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
