"""k2jax: Kimi K2 Thinking in JAX.

    import k2jax
    model = k2jax.from_hf("path/to/hf_dir", dtype=jnp.float32)
    logits = model(tokens).logits          # int32 [B, T] -> float32 [B, T, vocab]
"""
from __future__ import annotations

import importlib

import jax.numpy as jnp

from k2jax.config import ConfigError, K2Config, RopeConfig
from k2jax.hf import CheckpointError
from k2jax.params import abstract_params, init_params, logical_axes, param_specs
from k2jax.presets import PRESETS, get as preset

__all__ = [
    "ConfigError", "CheckpointError", "K2Config", "RopeConfig", "K2Model", "Output", "forward", "from_hf",
    "abstract_params", "init_params", "logical_axes", "param_specs", "PRESETS", "preset", "chat",
]


def from_hf(path: str, dtype=jnp.float32, *, shardings=None, mesh=None, rules=None, strict: bool = True,
            dequantize_experts: bool = False, progress: bool | None = None,
            check_finite: bool = True) -> K2Model:
  """Loads an HF checkpoint folder (config.json + safetensors) as a `K2Model`.

  INT4 pack-quantized routed experts (K2 Thinking) stay INT4 unless `dequantize_experts`.
  `shardings` (a tree like the params), or `mesh` (and `rules`) for `sharding.param_shardings`: every
  leaf is read straight into its shards, each process reading only what its devices hold.
  `progress`: a progress bar over the parameter leaves (default: for checkpoints over 1 GB).
  `check_finite`: NaN / Inf weights are an error naming the file and tensor (skip for speed).
  """
  import os  # noqa: PLC0415

  from k2jax import hf  # noqa: PLC0415
  if not os.path.isdir(path):
    raise CheckpointError(f"{path} is {'a file' if os.path.exists(path) else 'missing'}; give the checkpoint "
                          "folder that holds config.json and the safetensors files")
  config = K2Config.from_hf(path, strict=strict)
  if mesh is not None:
    if shardings is not None:
      raise ValueError("give from_hf shardings or a mesh, not both")
    from k2jax import sharding  # noqa: PLC0415
    sharding.check_mesh_fits_model(mesh, config)
    int4_experts = config.expert_quant == "int4" and not dequantize_experts
    like = abstract_params(config, dtype, int4_experts=int4_experts)
    shardings = sharding.param_shardings(config, mesh, rules, params=like)
  show = progress if progress is not None else hf.checkpoint_bytes(path) > 1e9
  bar = hf.progress_bar(config) if show else None
  try:
    p = hf.load_params(path, config, dtype, shardings, dequantize_experts=dequantize_experts,
                       progress=bar.update_leaf if bar else None, check_finite=check_finite)
  finally:
    if bar:
      bar.close()
  from k2jax.model import K2Model  # noqa: PLC0415
  return K2Model(config, p)


def __getattr__(name):  # the model (flax) and `k2jax.chat` load on first use: the CLIs that need neither start faster
  if name in ("K2Model", "Output", "forward"):
    return getattr(importlib.import_module("k2jax.model"), name)
  if name in ("chat", "tokenizer", "model"):
    return importlib.import_module(f"k2jax.{name}")
  raise AttributeError(name)
