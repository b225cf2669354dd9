"""The embedded default's model: SFT warm start on the environments' examples, then a short RL run;
both cached in the workdir, so a second `k2-tts` run only measures."""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Callable

import ml_collections

from k2jax import params as params_lib

TRAIN_RECORD = "train_config.json"


@dataclasses.dataclass
class TrainedModels:
  config: object                 # K2Config
  rl_steps: list[int]            # steps with a saved model (0: the warm start)
  load: Callable[[int], dict]    # rl step -> parameters

  def params(self, rl_step: int) -> dict:
    """Parameters after `rl_step` RL steps; -1: the last one."""
    step = self.rl_steps[-1] if rl_step < 0 else rl_step
    if step not in self.rl_steps:
      raise ValueError(f"no model saved at RL step {step}; saved: {self.rl_steps}")
    return self.load(step)


def sft_conversations(cfg) -> list[tuple[list[dict], list[dict]]]:
  """(messages, tool declarations) of every warm-start example; tools are declared where a
  conversation calls them, as the environment's tasks declare them."""
  from k2jax import envs  # noqa: PLC0415
  from k2jax.infer import heavy  # noqa: PLC0415
  out = []
  agg = cfg.train.aggregation
  for name, n in cfg.train.examples_per_env.items():
    env = envs.get(name, **dict(cfg.envs.get(name, {})))
    tools = env.reset(0).tools
    for messages in env.sft_examples(cfg.seed, int(n)):
      calls = any(m.get("tool_calls") for m in messages)
      out.append((messages, tools if calls else []))
    # Heavy mode's aggregation pass, in the prompt the sweep uses, on tasks after the ones above.
    n_agg = int(agg.examples.get(name, 0))
    if n_agg:
      out.extend((m, []) for m in envs.aggregation_examples(
          env, cfg.seed + int(n), n_agg, tuple(agg.num_candidates), prompt=heavy.PROMPTS[cfg.aggregation_prompt],
          right_frac=agg.right_frac))
  random.Random(f"tts-sft:{cfg.seed}").shuffle(out)
  return out


def _write_jsonl(path: Path, conversations) -> None:
  tmp = path.with_suffix(".tmp")
  with tmp.open("w", encoding="utf-8") as f:
    for messages, tools in conversations:
      f.write(json.dumps({"messages": messages, **({"tools": tools} if tools else {})}) + "\n")
  tmp.replace(path)


def rl_config(cfg) -> ml_collections.ConfigDict:
  """k2-rl's default config with the sweep's overrides (`cfg.train.rl`), starting from the warm start."""
  from k2jax.train.rl import runner  # noqa: PLC0415
  rl_cfg = runner.default_config()
  rl_cfg.update(cfg.train.rl.to_dict())
  return rl_cfg


def check_rl_steps(cfg, rl_steps: list[int]) -> None:
  """Every requested step is 0, the last RL step or a checkpoint step of the RL run."""
  n, every = int(cfg.train.rl.num_steps), int(cfg.train.rl.checkpoint_every)
  bad = [s for s in rl_steps if not (s == 0 or s == n or (0 < s < n and every and s % every == 0))]
  if bad:
    raise ValueError(f"rl_step values {bad} are not saved by the RL run (num_steps={n}, checkpoint_every={every})")


def check_config(cfg) -> None:
  """The warm start's and the RL run's settings, before anything is written or trained (ValueError)."""
  from k2jax.train import trainer  # noqa: PLC0415
  from k2jax.train.rl import runner  # noqa: PLC0415
  checks = [("train.sft", lambda: trainer.check_config(cfg.train.sft))]
  if cfg.train.rl.num_steps > 0:  # else no RL run: the warm start is the model measured
    checks.append(("train.rl", lambda: runner.check_config(rl_config(cfg))))
  for section, check in checks:
    try:
      check()
    except ValueError as e:
      raise ValueError(f"{section}: {e}") from None


