"""Orbax checkpoints of a training run: params, optimizer state, step, data state and the model config.

Layout: WORKDIR/checkpoints/<step>/{params, opt_state, meta}; `meta` is JSON with the step, the data
pipeline state, the K2Config fields and the run config. Params are saved on their own so inference
can restore them without the optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from k2jax import params as params_lib
from k2jax.config import K2Config, RopeConfig

CHECKPOINT_DIR = "checkpoints"
SET_ASIDE_DIR = "corrupt_checkpoints"  # unreadable steps are moved here when a run falls back past them

# Run-config fields that change how a run is watched, stopped or laid out on devices, not what it
# computes: a resumed run may change them freely. Any other difference needs allow_config_change.
OPERATIONAL_FIELDS = ("stop_after_steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                      "keep_checkpoints", "async_checkpoints", "progress_bar", "moe_impl")


class CheckpointError(RuntimeError):
  """A checkpoint that is missing, unreadable, or does not fit the run restoring it."""


class UnreadableCheckpointError(CheckpointError):
  """A step whose files cannot be read (truncated, corrupted, not written by k2-train)."""


def config_to_dict(c: K2Config) -> dict[str, Any]:
  return dataclasses.asdict(c)


def config_from_dict(d: dict[str, Any]) -> K2Config:
  d = dict(d)
  known = {f.name for f in dataclasses.fields(K2Config)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise CheckpointError(f"checkpoint model config has fields this version does not know: {unknown}")
  if isinstance(d.get("rope"), dict):
    d["rope"] = RopeConfig(**d["rope"])
  return K2Config(**d)


# Fields that name or describe storage, not the architecture (a converted checkpoint's name is its source's).
NON_ARCHITECTURE_FIELDS = ("name", "expert_quant")


def run_config_differences(saved: dict[str, Any], current: dict[str, Any],
                           ignore: tuple[str, ...] = OPERATIONAL_FIELDS) -> dict[str, tuple[Any, Any]]:
  """{dotted.field: (saved, current)} for every differing leaf of two run configs (as JSON dicts)."""
  out: dict[str, tuple[Any, Any]] = {}
  for k in sorted(set(saved) | set(current)):
    if k in ignore:
      continue
    a, b = saved.get(k), current.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out.update({f"{k}.{j}": v for j, v in run_config_differences(a, b, ()).items()})
    elif a != b:
      out[k] = (a, b)
  return out


def _describe(diff: dict[str, tuple[Any, Any]]) -> str:
  return ", ".join(f"{k}: checkpoint {v[0]!r} vs run {v[1]!r}" for k, v in diff.items())


def config_differences(saved: K2Config, current: K2Config, ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
  """{field: (saved, current)} for every differing field (rope fields as 'rope.x'), less `ignore`."""
  a, b = config_to_dict(saved), config_to_dict(current)
  for k in ignore:
    a.pop(k, None)
    b.pop(k, None)
  out = {}
  for k in sorted(set(a) | set(b)):
    if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
      out.update({f"{k}.{j}": (a[k].get(j), b[k].get(j)) for j in sorted(set(a[k]) | set(b[k]))
                  if a[k].get(j) != b[k].get(j)})
    elif a.get(k) != b.get(k):
      out[k] = (a.get(k), b.get(k))
  return out


class Checkpointer:
  """Saves every call to `save` (the trainer decides when), keeps the newest `keep`."""

  def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True):
    self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("params", "opt_state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave({**meta, "step": int(step)})))

  def restore(self, params_like: Any, opt_state_like: Any, c: K2Config, step: int | None = None,
              run_config: dict[str, Any] | None = None, allow_config_change: bool = False):
    """(step, params, opt_state, meta) of `step`, onto the shapes and shardings of the given trees.

    Without `step`, the newest readable step: an unreadable newer one is moved to SET_ASIDE_DIR with a
    warning and the one before it is tried. A model config (or, when given, run config) that differs
    from the checkpoint's raises CheckpointError naming the fields, unless `allow_config_change`."""
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    problems = []
    for candidate in steps:
      try:
        return self._restore_step(candidate, params_like, opt_state_like, c, run_config, allow_config_change)
      except UnreadableCheckpointError as e:
        if step is not None:
          raise
        problems.append(str(e))
        moved = self._set_aside(candidate)
        logging.warning("%s; moved it to %s and falling back to the previous checkpoint", e, moved)
    raise CheckpointError(f"no readable checkpoint in {self.directory}: " + "; ".join(problems))

  def _restore_step(self, step, params_like, opt_state_like, c, run_config, allow_config_change):
    where = self.directory / str(step)
    meta = _restore_meta(self.manager, step, where)
    hint = "; pass --allow_config_change to resume anyway, or use another workdir"
    diff = config_differences(config_from_dict(meta["model_config"]), c)
    # After an allowed model change a failing restore is that change's doing, not a corrupt step.
    failure = CheckpointError if diff else UnreadableCheckpointError
    if diff and not allow_config_change:
      raise CheckpointError(f"checkpoint {where} was trained with a different model config ({_describe(diff)}){hint}")
    if run_config is not None and isinstance(meta.get("run_config"), dict) and not allow_config_change:
      diff = {k: v for k, v in run_config_differences(meta["run_config"], run_config).items()
              if not k.startswith("model.")}  # the model section is compared above, as a K2Config
      if diff:
        raise CheckpointError(f"checkpoint {where} was written by a run with a different config ({_describe(diff)}){hint}")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(_abstract(params_like)),
          opt_state=ocp.args.StandardRestore(_abstract(opt_state_like))))
    except Exception as e:  # orbax raises many types for truncated / mismatched files
      raise failure(f"cannot restore checkpoint {where}: {type(e).__name__}: {e}") from e
    return step, out["params"], out["opt_state"], meta

  def _set_aside(self, step: int) -> Path:
    """Moves an unreadable step out of the checkpoints folder, so the run can save that step again."""
    target = self.directory.parent / SET_ASIDE_DIR / str(step)
    suffix = 1
    while target.exists():
      target, suffix = target.with_name(f"{step}.{suffix}"), suffix + 1
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(self.directory / str(step)), str(target))
    self.manager.reload()
    return target

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else ocp.utils.to_shape_dtype_struct(x),
                      tree)


