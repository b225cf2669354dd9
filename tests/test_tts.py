"""k2-tts: intervals, voting, the grid checks, one point's scoring with a scripted policy, and a whole
tiny run (train, sweep, outputs; a second run only measures)."""
import csv
import json
import math
import os
import random
import subprocess
import sys

import pytest
from conftest import xla_flags

from k2jax import envs
from k2jax.configs import tts_tiny
from k2jax.experiments import sweep, tts


def _score_bound(k, n, z, upper):
  """The Wilson bound by bisection on the score test |p_hat - p| = z sqrt(p (1 - p) / n)."""
  lo, hi = (k / n, 1.0) if upper else (0.0, k / n)
  for _ in range(200):
    mid = (lo + hi) / 2
    inside = abs(k / n - mid) <= z * math.sqrt(mid * (1 - mid) / n)
    if upper:
      lo, hi = (mid, hi) if inside else (lo, mid)
    else:
      lo, hi = (lo, mid) if inside else (mid, hi)
  return (lo + hi) / 2


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (17, 64), (50, 64), (1, 1)])
def test_wilson_interval_matches_the_score_test(k, n):
  lo, hi = sweep.wilson_interval(k, n)
  assert lo <= k / n <= hi
  assert lo == pytest.approx(_score_bound(k, n, 1.959964, False), abs=1e-6)
  assert hi == pytest.approx(_score_bound(k, n, 1.959964, True), abs=1e-6)


def test_majority_vote_counts_answers_not_correctness():
  assert sweep.majority_vote(["12", "7", "7", None, None]) == "7"
  assert sweep.majority_vote(["3", "4", "4", "3"]) == "3"  # tie: the first seen
  assert sweep.majority_vote([None, None]) is None


class ScriptedGenerator:
  """Stands in for `sweep.Generator`: answers from a script, one token per character."""

  def __init__(self, reply):
    self.reply, self.tokens_generated, self.calls = reply, 0, []

  def __call__(self, prompts, sampling, think_budget):
    self.calls.append((len(prompts), sampling.temperature, think_budget))
    out = [self.reply(p, i) for i, p in enumerate(prompts)]
    self.tokens_generated += sum(len(t) for t in out)
    return out


def test_parallel_point_is_a_majority_vote_and_counts_every_token():
  env = envs.get("arith")
  tasks = [env.reset(s) for s in envs.task_seeds("eval", 3)]
  wrong = {t.answer: str(int(t.answer) + 1) for t in tasks}
  # Per task, in order: right, wrong, right -> the vote is right; single samples are right 2/3 of the time.
  def reply(prompt, i):
    task = next(t for t in tasks if t.messages[-1]["content"] in prompt)
    return f"<think>x</think>{envs.base.spaced(task.answer if i % 3 != 1 else wrong[task.answer])}"
  gen = ScriptedGenerator(reply)
  r = sweep.measure(gen, env, tasks, sweep.Setting(parallel=3, temperature=1.0), "parallel", 3)
  assert (r.accuracy, r.n_problems) == (1.0, 3)
  assert r.mean_tokens == pytest.approx(gen.tokens_generated / 3)
  assert gen.calls == [(9, 1.0, -1)]
  # Wrong majority: the vote must fail even though one sample is right.
  gen = ScriptedGenerator(lambda p, i: "<think></think>" + ("1" if i % 3 else "2"))
  tasks1 = [t for t in tasks if t.answer not in ("1", "2")]
  r = sweep.measure(gen, env, tasks1, sweep.Setting(parallel=3, temperature=1.0), "parallel", 3)
  assert r.accuracy == 0.0


