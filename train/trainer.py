"""k2-train: MuonClip training of a K2 model from an ml_collections run config.

  k2-train --workdir=/tmp/run                                   # embedded tiny default
  k2-train --config=configs/sft_tiny.py --workdir=/tmp/sft --config.num_steps=50

Writes WORKDIR/metrics.jsonl (one JSON object per logged step, plus eval rows), TensorBoard events
when tensorboardX is importable, and checkpoints; restarting with the same workdir resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from k2jax import params as params_lib
from k2jax import presets, sharding
from k2jax.config import K2Config
from k2jax.train import checkpointing, config_rules, data
from k2jax.train import train_step as ts



def _default_config_path() -> str:
  """configs/train_tiny.py, found through the installed k2jax.configs package."""
  from k2jax import configs  # noqa: PLC0415
  return str(Path(configs.__file__).parent / "train_tiny.py")


class _Logger:
  """metrics.jsonl, plus TensorBoard scalars when tensorboardX is installed.

  A run that starts at `start_step` first drops the rows after it (steps a killed run logged past its
  last checkpoint, which this run computes again) and marks the restart with a row
  {"step": start_step, "resumed": true, "dropped_rows": n}, so every step appears once."""

  def __init__(self, workdir: Path, start_step: int = 0):
    path = workdir / "metrics.jsonl"
    if path.exists():
      _truncate_metrics(path, start_step)
    self.file = path.open("a", encoding="utf-8")
    self.tb = None
    try:
      from tensorboardX import SummaryWriter  # noqa: PLC0415
      self.tb = SummaryWriter(str(workdir / "tb"))
    except ImportError:
      pass

  def write(self, row: dict[str, Any]) -> None:
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()
    if self.tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, row["step"])

  def close(self) -> None:
    self.file.close()
    if self.tb is not None:
      self.tb.close()


def _truncate_metrics(path: Path, start_step: int) -> None:
  kept, dropped = [], 0
  for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
    try:
      row = json.loads(line)
      keep = isinstance(row, dict) and int(row.get("step", 0)) <= start_step
    except (ValueError, TypeError):  # a line cut short by the kill
      keep = False
    kept += [line] if keep else []
    dropped += not keep
  if kept or dropped:
    kept.append(json.dumps({"step": start_step, "resumed": True, "dropped_rows": dropped}))
  tmp = path.with_suffix(".jsonl.tmp")
  tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
  tmp.replace(path)


def check_workdir(workdir: Path) -> None:
  if workdir.exists() and not workdir.is_dir():
    raise NotADirectoryError(f"workdir {workdir} is a file, not a folder")


def prepare_workdir(workdir: Path) -> None:
  check_workdir(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if not os.access(workdir, os.W_OK):
    raise PermissionError(f"workdir {workdir} is not writable")


def _mesh_context():
  """The `--mesh` from flags when one is given (and the run is under absl), else no mesh."""
  from absl import flags  # noqa: PLC0415

  from k2jax import sharding  # noqa: PLC0415
  if "mesh" in flags.FLAGS and flags.FLAGS.is_parsed() and flags.FLAGS.mesh:
    mesh = sharding.mesh_from_flags()
    return mesh, sharding.use_mesh(mesh)
  return None, contextlib.nullcontext()


def _with_moe_impl(cfg: ml_collections.ConfigDict, mesh) -> ml_collections.ConfigDict:
  """A copy of `cfg` whose `moe_impl` is the one this mesh runs ("auto" resolved), printed to stderr."""
  from k2jax import sharding  # noqa: PLC0415
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.moe_impl = sharding.choose_moe_impl(mesh, cfg.get("moe_impl", "auto"))
  print(sharding.describe_moe_impl(cfg.moe_impl, mesh), file=sys.stderr)
  return cfg


def _data(cfg: ml_collections.ConfigDict, vocab_size: int):
  d = cfg.data
  targets = d.get("chat_targets", "last")
  train_docs = data.load_split(d.train, "train", d.eval_fraction, d.seed, chat_targets=targets)
  eval_docs = data.load_split(d.eval, "train", 0.0, chat_targets=targets) if d.eval else data.load_split(
      d.train, "eval", d.eval_fraction, d.seed, chat_targets=targets)
  data.check_token_ids(train_docs, vocab_size, d.train)
  data.check_token_ids(eval_docs, vocab_size, d.eval or d.train)
  try:
    train = data.PackedDataset(train_docs, d.batch_size, d.seq_len, seed=d.seed)
  except data.DataError as e:
    raise data.DataError(f"{d.train}: {e}") from None
  evals = data.eval_batches(eval_docs, d.batch_size, d.seq_len, cfg.eval_batches)
  return train, evals


def _init_params(cfg, c, mesh):
  dtype = params_lib.dtype_from_name(cfg.param_dtype)
  init_from = cfg.get("init_from", "")
  # Under a mesh every leaf is read or made in its shards: no device ever holds the whole model.
  if init_from:
    return checkpointing.load_params_for_training(init_from, c, dtype, mesh)
  if mesh is not None:
    return sharding.init_params_sharded(c, jax.random.key(cfg.seed), dtype, mesh)
  # One compiled init, not one small eager compile per leaf; committed to one device, like restored
  # arrays, so a resumed run hits the same compiled step.
  params = jax.jit(lambda k: params_lib.init_params(c, k, dtype))(jax.random.key(cfg.seed))
  return jax.device_put(params, jax.devices()[0])


# The fields the jitted steps depend on; runs that agree on them share compiled steps in one process
# (a restart after stop_after_steps does not compile again).
_STEP_FIELDS = ("model", "optimizer", "num_steps", "micro_batches", "remat", "layer_loop", "qat",
                "compute_dtype", "qk_clip_tau", "router_bias_u", "moe_impl")
_STEP_CACHE: dict[tuple, tuple] = {}


def _compiled_steps(c, cfg):
  key = (c, json.dumps({k: cfg.get(k) for k in _STEP_FIELDS}, sort_keys=True, default=str))
  if key not in _STEP_CACHE:
    if len(_STEP_CACHE) >= 4:
      _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
    tx, schedule = ts.make_optimizer(cfg)
    _STEP_CACHE[key] = (ts.make_train_step(c, cfg, tx, schedule), ts.make_eval_step(c, cfg))
  return _STEP_CACHE[key]


def _with_shardings(shapes, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _state_like(cfg, c, tx, mesh) -> ts.TrainState:
  """The state's shapes and shardings to restore onto, from shapes alone: no parameters are made or
  read (`init_from` is not loaded: the checkpoint replaces it), so a resume holds one copy of the state.
  Under a mesh, the optimizer state's shardings are what the fresh run's `init_state` gives them."""
  shapes = params_lib.abstract_params(c, params_lib.dtype_from_name(cfg.param_dtype))
  init = jax.jit(lambda p: ts.init_state(p, tx))
  if mesh is None:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = jax.eval_shape(init, shapes)
    return _with_shardings(state, jax.tree.map(lambda _: dev, state))
  placed = _with_shardings(shapes, sharding.param_shardings(c, mesh, params=shapes))
  # Compiling makes no arrays; its output shardings are the fresh run's.
  return _with_shardings(jax.eval_shape(init, placed), init.lower(placed).compile().output_shardings)


def _to_host(metrics: dict) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Every field the trainer reads is there (configs/train_tiny.py has them all)."""
  from k2jax.configs import train_tiny  # noqa: PLC0415
  base = train_tiny.get_config()
  missing = [k for k in base if k not in cfg]
  missing += [f"{k}.{j}" for k in base if isinstance(base[k], ml_collections.ConfigDict) and k in cfg
              and k != "model" for j in base[k] if j not in cfg[k]]
  if missing:
    raise ValueError(f"the run config lacks {', '.join(missing)}; build it on configs/train_tiny.py "
                     "(train_tiny.get_config())")
  check_choices(cfg)
  config_rules.check_numbers(cfg, NUMBERS)
  if cfg.data.batch_size % cfg.micro_batches:
    raise ValueError(f"micro_batches ({cfg.micro_batches}) must divide data.batch_size ({cfg.data.batch_size})")


