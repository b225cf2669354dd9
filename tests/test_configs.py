"""Every shipped run config works with the entry point it is for; model sections take only what the user set."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest
from conftest import CONFIGS, xla_flags

from k2jax import params as params_lib, presets
from k2jax.train import checkpointing, train_step as ts, trainer

# config file -> the entry point it is for (k2-train configs run here; others name the test that runs them)
ENTRY_POINTS = {"train_tiny.py": "k2-train", "sft_tiny.py": "k2-train", "k2_thinking.py": "k2-train",
                "from_workdir.py": "k2-train",
                "rl_tiny.py": "tests/test_rl.py", "tts_tiny.py": "tests/test_tts.py"}
SMALL_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "n_routed_experts": 4, "moe_intermediate_size": 32}


def _load(name: str, *args):
  spec = importlib.util.spec_from_file_location(f"config_{name[:-3]}", CONFIGS / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def _shrink(cfg):
  """A step or two of the config's own recipe on a model and batch small enough for a test."""
  cfg.model.preset = "tiny"
  cfg.model.update(SMALL_MODEL)
  cfg.data.batch_size, cfg.data.seq_len = 2, 64
  cfg.num_steps, cfg.log_every, cfg.eval_every, cfg.eval_batches, cfg.checkpoint_every = 2, 1, 2, 1, 2
  cfg.progress_bar, cfg.async_checkpoints = False, False
  return cfg


def test_every_shipped_config_has_an_entry_point():
  shipped = sorted(p.name for p in CONFIGS.glob("*.py") if p.name != "__init__.py")
  assert shipped == sorted(ENTRY_POINTS)
  for name, where in ENTRY_POINTS.items():
    assert where.startswith("k2-") or (CONFIGS.parent / where).exists(), name


def test_k2_thinking_recipe_runs_two_steps_on_a_small_model(tmp_path):
  # bf16 compute over fp32 masters, full remat, QAT; sft_tiny.py runs through the CLI below and
  # train_tiny.py (the base of both) through tests/test_train.py and tests/test_resume.py.
  cfg = _shrink(_load("k2_thinking.py"))
  rows = trainer.train(cfg, tmp_path)
  assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["resolved"]["model"]["hidden_size"] == 32 and saved["resolved"]["model_overrides"] == SMALL_MODEL
  assert (tmp_path / "checkpoints" / "2").is_dir()


def test_k2_thinking_config_is_the_real_model_and_its_state_builds_abstractly():
  cfg = _load("k2_thinking.py")
  trainer.check_config(cfg)
  c = presets.from_config_dict(cfg.model)
  assert c == presets.K2_THINKING
  tx, _ = ts.make_optimizer(cfg)
  state = jax.eval_shape(lambda: ts.init_state(params_lib.abstract_params(c), tx))
  assert params_lib.count(state.params) == 1_026_408_232_448


def test_model_section_overrides_only_what_is_set():
  cfg = _load("train_tiny.py")
  assert presets.from_config_dict(cfg.model) == presets.TINY
  cfg.model.preset = "k2_thinking"  # the preset decides every field left unset
  assert presets.from_config_dict(cfg.model) == presets.K2_THINKING
  cfg.model.preset = "tiny_no_qlora"
  assert presets.from_config_dict(cfg.model).q_lora_rank is None
  cfg.model.hidden_size, cfg.model.rope.factor = 32, 2.0
  c = presets.from_config_dict(cfg.model)
  assert (c.hidden_size, c.rope.factor, c.q_lora_rank, c.n_group) == (32, 2.0, None, 4)
  assert presets.config_overrides(cfg.model) == {"hidden_size": 32, "rope": {"factor": 2.0}}
  # A field with a fixed set of values is checked when the config is loaded, naming the field.
  for field, bad in (("layer_loop", "loop"), ("remat", "all"), ("compute_dtype", "float16")):
    wrong = _load("train_tiny.py")
    wrong[field] = bad
    with pytest.raises(ValueError, match=f"^{field} must be one of .*, got '{bad}'"):
      trainer.check_config(wrong)
  wrong = _load("train_tiny.py")
  wrong.optimizer.ns_dtype = "fp8"
  with pytest.raises(ValueError, match="optimizer.ns_dtype must be one of float32, bfloat16, got 'fp8'"):
    trainer.check_config(wrong)
  del cfg.data
  with pytest.raises(ValueError, match="run config lacks data"):
    trainer.check_config(cfg)


