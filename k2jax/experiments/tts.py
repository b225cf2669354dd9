"""k2-tts: accuracy against test-time compute, end to end.

  k2-tts --workdir=runs/tts                          # embedded default: warm start, RL, then the sweep
  k2-tts --workdir=runs/tts --axes=parallel,heavy    # only some axes
  k2-tts --workdir=runs/k2 --hf_dir=/ckpt/K2-Thinking --mesh=expert:8 --config.n_problems=200

Along each axis of the config (`thinking_budget`, `tool_steps`, `parallel`, `heavy`, `rl_step`) one
setting changes while the others stay at `base`; every point reports accuracy with a 95 % interval over
problems, mean generated tokens per problem and wall seconds. Writes WORKDIR/results.csv, results.json,
one PNG per axis and overview.png (accuracy against tokens). A second run in the same workdir reuses the
trained model and only measures again.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import ml_collections

from k2jax.experiments import sweep
from k2jax.train import config_rules

RESULT_FILES = ("results.csv", "results.json", "overview.png")


class SweepError(ValueError):
  """A configuration that cannot run; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """The grid to measure, checked before any compute."""
  axes: dict[str, list[int]]   # axis -> values, in the order measured
  env_of: dict[str, str]       # axis -> environment name
  base: sweep.Setting


def _env(cfg, name: str):
  from k2jax import envs  # noqa: PLC0415
  options = dict(cfg.envs.get(name, {})) if name in cfg.envs else {}
  return envs.get(name, **options)


# The sweep's own numbers (the warm start's and the RL run's are checked by their trainers' rules).
NUMBERS = {"n_problems": config_rules.COUNT, "max_new_tokens": config_rules.COUNT, "batch_size": config_rules.COUNT,
           "max_len": config_rules.COUNT, "seed": config_rules.STEPS, "temperature": config_rules.NON_NEGATIVE,
           "vote_temperature": config_rules.NON_NEGATIVE}


def _check_scalars(cfg) -> None:
  """The sweep's own numbers and names, before the warm start trains for minutes on a config whose sweep
  could not run."""
  from k2jax import params as params_lib  # noqa: PLC0415
  factors = {f"axis_problems_factor.{a}": config_rules.POSITIVE for a in cfg.get("axis_problems_factor", {})}
  try:
    config_rules.check_numbers(cfg, {**NUMBERS, **factors})
    params_lib.dtype_from_name(cfg.dtype)
  except ValueError as e:
    raise SweepError(str(e)) from None
  if cfg.max_len <= cfg.max_new_tokens:
    raise SweepError(f"max_len ({cfg.max_len}) must exceed max_new_tokens ({cfg.max_new_tokens}): the "
                     "engine's cache holds the prompt and the turn")


