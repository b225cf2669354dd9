"""MuonClip optimizer step and the parameter -> optimizer map."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from k2jax.train import optimizer_map as om
from k2jax.train.muonclip import muonclip
from k2jax.train.muonclip import newton_schulz5 as _newton_schulz5

newton_schulz5 = jax.jit(_newton_schulz5)  # one compile per shape instead of one per op

# Tiny sizes with distinct values so a wrong axis shows up as a shape error.
V, D, F, FE, E, R, C, P, N, NOPE, VH = 40, 16, 24, 8, 4, 12, 10, 4, 3, 6, 5
L_DENSE, L_MOE = 1, 2


def make_params(q_lora: bool = True, seed: int = 0, dtype=jnp.float32) -> dict:
  """A parameter tree with the docs/PARAMS.md names and tiny random shapes."""
  rng = np.random.default_rng(seed)

  def w(*shape):
    return jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[-1]), dtype)

  def layers(n_layers, moe):
    q = ({"q_a_dr": w(n_layers, D, R), "q_a_norm_r": w(n_layers, R),
          "q_b_rnq": w(n_layers, R, N, NOPE + P)} if q_lora else {"q_dnq": w(n_layers, D, N, NOPE + P)})
    attn = {**q, "kv_a_da": w(n_layers, D, C + P), "kv_a_norm_c": w(n_layers, C),
            "kv_b_cnu": w(n_layers, C, N, NOPE + VH), "o_nhd": w(n_layers, N, VH, D)}
    tree = {"attn_norm_d": w(n_layers, D), "attn": attn, "mlp_norm_d": w(n_layers, D)}
    if moe:
      tree["moe"] = {
          "router_de": w(n_layers, D, E),
          "router_bias_e": jnp.zeros((n_layers, E), jnp.float32),
          "experts": {"gate_edf": w(n_layers, E, D, FE), "up_edf": w(n_layers, E, D, FE),
                      "down_efd": w(n_layers, E, FE, D)},
          "shared": {"gate_df": w(n_layers, D, FE), "up_df": w(n_layers, D, FE),
                     "down_fd": w(n_layers, FE, D)},
      }
    else:
      tree["mlp"] = {"gate_df": w(n_layers, D, F), "up_df": w(n_layers, D, F), "down_fd": w(n_layers, F, D)}
    return tree

  return {"embed_vd": w(V, D), "dense_layers": layers(L_DENSE, False), "moe_layers": layers(L_MOE, True),
          "final_norm_d": w(D), "lm_head_dv": w(D, V)}


def random_like(tree, seed):
  # numpy, not jax.random: eager jax compiles once per distinct shape, which dominates runtime here.
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), tree)


def rms(x):
  return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float32)))))


# ---- Newton-Schulz ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 32), (64, 16), (16, 64), (48, 96), (3, 40, 24)])
def test_newton_schulz_singular_values_near_one(shape):
  rng = np.random.default_rng(1)
  *batch, n, m = shape
  k = min(n, m)
  mats = []
  for _ in range(int(np.prod(batch or [1]))):
    u = np.linalg.qr(rng.normal(size=(n, k)))[0]
    v = np.linalg.qr(rng.normal(size=(m, k)))[0]
    mats.append((u * rng.uniform(0.5, 2.0, size=k)) @ v.T)
  a = jnp.asarray(np.stack(mats).reshape(shape), jnp.float32)
  o = newton_schulz5(a)
  assert o.shape == shape and o.dtype == jnp.float32
  sv = np.linalg.svd(np.asarray(o), compute_uv=False)
  assert sv.min() > 0.6 and sv.max() < 1.25, (sv.min(), sv.max())
  # Same singular vectors as the input: O ~ U V^T, so O^T A is symmetric positive semi-definite.
  sym = np.swapaxes(np.asarray(o), -1, -2) @ np.asarray(a)
  np.testing.assert_allclose(sym, np.swapaxes(sym, -1, -2), atol=1e-3)


def test_newton_schulz_in_groups_equals_whole_stack(monkeypatch):
  from k2jax.train import muonclip as muonclip_mod
  a = jax.random.normal(jax.random.key(7), (5, 40, 24))
  whole = muonclip_mod._newton_schulz5(a, 5, muonclip_mod.NS_EPS)
  monkeypatch.setattr(muonclip_mod, "NS_CPU_GROUP_BYTES", 4 * 40 * 24 * 2)  # groups of 2, remainder 1
  grouped = newton_schulz5(a)
  np.testing.assert_allclose(grouped, whole, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(grouped - newton_schulz5(a[:1])[0]).max()) > 0.1  # each matrix normalised alone


@pytest.mark.parametrize("nesterov,shape", [(True, (2, 5, 40, 24)), (False, (2, 5, 40, 24)), (True, (7, 40, 24))])
def test_momentum_and_newton_schulz_in_groups_equal_separate_passes(monkeypatch, nesterov, shape):
  """On CPU a stack's momentum, Nesterov direction and Newton-Schulz run in one loop over groups, stored
  in place: the same numbers as the plain expressions over the whole stack (to rounding: XLA may contract
  mu M + G into one multiply-add), fp32 and bf16."""
  from k2jax.train import muonclip as muonclip_mod
  rng = np.random.default_rng(3)
  m, g = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2))
  new_m = 0.95 * m + g
  pre = g + 0.95 * new_m if nesterov else new_m
  monkeypatch.setattr(muonclip_mod, "NS_CPU_GROUP_BYTES", 4 * 40 * 24 * 3)  # groups of 3, a remainder
  fused = jax.jit(muonclip_mod.momentum_newton_schulz5, static_argnums=(2, 3, 4, 5, 6))
  for dtype in ("float32", "bfloat16"):
    whole = muonclip_mod._newton_schulz5(pre.reshape(-1, 40, 24), 5, muonclip_mod.NS_EPS, dtype).reshape(shape)
    got_m, got = fused(m, g, 0.95, nesterov, 5, muonclip_mod.NS_EPS, dtype)
    np.testing.assert_allclose(got_m, new_m, rtol=1e-6, atol=1e-6)
    if dtype == "float32":
      np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-5)
    else:  # a 1-ulp difference of the input moves bf16 roundings: within bf16's epsilon (7.8e-3)
      assert float(jnp.linalg.norm(got - whole) / jnp.linalg.norm(whole)) < 7.8e-3
    assert float(jnp.abs(got - pre).max()) > 0.1  # orthogonalised, not passed through


def test_newton_schulz_bf16_input_and_zero():
  o = newton_schulz5(jnp.ones((8, 12), jnp.bfloat16))
  assert o.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(o)))
  assert float(jnp.abs(newton_schulz5(jnp.zeros((5, 7)))).max()) == 0.0


@pytest.mark.parametrize("shape", [(64, 128), (3, 96, 48)])
def test_newton_schulz_bf16_close_to_fp32(shape):
  """ns_dtype="bfloat16" (the reference implementations' dtype) lands within 3% (Frobenius, relative) of
  the fp32 iteration; measured 1.1-1.5%. One iteration fewer in fp32 is ~33% off, so the bound catches a
  wrong iteration, and the result differs from fp32's (bf16 really ran)."""
  g = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)
  f32 = newton_schulz5(g)
  bf16 = jax.jit(_newton_schulz5, static_argnames=("dtype",))(g, dtype="bfloat16")
  assert bf16.dtype == jnp.float32 and bf16.shape == shape
  rel = float(jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32))
  assert 1e-4 < rel < 0.03, rel
  sv = np.linalg.svd(np.asarray(bf16), compute_uv=False)
  assert sv.min() > 0.6 and sv.max() < 1.25, (sv.min(), sv.max())


