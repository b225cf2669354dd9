"""The embedded default's model: SFT warm start on the environments' examples, then a short RL run;
both cached in the workdir, so a second `k2-tts` run only measures."""
from __future__ import annotations

import dataclasses
import json
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
  out = []
  for name, n in cfg.train.examples_per_env.items():
    options = {**dict(cfg.envs.get(name, {})), "aggregate_frac": cfg.train.aggregate_frac}
    env = envs.get(name, **options)
    tools = env.reset(0).tools
    for messages in env.sft_examples(cfg.seed, int(n)):
      calls = any(m.get("tool_calls") for m in messages)
      out.append((messages, tools if calls else []))
  return out


def _write_jsonl(path: Path, conversations) -> None:
  tmp = path.with_suffix(".tmp")
  with tmp.open("w", encoding="utf-8") as f:
    for messages, tools in conversations:
      f.write(json.dumps({"messages": messages, **({"tools": tools} if tools else {})}) + "\n")
  tmp.replace(path)


def _record(cfg) -> dict:
  return json.loads(ml_collections.ConfigDict({"seed": cfg.seed, "envs": cfg.envs, "train": cfg.train})
                    .to_json_best_effort())


def prepare(cfg, workdir: Path, rl_steps: list[int], *, progress: bool = True) -> TrainedModels:
  """Trains what the workdir lacks (or reuses it) and returns the models along the RL run."""
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
    trainer.train(sft_cfg, sft_dir)
  else:
    print(f"reusing the warm-start model in {sft_dir}")
  dtype = params_lib.dtype_from_name(cfg.dtype)
  _, config = checkpointing.load_params_for_inference(sft_dir, dtype)
  saved = {0: sft_dir}
  # TODO(rl): RL checkpoints at `rl_steps` from the RL loop (k2-rl), warm-started from sft_dir.
  del rl_steps
  steps = sorted(saved)

  def load(step: int) -> dict:
    return checkpointing.load_params_for_inference(saved[step], dtype)[0]

  return TrainedModels(config, steps, load)