def make_plan(cfg: ml_collections.ConfigDict, axes_flag: list[str] | None = None, *, trained_here: bool) -> Plan:
  """Validates axis names, values and environments; raises SweepError with a one-line reason."""
  _check_scalars(cfg)
  known = set(sweep.AXES)
  unknown = sorted(set(cfg.axes) - known)
  if unknown:
    raise SweepError(f"unknown axis {unknown[0]!r} in config.axes; known axes: {', '.join(sweep.AXES)}")
  if axes_flag is not None:
    bad = [a for a in axes_flag if a not in known]
    if bad:
      raise SweepError(f"unknown axis {bad[0]!r} in --axes; known axes: {', '.join(sweep.AXES)}")
    missing = [a for a in axes_flag if a not in cfg.axes]
    if missing:
      raise SweepError(f"--axes names {missing[0]!r}, which has no values in config.axes")
  names = [a for a in sweep.AXES if a in cfg.axes and (axes_flag is None or a in axes_flag)]
  if not trained_here and "rl_step" in names:
    if axes_flag is not None and "rl_step" in axes_flag:
      raise SweepError("the rl_step axis measures the RL run of the embedded default; it cannot run on a "
                       "given --checkpoint or --hf_dir")
    names.remove("rl_step")
  axes = {}
  for a in names:
    values = [int(v) for v in cfg.axes[a]]
    if not values:
      raise SweepError(f"axis {a!r} has an empty grid; give it at least one value (--config.axes.{a}=...)")
    axes[a] = values
  if not axes:
    raise SweepError("empty grid: no axis to measure (config.axes and --axes select none)")
  if "rl_step" in axes:
    from k2jax.experiments import training  # noqa: PLC0415
    try:
      training.check_rl_steps(cfg, axes["rl_step"])
    except ValueError as e:
      raise SweepError(str(e)) from None
  if not axes:
    raise SweepError("empty grid: no axis to measure (config.axes and --axes select none)")
  base = dict(cfg.base)
  if not trained_here:
    base["rl_step"] = -1
  try:
    sweep.Setting(**base)
    for a, values in axes.items():
      for v in values:
        sweep.Setting(**{**base, a: v, "parallel": v if a == "parallel" else 1, "heavy": v if a == "heavy" else 0})
  except (TypeError, ValueError) as e:
    raise SweepError(str(e)) from None
  from k2jax.infer import heavy  # noqa: PLC0415
  if cfg.aggregation_prompt not in heavy.PROMPTS:
    raise SweepError(f"unknown aggregation_prompt {cfg.aggregation_prompt!r}; known: {', '.join(heavy.PROMPTS)}")
  env_of = {a: cfg.axis_env.get(a, cfg.env) for a in axes}
  for name in sorted(set(env_of.values())):
    try:
      _env(cfg, name)
    except ValueError as e:
      raise SweepError(str(e)) from None
  return Plan(axes, env_of, sweep.Setting(**base, temperature=cfg.temperature))


def problems_of(cfg, axis: str) -> int:
  """Held-out problems of an axis: `n_problems` times the axis's factor in `axis_problems_factor` (1),
  at least one."""
  return max(1, round(int(cfg.n_problems) * float(cfg.get("axis_problems_factor", {}).get(axis, 1))))


def point_setting(plan: Plan, cfg, axis: str, value: int) -> sweep.Setting:
  """The base setting with one axis changed; parallel and heavy sample at `vote_temperature`."""
  changes: dict[str, Any] = {axis: value}
  if axis in ("parallel", "heavy"):
    changes["temperature"] = cfg.vote_temperature
    changes["parallel" if axis == "heavy" else "heavy"] = 1 if axis == "heavy" else 0
  return dataclasses.replace(plan.base, **changes)


# ------------------------------------------------------------------ outputs


def write_results(workdir: Path, results: list[sweep.PointResult], meta: dict[str, Any]) -> None:
  """results.csv and results.json, each written whole to a temporary name and then renamed."""
  tmp = workdir / "results.csv.tmp"
  with tmp.open("w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=sweep.PointResult.CSV_COLUMNS)
    w.writeheader()
    for r in results:
      w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.row().items()})
  tmp.replace(workdir / "results.csv")
  tmp = workdir / "results.json.tmp"
  tmp.write_text(json.dumps({**meta, "points": [r.row() for r in results]}, indent=2))
  tmp.replace(workdir / "results.json")


def format_table(results: list[sweep.PointResult]) -> str:
  head = f"{'axis':<16}{'value':>7}{'accuracy':>10}{'95% interval':>16}{'tokens':>9}{'seconds':>9}{'n':>5}"
  lines = [head, "-" * len(head)]
  for r in results:
    lines.append(f"{r.axis:<16}{r.value:>7}{r.accuracy:>10.3f}{f'[{r.ci_low:.2f}, {r.ci_high:.2f}]':>16}"
                 f"{r.mean_tokens:>9.1f}{r.seconds:>9.1f}{r.n_problems:>5}")
  return "\n".join(lines)


# ------------------------------------------------------------------ the run


