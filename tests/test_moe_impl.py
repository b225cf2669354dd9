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
                        "--max_new_tokens=6", "--output=ids", "--mesh=expert:2,fsdp:2", "--max_len=32"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  # The process has 8 fake CPU devices (XLA_FLAGS); the mesh's 4 replace them (`set_cpu_devices`).
  assert res.returncode == 0, res.stderr[-2000:]
  assert "moe_impl: ep (expert-parallel over expert:2" in res.stderr
  got = [[int(t) for t in line.split(",")] for line in res.stdout.strip().splitlines()]
  assert got == [list(map(int, row)) for row in want]
  bad = subprocess.run([sys.executable, "-m", "k2jax.infer.generate", f"--hf_dir={tmp_path}", "--prompt_ids=3,4",
                        "--output=ids", "--mesh=expert:3"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert "the expert axis (3) does not divide the model's 8 routed experts" in bad.stderr.strip().splitlines()[-1]


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


@pytest.mark.parametrize("batch", [4, 1])
def test_engine_on_a_two_device_cpu_expert_mesh_matches_one_device(monkeypatch, batch):
  """CPU inference over `expert:2`: per-layer weights, each device's experts as per-expert arrays read in
  place (tokens split over the devices where they divide, else replicated), the dense parts tensor-parallel
  (`sharding.CPU_INFERENCE_RULES`); prefill logits and greedy decoding equal the one-device engine's."""
  import jax.numpy as jnp  # noqa: PLC0415
  from k2jax.kernels import dispatch  # noqa: PLC0415
  monkeypatch.setattr(dispatch, "SPLIT_EXPERT_MIN_ELEMENTS", 1)  # the tiny experts take the per-expert path
  if batch == 1:  # on the mesh, gate and up apart per expert (as past a core's L2), taken matrix by matrix
    monkeypatch.setattr(dispatch, "JOIN_GATE_UP_MAX_BYTES", 0)
  c = presets.TINY
  p = params_lib.init_params(c, jax.random.key(5))
  rng = np.random.default_rng(batch)
  prompts = [rng.integers(0, c.vocab_size, n).tolist() for n in (9, 5, 12, 7)[:batch]]
  one = Engine(p, c, max_len=32, cache_dtype=jnp.float32)
  want_logits = np.asarray(one.prefill(prompts)[0])
  want = one.generate(prompts, 6)
  mesh = sharding.make_mesh("expert:2", jax.devices()[:2])
  rules = sharding.inference_rules(mesh)
  with sharding.use_mesh(mesh, rules):
    two = Engine(sharding.place_params(p, c, mesh, rules), c, max_len=32, cache_dtype=jnp.float32,
                 moe_impl=sharding.choose_moe_impl(mesh))
    experts = two._decode_params()["moe_layers"][0]["moe"]["experts"]
    got_logits = np.asarray(two.prefill(prompts)[0])
    got = two.generate(prompts, 6)
    # prefill ran on the mesh's first device, in the one-device layout (decode ran on the mesh)
    first = two._first_device_params(mesh)["moe_layers"][0]["moe"]["experts"]["gate_up_edf"][1]
  assert first.devices() == {mesh.devices.flat[0]}
  assert first.shape == (c.hidden_size, 2 * c.moe_intermediate_size)
  # element j holds local expert j of each device: [2, K, N], one [1, K, N] shard per device
  assert len(experts["down_efd"]) == c.n_routed_experts // 2
  stacks = p["moe_layers"]["moe"]["experts"]
  if batch == 1:
    w, want_w = experts["up_edf"][1], np.asarray(stacks["up_edf"][0])
    assert "gate_up_edf" not in experts
  else:
    w, want_w = experts["gate_up_edf"][1], np.concatenate([stacks["gate_edf"][0], stacks["up_edf"][0]], axis=-1)
  assert w.shape == (2, c.hidden_size, want_w.shape[-1])
  assert w.sharding.spec[0] == "expert" and {s.data.shape[0] for s in w.addressable_shards} == {1}
  np.testing.assert_array_equal(np.asarray(w), want_w[[1, 1 + c.n_routed_experts // 2]])
  q_b = two._decode_params()["moe_layers"][0]["attn"]["q_b_rnq"]  # heads split over the same devices
  assert {s.data.shape[1] for s in q_b.addressable_shards} == {c.num_attention_heads // 2}
  scale = np.abs(want_logits).max()
  np.testing.assert_allclose(got_logits, want_logits, rtol=0, atol=1e-5 * scale)
  assert got.tokens == want.tokens
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), rtol=1e-4, atol=1e-5)


def _eqns(jaxpr):
  """Every equation of a jaxpr, those of the jaxprs inside its equations (jit, shard_map, ...) too."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      inner = getattr(v, "jaxpr", v)
      if hasattr(inner, "eqns"):
        yield from _eqns(inner)


def _one_moe_layer(seed: int, int4_experts: bool, seq: int):
  """The tiny model's first MoE layer (INT4 experts if asked), random tokens [4, seq, D] and random output
  weights, all valid."""
  import jax.numpy as jnp  # noqa: PLC0415
  c = presets.TINY
  params = params_lib.init_params(c, jax.random.key(seed))
  if int4_experts:
    params = params_lib.quantize_experts(params)
  p = jax.tree.map(lambda a: a[0], params["moe_layers"]["moe"])
  rng = np.random.default_rng(seed)
  x_btd = jnp.asarray(rng.normal(size=(4, seq, c.hidden_size)), jnp.float32)
  w_btd = jnp.asarray(rng.normal(size=x_btd.shape), jnp.float32)
  return c, p, x_btd, w_btd, jnp.ones((4, seq), bool)


def _fresh_moe_loss(c, w_btd, valid_bt, impl: str, grads: bool):
  """sum(moe(p, x) * w) with (out, load), jitted, with its gradients in (p, x) if `grads`. A new function
  each call: a traced one keeps the mesh (or none) it was traced under."""
  import jax.numpy as jnp  # noqa: PLC0415
  from k2jax import moe  # noqa: PLC0415

  def loss(p, x):
    out, load, _ = moe.moe(p, x, c, valid_bt, impl=impl)
    return jnp.sum(out * w_btd), (out, load)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True) if grads else loss)


def _assert_trees_close(got, want):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("int4_experts", [False, True])
def test_ragged_under_a_mesh_with_opaque_kernels_runs_each_devices_tokens_in_shard_map(monkeypatch, int4_experts):
  """Where the grouped matmuls are kernels XLA cannot partition (Pallas on TPU/GPU; here the CPU path is
  declared so), "ragged" under a mesh runs in shard_map, each device its own tokens through every expert:
  the same outputs and gradients as one device."""
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415
  from k2jax.kernels import dispatch  # noqa: PLC0415
  c, p, x_btd, w_btd, valid_bt = _one_moe_layer(7, int4_experts, 16)
  fresh = lambda: _fresh_moe_loss(c, w_btd, valid_bt, "ragged", grads=not int4_experts)  # noqa: E731
  want = fresh()(p, x_btd)
  monkeypatch.setattr(dispatch, "partitionable_grouped_matmul", lambda backend=None: False)
  with sharding.use_mesh(sharding.make_mesh("fsdp:4,data:2")):
    eqns = [e for e in _eqns(jax.make_jaxpr(fresh())(p, x_btd).jaxpr) if e.primitive.name == "shard_map"]
    assert eqns and all(P(("data", "fsdp")) in e.params["out_specs"] for e in eqns)  # tokens split
    got = fresh()(p, x_btd)
  _assert_trees_close(got, want)


@pytest.mark.parametrize("impl,spec,int4_experts", [
    ("ragged", "fsdp:2,data:2", False), ("ep", "expert:2,data:2", False), ("ep_a2a", "expert:2,data:2", False),
    ("ep", "expert:2,data:2", True)])
def test_pallas_grouped_matmuls_under_a_mesh_match_one_device(monkeypatch, impl, spec, int4_experts):
  """The TPU Pallas kernels (interpreted) as the routed experts' grouped matmuls inside shard_map, every
  way the experts run on a mesh: forward and gradients (INT4 experts: the forward) equal one device's
  plain-XLA MoE (a pallas_call's outputs carry no varying-axes type, so these shard_maps run unchecked,
  `expert_parallel.opaque_kernels`)."""
  import functools  # noqa: PLC0415
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
  from k2jax.kernels import dispatch  # noqa: PLC0415
  c, p, x_btd, w_btd, valid_bt = _one_moe_layer(11, int4_experts, 8)
  want = _fresh_moe_loss(c, w_btd, valid_bt, "ragged", grads=not int4_experts)(p, x_btd)
  pallas = functools.partial(dispatch.grouped_swiglu, backend="tpu", impl="pallas",
                             interpret=pltpu.InterpretParams())
  monkeypatch.setattr(dispatch, "grouped_swiglu", pallas)
  monkeypatch.setattr(dispatch, "partitionable_grouped_matmul", lambda backend=None: False)
  with sharding.use_mesh(sharding.make_mesh(spec, jax.devices()[:4])):
    got = _fresh_moe_loss(c, w_btd, valid_bt, impl, grads=not int4_experts)(p, x_btd)
  _assert_trees_close(got, want)