def test_heavy_point_scores_the_aggregation_not_the_attempts():
  env = envs.get("arith")
  tasks = [env.reset(s) for s in envs.task_seeds("eval", 2)]

  def reply(prompt, i):
    task = next(t for t in tasks if t.messages[-1]["content"] in prompt)
    if "independent attempts" in prompt:  # the aggregation pass answers wrongly on purpose
      return "<think></think>" + envs.base.spaced(int(task.answer) + 1)
    return "<think></think>" + envs.base.spaced(task.answer)
  gen = ScriptedGenerator(reply)
  r = sweep.measure(gen, env, tasks, sweep.Setting(heavy=4, temperature=1.0), "heavy", 4)
  assert r.accuracy == 0.0 and r.answered == 1.0
  assert [c[0] for c in gen.calls] == [8, 2]


def test_tools_off_declares_no_tools_and_allows_one_turn():
  env = envs.get("lookup")
  tasks = [env.reset(s) for s in envs.task_seeds("eval", 2)]
  seen = []
  gen = ScriptedGenerator(lambda p, i: seen.append(p) or "<think></think>1 2 3")
  sweep.measure(gen, env, tasks, sweep.Setting(tool_steps=0), "tool_steps", 0)
  assert seen and not any("tool_declare" in p for p in seen)
  seen.clear()
  sweep.measure(gen, env, tasks, sweep.Setting(tool_steps=1), "tool_steps", 1)
  assert all("tool_declare" in p for p in seen)


def _cfg(**axes):
  cfg = tts_tiny.get_config()
  for k in list(cfg.axes):
    if k not in axes:
      del cfg.axes[k]
  for k, v in axes.items():
    cfg.axes[k] = v
  return cfg



def test_the_default_grid_plans():
  # Every rl_step of the shipped grid is saved by its RL run; heavy's factor doubles its problems.
  cfg = tts_tiny.get_config()
  plan = tts.make_plan(cfg, None, trained_here=True)
  assert list(plan.axes) == list(sweep.AXES) and plan.axes["rl_step"][-1] == cfg.train.rl.num_steps
  assert tts.problems_of(cfg, "heavy") == 2 * cfg.n_problems and tts.problems_of(cfg, "parallel") == cfg.n_problems
  assert tts.point_setting(plan, cfg, "parallel", 16).temperature == cfg.vote_temperature

@pytest.mark.parametrize("change,message", [
    (lambda c, a: a.append("thinking"), "unknown axis 'thinking' in --axes"),
    (lambda c, a: setattr(c.axes, "parallel", ()), "axis 'parallel' has an empty grid"),
    (lambda c, a: setattr(c, "env", "chess"), "unknown environment 'chess'"),
    (lambda c, a: a.clear() or a.append("heavy"), "--axes names 'heavy', which has no values"),
    # The sweep's own numbers: each was once accepted and failed (or was silently replaced) only after the
    # warm start had trained for minutes.
    (lambda c, a: setattr(c, "n_problems", 0), r"n_problems must be an integer >= 1, got 0"),
    (lambda c, a: setattr(c, "vote_temperature", -1.0), r"vote_temperature must be a number >= 0, got -1.0"),
    (lambda c, a: setattr(c, "batch_size", 0), r"batch_size must be an integer >= 1, got 0"),
    (lambda c, a: setattr(c, "max_len", 40), r"max_len \(40\) must exceed max_new_tokens \(48\)"),
    (lambda c, a: setattr(c, "dtype", "fp8"), r"dtype must be one of \['bfloat16', 'float32'\], got 'fp8'"),
    (lambda c, a: setattr(c.axis_problems_factor, "heavy", 0.0), r"axis_problems_factor.heavy must be a number > 0"),
])
def test_bad_grids_are_refused_before_any_compute(change, message):
  cfg, axes = _cfg(parallel=(1, 2), thinking_budget=(0, 8)), ["parallel"]
  change(cfg, axes)
  with pytest.raises(tts.SweepError, match=message):
    tts.make_plan(cfg, axes, trained_here=True)
  cfg = _cfg()
  with pytest.raises(tts.SweepError, match="empty grid"):
    tts.make_plan(cfg, None, trained_here=True)