def _restore_meta(manager: ocp.CheckpointManager, step: int, where: Path) -> dict[str, Any]:
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:
    raise UnreadableCheckpointError(f"checkpoint {where} has no readable metadata ({type(e).__name__}: {e}); it may be "
                          "corrupt or not written by k2-train") from e
  if not isinstance(meta, dict) or "model_config" not in meta:
    raise UnreadableCheckpointError(f"checkpoint {where}: metadata lacks 'model_config'")
  return meta


def has_steps(workdir: str | Path) -> bool:
  """Whether a workdir holds a saved step (a run there resumes rather than starts)."""
  root = Path(workdir) / CHECKPOINT_DIR
  return root.is_dir() and any(p.name.isdigit() for p in root.iterdir())


def model_config_of(path: str | Path) -> K2Config:
  """The model config a checkpoint (workdir, step folder or converted checkpoint) was saved with, from its
  metadata alone: a fresh run checks its init source with it before writing anything."""
  return config_from_dict(read_meta(path)["model_config"])


def _locate(path: str | Path) -> tuple[Path, int]:
  """(checkpoints folder, step) for a workdir, its checkpoints folder, or one step folder."""
  path = Path(path).absolute()
  if not path.exists():
    raise CheckpointError(f"checkpoint path {path} does not exist")
  if path.name.isdigit() and (path / "meta").exists():
    return path.parent, int(path.name)
  root = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())
  if not steps:
    raise CheckpointError(f"no checkpoint steps under {root}")
  return root, steps[-1]