def test_muonclip_ns_dtype_option():
  params = {"moe_layers": {"attn": {"q_a_dr": jnp.zeros((1, 24, 40))}}}
  g = random_like(params, 9)
  state = muonclip(1.0).init(params)
  u32, u16, default = (muonclip(1.0, weight_decay=0.0, **kw).update(g, state, params)[0]["moe_layers"]["attn"]["q_a_dr"]
                       for kw in ({"ns_dtype": "float32"}, {"ns_dtype": "bfloat16"}, {}))
  assert u16.dtype == jnp.float32 and 1e-4 < float(jnp.linalg.norm(u32 - u16) / jnp.linalg.norm(u32)) < 0.03
  np.testing.assert_array_equal(default, u16)  # bf16 is the default, as in the reference implementations
  with pytest.raises(ValueError, match="ns_dtype"):
    muonclip(1.0, ns_dtype="float16")


# ---- Muon update --------------------------------------------------------------------------------


@pytest.mark.parametrize("name,shape", [
    ("q_a_dr", (1, 64, 16)), ("q_a_dr", (1, 16, 64)), ("q_a_dr", (1, 48, 48)), ("q_b_rnq", (1, 32, 4, 24))])
def test_muon_update_rms_is_0p2_lr(name, shape):
  params = {"moe_layers": {"attn": {name: jnp.zeros(shape)}}}
  grads = random_like(params, 3)
  lr = 0.01
  opt = muonclip(lr, weight_decay=0.0)
  updates, _ = opt.update(grads, opt.init(params), params)
  u = updates["moe_layers"]["attn"][name]
  # NS5 leaves singular values in ~[0.7, 1.1], so the RMS sits a little under 0.2 lr.
  assert 0.7 * 0.2 * lr < rms(u) < 1.1 * 0.2 * lr, rms(u) / lr