def test_cli_prints_and_saves_the_resolved_run(tmp_path):
  work = tmp_path / "run"
  args = [f"--config={CONFIGS / 'sft_tiny.py'}", f"--workdir={work}", "--mesh=fsdp:2", "--config.init_from=", "--config.num_steps=2",
          "--config.eval_every=2", "--config.eval_batches=1", "--config.data.batch_size=2",
          "--config.data.seq_len=32", "--config.progress_bar=True"]
  args += [f"--config.model.{k}={v}" for k, v in SMALL_MODEL.items()]
  code = "import sys; from k2jax.train.trainer import run; sys.argv[0] = 'k2-train'; run()"
  env = {**os.environ, "XLA_FLAGS": xla_flags(2)}  # 2 devices are enough here
  res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600, env=env)
  assert res.returncode == 0, res.stderr[-3000:]
  out = res.stdout
  assert "model: preset tiny, overrides: hidden_size=32, moe_intermediate_size=32, n_routed_experts=4, " \
         "num_hidden_layers=2" in out
  assert "mesh: data:1,fsdp:2,expert:1,tensor:1" in out and "eval loss" in out
  assert f"checkpoint: {work.absolute()}/checkpoints/2" in out and f"k2-generate --checkpoint={work}" in out
  assert "Unable to initialize backend" not in res.stderr
  assert "eval_loss=" in res.stderr  # the progress bar shows the eval loss
  saved = json.loads((work / "config.json").read_text())
  assert saved["resolved"]["mesh"] == "data:1,fsdp:2,expert:1,tensor:1" and saved["resolved"]["devices"] == 2
  assert saved["resolved"]["model"]["num_hidden_layers"] == 2 and saved["model"]["preset"] == "tiny"
  assert saved["data"]["train"] == "synthetic_chat"
  # The workdir alone gives the run config back (configs/from_workdir.py:WORKDIR), model overrides included.
  again = _load("from_workdir.py", str(work))
  trainer.check_config(again)
  assert checkpointing.config_to_dict(presets.from_config_dict(again.model)) == saved["resolved"]["model"]
  assert presets.config_overrides(again.model) == SMALL_MODEL
  assert (again.data.train, again.num_steps, again.data.seq_len) == ("synthetic_chat", 2, 32)


@pytest.mark.parametrize("field, value, message", [
    ("data.batch_size", 0, "data.batch_size must be an integer >= 1, got 0"),
    ("data.seq_len", 1, "data.seq_len must be an integer >= 2, got 1"),
    ("log_every", 0, "log_every must be an integer >= 1"),
    ("eval_batches", -1, "eval_batches must be an integer >= 0"),
    ("keep_checkpoints", 0, "keep_checkpoints must be an integer >= 1, got 0"),
    ("data.eval_fraction", 1.0, r"data.eval_fraction must be a number in \[0, 1\), got 1.0"),
    ("optimizer.peak_lr", 0.0, "optimizer.peak_lr must be a number > 0"),
    ("optimizer.adam_b2", 1.0, r"optimizer.adam_b2 must be a number in \[0, 1\)"),
    ("optimizer.decay_fraction", 1.5, r"optimizer.decay_fraction must be a number in \[0, 1\]"),
    ("optimizer.grad_clip", -1.0, "optimizer.grad_clip must be a number >= 0"),
    ("micro_batches", 3, r"micro_batches \(3\) must divide data.batch_size \(8\)"),
    ("optimizer.decay", "step", "optimizer.decay must be one of cosine, linear, got 'step'"),
])
def test_out_of_range_fields_are_named_before_anything_runs(field, value, message):
  cfg = _load("train_tiny.py")
  section, _, name = field.rpartition(".")
  with cfg.unlocked():
    (cfg[section] if section else cfg)[name] = value
  with pytest.raises(ValueError, match=message):
    trainer.check_config(cfg)


def test_every_shipped_config_is_in_range():
  from k2jax.experiments import training
  from k2jax.train.rl import runner
  for name, entry in ENTRY_POINTS.items():
    if entry == "k2-train" and name != "from_workdir.py":
      trainer.check_config(_load(name))
  runner.check_config(_load("rl_tiny.py"))
  training.check_config(_load("tts_tiny.py"))


def test_number_rule_bounds_and_types():
  from k2jax.train import config_rules as rules
  assert [rules.DECAY_RATE.admits(v) for v in (0, 0.5, 1.0, -0.1)] == [True, True, False, False]
  assert [rules.COUNT.admits(v) for v in (1, 0, 2.0, True)] == [True, False, False, False]  # bools are not counts
  assert [rules.POSITIVE.admits(v) for v in (1e-9, 0.0)] == [True, False]
  # NaN passes every bound (its comparisons are all False); infinities are never meant
  assert not any(rule.admits(v) for rule in (rules.POSITIVE, rules.NON_NEGATIVE, rules.FRACTION)
                 for v in (float("nan"), float("inf")))
  assert str(rules.FRACTION) == "a number in [0, 1]" and str(rules.STEPS) == "an integer >= 0"