# Numeric fields and their ranges (0 turns the *_every intervals and the loss terms off).
NUMBERS = {
    "num_steps": config_rules.COUNT, "stop_after_steps": config_rules.STEPS, "micro_batches": config_rules.COUNT,
    "data.batch_size": config_rules.COUNT, "data.seq_len": config_rules.Number(integer=True, low=2),
    "data.eval_fraction": config_rules.Number(low=0, high=1, high_open=True),
    "log_every": config_rules.COUNT, "eval_every": config_rules.STEPS, "eval_batches": config_rules.STEPS,
    "checkpoint_every": config_rules.STEPS, "keep_checkpoints": config_rules.COUNT,
    "qk_clip_tau": config_rules.NON_NEGATIVE, "router_bias_u": config_rules.NON_NEGATIVE,
    "aux_loss_alpha": config_rules.NON_NEGATIVE, **config_rules.OPTIMIZER,
}


def check_choices(cfg: ml_collections.ConfigDict) -> None:
  """Fields with a fixed set of values, checked before anything is written (not at the first step's
  trace); those the config has (k2-train's has them all but `optimizer.decay` / `matrices`, which
  default; k2-rl's has no `data` or `layer_loop`)."""
  from k2jax.model import REMAT_POLICIES  # noqa: PLC0415
  from k2jax.train import muonclip, schedules  # noqa: PLC0415
  choices = {"remat": tuple(REMAT_POLICIES), "layer_loop": ts.LAYER_LOOPS, "moe_impl": sharding.MOE_IMPLS,
             "data.chat_targets": data.CHAT_TARGETS, "optimizer.ns_dtype": muonclip.NS_DTYPES,
             "optimizer.decay": schedules.DECAYS, "optimizer.matrices": muonclip.MATRICES,
             "param_dtype": tuple(params_lib.DTYPES), "compute_dtype": tuple(params_lib.DTYPES)}
  for name, allowed in choices.items():
    section, _, field = name.rpartition(".")
    holder = cfg.get(section, {}) if section else cfg
    if field in holder and holder[field] not in allowed:
      raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {holder[field]!r}")