def test_muon_whole_attention_matrix_not_per_head():
  """q_b_rnq is one R x (N*Q) matrix: its update differs from orthogonalising each head alone."""
  params = {"moe_layers": {"attn": {"q_b_rnq": jnp.zeros((1, 16, 4, 6))}}}
  grads = random_like(params, 4)
  opt = muonclip(1.0, weight_decay=0.0, nesterov=False, ns_dtype="float32")
  u = opt.update(grads, opt.init(params), params)[0]["moe_layers"]["attn"]["q_b_rnq"]
  g = grads["moe_layers"]["attn"]["q_b_rnq"]
  whole = -0.2 * np.sqrt(24) * newton_schulz5(g.reshape(1, 16, 24)).reshape(g.shape)
  np.testing.assert_allclose(u, whole, atol=1e-5)
  per_head = -0.2 * np.sqrt(16) * jnp.stack([newton_schulz5(g[:, :, h]) for h in range(4)], axis=2)
  assert float(jnp.abs(u - per_head).max()) > 1e-2


def test_muon_per_expert_and_per_layer():
  params = {"moe_layers": {"moe": {"experts": {"gate_edf": jnp.zeros((2, 3, 16, 8)),
                                                "down_efd": jnp.zeros((2, 3, 8, 16))}}}}
  opt = muonclip(0.1, weight_decay=0.0)
  update = jax.jit(opt.update)
  g1, g2 = random_like(params, 5), random_like(params, 6)
  s = opt.init(params)
  _, s = update(g1, s, params)
  full, _ = update(g2, s, params)
  for l in range(2):
    for e in range(3):
      sl = lambda t: jax.tree.map(lambda x: x[l:l + 1, e:e + 1], t)
      s1 = opt.init(sl(params))
      _, s1 = update(sl(g1), s1, sl(params))
      alone, _ = update(sl(g2), s1, sl(params))
      for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(sl(full))):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_muon_momentum_and_nesterov():
  params = {"moe_layers": {"attn": {"q_a_dr": jnp.zeros((1, 12, 20))}}}
  g1, g2 = random_like(params, 7), random_like(params, 8)
  opt = muonclip(1.0, weight_decay=0.0, momentum=0.95, ns_dtype="float32")
  s = opt.init(params)
  _, s = opt.update(g1, s, params)
  u2, _ = opt.update(g2, s, params)
  a, b = g1["moe_layers"]["attn"]["q_a_dr"], g2["moe_layers"]["attn"]["q_a_dr"]
  m2 = 0.95 * a + b
  expected = -0.2 * np.sqrt(20) * newton_schulz5(b + 0.95 * m2)
  np.testing.assert_allclose(u2["moe_layers"]["attn"]["q_a_dr"], expected, atol=1e-5)


# ---- AdamW leaves, decay, none ------------------------------------------------------------------


def test_adamw_leaves_match_optax_adamw():
  params = {"embed_vd": jnp.ones((10, 6)), "final_norm_d": jnp.ones((6,)), "lm_head_dv": jnp.ones((6, 10)),
            "moe_layers": {"attn_norm_d": jnp.ones((2, 6))}}
  sched = optax.linear_schedule(1e-3, 5e-4, 10)
  ours = muonclip(sched, weight_decay=0.1, adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8)
  ref = optax.adamw(sched, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
  p1 = p2 = params
  s1, s2 = ours.init(params), ref.init(params)
  ours_update, ref_update = jax.jit(ours.update), jax.jit(ref.update)
  for step in range(3):
    g = random_like(params, 10 + step)
    u1, s1 = ours_update(g, s1, p1)
    u2, s2 = ref_update(g, s2, p2)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)


