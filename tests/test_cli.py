"""Entry points: the smoke job runs, `--help` lists each tool's own flags, unknown flags are errors."""
import subprocess
import sys

import pytest

ENTRY_POINTS = {
    "k2jax.smoke": ["--tiny_preset", "--mesh"],
    "k2jax.report": ["--preset", "--hf_config"],
    "k2jax.plan": ["--device_memory_gib", "--mesh"],
    "k2jax.infer.generate": ["--prompt_ids", "--max_new_tokens", "--mesh"],
    "k2jax.infer.chat_cli": ["--tools", "--think_budget", "--mesh"],
    "k2jax.train.trainer": ["--workdir", "--config", "--mesh"],
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
