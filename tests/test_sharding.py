"""Sharded forward (and gradients) on 8 fake CPU devices equal the single-device model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from k2jax import expert_parallel, model as model_lib, moe, params as params_lib, presets, sharding
from hf_reference import rel_err
from host_params import host_params

C = presets.TINY
TOL = 1e-5

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices; see conftest.py")


@pytest.fixture(scope="module")
def setup():
  p = host_params(C)
  tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, C.vocab_size)
  segments = jnp.ones_like(tokens).at[1, 9:].set(0).at[3, 5:].set(2)  # padding and packing
  ref = jax.jit(lambda p, t, s: model_lib.forward(p, C, t, segment_ids_bt=s))(p, tokens, segments)
  return p, tokens, segments, ref


def _sharded_forward(p, tokens, segments, spec, moe_impl, remat="none"):
  mesh = sharding.make_mesh(spec)
  placed = sharding.place_params(p, C, mesh)
  with sharding.use_mesh(mesh):  # a fresh jit per mesh: constraints are read while tracing
    fwd = jax.jit(lambda p, t, s: model_lib.forward(p, C, t, segment_ids_bt=s, moe_impl=moe_impl, remat=remat))
    return fwd(placed, tokens, segments), placed


@pytest.mark.parametrize("spec,moe_impl", [
    ("fsdp:8", "ragged"),
    ("data:2,tensor:4", "ragged"),
    ("expert:2,fsdp:4", "ep"),
    ("expert:4,data:2", "ep"),
    ("data:2,expert:2,tensor:2", "ep_a2a"),
])
def test_sharded_forward_matches_single_device(setup, spec, moe_impl):
  p, tokens, segments, ref = setup
  out, placed = _sharded_forward(p, tokens, segments, spec, moe_impl)
  assert rel_err(out.logits, ref.logits) <= TOL
  np.testing.assert_allclose(out.expert_load, ref.expert_load)
  # The weights really are split: an expert shard holds E / n experts.
  gate = placed["moe_layers"]["moe"]["experts"]["gate_edf"]
  assert gate.addressable_shards[0].data.shape[1] == C.n_routed_experts // dict(gate.sharding.mesh.shape)["expert"]


def test_expert_parallel_model_gradients_with_remat(setup):
  p, tokens, segments, _ = setup

  def loss(p, moe_impl, remat):
    out = model_lib.forward(p, C, tokens, segment_ids_bt=segments, moe_impl=moe_impl, remat=remat)
    logp = jax.nn.log_softmax(out.logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

  ref = jax.jit(jax.grad(lambda p: loss(p, "ragged", "none")))(p)
  mesh = sharding.make_mesh("data:2,expert:4")
  with sharding.use_mesh(mesh):
    got = jax.jit(jax.grad(lambda p: loss(p, "ep", "full")))(sharding.place_params(p, C, mesh))
  for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(ref)):
    if np.any(np.asarray(r)):  # the router bias gets no gradient
      assert rel_err(g, r) <= TOL, jax.tree_util.keystr(path)


def test_routed_experts_ep_values_and_gradients():
  T, D, E, F = 24, 16, 8, 32  # 24 tokens: not divisible by every mesh's token shards
  ks = jax.random.split(jax.random.key(3), 6)
  x = jax.random.normal(ks[0], (T, D))
  r = moe.route(x, jax.random.normal(ks[1], (D, E)), jnp.zeros(E), C)
  experts = {"gate_edf": jax.random.normal(ks[2], (E, D, F)) / 4, "up_edf": jax.random.normal(ks[3], (E, D, F)) / 4,
             "down_efd": jax.random.normal(ks[4], (E, F, D)) / 6}
  cotangent = jax.random.normal(ks[5], (T, D))
  mesh = sharding.make_mesh("data:2,expert:2,tensor:2")  # tokens over data x expert, F over tensor

  def loss(run, x, experts):  # under the "dots" remat policy, as in training
    y = jax.checkpoint(run, policy=model_lib.REMAT_POLICIES["dots"])(x, r, experts)
    return jnp.sum(y * cotangent), y

  (_, ref), ref_g = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(moe.routed_experts, x, experts)
  for dispatch in expert_parallel.DISPATCHES:
    run = lambda x, r, e: expert_parallel.routed_experts_ep(x, r, e, mesh, dispatch)  # noqa: E731
    (_, y), g = jax.jit(jax.value_and_grad(lambda x, e: loss(run, x, e), argnums=(0, 1), has_aux=True))(x, experts)
    assert rel_err(y, ref) <= TOL, dispatch
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
      assert rel_err(a, b) <= TOL, dispatch


def test_routed_experts_ep_with_int4_weights():
  """INT4 expert weights split along their expert (and F) axes like dense ones."""
  from k2jax import int4  # noqa: PLC0415

  T, D, E, F = 16, 64, 8, 64  # F = 2 groups of 32, so the down weight's K splits over tensor:2
  ks = jax.random.split(jax.random.key(4), 5)
  x = jax.random.normal(ks[0], (T, D))
  r = moe.route(x, jax.random.normal(ks[1], (D, E)), jnp.zeros(E), C)
  q = {"gate_edf": int4.QuantizedWeight.quantize(jax.random.normal(ks[2], (E, D, F)) / 8),
       "up_edf": int4.QuantizedWeight.quantize(jax.random.normal(ks[3], (E, D, F)) / 8),
       "down_efd": int4.QuantizedWeight.quantize(jax.random.normal(ks[4], (E, F, D)) / 8)}
  ref = moe.routed_experts(x, r, q)
  mesh = sharding.make_mesh("data:2,expert:2,tensor:2")
  for dispatch in expert_parallel.DISPATCHES:
    y = jax.jit(lambda x, r, q: expert_parallel.routed_experts_ep(x, r, q, mesh, dispatch))(x, r, q)
    assert rel_err(y, ref) <= TOL, dispatch


def test_emulated_ragged_all_to_all_semantics():
  n, M = 4, 6
  mesh = sharding.make_mesh("expert:4,fsdp:2")
  rng = np.random.default_rng(0)
  sizes = rng.integers(0, 3, (n, n)).astype(np.int32)          # sizes[i, j]: rows i sends to j
  x = np.arange(n * M, dtype=np.float32).reshape(n, M, 1) + 1

  def body(x, send):
    me = jax.lax.axis_index("expert")
    all_sizes = jax.lax.all_gather(send[0], "expert")
    in_off = jnp.cumsum(send[0]) - send[0]
    out_off = (jnp.cumsum(all_sizes, 0) - all_sizes)[me]
    out = jnp.full((n * M, 1), -1.0)
    return expert_parallel.emulated_ragged_all_to_all(x[0], out, in_off, send[0], out_off, all_sizes[:, me],
                                                      axis_name="expert")[None]

  got = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("expert"), out_specs=P("expert")))(x, sizes)
  for j in range(n):  # receiver j: senders' chunks in sender order, then untouched rows
    want = np.concatenate([x[i, sizes[i, :j].sum():sizes[i, :j + 1].sum()] for i in range(n)])
    np.testing.assert_array_equal(got[j, :len(want)], want)
    assert np.all(got[j, len(want):] == -1)


def test_params_created_sharded():
  c = C.replace(num_hidden_layers=1, first_k_dense_replace=0, q_lora_rank=None)  # fewer leaves to compile
  mesh = sharding.make_mesh("data:2,expert:2,tensor:2")
  got = sharding.init_params_sharded(c, jax.random.key(0), jnp.float32, mesh)
  want = jax.jit(lambda key: params_lib.init_params(c, key, jnp.float32))(jax.random.key(0))
  experts = got["moe_layers"]["moe"]["experts"]
  assert experts["gate_edf"].sharding.spec == P(None, "expert", None, "tensor")
  assert experts["down_efd"].sharding.spec == P(None, "expert", "tensor", None)
  # Without an expert dim, a weight spends the expert axis on its embed (or LoRA) dim, like fsdp.
  assert got["embed_vd"].sharding.spec == P("tensor", "expert")
  assert got["moe_layers"]["attn"]["kv_b_cnu"].sharding.spec == P(None, "expert", "tensor", None)
  shardings = sharding.param_shardings(c, mesh)
  for a, s, w in zip(jax.tree.leaves(got), jax.tree.leaves(shardings), jax.tree.leaves(want)):
    assert a.sharding == s
    np.testing.assert_array_equal(a, w)


def test_partition_spec_leaves_out_axes_that_do_not_divide():
  mesh = sharding.abstract_mesh("fsdp:4,expert:3", 12)
  assert sharding.partition_spec(("expert", "embed"), mesh, sharding.DEFAULT_RULES, (384, 7168)) == P("expert", "fsdp")
  assert sharding.partition_spec(("expert", "embed"), mesh, sharding.DEFAULT_RULES, (8, 6)) == P(None, "expert")
  assert sharding.partition_spec(("batch",), mesh, sharding.DEFAULT_RULES, (8,)) == P("fsdp")


def test_mesh_spec_parsing():
  sizes = sharding.parse_mesh_spec("data:2,fsdp:2,expert:2,tensor:1", 8)
  assert sizes == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
  assert sharding.parse_mesh_spec(None, 8) == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
  assert sharding.parse_mesh_spec(" expert:4 , fsdp:-1", 16)["fsdp"] == 4
  mesh = sharding.make_mesh("expert:4,data:2")
  assert mesh.axis_names == sharding.MESH_AXES and dict(mesh.shape)["expert"] == 4
  errors = {
      "model:8": "unknown mesh axis 'model'",
      "data:2,fsdp:2": "4 devices in all, but there are 8",
      "data=2": "expected comma-separated 'axis:size'",
      "data:two": "bad size 'two'",
      "data:2,data:4": "given twice",
      "data:-1,fsdp:-1": "at most one mesh axis may be -1",
      "data:3,fsdp:-1": "not divisible by 3",
      "data:0,fsdp:8": "sizes are >= 1",
  }
  for spec, msg in errors.items():
    with pytest.raises(sharding.MeshError, match=msg):
      sharding.parse_mesh_spec(spec, 8)


def test_distributed_start_up_is_a_no_op_on_one_host():
  assert not sharding.maybe_initialize_distributed(env={})
  assert not sharding.maybe_initialize_distributed(env={"JAX_NUM_PROCESSES": "1"})
  assert not sharding.maybe_initialize_distributed("off", env={"JAX_NUM_PROCESSES": "2"})
  with pytest.raises(sharding.MeshError, match="JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID not set"):
    sharding.maybe_initialize_distributed(env={"JAX_NUM_PROCESSES": "2"})


def _nll(out, tokens, segments):
  logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32))
  w = (segments[:, 1:] != 0).astype(jnp.float32)
  return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0] * w) / jnp.sum(w)


def _logits_and_grads(p, tokens, segments, moe_impl):
  """(logits, gradient of the next-token loss) in one jit (one compile)."""
  def loss(p):
    out = model_lib.forward(p, C, tokens, segment_ids_bt=segments, moe_impl=moe_impl)
    return _nll(out, tokens, segments), out.logits
  (_, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(p)
  return logits, g


@pytest.fixture(scope="module")
def bf16_refs(setup):
  """bf16 parameters; fp32 compute on the same values (the reference) and the single-device bf16 run."""
  p, tokens, segments, _ = setup
  p16 = params_lib.cast(p, jnp.bfloat16)
  ref = _logits_and_grads(jax.tree.map(lambda x: x.astype(jnp.float32), p16), tokens, segments, "ragged")
  return p16, ref, _logits_and_grads(p16, tokens, segments, "ragged")


@pytest.mark.parametrize("spec,moe_impl", [("data:2,expert:4", "ep"), ("expert:4,tensor:2", "ep_a2a")])
def test_bf16_sharded_forward_and_gradients(setup, bf16_refs, spec, moe_impl):
  """bf16 parameters: the sharded run is as close to fp32 as the single-device bf16 run is."""
  _, tokens, segments, _ = setup
  p16, (ref_logits, ref_g), (single_logits, single_g) = bf16_refs
  mesh = sharding.make_mesh(spec)
  with sharding.use_mesh(mesh):
    logits, g = _logits_and_grads(sharding.place_params(p16, C, mesh), tokens, segments, moe_impl)
  assert logits.dtype == jnp.float32 and g["embed_vd"].dtype == jnp.bfloat16
  single_err = rel_err(single_logits, ref_logits)
  assert 1e-4 < single_err < 5e-2  # bf16 really was used, and is sane
  assert rel_err(logits, ref_logits) <= 2 * single_err
  for (path, got), want, one in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(ref_g),
                                    jax.tree.leaves(single_g)):
    if np.any(np.asarray(want)):  # the router bias gets no gradient
      bound = 2 * rel_err(one, want) + 1e-3
      assert rel_err(got, want) <= bound, (jax.tree_util.keystr(path), rel_err(got, want), bound)


def test_ragged_all_to_all_dispatch_exports_for_tpu_and_cuda():
  """The real collective (CPU meshes emulate it) traces and lowers, forward and backward."""
  T, D, E, F = 32, 64, 8, 64
  s = jax.ShapeDtypeStruct
  mesh = sharding.make_mesh("data:2,expert:4")

  def f(x_td, router_de, experts):
    r = moe.route(x_td, router_de, jnp.zeros(E), C)
    return expert_parallel.routed_experts_ep(x_td, r, experts, mesh, "all_to_all", emulate=False)

  grad = jax.grad(lambda x, r, e: f(x, r, e).astype(jnp.float32).sum(), argnums=(0, 2))
  bf = jnp.bfloat16
  args = (s((T, D), bf), s((D, E), jnp.float32),
          {"gate_edf": s((E, D, F), bf), "up_edf": s((E, D, F), bf), "down_efd": s((E, F, D), bf)})
  for target in ("tpu", "cuda"):
    for fn, calls in ((f, 3), (grad, 5)):  # there: rows and expert ids, back: outputs (+ 2 in the VJP)
      exp = jax.export.export(jax.jit(fn), platforms=[target], disabled_checks=[
          jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")])(*args)
      assert exp.mlir_module().count("@ragged_all_to_all") == calls, target