@pytest.fixture(scope="module")
def full_step():
  """One compiled update over a realistic tree (lr 0.02, wd 0.1), shared by the tests below."""
  params = make_params()
  opt = muonclip(0.02, weight_decay=0.1)
  return params, opt.init(params), jax.jit(opt.update)


def test_weight_decay_is_decoupled_and_router_bias_frozen(full_step):
  params, state, update = full_step
  lr, wd = 0.02, 0.1
  omap = om.build_optimizer_map(params)
  flat_p = dict(zip(omap, jax.tree.leaves(params)))
  zeros = jax.tree.map(np.zeros_like, params)
  # Zero gradient: Muon's NS5(0) = 0 and Adam's 0/(0+eps) = 0 leave only the decay term.
  u0, _ = update(zeros, state, params)
  for path, got in zip(omap, jax.tree.leaves(u0)):
    want = 0.0 if omap[path].optimizer == "none" else -lr * wd * np.asarray(flat_p[path])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=path)
  # With a gradient, W enters only through -lr wd W: never through momentum or Adam moments.
  g = random_like(params, 11)
  u_w, _ = update(g, state, params)
  u_0, _ = update(g, state, zeros)
  for path, a, b in zip(omap, jax.tree.leaves(u_w), jax.tree.leaves(u_0)):
    want = 0.0 if omap[path].optimizer == "none" else -lr * wd * np.asarray(flat_p[path])
    np.testing.assert_allclose(np.asarray(a) - np.asarray(b), want, rtol=1e-4, atol=1e-7, err_msg=path)
    if omap[path].optimizer == "muon":  # and Muon's part has RMS ~ 0.2 lr per leaf
      assert 0.7 * 0.2 * lr < rms(b) < 1.1 * 0.2 * lr, path
  assert float(jnp.abs(u_w["moe_layers"]["moe"]["router_bias_e"]).max()) == 0.0


def small_tree(dtype=jnp.float32):
  """One leaf of each kind: AdamW matrix and gains, a stacked expert matrix, the router bias."""
  params = make_params(dtype=dtype)
  moe = params["moe_layers"]
  return {"embed_vd": params["embed_vd"], "final_norm_d": params["final_norm_d"],
          "moe_layers": {"attn_norm_d": moe["attn_norm_d"],
                         "moe": {"router_bias_e": moe["moe"]["router_bias_e"],
                                 "experts": {"gate_edf": moe["moe"]["experts"]["gate_edf"]}}}}


def test_jit_bf16_params():
  params = small_tree(jnp.bfloat16)
  opt = muonclip(optax.linear_schedule(0.0, 1e-3, 5))
  state = opt.init(params)
  assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(state))

  @jax.jit
  def step(p, s, g):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  g = random_like(params, 12)
  p2, s2 = step(params, state, g)
  p3, _ = step(p2, s2, g)
  assert jax.tree.map(lambda x: x.dtype, p3) == jax.tree.map(lambda x: x.dtype, params)
  assert jax.tree.structure(s2) == jax.tree.structure(state)
  assert all(x.dtype == y.dtype for x, y in zip(jax.tree.leaves(s2), jax.tree.leaves(state)))
  assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in jax.tree.leaves(p3))
  assert bool(jnp.any(p3["moe_layers"]["moe"]["experts"]["gate_edf"]
                      != params["moe_layers"]["moe"]["experts"]["gate_edf"]))


# ---- optimizer map ------------------------------------------------------------------------------