@pytest.mark.parametrize("flags,message,workdir_is_a_file", [
    (["--axes=parallel,bogus"], "unknown axis 'bogus' in --axes", False),
    (["--checkpoint=/nonexistent/run"], "does not exist", False),
    (["--config.max_new_tokens=0"], "max_new_tokens must be an integer >= 1, got 0", False),
    ([], "is a file, not a folder", True),
])
def test_cli_errors_are_one_line_and_nonzero(tmp_path, flags, message, workdir_is_a_file):
  workdir = tmp_path / "w"
  if workdir_is_a_file:
    workdir.write_text("not a folder")
  proc = subprocess.run([sys.executable, "-c", "from k2jax.experiments.tts import run_cli; run_cli()",
                         f"--workdir={workdir}", *flags], capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr and "Traceback" not in proc.stderr
  assert workdir.is_file() if workdir_is_a_file else not workdir.exists()  # nothing written


def test_help_lists_the_flags():
  proc = subprocess.run([sys.executable, "-c", "from k2jax.experiments.tts import run_cli; run_cli()", "--help"],
                        capture_output=True, text=True, timeout=120)
  for flag in ("--workdir", "--axes", "--checkpoint", "--hf_dir", "--mesh", "--config"):
    assert flag in proc.stdout, flag


def test_tiny_run_end_to_end_then_reuses_the_model(tmp_path, monkeypatch, capsys):
  """One tiny run (warm start, a 2-step RL run, every axis), then a second run that only measures."""
  cfg = _cfg(thinking_budget=(0, 4), tool_steps=(0, 1), parallel=(1, 2), heavy=(1,), rl_step=(0, 2))
  cfg.n_problems, cfg.batch_size, cfg.max_new_tokens, cfg.max_len = 3, 8, 16, 512
  cfg.axis_problems_factor = {"heavy": 2}
  cfg.train.examples_per_env = {"arith": 24, "lookup": 8}
  cfg.train.aggregation.examples = {"arith": 8}
  cfg.train.sft.num_steps, cfg.train.sft.data.batch_size, cfg.train.sft.data.seq_len = 2, 4, 256
  cfg.train.sft.progress_bar = False
  cfg.train.rl.update({"num_steps": 2, "checkpoint_every": 1, "prompts_per_step": 2, "samples_per_prompt": 2,
                       "eval_every": 0})
  results = tts.run(cfg, tmp_path, progress=False)
  assert [(r.axis, r.value) for r in results] == [("thinking_budget", 0), ("thinking_budget", 4), ("tool_steps", 0),
                                                   ("tool_steps", 1), ("parallel", 1), ("parallel", 2), ("heavy", 1),
                                                   ("rl_step", 0), ("rl_step", 2)]
  # The rl_step axis measures the models the RL run saved.
  assert sorted(int(p.name) for p in (tmp_path / "rl" / "checkpoints").iterdir()) == [1, 2]
  with (tmp_path / "results.csv").open() as f:
    rows = list(csv.reader(f))
  assert rows[0][:8] == ["axis", "value", "accuracy", "ci_low", "ci_high", "mean_tokens", "seconds", "n_problems"]
  assert len(rows) == 10
  for r in results:
    assert 0 <= r.ci_low <= r.accuracy <= r.ci_high <= 1 and r.mean_tokens > 0
    assert r.n_problems == (6 if r.axis == "heavy" else 3)
  # Two trajectories cost more tokens than one; the aggregation pass adds to heavy's one trajectory.
  by = {(r.axis, r.value): r for r in results}
  assert by["parallel", 2].mean_tokens > by["parallel", 1].mean_tokens
  assert json.loads((tmp_path / "results.json").read_text())["points"][0]["axis"] == "thinking_budget"
  for name in ("overview", "thinking_budget", "tool_steps", "parallel", "heavy", "rl_step"):
    assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
  table = tts.format_table(results)
  assert "thinking_budget" in table and "95% interval" in table

  from k2jax.train import trainer
  from k2jax.train.rl import runner
  monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("the second run trained again"))
  monkeypatch.setattr(runner, "train_rl", lambda *a, **k: pytest.fail("the second run ran RL again"))
  again = tts.run(cfg, tmp_path, axes=["parallel"], progress=False)
  assert [r.axis for r in again] == ["parallel", "parallel"]
  cfg.axes.rl_step = (0, 3)
  with pytest.raises(tts.SweepError, match=r"rl_step values \[3\] are not saved"):
    tts.run(cfg, tmp_path, progress=False)
  cfg.axes.rl_step = (0, 2)
  cfg.train.sft.num_steps = 3
  with pytest.raises(ValueError, match="other training settings"):
    tts.run(cfg, tmp_path, progress=False)