def run_sweep(cfg, plan: Plan, models, tokenizer, config, workdir: Path, *, progress: bool = True,
              mesh=None, moe_impl: str = "ragged") -> list[sweep.PointResult]:
  """Measures every point of `plan`; `models(rl_step)` gives the parameters of that step."""
  from k2jax import envs  # noqa: PLC0415
  from k2jax import sharding  # noqa: PLC0415
  from k2jax.experiments import plots  # noqa: PLC0415

  points = [(a, v) for a, values in plan.axes.items() for v in values]
  bar = _progress(len(points), progress)
  tasks_of = {}  # (environment, problems) -> the held-out tasks; an axis's points share them
  for axis in plan.axes:
    key = (plan.env_of[axis], problems_of(cfg, axis))
    if key not in tasks_of:
      tasks_of[key] = [_env(cfg, key[0]).reset(s) for s in envs.task_seeds("eval", key[1])]
  # The engine reads the mesh from the context (training set up its own).
  with sharding.on_mesh(mesh, sharding.inference_rules(mesh)):
    results = _measure_points(cfg, plan, models, tokenizer, config, points, tasks_of, bar, mesh, moe_impl)
  plots.write_plots(workdir, results)
  return results


def _measure_points(cfg, plan, models, tokenizer, config, points, tasks_of, bar, mesh, moe_impl):
  from k2jax import sharding  # noqa: PLC0415
  from k2jax.infer import heavy  # noqa: PLC0415
  from k2jax.infer.engine import Engine  # noqa: PLC0415
  results: list[sweep.PointResult] = []
  engine = generate = None
  loaded_step = None
  try:
    for axis, value in points:
      setting = point_setting(plan, cfg, axis, value)
      if engine is None or setting.rl_step != loaded_step:
        params = models(setting.rl_step)
        if mesh is not None:
          params = sharding.place_for_inference(params, config, mesh)
        if engine is None:
          engine = Engine(params, config, max_len=cfg.max_len, moe_impl=moe_impl)
          generate = sweep.Generator(engine, tokenizer, batch_size=cfg.batch_size,
                                     max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        engine.params = params  # same shapes: the compiled steps are reused
        loaded_step = setting.rl_step
      env = _env(cfg, plan.env_of[axis])
      r = sweep.measure(generate, env, tasks_of[env.name, problems_of(cfg, axis)], setting, axis, value,
                        heavy.PROMPTS[cfg.aggregation_prompt])
      results.append(r)
      if bar is not None:
        bar.set_postfix_str(f"{axis}={value} acc={r.accuracy:.2f}")
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  return results


def _progress(total: int, enabled: bool):
  if not enabled:
    return None
  from tqdm import tqdm  # noqa: PLC0415
  return tqdm(total=total, desc="sweep", unit="point", dynamic_ncols=True)


def run(cfg: ml_collections.ConfigDict, workdir: str | Path, *, checkpoint: str | None = None,
        hf_dir: str | None = None, axes: list[str] | None = None, progress: bool = True,
        mesh=None, moe_impl: str = "ragged", train_on_mesh: bool | None = None) -> list[sweep.PointResult]:
  """The whole job; returns the measured points (also written to `workdir`).

  `mesh`: what the sweep measures on; the embedded default also trains there when `train_on_mesh`
  (None: when its devices are accelerators; a CPU host's devices share its cores, and training on
  `expert:2` there took 1.6x one device's time)."""
  from k2jax import presets, sharding  # noqa: PLC0415
  from k2jax.experiments import training  # noqa: PLC0415
  from k2jax.infer import cli_common  # noqa: PLC0415
  from k2jax.train import trainer  # noqa: PLC0415
  if checkpoint and hf_dir:
    raise SweepError("give at most one of --checkpoint and --hf_dir")
  trained_here = not (checkpoint or hf_dir)
  plan = make_plan(cfg, axes, trained_here=trained_here)
  workdir = Path(workdir)
  trainer.check_workdir(workdir)  # before minutes of training or a model load
  t0 = time.perf_counter()
  if trained_here:
    try:
      training.check_config(cfg)
    except ValueError as e:
      raise SweepError(str(e)) from None
    sharding.check_mesh_fits_model(mesh, presets.from_config_dict(cfg.train.sft.model))  # before training
    if sharding.current() is not None:  # training sets up its own mesh contexts (k2-train's, k2-rl's)
      raise SweepError("tts.run trains the embedded default under its own mesh contexts: call it outside "
                       "sharding.use_mesh and give the mesh as mesh=..., which it then trains and measures on")
    workdir.mkdir(parents=True, exist_ok=True)
    rl_steps = sorted(set(plan.axes.get("rl_step", [])))
    if train_on_mesh is None:
      train_on_mesh = mesh is not None and sharding.mesh_platform(mesh) != "cpu"
    store = training.prepare(cfg, workdir, rl_steps, progress=progress, mesh=mesh if train_on_mesh else None)
    models, config = store.params, store.config
    tokenizer = cli_common.load_tokenizer(None, config)
    source = {"trained_in": str(workdir), "rl_steps": store.rl_steps}
  else:
    from k2jax.train.checkpointing import CheckpointError  # noqa: PLC0415
    try:
      params, config = cli_common.load_model(hf_dir, checkpoint, cfg.dtype, mesh)
      tokenizer = cli_common.load_tokenizer(hf_dir, config, checkpoint)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
      raise SweepError(str(e)) from None
    workdir.mkdir(parents=True, exist_ok=True)  # only once the model loaded: a bad path leaves nothing
    models = lambda step: params  # noqa: E731
    source = {"checkpoint": checkpoint} if checkpoint else {"hf_dir": hf_dir}
  t_train = time.perf_counter() - t0
  results = run_sweep(cfg, plan, models, tokenizer, config, workdir, progress=progress, mesh=mesh,
                      moe_impl=moe_impl)
  meta = {"model": source, "model_config": config.name, "config": json.loads(cfg.to_json_best_effort()),
          "axes": plan.axes, "env_of_axis": plan.env_of, "train_seconds": t_train,
          "total_seconds": time.perf_counter() - t0}
  write_results(workdir, results, meta)
  return results


def _default_config_path() -> str:
  from k2jax import configs  # noqa: PLC0415
  return str(Path(configs.__file__).parent / "tts_tiny.py")


def main(argv) -> None:
  from absl import app, flags  # noqa: PLC0415

  from k2jax import sharding  # noqa: PLC0415
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  axes = [a.strip() for a in FLAGS.axes.split(",")] if FLAGS.axes is not None else None
  if axes is not None and not any(axes):
    raise app.UsageError("--axes is empty; name at least one of " + ", ".join(sweep.AXES))
  axes = [a for a in axes if a] if axes is not None else None
  try:
    mesh = sharding.mesh_from_flags() if FLAGS.mesh else None
    moe_impl = sharding.moe_impl_from_flags(mesh)
    results = run(FLAGS.config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, hf_dir=FLAGS.hf_dir, axes=axes,
                  mesh=mesh, moe_impl=moe_impl, train_on_mesh=FLAGS.train_on_mesh)
  except SweepError as e:
    raise app.UsageError(str(e)) from None
  print(format_table(results))
  print(f"\nwrote {', '.join(RESULT_FILES)} and one PNG per axis to {FLAGS.workdir}")


def run_cli() -> None:
  from absl import flags  # noqa: PLC0415

  from k2jax import cli, sharding  # noqa: PLC0415
  if "config" not in flags.FLAGS:
    cli.define_config_file(_default_config_path(), "Sweep config file (ml_collections).")
    flags.DEFINE_string("workdir", None, "Results, plots and the trained model (embedded default) go here.")
    flags.mark_flag_as_required("workdir")
    flags.DEFINE_string("checkpoint", None, "Sweep a k2-train / k2-rl workdir or checkpoint instead of training.")
    flags.DEFINE_string("hf_dir", None, "Sweep an HF checkpoint folder (e.g. K2 Thinking) instead of training.")
    flags.DEFINE_string("axes", None, f"Comma-separated subset of the config's axes ({', '.join(sweep.AXES)}).")
    sharding.define_mesh_flag()
    flags.DEFINE_bool("train_on_mesh", None, "Train the embedded default on --mesh too (default: when its "
                      "devices are accelerators; on a CPU host they share its cores and training there is slower).")
  cli.run(main, [__name__, "k2jax.sharding"], keep_scratch_mapped=True)


if __name__ == "__main__":
  run_cli()