@pytest.mark.parametrize("q_lora", [True, False])
def test_optimizer_map_covers_every_leaf_once(q_lora):
  params = make_params(q_lora)
  omap = om.build_optimizer_map(params)
  assert len(omap) == len(jax.tree.leaves(params))
  om.check_optimizer_map(params, omap)
  for path, plan in omap.items():
    name = path.rsplit("/", 1)[-1]
    if name in ("embed_vd", "lm_head_dv") or "_norm_" in name:
      assert plan.optimizer == "adamw", path
    elif name == "router_bias_e":
      assert plan.optimizer == "none", path
    else:
      assert plan.optimizer == "muon", path
      assert plan.batch[0] == "L", path
  views = {p: plan.matrix_shape for p, plan in omap.items()}
  q = "q_b_rnq" if q_lora else "q_dnq"
  assert views[f"moe_layers/attn/{q}"] == (L_MOE, R if q_lora else D, N * (NOPE + P))
  assert views["moe_layers/attn/kv_b_cnu"] == (L_MOE, C, N * (NOPE + VH))
  assert views["moe_layers/attn/o_nhd"] == (L_MOE, N * VH, D)
  assert views["moe_layers/moe/experts/down_efd"] == (L_MOE, E, FE, D)
  assert views["dense_layers/mlp/gate_df"] == (L_DENSE, D, F)
  table = om.format_optimizer_map(omap)
  assert len(table.splitlines()) == len(omap) + 2
  assert "moe_layers/moe/experts/gate_edf" in table and "[L=2,E=4]" in table
  labels = om.optimizer_labels(params)
  assert jax.tree.structure(labels) == jax.tree.structure(params)


def test_optimizer_map_decides_by_name_not_ndim():
  plan = om.plan_leaf("moe_layers/attn_norm_d", (2, 16))  # 2-D but a norm gain
  assert plan.optimizer == "adamw"
  assert om.plan_leaf("embed_vd", (40, 16)).optimizer == "adamw"  # 2-D but an embedding


def test_unknown_or_misshaped_leaf_raises_naming_it():
  params = make_params()
  params["moe_layers"]["attn"]["mystery_dx"] = jnp.zeros((2, 16, 3))
  with pytest.raises(ValueError, match="moe_layers/attn/mystery_dx"):
    om.build_optimizer_map(params)
  with pytest.raises(ValueError, match="moe_layers/attn/mystery_dx"):
    muonclip(1e-3).init(params)
  with pytest.raises(ValueError, match="moe_layers/attn/q_b_rnq"):
    om.plan_leaf("moe_layers/attn/q_b_rnq", (12, 3, 10))  # layer axis missing
  omap = om.build_optimizer_map(make_params())
  del omap["embed_vd"]
  with pytest.raises(ValueError, match="embed_vd"):
    om.check_optimizer_map(make_params(), omap)


def test_custom_rules_and_explicit_map():
  rules = om.DEFAULT_RULES + (om.Rule("*/attn/extra_dd", "adamw"),)
  params = small_tree()
  params["moe_layers"]["attn"] = {"extra_dd": jnp.ones((2, 16, 16))}
  omap = om.build_optimizer_map(params, rules)
  assert omap["moe_layers/attn/extra_dd"].optimizer == "adamw"
  opt = muonclip(1e-3, optimizer_map=omap)
  u, _ = jax.jit(opt.update)(random_like(params, 13), opt.init(params), params)
  assert jax.tree.structure(u) == jax.tree.structure(params)
  with pytest.raises(ValueError, match="extra_dd"):
    om.build_optimizer_map(params)  # the default rules do not know it


# ---- schedules ----------------------------------------------------------------------------------


def approx(x):
  return pytest.approx(x, rel=1e-5)  # schedules evaluate in fp32


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_warmup_stable_decay(decay):
  from k2jax.train.schedules import warmup_stable_decay
  f = warmup_stable_decay(2e-4, warmup_steps=10, stable_steps=20, decay_steps=40, end_value=2e-5,
                          decay=decay)
  v = lambda s: float(f(s))
  assert v(0) == 0.0
  assert v(5) == approx(1e-4)
  assert v(10) == approx(2e-4) and v(29) == approx(2e-4)
  assert v(50) == approx(1.1e-4)  # half-way through the decay, both shapes
  assert 2e-5 < v(60) < 2e-4
  assert v(70) == approx(2e-5) and v(1000) == approx(2e-5)
  assert all(v(s) >= v(s + 1) * (1 - 1e-6) for s in range(10, 80))  # fp32 noise


def test_warmup_cosine_and_k2_schedule():
  from k2jax.train.schedules import k2_pretrain_schedule, warmup_cosine
  f = warmup_cosine(1e-3, warmup_steps=4, decay_steps=8, end_value=1e-4, init_value=1e-5)
  assert float(f(0)) == approx(1e-5)
  assert float(f(4)) == approx(1e-3)
  assert float(f(8)) == approx(5.5e-4)
  assert float(f(12)) == approx(1e-4) and float(f(100)) == approx(1e-4)
  k2 = k2_pretrain_schedule()
  assert float(k2(500)) == approx(2e-4)
  assert float(k2(100_000)) == approx(2e-4)
  assert float(k2(10_000_000)) == approx(2e-5)