def test_cli_trains_then_measures_on_an_expert_mesh(tmp_path):
  # `--mesh=expert:2` once wrapped the whole job in the mesh: the warm start's first train step failed
  # (its state on one device, the step traced under the two-device mesh). With --train_on_mesh the warm
  # start and RL train on the mesh in their own contexts (k2-train's, k2-rl's); the sweep's engine runs on it.
  overrides = {"n_problems": 2, "batch_size": 4, "max_new_tokens": 8, "max_len": 512, "axes.parallel": "(1, 2)",
               "train.examples_per_env.arith": 16, "train.examples_per_env.lookup": 8,
               "train.aggregation.examples.arith": 4, "train.sft.num_steps": 2, "train.sft.data.batch_size": 4,
               "train.rl.num_steps": 1}
  proc = subprocess.run(
      [sys.executable, "-c", "from k2jax.experiments.tts import run_cli; run_cli()", f"--workdir={tmp_path / 'w'}",
       "--mesh=expert:2", "--train_on_mesh", "--axes=parallel", *[f"--config.{k}={v}" for k, v in overrides.items()]],
      capture_output=True, text=True, timeout=600, env={**os.environ, "XLA_FLAGS": xla_flags(2)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "moe_impl: ep" in proc.stderr
  assert "expert:2" in json.loads((tmp_path / "w" / "sft" / "config.json").read_text())["resolved"]["mesh"]
  assert json.loads((tmp_path / "w" / "rl" / "config.json").read_text())["moe_impl"] == "ep"  # RL on the mesh
  rows = list(csv.reader((tmp_path / "w" / "results.csv").open()))
  assert [r[:2] for r in rows[1:]] == [["parallel", "1"], ["parallel", "2"]]


def test_training_under_a_callers_mesh_is_refused_before_any_work(tmp_path):
  import jax

  from k2jax import sharding
  mesh = sharding.make_mesh("expert:2", jax.devices()[:2])
  with sharding.use_mesh(mesh), pytest.raises(tts.SweepError, match="outside sharding.use_mesh"):
    tts.run(_cfg(parallel=(1,)), tmp_path / "w", progress=False, mesh=mesh, moe_impl="ep")
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("train_on_mesh, trains_on_mesh", [(None, False), (True, True), (False, False)])
def test_training_on_cpu_devices_is_opt_in(train_on_mesh, trains_on_mesh, tmp_path, monkeypatch):
  # A CPU host's devices share its cores: training there was slower than on one device.
  import jax

  from k2jax import sharding
  from k2jax.experiments import training
  mesh = sharding.make_mesh("expert:2", jax.devices()[:2])
  seen = []

  def prepare(*args, mesh=None, **kwargs):
    seen.append(mesh)
    raise tts.SweepError("stop")
  monkeypatch.setattr(training, "prepare", prepare)
  with pytest.raises(tts.SweepError, match="stop"):
    tts.run(_cfg(parallel=(1,)), tmp_path / "w", progress=False, mesh=mesh, moe_impl="ep",
            train_on_mesh=train_on_mesh)
  assert seen == [mesh if trains_on_mesh else None]
