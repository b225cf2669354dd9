"""Entry points: the smoke job runs, `--help` lists each tool's own flags, unknown flags are errors."""
import subprocess
import sys

import pytest
from conftest import CONFIGS

ENTRY_POINTS = {
    "k2jax.smoke": ["--tiny_preset", "--mesh"],
    "k2jax.report": ["--preset", "--hf_config"],
    "k2jax.plan": ["--device_memory_gib", "--mesh"],
    "k2jax.infer.generate": ["--prompt_ids", "--max_new_tokens", "--mesh"],
    "k2jax.infer.chat_cli": ["--tools", "--think_budget", "--mesh"],
    "k2jax.train.trainer": ["--workdir", "--config", "--mesh"],
    "k2jax.train.rl.runner": ["--workdir", "--init_checkpoint", "--mesh", "--moe_impl"],
}


def _run(module, *args, timeout=300):
  code = f"import sys; from {module} import run; sys.argv[0] = 'k2-tool'; run()"
  return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


# The main job installs without the test extra: it must not import what only the tests need.
TEST_ONLY = ("torch", "transformers", "compressed_tensors", "safetensors", "pytest", "hypothesis", "nbclient")


def test_smoke_job_prints_the_1t_table_and_runs_tiny():
  block = "; ".join(f"sys.modules[{m!r}] = None" for m in TEST_ONLY)  # importing any of them fails
  code = f"import sys; {block}; from k2jax.smoke import run; sys.argv[0] = 'k2-tool'; run()"
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "1,026,408,232,448" in res.stdout and "553.40" in res.stdout  # GiB, as k2-plan
  assert "tiny:" in res.stdout and "next-token loss" in res.stdout


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_help_lists_the_tools_flags(module):
  res = _run(module, "--help")  # absl prints the usage and exits with status 1
  assert "USAGE: k2-tool" in res.stdout, res.stderr[-2000:]
  for flag in ENTRY_POINTS[module]:
    assert flag in res.stdout, (module, flag)


def test_unknown_flag_is_named():
  res = _run("k2jax.report", "--presett=tiny")
  assert res.returncode != 0 and "presett" in res.stderr


@pytest.mark.parametrize("module, entry, flag", [
    ("k2jax.smoke", "run", "--seq_len=1"),  # a next-token loss needs two tokens
    ("k2jax.plan", "run", "--batch=-1"),
    ("k2jax.plan", "run", "--device_memory_gib=0"),
    ("k2jax.convert.cli", "run_export", "--max_shard_gb=0"),
])
def test_numbers_out_of_range_are_flag_errors(module, entry, flag):
  code = f"import sys; from {module} import {entry}; sys.argv[0] = 'k2-tool'; {entry}()"
  res = subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True, timeout=300)
  assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
  assert f"flag {flag.split('=')[0]}=" in res.stderr


@pytest.mark.parametrize("module, args, message", [
    ("k2jax.train.trainer", ["--workdir={file}"], "k2-tool: error: workdir {file} is a file, not a folder"),
    ("k2jax.train.rl.runner", ["--workdir={file}"], "k2-tool: error: workdir {file} is a file, not a folder"),
    ("k2jax.plan", ["--mesh=bogus:2"], "k2-tool: error: unknown mesh axis 'bogus'"),
    ("k2jax.train.rl.runner", ["--workdir={missing}", "--mesh=expert:3"],
     "k2-tool: error: mesh data:1,fsdp:1,expert:3,tensor:1: the expert axis (3) does not divide"),
    ("k2jax.infer.generate", ["--hf_dir={missing}", "--prompt_ids=1"], "k2-tool: error: {missing} is missing"),
    # A config field that does not exist, with the default config (loaded when the flag is defined) and
    # with --config given (loaded when the flags are parsed).
    ("k2jax.train.trainer", ["--workdir={missing}", "--config.optimizer.peak_lrr=1"],
     "k2-tool: error: --config.optimizer.peak_lrr: the config has no field 'optimizer.peak_lrr' (did you "
     "mean \"peak_lr\""),
    ("k2jax.train.rl.runner", ["--workdir={missing}", f"--config={CONFIGS}/rl_tiny.py", "--config.nope.x=1"],
     "k2-tool: error: --config.nope.x: the config has no field 'nope'"),
])
def test_expected_errors_are_one_line_and_exit_1(module, args, message, tmp_path):
  names = {"file": tmp_path / "file", "missing": tmp_path / "missing"}
  names["file"].write_text("not a folder")
  res = _run(module, *[a.format(**names) for a in args])
  assert res.returncode == 1
  assert res.stderr.strip().splitlines()[-1].startswith(message.format(**names)), res.stderr[-2000:]
  assert "Traceback" not in res.stderr
  assert not names["missing"].exists()  # nothing written


def test_fail_cleanly_reports_project_and_os_errors_and_keeps_bugs_loud(capsys, monkeypatch):
  from k2jax import cli
  from k2jax.config import ConfigError

  def failing(error):
    def main(argv):
      raise error
    return cli.fail_cleanly(main)

  for error, text in [(ConfigError("bad\nfield"), "bad field"), (PermissionError(13, "Permission denied", "/x"), "/x")]:
    with pytest.raises(SystemExit) as exit_info:
      failing(error)(["k2-x"])
    assert exit_info.value.code == 1
    line, = capsys.readouterr().err.splitlines()
    assert line.startswith("k2-x: error: ") and text in line
  with pytest.raises(ZeroDivisionError):  # not an expected error: the traceback stays
    failing(ZeroDivisionError("bug"))(["k2-x"])
  monkeypatch.setenv("K2JAX_TRACEBACK", "1")
  with pytest.raises(ConfigError):
    failing(ConfigError("shown with its traceback"))(["k2-x"])