def test_k2_full_size_map_and_state_shapes_without_weights():
  """K2's real shapes as ShapeDtypeStructs: the map and optimizer state are built without memory."""
  v, d, f, fe, e, r, c, p, n, nope, vh = 163840, 7168, 18432, 2048, 384, 1536, 512, 64, 64, 128, 128
  bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)

  def layers(l, moe):
    attn = {"q_a_dr": bf(l, d, r), "q_a_norm_r": bf(l, r), "q_b_rnq": bf(l, r, n, nope + p),
            "kv_a_da": bf(l, d, c + p), "kv_a_norm_c": bf(l, c), "kv_b_cnu": bf(l, c, n, nope + vh),
            "o_nhd": bf(l, n, vh, d)}
    tree = {"attn_norm_d": bf(l, d), "attn": attn, "mlp_norm_d": bf(l, d)}
    if moe:
      tree["moe"] = {"router_de": bf(l, d, e), "router_bias_e": jax.ShapeDtypeStruct((l, e), jnp.float32),
                     "experts": {"gate_edf": bf(l, e, d, fe), "up_edf": bf(l, e, d, fe),
                                 "down_efd": bf(l, e, fe, d)},
                     "shared": {"gate_df": bf(l, d, fe), "up_df": bf(l, d, fe), "down_fd": bf(l, fe, d)}}
    else:
      tree["mlp"] = {"gate_df": bf(l, d, f), "up_df": bf(l, d, f), "down_fd": bf(l, f, d)}
    return tree

  params = {"embed_vd": bf(v, d), "dense_layers": layers(1, False), "moe_layers": layers(60, True),
            "final_norm_d": bf(d), "lm_head_dv": bf(d, v)}
  omap = om.build_optimizer_map(params)
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(params)) == 1_026_408_232_448
  assert omap["moe_layers/moe/experts/gate_edf"].matrix_shape == (60, 384, 7168, 2048)
  assert omap["moe_layers/attn/q_b_rnq"].matrix_shape == (60, 1536, 64 * 192)
  assert omap["moe_layers/attn/o_nhd"].matrix_shape == (60, 64 * 128, 7168)
  state = jax.eval_shape(muonclip(2e-4).init, params)
  state_numel = sum(np.prod(x.shape) for x in jax.tree.leaves(state))
  n_muon = sum(np.prod(pl.shape) for pl in omap.values() if pl.optimizer == "muon")
  n_adam = sum(np.prod(pl.shape) for pl in omap.values() if pl.optimizer == "adamw")
  assert state_numel - n_muon - 2 * n_adam < 10  # momentum for Muon, two moments for AdamW, counters


@pytest.mark.parametrize("preset", ["tiny", "tiny_no_qlora", "k2_thinking"])
def test_map_covers_the_models_own_parameter_tree(preset):
  from k2jax import params as params_lib
  from k2jax import presets
  tree = params_lib.abstract_params(presets.get(preset))
  omap = om.build_optimizer_map(tree)
  assert len(omap) == len(jax.tree.leaves(tree))
  assert {p.optimizer for p in omap.values()} == {"muon", "adamw", "none"}


def test_matrices_adamw_is_optax_adamw_on_every_trained_leaf():
  """matrices='adamw' (the RL option): every leaf but the router bias takes optax's AdamW step."""
  params, lr, wd = make_params(), 1e-3, 0.1
  g1, g2 = random_like(params, 3), random_like(params, 4)
  ours, ref = muonclip(lr, weight_decay=wd, matrices="adamw"), optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8,
                                                                          weight_decay=wd)
  s, r = ours.init(params), ref.init(params)
  for g in (g1, g2):  # two steps: the moments carry over
    u, s = ours.update(g, s, params)
    v, r = ref.update(g, r, params)
  omap = om.build_optimizer_map(params)
  for path, a, b in zip(omap, jax.tree.leaves(u), jax.tree.leaves(v)):
    want = 0.0 if omap[path].optimizer == "none" else np.asarray(b)
    np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-9, err_msg=path)
  with pytest.raises(ValueError, match="matrices must be"):
    muonclip(lr, matrices="sgd")