def abstract_params_of(meta: dict[str, Any], c: K2Config, *, mesh=None, rules=None) -> Any:
  """ShapeDtypeStructs of a checkpoint's params as stored: its param dtype, and INT4 experts (converted
  checkpoints, `expert_format: int4`) as QuantizedWeight(packed int32, scales as the source stored them).
  Each on the first device, or with `mesh` in its own shards (`sharding.param_shardings` under `rules`)."""
  int4_experts = meta.get("expert_format") == "int4"
  like = params_lib.abstract_params(c, jnp.dtype(meta.get("param_dtype", "float32")), int4_experts=int4_experts)
  if int4_experts:
    from k2jax.int4 import QuantizedWeight  # noqa: PLC0415
    from k2jax.safetensors_io import DTYPES  # noqa: PLC0415
    scale_dtype = DTYPES[meta.get("int4_scale_dtype") or "BF16"]
    moe = like["moe_layers"]["moe"]
    moe["experts"] = {k: QuantizedWeight(w.packed, jax.ShapeDtypeStruct(w.scales.shape, scale_dtype))
                      for k, w in moe["experts"].items()}
  if mesh is not None:
    from k2jax import sharding  # noqa: PLC0415
    tree = sharding.param_shardings(c, mesh, rules, params=like)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), like, tree)
  device = _single_device()
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), like)


def load_params_for_inference(path: str | Path, dtype=jnp.bfloat16, dequantize_experts: bool = False, *,
                              mesh=None, rules=None) -> tuple[dict, K2Config]:
  """(params in `dtype`, K2Config) from a k2-train workdir (latest step), a step folder, or a converted
  checkpoint (`k2-convert`). INT4 experts stay INT4 unless `dequantize_experts` (to `dtype`, for training).

  With `mesh`, every leaf is restored straight into its shards (`sharding.param_shardings` under `rules`):
  each process reads only the parts its devices hold, and no device holds the whole model (the 1T model
  cannot be restored onto one device and placed after). Without, everything lands on the first device.
  """
  root, step = _locate(path)
  manager = ocp.CheckpointManager(root, item_names=("params", "meta"))
  try:
    meta = _restore_meta(manager, step, root / str(step))
    c = config_from_dict(meta["model_config"])
    if mesh is not None:  # a mesh that cannot hold the model says so before anything is read
      from k2jax import sharding  # noqa: PLC0415
      sharding.check_mesh_fits_model(mesh, c)
    like = abstract_params_of(meta, c, mesh=mesh, rules=rules)
    try:
      params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(like)))["params"]
    except Exception as e:
      raise CheckpointError(f"cannot restore params of {root / str(step)}: {type(e).__name__}: {e}") from e
  finally:
    manager.close()
  if dequantize_experts and meta.get("expert_format") == "int4":
    experts = {k: w.dequantize(dtype) for k, w in params["moe_layers"]["moe"]["experts"].items()}
    params = {**params, "moe_layers": {**params["moe_layers"], "moe": {**params["moe_layers"]["moe"],
                                                                       "experts": experts}}}
  return params_lib.cast(params, dtype), c


def refuse_other_model(source: str | Path, saved: K2Config, c: K2Config) -> None:
  """A CheckpointError naming each field where the model a run starts from (`saved`, of `source`) is not
  the run's `c`. Its quantisation and name do not count: a converted release starts a dense run."""
  diff = config_differences(saved, c, ignore=NON_ARCHITECTURE_FIELDS)
  if diff:
    raise CheckpointError(f"init checkpoint {source} is of another model config ({_describe(diff)})")


def load_params_for_training(path: str | Path, c: K2Config, dtype, mesh=None) -> dict:
  """The weights a k2-train or k2-rl run starts from: `path`'s (a workdir, a step folder or a converted
  release, whose INT4 experts are dequantised to `dtype`: training and QAT update dense masters), refused
  if its model is not `c`. On `mesh`, read into the training shardings; else on the first device."""
  params, saved = load_params_for_inference(path, dtype, dequantize_experts=True, mesh=mesh)
  refuse_other_model(path, saved, c)
  if mesh is not None:  # the dequantised experts' layout (a no-op for every other leaf)
    from k2jax import sharding  # noqa: PLC0415
    return sharding.place_params(params, c, mesh)
  return jax.device_put(params, jax.devices()[0])


def _single_device():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def read_meta(path: str | Path) -> dict[str, Any]:
  """The JSON metadata of the latest (or given) step."""
  root, step = _locate(path)
  return json.loads((root / str(step) / "meta" / "metadata").read_text())
