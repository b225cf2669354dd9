"""Blockwise (flash) attention against the plain full-score path: values, max logits and gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax import model as model_lib, params as params_lib, presets, sharding
from k2jax.attention import attend, flash
from k2jax.attention.flash import Mask, flash_attention, reference_attention

jax.config.update("jax_default_matmul_precision", "highest")

B, T, N, K, P, H = 2, 37, 3, 8, 4, 5
# Packed segments (row 0: two documents), padding (segment 0) at the ends.
SEG = np.array([[1] * 10 + [2] * 20 + [0] * 7, [1] * 30 + [0] * 7], np.int32)


def _inputs(shared_v: bool, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = (jax.random.normal(ks[0], (B, T, N, K)), jax.random.normal(ks[1], (B, T, N, P)))
  k = (jax.random.normal(ks[2], (B, T, N, K)), jax.random.normal(ks[3], (B, T, P)))  # rope key shared by heads
  v = jax.random.normal(ks[4], (B, T, H) if shared_v else (B, T, N, H))
  return q, k, v


@pytest.mark.parametrize("shared_v", [False, True])
@pytest.mark.parametrize("blocks", [(8, 16), (16, 5), (64, 64)])
def test_flash_equals_plain_values_max_logits_and_grads(shared_v, blocks):
  q, k, v = _inputs(shared_v)
  idx = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask = Mask(jnp.asarray(SEG), idx, jnp.asarray(SEG))
  valid = jnp.asarray(SEG != 0)[:, :, None, None]
  w = jax.random.normal(jax.random.key(9), (B, T, N, H))

  def run(fn, q, k, v):
    out, mx = fn(q, k, v)
    return jnp.sum(jnp.where(valid, out * w, 0.0)), (out, mx)

  flash = lambda q, k, v: flash_attention(q, k, v, mask, 0.3, block_q=blocks[0], block_k=blocks[1])
  plain = lambda q, k, v: reference_attention(q, k, v, mask, 0.3)
  (_, (o1, m1)), g1 = jax.value_and_grad(lambda *a: run(flash, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  (_, (o2, m2)), g2 = jax.value_and_grad(lambda *a: run(plain, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_allclose(np.where(valid, o1, 0), np.where(valid, o2, 0), atol=1e-5, rtol=1e-5)
  assert np.all(np.asarray(o1)[SEG == 0] == 0)  # rows that see no key give 0, not NaN
  np.testing.assert_allclose(m1, m2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), np.abs(a - b).max()


@pytest.mark.parametrize("impl", ["flash", "pallas", "pallas_mesh"])
def test_flash_reads_a_layer_of_a_cache_stack(impl):
  """The absorbed layout: one shared key/value per token, read from layer 1 of a [L, B, S, .] stack
  (by the split-K decode kernel for "pallas", per (batch, head) shard under a mesh for "pallas_mesh")."""
  S, C = 40, 6
  ks = jax.random.split(jax.random.key(1), 4)
  q = (jax.random.normal(ks[0], (B, 3, N, C)), jax.random.normal(ks[1], (B, 3, N, P)))
  c_lbsc, pe_lbsp = jax.random.normal(ks[2], (2, B, S, C)), jax.random.normal(ks[3], (2, B, S, P))
  start = jnp.array([5, 21])
  mask = Mask(jnp.array([[1, 1, 0], [1, 1, 1]]), start[:, None] + jnp.arange(3))
  if impl == "flash":
    got, m1 = flash_attention(q, (c_lbsc, pe_lbsp), c_lbsc, mask, 0.5, block_q=2, block_k=16, layer=1)
  elif impl == "pallas":
    got, m1 = attend(q, (c_lbsc, pe_lbsp), c_lbsc, mask, 0.5, impl="pallas", layer=1)
  else:
    with sharding.use_mesh(sharding.make_mesh("data:2,fsdp:4")):
      got, m1 = jax.jit(lambda q, k, v: attend(q, k, v, mask, 0.5, impl="pallas", layer=1))(
          q, (c_lbsc, pe_lbsp), c_lbsc)
  want, m2 = reference_attention(q, (c_lbsc[1], pe_lbsp[1]), c_lbsc[1], mask, 0.5)
  valid = np.asarray(mask.q_seg_bt != 0)
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(m1, m2, rtol=1e-6)


@pytest.mark.parametrize("starts", [(5, 21), (5, 140), (250, 290)])
def test_cached_tile_reads_only_the_filled_keys(starts):
  """A cached step's single tile scores keys up to the filled length (rounded up to 128) only: equal to
  the plain path over the whole cache, whichever length branch the filled length picks."""
  S, C = 300, 6
  ks = jax.random.split(jax.random.key(3), 4)
  q = (jax.random.normal(ks[0], (B, 3, N, C)), jax.random.normal(ks[1], (B, 3, N, P)))
  c_lbsc, pe_lbsp = jax.random.normal(ks[2], (2, B, S, C)), jax.random.normal(ks[3], (2, B, S, P))
  mask = Mask(jnp.array([[1, 1, 0], [1, 1, 1]]), jnp.array(starts)[:, None] + jnp.arange(3))
  got, m1 = jax.jit(lambda q, k, v: attend(q, k, v, mask, 0.5, impl="flash", layer=1))(q, (c_lbsc, pe_lbsp), c_lbsc)
  want, m2 = reference_attention(q, (c_lbsc[1], pe_lbsp[1]), c_lbsc[1], mask, 0.5)
  valid = np.asarray(mask.q_seg_bt != 0)
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(m1, m2, rtol=1e-6)


@pytest.mark.parametrize("shared", [False, True])
def test_pallas_attention_under_a_mesh_splits_batch_and_heads(shared):
  """Under `use_mesh` the kernels run per (batch, head) shard in shard_map; values and gradients as plain
  (a shared key/value is replicated over the head shards, its gradient summed over them)."""
  ks = jax.random.split(jax.random.key(2), 5)
  q = (jax.random.normal(ks[0], (B, T, 4, K)), jax.random.normal(ks[1], (B, T, 4, P)))  # 2 heads per shard
  k = (jax.random.normal(ks[2], (B, T, K) if shared else (B, T, 4, K)), jax.random.normal(ks[3], (B, T, P)))
  v = jax.random.normal(ks[4], (B, T, H) if shared else (B, T, 4, H))
  mask = Mask(jnp.asarray(SEG), jnp.broadcast_to(jnp.arange(T), (B, T)), jnp.asarray(SEG))
  w = jax.random.normal(jax.random.key(9), (B, T, 4, H))
  valid = jnp.asarray(SEG != 0)[:, :, None, None]

  def loss(impl, q, k, v):
    out, mx = attend(q, k, v, mask, 0.3, impl=impl)
    return jnp.sum(jnp.where(valid, out * w, 0.0)), mx

  with sharding.use_mesh(sharding.make_mesh("data:2,fsdp:2,tensor:2")):
    (l1, m1), g1 = jax.jit(jax.value_and_grad(functools.partial(loss, "pallas"), argnums=(0, 1, 2),
                                              has_aux=True))(q, k, v)
  (l2, m2), g2 = jax.value_and_grad(functools.partial(loss, "plain"), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  # The loss sums terms of both signs: its rounding is relative to the terms' magnitude, not to the sum.
  terms = jnp.sum(jnp.abs(jnp.where(valid, attend(q, k, v, mask, 0.3, impl="plain")[0] * w, 0.0)))
  assert abs(float(l1) - float(l2)) <= 1e-5 * float(terms), (l1, l2, terms)
  np.testing.assert_allclose(m1, m2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), np.abs(a - b).max()


@pytest.mark.parametrize("impl", ["flash", "pallas"])
def test_model_flash_equals_plain_logits(monkeypatch, impl):
  """The tiny model's forward on XLA's blockwise loop, and on the Pallas kernels forced (interpreted here)."""
  from k2jax.kernels import flash_attention as fa
  monkeypatch.setattr(flash, "BLOCK_Q", 16)  # several tiles at this short length
  monkeypatch.setattr(flash, "BLOCK_K", 8)
  monkeypatch.setitem(fa.DEFAULT_BLOCKS, "gpu", (16, 16))
  c = presets.TINY_NO_QLORA
  p = params_lib.init_params(c, jax.random.key(0), jnp.float32)
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, c.vocab_size)
  o1, o2 = (model_lib.forward(p, c, tokens, segment_ids_bt=jnp.asarray(SEG), attn_impl=i) for i in (impl, "plain"))
  valid = np.asarray(SEG != 0)
  np.testing.assert_allclose(np.asarray(o1.logits)[valid], np.asarray(o2.logits)[valid], atol=1e-4, rtol=1e-5)
  for name in o2.max_attn_logits:
    np.testing.assert_allclose(o1.max_attn_logits[name], o2.max_attn_logits[name], rtol=1e-5)


def test_model_decode_step_on_the_pallas_decode_kernel_equals_plain():
  """A decode step through the model's scanned layers (a traced layer index) with the split-K decode kernel
  (interpreted) against plain attention, from the same prefilled cache (one row shorter, padded)."""
  c = presets.TINY_NO_QLORA
  p = params_lib.init_params(c, jax.random.key(0), jnp.float32)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, c.vocab_size)
  seg = jnp.array([[1] * 12, [1] * 7 + [0] * 5])
  cache = model_lib.forward(p, c, tokens, segment_ids_bt=seg, cache=model_lib.init_cache(c, 2, 40, jnp.float32),
                            attn_impl="plain").cache
  got, want = (model_lib.forward(p, c, tokens[:, :1], cache=cache, attn_impl=impl) for impl in ("pallas", "plain"))
  np.testing.assert_allclose(got.logits, want.logits, atol=1e-5, rtol=1e-5)
  for name in want.max_attn_logits:
    np.testing.assert_allclose(got.max_attn_logits[name], want.max_attn_logits[name], rtol=1e-5)


def test_write_latent_keeps_earlier_entries_near_the_end_of_the_cache():
  """A padded chunk whose window would run past the cache: only the valid tokens land, nothing shifts."""
  from k2jax.attention import write_latent
  cache = jax.random.normal(jax.random.key(0), (2, 2, 10, 3))
  new = jax.random.normal(jax.random.key(1), (2, 4, 3))
  start = jnp.array([8, 1])
  valid = jnp.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)
  got = np.asarray(write_latent(cache, new, 1, start, valid))
  want = np.array(cache)
  want[1, 0, 8:10] = new[0, :2]
  want[1, 1, 1:4] = new[1, :3]
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("output_major", [False, True])
@pytest.mark.parametrize("preset", ["tiny", "tiny_no_qlora"])
def test_absorbed_prefill_with_folded_weights_equals_per_head_attention(preset, output_major):
  """64 tokens per row into an empty cache: W_UK goes into the query weight (the q-LoRA up-projection, or
  the single projection) and W_UV into the output weight; the output, max logits and cached latents equal
  the per-head path's. Also with the projections stored output-major (the engine's decode weights)."""
  from k2jax import attention, model as model_lib, rope
  c = presets.get(preset)
  T = 64
  assert attention.absorbed_folds(c, 2 * T) == (True, True)
  assert attention.absorbed_folds(c, 2) == (False, False)  # decode steps
  assert attention.absorbed_folds(presets.K2_THINKING, 1 << 16) == (False, False)  # C = 512 > nope = 128
  p = jax.tree.map(lambda a: a[0], params_lib.init_params(c, jax.random.key(0), jnp.float32)["moe_layers"])["attn"]
  x = jax.random.normal(jax.random.key(1), (2, T, c.hidden_size))
  seg = jnp.array([[1] * T, [1] * 50 + [0] * 14])
  index = jnp.broadcast_to(jnp.arange(T), (2, T))
  cos, sin = rope.cos_sin(c, index, x.dtype)
  cache = [jnp.zeros((2, 2, 80, d)) for d in (c.kv_lora_rank, c.qk_rope_head_dim)]
  p_absorbed = p
  if output_major:
    p_absorbed = model_lib.output_major_layers({"moe_layers": ({"attn": p},)}, ("attn",))["moe_layers"][0]["attn"]
    assert "o_dnh" in p_absorbed and "o_nhd" not in p_absorbed
  got, m1, cache_c, _ = jax.jit(lambda p, x: attention.mla_absorbed(p, x, c, cos, sin, Mask(seg, index), *cache, 1,
                                                                    jnp.zeros(2, jnp.int32)))(p_absorbed, x)
  want, m2 = jax.jit(lambda p, x: attention.mla(p, x, c, cos, sin, Mask(seg, index, seg), "plain"))(p, x)
  valid = np.asarray(seg != 0)
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(m1, m2, rtol=1e-5)
  np.testing.assert_allclose(cache_c[1, :, :T][valid], attention.latent(p, x, c, cos, sin)[0][valid], rtol=1e-6)