def _rl(cfg, workdir: Path, sft_dir: Path, progress: bool, mesh=None) -> dict[int, Path]:
  """RL from the warm start (k2-rl's loop, on `mesh` when given), resumed or reused; its saved models by
  step."""
  from k2jax.train import checkpointing  # noqa: PLC0415
  from k2jax.train.rl import runner  # noqa: PLC0415
  rl_cfg = rl_config(cfg)
  rl_cfg.init_checkpoint = str(sft_dir)
  rl_cfg.progress_bar = progress
  rl_cfg.keep_checkpoints = max(rl_cfg.keep_checkpoints, rl_cfg.num_steps)  # every saved step is a point
  rl_dir = workdir / "rl"
  ckpt = checkpointing.Checkpointer(rl_dir, 1, False)
  latest = ckpt.latest_step()
  ckpt.close()
  if latest != rl_cfg.num_steps:
    runner.train_rl(rl_cfg, rl_dir, mesh)
  else:
    print(f"reusing the RL run in {rl_dir}")
  root = rl_dir / checkpointing.CHECKPOINT_DIR
  return {int(p.name): p for p in root.iterdir() if p.name.isdigit() and (p / "meta").exists()}


def _record(cfg) -> dict:
  return json.loads(ml_collections.ConfigDict({"seed": cfg.seed, "envs": cfg.envs, "train": cfg.train,
                                              "aggregation_prompt": cfg.aggregation_prompt})
                    .to_json_best_effort())


def prepare(cfg, workdir: Path, rl_steps: list[int], *, progress: bool = True, mesh=None) -> TrainedModels:
  """Trains what the workdir lacks (or reuses it) and returns the models along the RL run (`check_config`
  first: `tts.run` calls it before it makes the workdir). With `mesh`, the warm start and RL train on it
  (as `k2-train --mesh` and `k2-rl --mesh` do) and the models load into the engine's shards; a model
  trained on one layout is reused on another (the same model, to rounding)."""
  from k2jax import sharding  # noqa: PLC0415
  from k2jax.train import checkpointing, trainer  # noqa: PLC0415
  record_path = workdir / TRAIN_RECORD
  record = _record(cfg)
  if record_path.exists() and json.loads(record_path.read_text()) != record:
    raise ValueError(f"{workdir} holds a model trained with other training settings ({TRAIN_RECORD}); "
                     "use a new --workdir or the same config")
  record_path.write_text(json.dumps(record, indent=2))
  sft_dir = workdir / "sft"
  sft_cfg = ml_collections.ConfigDict(cfg.train.sft.to_dict())
  sft_cfg.progress_bar = progress
  done = checkpointing.Checkpointer(sft_dir, 1, False)
  latest = done.latest_step()
  done.close()
  if latest != sft_cfg.num_steps:
    data_path = workdir / "sft.jsonl"
    if not data_path.exists():
      _write_jsonl(data_path, sft_conversations(cfg))
    sft_cfg.data.train = str(data_path)
    with sharding.on_mesh(mesh):
      trainer.train(sft_cfg, sft_dir, mesh)
  else:
    print(f"reusing the warm-start model in {sft_dir}")
  dtype = params_lib.dtype_from_name(cfg.dtype)
  config = checkpointing.model_config_of(sft_dir)
  saved = {0: sft_dir}
  if cfg.train.rl.num_steps > 0:
    saved.update(_rl(cfg, workdir, sft_dir, progress, mesh))
  missing = [s for s in rl_steps if s not in saved]
  if missing:
    raise ValueError(f"the RL run saved no model at steps {missing}; saved: {sorted(saved)}")
  steps = sorted(saved)

  rules = sharding.inference_rules(mesh) if mesh is not None else None

  def load(step: int) -> dict:
    return checkpointing.load_params_for_inference(saved[step], dtype, mesh=mesh, rules=rules)[0]

  return TrainedModels(config, steps, load)