def resolved(cfg: ml_collections.ConfigDict, c: K2Config, mesh) -> dict[str, Any]:
  """What the run config leaves to the preset and the flags, written out: the model config, the
  fields the run changed, and the mesh (None: one device, no mesh)."""
  devices = mesh.devices.size if mesh is not None else 1
  return {"model": checkpointing.config_to_dict(c), "preset": cfg.model.preset,
          "model_overrides": presets.config_overrides(cfg.model),
          "mesh": sharding.format_mesh(mesh) if mesh is not None else None, "devices": int(devices),
          "platform": jax.devices()[0].platform}


def describe(cfg: ml_collections.ConfigDict, c: K2Config, mesh, workdir: Path) -> str:
  """The run in a few lines: the resolved model (and what changed it), the mesh, where it all is saved."""
  r = resolved(cfg, c, mesh)
  n = params_lib.count(params_lib.abstract_params(c))
  changed = ", ".join(f"{k}={v}" for k, v in sorted(r["model_overrides"].items())) or "none"
  return "\n".join([
      f"model: preset {r['preset']}, overrides: {changed}",
      f"  {n:,} parameters: {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads, "
      f"{c.n_routed_experts} experts top-{c.num_experts_per_tok}, q_lora_rank {c.q_lora_rank}, vocab {c.vocab_size}",
      f"mesh: {r['mesh'] or 'none'} ({r['devices']} {r['platform']} device{'s' if r['devices'] > 1 else ''})",
      f"run config, resolved model and mesh: {workdir / 'config.json'}"])


