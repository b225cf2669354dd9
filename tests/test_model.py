"""Model pieces against independent references: routing, dropless experts, packing, RoPE, NNX wrapper."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2jax import attention, model as model_lib, moe, params, presets, rope
from k2jax.config import RopeConfig
from hf_reference import rel_err

jax.config.update("jax_default_matmul_precision", "highest")


def _numpy_route(x, w, bias, c):
  """Routing written out in numpy, one token at a time."""
  scores = 1 / (1 + np.exp(-(x.astype(np.float64) @ w.astype(np.float64))))
  choice = scores + bias
  E, G = c.n_routed_experts, c.n_group
  weights, experts = [], []
  for t in range(x.shape[0]):
    s = choice[t].copy()
    if G > 1:
      group_scores = np.sort(s.reshape(G, E // G), axis=1)[:, -2:].sum(1)
      keep = np.argsort(-group_scores)[:c.topk_group]
      for g in range(G):
        if g not in keep:
          s[g * E // G:(g + 1) * E // G] = -np.inf
    top = np.argsort(-s)[:c.num_experts_per_tok]
    wt = scores[t, top]
    if c.norm_topk_prob:
      wt = wt / wt.sum()
    weights.append(wt * c.routed_scaling_factor)
    experts.append(top)
  return np.array(weights), np.array(experts)


@pytest.mark.parametrize("preset", ["tiny", "tiny_no_qlora"])
def test_router_matches_numpy_and_uses_unbiased_weights(preset):
  c = presets.get(preset)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, c.hidden_size)).astype(np.float32)
  w = (0.3 * rng.normal(size=(c.hidden_size, c.n_routed_experts))).astype(np.float32)
  bias = rng.normal(size=(c.n_routed_experts,)).astype(np.float32)  # large: it changes the choice
  r = moe.route(jnp.asarray(x), jnp.asarray(w), jnp.asarray(bias), c)
  want_w, want_e = _numpy_route(x, w, bias, c)
  got_e, got_w = np.asarray(r.experts_tk), np.asarray(r.weights_tk)
  order = np.argsort(got_e, 1), np.argsort(want_e, 1)
  np.testing.assert_array_equal(np.take_along_axis(got_e, order[0], 1), np.take_along_axis(want_e, order[1], 1))
  np.testing.assert_allclose(np.take_along_axis(got_w, order[0], 1), np.take_along_axis(want_w, order[1], 1),
                             rtol=1e-5)
  # Weights taken from the biased scores would be far off: this test fails for that bug.
  scores = 1 / (1 + np.exp(-(x @ w)))
  biased = np.take_along_axis(scores + bias, got_e, 1)
  if c.norm_topk_prob:
    biased = biased / biased.sum(1, keepdims=True)
  assert np.abs(biased * c.routed_scaling_factor - got_w).max() > 0.1


def test_group_limiting_keeps_only_top_groups():
  c = presets.TINY_NO_QLORA  # 8 experts in 4 groups, keep 2
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(200, c.hidden_size)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(c.hidden_size, c.n_routed_experts)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(c.n_routed_experts,)), jnp.float32)
  r = moe.route(x, w, bias, c)
  groups = np.asarray(r.experts_tk) // (c.n_routed_experts // c.n_group)
  assert max(len(set(g)) for g in groups) <= c.topk_group


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ragged_experts_equal_dense_reference_values_and_grads(dtype):
  c = presets.TINY
  p = params.init_params(c, jax.random.key(0), dtype)["moe_layers"]
  layer = jax.tree.map(lambda a: a[0], p)
  x = jax.random.normal(jax.random.key(1), (50, c.hidden_size), dtype)
  r = moe.route(x, layer["moe"]["router_de"], layer["moe"]["router_bias_e"], c)

  def loss(experts, x, impl):
    return jnp.sum(jnp.sin(impl(x, r, experts).astype(jnp.float32)))

  ex = layer["moe"]["experts"]
  a, b = moe.routed_experts(x, r, ex), moe.routed_experts_dense(x, r, ex)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  assert rel_err(a, b) <= tol
  # Gradients for the weights and for x (rows sorted and unsorted by gathers both ways, `_sort_rows`).
  ga = jax.grad(loss, argnums=(0, 1))(ex, x, moe.routed_experts)
  gb = jax.grad(loss, argnums=(0, 1))(ex, x, moe.routed_experts_dense)
  for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    assert rel_err(u.astype(jnp.float32), v.astype(jnp.float32)) <= tol


def test_packed_sequences_equal_separate_forwards():
  c = presets.TINY
  p = params.init_params(c, jax.random.key(2))
  rng = np.random.default_rng(3)
  a, b = rng.integers(0, c.vocab_size, 9), rng.integers(0, c.vocab_size, 6)
  packed = np.concatenate([a, b, [0, 0, 0]])[None]
  seg = np.array([[1] * 9 + [2] * 6 + [0] * 3])
  out = model_lib.forward(p, c, packed, segment_ids_bt=seg)
  la = model_lib.forward(p, c, a[None]).logits[0]
  lb = model_lib.forward(p, c, b[None]).logits[0]
  assert rel_err(out.logits[0, :9], la) <= 1e-5
  assert rel_err(out.logits[0, 9:15], lb) <= 1e-5
  # Padding tokens are not counted in the expert load.
  assert float(out.expert_load.sum()) == pytest.approx(15 * c.num_experts_per_tok * c.num_moe_layers)


def test_unstacked_layers_equal_scanned_stack():
  from k2jax.kernels import dispatch
  assert dispatch.unstack_layers_for_decode("cpu") and not dispatch.unstack_layers_for_decode("tpu")
  c = presets.TINY
  p = params.init_params(c, jax.random.key(4))
  toks = np.random.default_rng(5).integers(0, c.vocab_size, (2, 7))
  # Longer than one key bucket: attention reads the filled keys only (`attention._filled_keys_tile`).
  cache = model_lib.init_cache(c, 2, attention.CACHE_KEY_BUCKET + 12, jnp.float32)
  f = jax.jit(lambda p, cache: model_lib.forward(p, c, toks, cache=cache))
  per_layer = model_lib.unstack_layers(p)
  # The routed experts as tuples of per-expert arrays too (the engine's decode weights on CPU), gate and
  # up joined per expert, or apart where the joined matrix would not fit the core's cache (with the head,
  # attention projections, dense MLP and shared expert output-major, `model.output_major_layers`).
  per_expert = lambda join: dict(per_layer, moe_layers=tuple({**l, "moe": {**l["moe"], "experts": moe.split_experts(
      l["moe"]["experts"], join=join)}} for l in per_layer["moe_layers"]))
  joined = per_expert(None)
  apart = model_lib.output_major_layers(per_expert(False), ("head", *model_lib.OUTPUT_MAJOR_GROUPS))
  assert "lm_head_dv" not in apart and apart["lm_head_vd"].shape == (c.vocab_size, c.hidden_size)
  layer = apart["moe_layers"][0]
  assert layer["attn"]["o_dnh"].shape == (c.hidden_size, c.num_attention_heads, c.v_head_dim)
  assert layer["moe"]["shared"]["down_df"].shape[0] == c.hidden_size and "gate_df" not in layer["moe"]["shared"]
  assert apart["dense_layers"][0]["mlp"]["gate_fd"].shape == (c.intermediate_size, c.hidden_size)
  assert "gate_up_edf" in joined["moe_layers"][0]["moe"]["experts"]
  assert isinstance(apart["moe_layers"][0]["moe"]["experts"]["up_edf"], tuple)
  a = f(p, cache)
  # Over per-layer weights the cache may be per layer as well (the engine's decode chunks).
  unstacked = f(apart, model_lib.unstack_cache(cache))
  assert isinstance(unstacked.cache.c_kv["moe_layers"], tuple)
  unstacked.cache = model_lib.stack_cache(unstacked.cache)
  for b in (f(per_layer, cache), f(joined, cache), unstacked):
    assert rel_err(b.logits, a.logits) <= 1e-6
    assert rel_err(b.max_attn_logits["moe_layers"], a.max_attn_logits["moe_layers"]) <= 1e-6
    np.testing.assert_array_equal(b.expert_load, a.expert_load)
    assert rel_err(b.cache.c_kv["moe_layers"], a.cache.c_kv["moe_layers"]) <= 1e-6
    assert rel_err(b.cache.k_pe["dense_layers"], a.cache.k_pe["dense_layers"]) <= 1e-6
  assert float(jnp.abs(a.cache.c_kv["moe_layers"][:, :, :7]).min()) > 0  # the cache was written
  with pytest.raises(ValueError, match="per-layer cache"):
    model_lib.forward(p, c, toks, cache=model_lib.unstack_cache(cache))


def test_positions_from_segments():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  want = [[0, 1, 2, 0, 1, 0, 0, 0], list(range(8))]
  np.testing.assert_array_equal(model_lib.positions_from_segments(seg), want)


def test_yarn_matches_k2_facts():
  r = presets.K2_THINKING.rope
  f = rope.inv_frequencies(r, 64)
  base = 1.0 / (50000.0 ** (np.arange(0, 64, 2) / 64))
  # Correction range low=19, high=20: the ramp is 0 up to dim 19 (kept) and 1 from dim 20 (divided).
  np.testing.assert_allclose(f[:20], base[:20], rtol=1e-6)
  np.testing.assert_allclose(f[20:], base[20:] / 64, rtol=1e-6)
  assert presets.K2_INSTRUCT.softmax_scale == pytest.approx(0.13086080, abs=1e-8)
  assert presets.K2_THINKING.softmax_scale == pytest.approx(0.14467963, abs=1e-8)
  assert rope.attention_factor(r) == 1.0
  assert rope.attention_factor(RopeConfig(kind="yarn", factor=4.0, mscale=1.0, mscale_all_dim=0.7)) != 1.0


def test_rope_rotates_interleaved_pairs_and_is_relative():
  c = presets.TINY
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, c.qk_rope_head_dim)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, c.qk_rope_head_dim)), jnp.float32)

  def dot_at(pq, pk):
    cq, sq = rope.cos_sin(c, jnp.array([[pq]]), jnp.float32)
    ck, sk = rope.cos_sin(c, jnp.array([[pk]]), jnp.float32)
    return float(jnp.sum(rope.apply_rope(q, cq, sq) * rope.apply_rope(k, ck, sk)))

  assert dot_at(7, 3) == pytest.approx(dot_at(104, 100), rel=1e-4)
  # Pair (x0, x1) turns by angle = position * f0 (the highest frequency, 1 rad per position).
  cq, sq = rope.cos_sin(c, jnp.array([[1]]), jnp.float32)
  out = rope.apply_rope(q, cq, sq)[0, 0, 0]
  x0, x1 = float(q[0, 0, 0, 0]), float(q[0, 0, 0, 1])
  assert float(out[0]) == pytest.approx(x0 * np.cos(1) - x1 * np.sin(1), rel=1e-5)
  assert float(out[1]) == pytest.approx(x1 * np.cos(1) + x0 * np.sin(1), rel=1e-5)


def test_causal_no_future_leak():
  c = presets.TINY_NO_QLORA
  p = params.init_params(c, jax.random.key(5))
  t = np.random.default_rng(5).integers(0, c.vocab_size, (1, 12))
  t2 = t.copy()
  t2[0, 8:] = (t2[0, 8:] + 1) % c.vocab_size
  a, b = model_lib.forward(p, c, t).logits, model_lib.forward(p, c, t2).logits
  np.testing.assert_array_equal(a[0, :8], b[0, :8])
  assert not np.allclose(a[0, 8:], b[0, 8:])


def test_nnx_model_state_carries_logical_axes():
  m = model_lib.K2Model(presets.TINY, rngs=nnx.Rngs(0))
  _, state = nnx.split(m)
  flat = nnx.to_flat_state(state)
  axes = {"/".join(map(str, path)): v.get_metadata()["logical_axes"] for path, v in flat}
  assert axes["params/moe_layers/moe/experts/gate_edf"] == ("layers", "expert", "embed", "moe_mlp")
  assert len(axes) == len(jax.tree.leaves(params.param_specs(presets.TINY), is_leaf=params.is_spec))
  out = m(jnp.ones((1, 4), jnp.int32))
  assert out.logits.shape == (1, 4, presets.TINY.vocab_size)
