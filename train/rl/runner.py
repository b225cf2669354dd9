"""k2-rl: RL of a K2 model on a verifiable environment, rollouts from the shared engine.

  k2-rl --workdir=/tmp/rl                                  # embedded default: warm start, then RL
  k2-rl --workdir=/tmp/rl --init_checkpoint=/tmp/sft --config.num_steps=100
  k2-rl --workdir=/tmp/rl --config=configs/rl_tiny.py --config.objective=grpo

Without an init checkpoint the run first fine-tunes the model on the environment's own warm-start
conversations (WORKDIR/warm_start, a k2-train workdir; reused when already there). Writes
WORKDIR/metrics.jsonl (one row per step, eval rows with eval_reward) and Orbax checkpoints that
k2-generate / k2-chat --checkpoint and k2-rl --init_checkpoint load; restarting resumes with the
same rollouts (keys and tasks follow from the step) and the same losses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from k2jax import cli, envs, presets, sharding
from k2jax import params as params_lib
from k2jax.config import K2Config
from k2jax.envs.base import task_seeds
from k2jax.infer.engine import Engine
from k2jax.infer.sampling import SamplingParams
from k2jax.train import checkpointing, config_rules, data, trainer
from k2jax.train import train_step as ts
from k2jax.train.rl import learner, rollout as ro
from k2jax.train.rl import loss as rl_loss

WARM_START_DIR = "warm_start"


def _default_config_path() -> str:
  from k2jax import configs  # noqa: PLC0415
  return str(Path(configs.__file__).parent / "rl_tiny.py")


def default_config() -> ml_collections.ConfigDict:
  from k2jax.configs import rl_tiny  # noqa: PLC0415
  return rl_tiny.get_config()


def make_env(cfg: ml_collections.ConfigDict):
  return envs.get(cfg.env, **dict(cfg.get("env_options") or {}))


# Numeric fields and their ranges (0 turns the *_every intervals, penalties and the PTX loss off).
NUMBERS = {
    **{name: config_rules.COUNT for name in (
        "prompts_per_step", "num_steps", "updates_per_batch", "max_turns", "turn_tokens", "response_tokens",
        "seq_len", "ptx_batch_size", "log_every", "keep_checkpoints", "warm_start.num_steps",
        "warm_start.examples", "warm_start.batch_size")},
    **{name: config_rules.STEPS for name in (
        "stop_after_steps", "temperature_decay_steps", "eval_every", "eval_tasks", "checkpoint_every")},
    **{name: config_rules.NON_NEGATIVE for name in (
        "tau", "temperature", "temperature_end", "temperature_quantum", "length_penalty_weight",
        "truncation_penalty", "ptx_weight", "qk_clip_tau", "router_bias_u")},
    "clip_eps": config_rules.POSITIVE, "warm_start.seq_len": config_rules.Number(integer=True, low=2),
    "warm_start.peak_lr": config_rules.POSITIVE, **config_rules.OPTIMIZER,
}


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Clear errors for settings that cannot work, before anything is written."""
  rl_loss.get_objective(cfg.objective)
  if cfg.samples_per_prompt < 2:
    raise ValueError(f"the {cfg.objective} objective needs samples_per_prompt (K) >= 2, got {cfg.samples_per_prompt}")
  trainer.check_choices(cfg)
  config_rules.check_numbers(cfg, NUMBERS)
  make_env(cfg)


def temperature_at(cfg: ml_collections.ConfigDict, step: int) -> float:
  """Linear decay from `temperature` to `temperature_end` over `temperature_decay_steps`, rounded to
  `temperature_quantum` so that only a few sampling programs are compiled."""
  t0, t1, n = cfg.temperature, cfg.temperature_end, cfg.temperature_decay_steps
  t = t0 if n <= 0 else t0 + (t1 - t0) * min(step / n, 1.0)
  q = cfg.temperature_quantum
  return round(round(t / q) * q, 6) if q else t


# ------------------------------------------------------------------ warm start