def train(cfg: ml_collections.ConfigDict, workdir: str | Path, mesh=None,
          allow_config_change: bool = False) -> list[dict[str, Any]]:
  """Runs (or resumes) training; returns the logged rows of this invocation.

  WORKDIR/config.json holds the run config plus `resolved` (the model config, the fields the run
  changed, the mesh), so the workdir alone says what ran. Resuming restores the newest readable
  checkpoint (an unreadable one is set aside with a warning) and refuses a config that differs from the
  checkpoint's, naming the fields, unless `allow_config_change`.
  """
  check_config(cfg)
  workdir = Path(workdir)
  c = presets.from_config_dict(cfg.model)
  sharding.check_mesh_fits_model(mesh, c)
  cfg = _with_moe_impl(cfg, mesh)
  train_ds, eval_set = _data(cfg, c.vocab_size)  # a data source that fails leaves no workdir behind
  if cfg.get("init_from", "") and not checkpointing.has_steps(workdir):  # nor does a bad init source
    checkpointing.refuse_other_model(cfg.init_from, checkpointing.model_config_of(cfg.init_from), c)
  prepare_workdir(workdir)
  tx, _ = ts.make_optimizer(cfg)
  ckpt = checkpointing.Checkpointer(workdir, cfg.keep_checkpoints, cfg.async_checkpoints)
  start = 0
  if ckpt.latest_step() is None:
    state = jax.jit(lambda p: ts.init_state(p, tx))(_init_params(cfg, c, mesh))
  else:
    state = _state_like(cfg, c, tx, mesh)
    try:
      start, params, opt_state, meta = ckpt.restore(state.params, state.opt_state, c,
                                                    run_config=json.loads(cfg.to_json_best_effort()),
                                                    allow_config_change=allow_config_change)
    except checkpointing.CheckpointError:
      ckpt.close()
      raise
    state = ts.TrainState(jax.device_put(jnp.asarray(start, jnp.int32), state.step.sharding), params, opt_state)
    train_ds.restore(meta["data_state"])
  saved = {**json.loads(cfg.to_json_best_effort()), "resolved": resolved(cfg, c, mesh)}
  (workdir / "config.json").write_text(json.dumps(saved, indent=2) + "\n")  # once a resume is accepted
  step_fn, eval_fn = _compiled_steps(c, cfg)
  meta_base = {"model_config": checkpointing.config_to_dict(c), "param_dtype": cfg.param_dtype,
               "run_config": json.loads(cfg.to_json_best_effort())}

  def save(step):
    ckpt.save(step, state.params, state.opt_state, {**meta_base, "data_state": train_ds.state()})

  end = cfg.num_steps if not cfg.stop_after_steps else min(cfg.num_steps, cfg.stop_after_steps)
  logger, rows = _Logger(workdir, start), []
  bar = _progress(cfg, start, end)
  postfix: dict[str, str] = {}
  t_last, t_from = time.perf_counter(), start
  try:
    for step in range(start, end):
      state, metrics = step_fn(state, train_ds.next_batch())
      done = step + 1
      if step == start:  # leave compilation out of the throughput
        jax.block_until_ready(metrics)
        t_last, t_from = time.perf_counter(), done
      if done % cfg.log_every == 0 or done == end:
        m = _to_host(metrics)
        now = time.perf_counter()
        # Tokens fed through the model (padding included) since the last timing point; m["tokens"]
        # counts the loss-weighted ones. 0 when only the compiling first step has run.
        fed = (done - t_from) * cfg.data.batch_size * cfg.data.seq_len
        m["tokens_per_sec"] = fed / max(now - t_last, 1e-9)
        t_last, t_from = now, done
        row = {"step": done, **m}
        rows.append(row)
        logger.write(row)
        postfix.update(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_sec']:.0f}")
        if bar is not None:
          bar.set_postfix(postfix)
      if bar is not None:
        bar.update(1)
      if cfg.eval_every and (done % cfg.eval_every == 0 or done == end) and eval_set:
        eval_row = {"step": done, "eval_loss": _eval(eval_fn, state.params, eval_set)}
        logger.write(eval_row)
        postfix["eval_loss"] = f"{eval_row['eval_loss']:.3f}"
        if bar is not None:
          bar.set_postfix(postfix)
        t_last, t_from = time.perf_counter(), done  # eval time is not training throughput
      if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == end:
        save(done)
  finally:
    if bar is not None:
      bar.close()
    logger.close()
    ckpt.close()
  return rows


def _latest_checkpoint(workdir: Path) -> Path | None:
  folder = workdir.absolute() / checkpointing.CHECKPOINT_DIR
  steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
  return folder / str(max(steps)) if steps else None


def _eval(eval_fn, params, batches) -> float:
  nll, w = 0.0, 0.0
  for b in batches:
    n, c = jax.device_get(eval_fn(params, b))
    nll, w = nll + float(n), w + float(c)
  return nll / max(w, 1.0)


def _progress(cfg, start, end):
  if not cfg.get("progress_bar", True):
    return None
  try:
    from tqdm import tqdm  # noqa: PLC0415
  except ImportError:
    return None
  return tqdm(total=end, initial=start, desc="train", dynamic_ncols=True)


def main(argv) -> None:
  del argv
  from absl import app, flags  # noqa: PLC0415
  cfg, workdir = flags.FLAGS.config, Path(flags.FLAGS.workdir)
  if flags.FLAGS["moe_impl"].present:  # the flag overrides the run config's moe_impl
    with cfg.unlocked():
      cfg.moe_impl = flags.FLAGS.moe_impl
  mesh, ctx = _mesh_context()
  try:
    check_config(cfg)
    print(describe(cfg, presets.from_config_dict(cfg.model), mesh, workdir), flush=True)
  except ValueError as e:  # ConfigError included
    raise app.UsageError(str(e)) from None
  with ctx:
    rows = train(cfg, workdir, mesh, allow_config_change=flags.FLAGS.allow_config_change)
  if rows:
    print(json.dumps(rows[-1]))
  metrics = workdir / "metrics.jsonl"
  evals = [r for r in map(json.loads, metrics.read_text().splitlines()) if "eval_loss" in r]
  if evals:
    print(f"eval loss {evals[-1]['eval_loss']:.4f} at step {evals[-1]['step']}")
  latest = _latest_checkpoint(workdir)
  if latest is not None:
    print(f"checkpoint: {latest}\n"
          f"next: k2-generate --checkpoint={workdir} --prompt=\"...\"   (the same k2-train command resumes; "
          f"metrics: {metrics})")


def run() -> None:
  from k2jax import cli  # noqa: PLC0415
  from absl import flags  # noqa: PLC0415
  if "config" not in flags.FLAGS:
    cli.define_config_file(_default_config_path(), "Run config file (ml_collections).")
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events go here.")
    flags.mark_flag_as_required("workdir")
    flags.DEFINE_bool("allow_config_change", False, "Resume even though the run config differs from the "
                      "checkpoint's (by default the differing fields are named and the run refused).")
    from k2jax import sharding  # noqa: PLC0415
    sharding.define_mesh_flag()
  cli.run(main, [__name__, "k2jax.sharding"], keep_scratch_mapped=True)


if __name__ == "__main__":
  run()
