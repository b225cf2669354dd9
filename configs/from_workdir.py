"""The run config a k2-train workdir was run with, read back from its config.json: reruns it elsewhere.

  k2-train --config=configs/from_workdir.py:runs/a --workdir=runs/b --mesh=MESH   # MESH: config.json resolved.mesh

Overrides (--config.num_steps=...) apply on top, as with any config file.
"""
import json
from pathlib import Path

import ml_collections

from k2jax import presets
from k2jax.configs import train_tiny


def _assign(node: ml_collections.ConfigDict, values: dict) -> None:
  for key, value in values.items():
    if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict):
      _assign(node[key], value)
    elif value is not None or key not in node:  # None leaves a placeholder unset
      node[key] = value


def get_config(workdir: str) -> ml_collections.ConfigDict:
  path = Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: give a k2-train workdir (configs/from_workdir.py:WORKDIR)")
  saved = json.loads(path.read_text())
  saved.pop("resolved", None)  # written by the run, not read by it
  model = saved.pop("model")
  cfg = train_tiny.get_config()
  cfg.model = presets.model_config_section(model.pop("preset"))
  _assign(cfg.model, model)
  _assign(cfg, saved)
  return cfg
