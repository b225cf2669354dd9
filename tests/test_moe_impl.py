"""The MoE implementation chosen from the mesh, and the entry points running expert-parallel with it."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from k2jax import hf, params as params_lib, presets, sharding
from k2jax.infer.engine import Engine
from test_train import small_config

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices; see conftest.py")


def test_choice_follows_the_mesh_and_the_override():
  assert sharding.choose_moe_impl(None) == "ragged"
  assert sharding.choose_moe_impl(sharding.make_mesh("fsdp:8")) == "ragged"
  cpu_ep = sharding.make_mesh("expert:4,fsdp:2")
  assert sharding.choose_moe_impl(cpu_ep) == "ep"  # XLA:CPU has no ragged all-to-all
  assert sharding.choose_moe_impl(cpu_ep, platform="tpu") == "ep_a2a"
  assert sharding.choose_moe_impl(cpu_ep, platform="gpu") == "ep_a2a"
  assert sharding.choose_moe_impl(sharding.abstract_mesh("expert:8,fsdp:4")) == "ep_a2a"  # planning: accelerator
  assert sharding.choose_moe_impl(cpu_ep, "ragged") == "ragged"
  assert sharding.choose_moe_impl(None, "ep_a2a") == "ep_a2a"
  with pytest.raises(ValueError, match="moe_impl must be one of"):
    sharding.choose_moe_impl(cpu_ep, "ep2")
  assert "expert-parallel over expert:4" in sharding.describe_moe_impl("ep", cpu_ep)


def test_generate_cli_runs_expert_parallel_with_single_device_ids(tmp_path):
  c = presets.TINY
  p = params_lib.init_params(c, jax.random.key(3))
  hf.save_hf(p, c, str(tmp_path))
  prompts = [[3, 17, 42, 8, 64, 23], [5, 9, 77], [11, 2, 30, 31]]
  want = Engine(p, c, max_len=32).generate(prompts, 6, stop_ids=[c.eos_token_id]).tokens
  ids = ";".join(",".join(map(str, pr)) for pr in prompts)
  res = subprocess.run([sys.executable, "-m", "k2jax.infer.generate", f"--hf_dir={tmp_path}", f"--prompt_ids={ids}",
                        "--max_new_tokens=6", "--output=ids", "--mesh=expert:4,fsdp:2", "--max_len=32"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert res.returncode == 0, res.stderr[-2000:]
  assert "moe_impl: ep (expert-parallel over expert:4" in res.stderr
  got = [[int(t) for t in line.split(",")] for line in res.stdout.strip().splitlines()]
  assert got == [list(map(int, row)) for row in want]


def test_train_step_expert_parallel_matches_single_device(tmp_path):
  from k2jax.train import trainer  # noqa: PLC0415
  cfg = small_config(num_steps=1, checkpoint_every=0, **{"data.batch_size": 8, "data.seq_len": 32})
  single = trainer.train(cfg, tmp_path / "single")
  mesh = sharding.make_mesh("expert:4,data:2")
  with sharding.use_mesh(mesh):
    sharded = trainer.train(cfg, tmp_path / "ep", mesh)
  for key in ("loss", "grad_norm", "max_attn_logit"):
    np.testing.assert_allclose(sharded[-1][key], single[-1][key], rtol=1e-5, err_msg=key)
  saved = {d: json.loads((tmp_path / d / "config.json").read_text())["moe_impl"] for d in ("single", "ep")}
  assert saved == {"single": "ragged", "ep": "ep"}