def warm_start_config(cfg: ml_collections.ConfigDict, data_path: Path) -> ml_collections.ConfigDict:
  from k2jax.configs import sft_tiny  # noqa: PLC0415
  w = cfg.warm_start
  s = sft_tiny.get_config()
  s.model = cfg.model
  s.param_dtype, s.compute_dtype, s.seed = cfg.param_dtype, cfg.compute_dtype, cfg.seed
  s.data.train, s.data.batch_size, s.data.seq_len = str(data_path), w.batch_size, w.seq_len
  s.num_steps, s.optimizer.peak_lr, s.optimizer.end_lr = w.num_steps, w.peak_lr, w.peak_lr / 10
  s.eval_every, s.checkpoint_every = 0, w.num_steps  # RL evaluates; no held-out loss here
  s.log_every = max(1, w.num_steps // 10)
  s.keep_checkpoints, s.async_checkpoints, s.progress_bar = 1, False, cfg.progress_bar
  return s


def write_sft_data(env, path: Path, n: int, seed: int = 0) -> None:
  """The environment's warm-start conversations as k2-train jsonl ({"messages", "tools"} rows)."""
  if path.exists():
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tools = {}
  rows = []
  for i, conv in enumerate(env.sft_examples(seed, n)):
    calls = any(m.get("tool_calls") for m in conv)
    if calls and not tools:
      tools = env.reset(seed + i).tools
    rows.append(json.dumps({"messages": conv, **({"tools": tools} if calls else {})}))
  tmp = path.with_suffix(".tmp")
  tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
  tmp.replace(path)  # never a half-written file


def warm_start(cfg: ml_collections.ConfigDict, workdir: str | Path, mesh=None) -> Path:
  """SFT on the environment's warm-start data into WORKDIR/warm_start (reused when finished)."""
  wdir = Path(workdir) / WARM_START_DIR
  if (wdir / checkpointing.CHECKPOINT_DIR / str(cfg.warm_start.num_steps)).is_dir():
    return wdir
  data_path = wdir / "sft.jsonl"
  write_sft_data(make_env(cfg), data_path, cfg.warm_start.examples)
  with sharding.on_mesh(mesh):  # the learner's context: the mesh's training rules
    trainer.train(warm_start_config(cfg, data_path), wdir, mesh)
  return wdir


def _sampling(mesh):
  """The context the engine's rollouts trace under: the rules the engine runs with on this mesh."""
  return sharding.on_mesh(mesh, sharding.inference_rules(mesh))


# ------------------------------------------------------------------ RL


def _rollout_params(params: dict, cfg: ml_collections.ConfigDict, c: K2Config, mesh) -> dict:
  """What the engine samples with: the trainer's params in compute dtype; under QAT with real INT4
  experts (the same quantiser the loss fake-quantises with). On a mesh, laid out as the engine runs them
  (the same shardings as training's on TPU/GPU; on a CPU expert mesh, `sharding.CPU_INFERENCE_RULES`)."""
  p = params_lib.cast(params, params_lib.dtype_from_name(cfg.compute_dtype))
  p = params_lib.quantize_experts(p, ts.QAT_MODE) if cfg.qat else p
  return sharding.place_for_inference(p, c, mesh) if mesh is not None else p


def _spec(cfg) -> ro.RolloutSpec:
  return ro.RolloutSpec(cfg.max_turns, cfg.turn_tokens, cfg.response_tokens, cfg.seq_len)


def evaluate(engine: Engine, tokenizer, env, cfg) -> dict[str, float]:
  """Greedy rollouts on the first `eval_tasks` held-out seeds."""
  tasks = [env.reset(s) for s in task_seeds("eval", cfg.eval_tasks)]
  samples = ro.rollout(engine, tokenizer, env, tasks, _spec(cfg), SamplingParams(temperature=0.0), jax.random.key(0))
  scores = [env.score(s.task, s.trajectory) for s in samples]
  return {"eval_reward": float(np.mean([r for r, _ in scores])),
          "eval_correct": float(np.mean([i["correct"] for _, i in scores])),
          "eval_response_len": float(np.mean([s.response_len for s in samples])),
          "eval_thinking_frac": float(np.mean([s.thought for s in samples]))}


def _ptx_data(cfg, env, tok):
  if not cfg.ptx_weight:
    return None
  rows = []
  for i, conv in enumerate(env.sft_examples(seed=task_seeds("train", 1, start=cfg.warm_start.examples)[0], n=512)):
    rows.append(data.chat_document(tok, conv, env.reset(i).tools if any(m.get("tool_calls") for m in conv)
                                   else None))
  return data.PackedDataset(rows, cfg.ptx_batch_size, cfg.seq_len, seed=cfg.seed)


def _tokenizer(c: K2Config, init_checkpoint: str | None):
  """The init checkpoint's own tokenizer (a converted release keeps its files beside the weights), else the
  project's tiny one, only for a model of its vocabulary (the embedded default); anything else is an error:
  the wrong vocabulary would train on garbage."""
  from k2jax.infer import cli_common  # noqa: PLC0415
  return cli_common.load_tokenizer(None, c, init_checkpoint or None)


def step_rows(samples, scores, rewards) -> dict[str, float]:
  return {"reward_mean": float(np.mean(rewards)), "reward_std": float(np.std(rewards)),
          "env_reward_mean": float(np.mean([r for r, _ in scores])),
          "correct_mean": float(np.mean([i["correct"] for _, i in scores])),
          "response_len_mean": float(np.mean([s.response_len for s in samples])),
          "thinking_frac": float(np.mean([s.thought for s in samples])),
          "truncated_frac": float(np.mean([s.truncated for s in samples])),
          "tool_calls_mean": float(np.mean([s.trajectory.num_tool_calls for s in samples]))}


# Runs in one process that agree on these share the jitted step and the engine (a resumed or repeated
# run does not compile again).
_STEP_FIELDS = ("objective", "tau", "clip_eps", "samples_per_prompt", "updates_per_batch", "num_steps", "optimizer",
                "ptx_weight", "qat", "qk_clip_tau", "router_bias_u", "remat", "moe_impl", "compute_dtype")
_CACHE: dict[tuple, tuple] = {}


def _compiled(c, cfg, tx, schedule, mesh=None):
  # The mesh is in the key: the steps keep the constraints of the mesh they were traced under.
  key = (c, cfg.seq_len, cfg.turn_tokens, mesh,
         json.dumps({k: cfg.get(k) for k in _STEP_FIELDS}, sort_keys=True, default=str))
  if key not in _CACHE:
    if len(_CACHE) >= 2:
      _CACHE.pop(next(iter(_CACHE)))
    # The cache holds the longest context plus one turn; prefill rounds prompts up to a power of two.
    engine = Engine(None, c, max_len=2 * cfg.seq_len + cfg.turn_tokens, cache_dtype=params_lib.dtype_from_name(
        cfg.compute_dtype), moe_impl=sharding.choose_moe_impl(mesh, cfg.get("moe_impl", "auto")))
    _CACHE[key] = (learner.make_rl_step(c, cfg, tx, schedule), engine)
  return _CACHE[key]


def train_rl(cfg: ml_collections.ConfigDict, workdir: str | Path, mesh=None) -> list[dict[str, Any]]:
  """Runs (or resumes) RL in `workdir`; returns the rows logged by this call (eval rows included).

  `mesh`: the warm start, the learner and the optimizer state sharded as `k2-train` shards them, the
  engine's rollouts laid out as `k2-generate` runs them on it (`sharding.inference_rules`)."""
  check_config(cfg)
  workdir = Path(workdir)
  c = presets.from_config_dict(cfg.model)
  sharding.check_mesh_fits_model(mesh, c)
  if mesh is not None:
    cfg = trainer._with_moe_impl(cfg, mesh)
  if cfg.init_checkpoint and not checkpointing.has_steps(workdir):  # refused before the workdir exists
    checkpointing.refuse_other_model(cfg.init_checkpoint, checkpointing.model_config_of(cfg.init_checkpoint), c)
  tok = _tokenizer(c, cfg.init_checkpoint)  # so is a model without its tokenizer
  trainer.prepare_workdir(workdir)
  env = make_env(cfg)
  tx, schedule = learner.make_optimizer(cfg)
  ckpt = checkpointing.Checkpointer(workdir, cfg.keep_checkpoints, async_save=False)
  ptx = _ptx_data(cfg, env, tok)
  start = ckpt.latest_step() or 0
  if not start:
    init = cfg.init_checkpoint or warm_start(cfg, workdir, mesh)
    # Built under jit: committed to the devices like the step's own output, so step 2 does not compile again.
    params = checkpointing.load_params_for_training(init, c, params_lib.dtype_from_name(cfg.param_dtype), mesh)
    state = jax.jit(lambda p: ts.init_state(p, tx))(params)
  else:
    like = trainer._state_like(cfg, c, tx, mesh)  # the fresh run's shapes and shardings
    _, params, opt_state, meta = ckpt.restore(like.params, like.opt_state, c)
    state = ts.TrainState(jax.device_put(jnp.asarray(start * cfg.updates_per_batch, jnp.int32), like.step.sharding),
                          params, opt_state)
    if ptx is not None:
      ptx.restore(meta["ptx_state"])
  (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
  step_fn, engine = _compiled(c, cfg, tx, schedule, mesh)
  engine.params = _rollout_params(state.params, cfg, c, mesh)
  K, P = cfg.samples_per_prompt, cfg.prompts_per_step
  end = cfg.num_steps if not cfg.stop_after_steps else min(cfg.num_steps, cfg.stop_after_steps)
  logger, rows = trainer._Logger(workdir, start), []  # drops rows a killed run logged past its checkpoint

  def log(row):
    rows.append(row)
    logger.write(row)

  meta_base = {"model_config": checkpointing.config_to_dict(c), "param_dtype": cfg.param_dtype,
               "run_config": json.loads(cfg.to_json_best_effort())}
  bar = _progress(cfg, start, end)
  try:
    if start == 0 and cfg.eval_every:
      with _sampling(mesh):
        log({"step": 0, **evaluate(engine, tok, env, cfg)})
    for step in range(start, end):
      engine.params = _rollout_params(state.params, cfg, c, mesh)
      seeds = task_seeds("train", P, start=cfg.warm_start.examples + step * P)
      tasks = [env.reset(s) for s in seeds for _ in range(K)]
      temp = temperature_at(cfg, step)
      key = jax.random.fold_in(jax.random.key(cfg.seed), step)
      with _sampling(mesh):
        samples = ro.rollout(engine, tok, env, tasks, _spec(cfg), SamplingParams(temperature=temp), key)
      scores = [env.score(s.task, s.trajectory) for s in samples]
      shape_pk = lambda xs: np.asarray(xs).reshape(P, K)  # noqa: E731
      rewards = rl_loss.shaped_rewards(
          shape_pk([r for r, _ in scores]), shape_pk([i["correct"] for _, i in scores]),
          shape_pk([s.response_len for s in samples]), shape_pk([s.truncated for s in samples]),
          length_weight=cfg.length_penalty_weight, truncation_penalty=cfg.truncation_penalty).reshape(-1)
      batch = {**ro.to_batch(samples, cfg.seq_len), "rewards": rewards}
      with sharding.on_mesh(mesh):
        state, metrics = step_fn(state, batch, ptx.next_batch() if ptx is not None else None)
      done = step + 1
      row = {"step": done, **step_rows(samples, scores, rewards), "temperature": temp,
             **{k: float(v) for k, v in jax.device_get(metrics).items()}}
      if done % cfg.log_every == 0 or done == end:
        log(row)
      if bar is not None:
        bar.set_postfix(reward=f"{row['reward_mean']:.2f}", len=f"{row['response_len_mean']:.0f}")
        bar.update(1)
      if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.num_steps):
        engine.params = _rollout_params(state.params, cfg, c, mesh)
        with _sampling(mesh):
          log({"step": done, **evaluate(engine, tok, env, cfg)})
      if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == end:
        ckpt.save(done, state.params, state.opt_state,
                  {**meta_base, "ptx_state": ptx.state() if ptx is not None else None})
  finally:
    if bar is not None:
      bar.close()
    logger.close()
    ckpt.close()
  return rows


def _progress(cfg, start, end):
  if not cfg.get("progress_bar", True):
    return None
  from tqdm import tqdm  # noqa: PLC0415
  return tqdm(total=end, initial=start, desc="rl", dynamic_ncols=True)


def main(argv) -> None:
  from absl import flags  # noqa: PLC0415
  cfg = flags.FLAGS.config
  if flags.FLAGS.init_checkpoint:
    cfg.init_checkpoint = flags.FLAGS.init_checkpoint
  if flags.FLAGS["moe_impl"].present:  # the flag overrides the run config's moe_impl
    with cfg.unlocked():
      cfg.moe_impl = flags.FLAGS.moe_impl
  try:
    mesh = sharding.mesh_from_flags() if flags.FLAGS.mesh else None
    rows = train_rl(cfg, flags.FLAGS.workdir, mesh)
  except (ValueError, checkpointing.CheckpointError, presets.ConfigError, FileNotFoundError) as e:
    cli.exit_with_error(argv, e)
  last = [r for r in rows if "reward_mean" in r]
  if last:
    print(json.dumps(last[-1]))


def run() -> None:
  from absl import flags  # noqa: PLC0415

  if "config" not in flags.FLAGS:
    cli.define_config_file(_default_config_path(), "Run config file (ml_collections).")
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and the warm start go here.")
    flags.DEFINE_string("init_checkpoint", None, "k2-train / k2-rl workdir or step folder to start RL from "
                        "(default: the embedded warm start).")
    flags.mark_flag_as_required("workdir")
    sharding.define_mesh_flag()
  cli.run(main, [__name__, "k2jax.sharding"], keep_scratch_mapped=True)


if __name__ == "__main__":
  run()
