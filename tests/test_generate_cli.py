"""k2-generate as a new user meets it: prompts that fit are served, text output is clean, heavy mode runs,
the tokenizer is the checkpoint's own, and wrong counts get their own error."""
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax import hf, params, presets, tokenizer_build
from k2jax.infer import cli_common


def _generate(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "k2jax.infer.generate", *args], capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture(scope="module")
def stop_model(tmp_path_factory):
  """The tiny K2 with a head whose greedy choice is always a stop token: <|im_end|> or [EOS], by the sign
  of one hidden unit, so the first generated token ends the answer."""
  c = presets.TINY
  tok = tokenizer_build.tiny_tokenizer()
  p = params.init_params(c, jax.random.key(3))
  p["final_norm_d"] = jnp.zeros_like(p["final_norm_d"]).at[0].set(1.0)
  head = np.zeros(p["lm_head_dv"].shape, np.float32)
  head[0, tok.eos_id], head[0, tok.doc_eos_id] = 100.0, -100.0
  p["lm_head_dv"] = jnp.asarray(head)
  path = tmp_path_factory.mktemp("stop") / "m"
  hf.save_hf(p, c, str(path))
  return str(path), tok


def test_text_output_drops_stop_tokens_and_reports_speed(stop_model):
  path, tok = stop_model
  ids = ",".join(str(i) for i in range(1, 41))  # 40 tokens: the prefill bucket (64) exceeds the cache (60)
  res = _generate(f"--hf_dir={path}", f"--prompt_ids={ids}", "--max_new_tokens=4", "--output=text")
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout == "\n"  # the stop token ends the answer and is not text
  assert "1 tokens in" in res.stderr and "tokens/s" in res.stderr
  assert "Unable to initialize backend" not in res.stderr


def test_heavy_mode_cli(stop_model):
  path, _ = stop_model
  res = _generate(f"--hf_dir={path}", "--prompt=What is 6*7?", "--chat", "--heavy=3", "--max_new_tokens=4",
                  "--temperature=1")
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stderr.count("[attempt ") == 3 and res.stdout == "\n"
  assert "identical attempts" not in res.stderr
  greedy = _generate(f"--hf_dir={path}", "--prompt=What is 6*7?", "--chat", "--heavy=2", "--max_new_tokens=2")
  assert greedy.returncode == 0 and "--heavy=2 with --temperature=0 decodes 2 identical attempts" in greedy.stderr


def test_negative_counts_and_misused_heavy_are_usage_errors():
  for flag, message in (("--max_new_tokens=-5", "--max_new_tokens must be >= 0, got -5"),
                        ("--heavy=2", "--heavy needs --chat"),
                        ("--temperature=nan", "temperature must be a finite number >= 0, got nan")):
    res = _generate("--checkpoint=unused", "--prompt_ids=1,2", flag)
    assert res.returncode != 0 and message in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]


def test_a_checkpoints_error_is_not_buried_in_orbax_info_logs(stop_model, tmp_path):
  """absl raises its log level to INFO once flags are parsed, and restoring an Orbax checkpoint logs
  ~30 INFO lines: the error after them must stand alone unless the user asks for logs (--verbosity)."""
  from k2jax.convert import hf_to_orbax  # noqa: PLC0415
  path, _ = stop_model
  hf_to_orbax.convert(path, str(tmp_path / "ckpt"), dtype="float32", progress=False)
  info_line = re.compile(r"^I\d{4} ", re.M)  # absl's INFO prefix: I<month><day> <time>
  args = (f"--checkpoint={tmp_path / 'ckpt'}", "--prompt_ids=1,2,99999999")
  res = _generate(*args)
  assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
  assert "error: prompt ids [99999999] are outside the vocabulary" in res.stderr.strip().splitlines()[-1]
  assert not info_line.search(res.stderr), res.stderr[:2000]
  loud = _generate(*args, "--verbosity=0")
  assert loud.returncode == 1 and info_line.search(loud.stderr), loud.stderr[-2000:]


def test_tokenizer_is_the_checkpoints_own_or_a_clear_error(tmp_path):
  tiny = tokenizer_build.tiny_tokenizer()
  assert cli_common.load_tokenizer(str(tmp_path), presets.TINY).vocab_size == tiny.vocab_size
  shutil.copytree(tokenizer_build.TINY_TOKENIZER_DIR, tmp_path / "tok")
  own = cli_common.load_tokenizer(str(tmp_path / "tok"), presets.K2_THINKING)
  assert own.encode("hello world") == tiny.encode("hello world")
  with pytest.raises(ValueError, match=f"{tmp_path} has no tiktoken.model"):
    cli_common.load_tokenizer(str(tmp_path), presets.K2_THINKING)
  with pytest.raises(ValueError, match="no tokenizer folder was given"):
    cli_common.load_tokenizer(None, presets.K2_THINKING)
  (tmp_path / "run").mkdir()  # k2-convert keeps the source's tokenizer in OUT/hf
  shutil.copytree(tmp_path / "tok", tmp_path / "run" / "hf")
  assert cli_common.load_tokenizer(None, presets.K2_THINKING, str(tmp_path / "run")).vocab_size == tiny.vocab_size


def test_prompts_past_the_models_positions_are_refused(stop_model):
  path, _ = stop_model
  limit = presets.TINY.max_position_embeddings
  for n, new, message in ((limit + 1, 1, f"more than the model's max_position_embeddings={limit}"),
                          (limit - 2, 5, "--max_new_tokens=5 exceeds the model's max_position_embeddings")):
    ids = ",".join(str(1 + i % 50) for i in range(n))
    res = _generate(f"--hf_dir={path}", f"--prompt_ids={ids}", f"--max_new_tokens={new}")
    assert res.returncode != 0 and message in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
