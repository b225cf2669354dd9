"""The Pallas flash-attention kernels (forward, dQ, dK/dV) against the plain full-score path, run interpreted
on CPU (no accelerator in CI): the generic interpreter (`interpret=True`, the GPU kernels) and the TPU
interpreter (`pltpu.InterpretParams()`); and the 1T config's shapes lowered for Mosaic and Triton."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from k2jax import presets
from k2jax.attention.flash import Mask, reference_attention
from k2jax.kernels import flash_attention as fa
from k2jax.kernels.flash_attention import flash_mha

jax.config.update("jax_default_matmul_precision", "highest")
B, N, T, D, Dv = 2, 2, 64, 192, 128  # MLA's head dims: q/k 192 (nope 128 + rope 64), v 128
# Row 0: two packed documents then padding; row 1: one document then padding (segment 0).
SEG = jnp.array([[1] * 20 + [2] * 30 + [0] * 14, [1] * 60 + [0] * 4], jnp.int32)
IDX = jnp.broadcast_to(jnp.arange(T), (B, T)).astype(jnp.int32)
INTERPRETERS = {"interpret": ("gpu", True), "tpu_interpret": ("tpu", pltpu.InterpretParams())}


def _plain(q, k, v, scale):
  """Reference out [B, N, T, Dv], logsumexp [B, N, T] and max logit [N] from the full fp32 scores."""
  shared = k.shape[1] == 1
  kr = k[:, 0] if shared else k.transpose(0, 2, 1, 3)
  vr = v[:, 0] if shared else v.transpose(0, 2, 1, 3)
  mask = Mask(SEG, IDX, SEG)
  out, mx = reference_attention((q.transpose(0, 2, 1, 3),), (kr,), vr, mask, scale)
  s = jnp.einsum("bntd,bnsd->bnts", q, jnp.broadcast_to(k, (B, N, T, D))) * scale
  lse = jax.nn.logsumexp(jnp.where(mask.dense(T)[:, None], s, -1e30), axis=-1)
  return out.transpose(0, 2, 1, 3), lse, mx


@pytest.mark.parametrize("interpreter", list(INTERPRETERS))
@pytest.mark.parametrize("shared_kv", [False, True])
def test_pallas_flash_equals_plain_values_lse_max_and_grads(interpreter, shared_kv):
  """Causal + packed segments + padding, several query and key blocks; gradients through out and lse."""
  platform, interpret = INTERPRETERS[interpreter]
  ks = jax.random.split(jax.random.key(0), 5)
  hk = 1 if shared_kv else N
  q = jax.random.normal(ks[0], (B, N, T, D))
  k, v = jax.random.normal(ks[1], (B, hk, T, D)), jax.random.normal(ks[2], (B, hk, T, Dv))
  w_out, w_lse = jax.random.normal(ks[3], (B, N, T, Dv)), jax.random.normal(ks[4], (B, N, T))
  valid = np.asarray(SEG != 0)[:, None, :]

  def pallas(q, k, v):
    return flash_mha(q, k, v, SEG, IDX, SEG, scale=0.1, block_q=16, block_k=32, platform=platform,
                     interpret=interpret)

  def loss(fn, q, k, v):
    out, lse, mx = fn(q, k, v)
    return jnp.sum(jnp.where(valid[..., None], out * w_out, 0)) + jnp.sum(jnp.where(valid, lse * w_lse, 0)), (
        out, lse, mx)

  grad = lambda fn: jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  (_, (o1, lse1, m1)), g1 = grad(pallas)
  (_, (o2, lse2, m2)), g2 = grad(lambda q, k, v: _plain(q, k, v, 0.1))
  rel = lambda a, b: np.abs(np.where(valid[..., None] if a.ndim == 4 else valid, a - b, 0)).max() / np.abs(b).max()
  assert rel(o1, o2) <= 1e-5
  assert rel(lse1, np.where(valid, lse2, 1.0)) <= 1e-5
  np.testing.assert_allclose(m1.max(axis=(0, 2)), m2, rtol=1e-5)
  assert np.all(np.asarray(o1).transpose(0, 2, 1, 3)[~np.asarray(SEG != 0)] == 0)  # padding: 0, not NaN
  for name, a, b in zip("qkv", g1, g2):
    assert np.all(np.isfinite(a)), name
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), (name, np.abs(a - b).max() / np.abs(b).max())
  assert np.all(np.asarray(g1[0]).transpose(0, 2, 1, 3)[~np.asarray(SEG != 0)] == 0)  # padded rows: no grad


def test_pallas_decode_reads_the_filled_length_of_a_cache():
  """One query per row at its own offset in a 64-slot latent cache; NaN past the filled length is never read."""
  S, d, dv = 64, 12, 8
  ks = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(ks[0], (B, N, 8, d))
  k, v = jax.random.normal(ks[1], (B, 1, S, d)), jax.random.normal(ks[2], (B, 1, S, dv))
  lengths = jnp.array([5, 20])
  k = jnp.where(jnp.arange(S)[None, None, :, None] > 31, jnp.nan, k)  # beyond every row's key blocks
  seg = jnp.zeros((B, 8), jnp.int32).at[:, 0].set(1)
  idx = (lengths[:, None] + jnp.arange(8)).astype(jnp.int32)
  out, _, _ = flash_mha(q, k, v, seg, idx, jnp.ones((B, S), jnp.int32), scale=0.5, block_q=8, block_k=16,
                        platform="gpu", interpret=True)
  want, _ = reference_attention((q.transpose(0, 2, 1, 3)[:, :1],), (k[:, 0, :32],), v[:, 0, :32],
                                Mask(seg[:, :1], idx[:, :1]), 0.5)
  np.testing.assert_allclose(np.asarray(out[:, :, 0]), np.asarray(want[:, 0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_1t_shapes_lower_for_mosaic_and_triton(platform):
  """K2's per-head (q/k 192, v 128) and absorbed (576 / 512) layouts, forward and backward, pass the
  backend's block-shape rules (TPU (8, 128) tiles; Triton powers of two) at its default blocks."""
  c = presets.K2_THINKING
  n, T = c.num_attention_heads, 2048
  layouts = {"per_head": (n, c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim),
             "absorbed": (1, c.kv_lora_rank + c.qk_rope_head_dim, c.kv_lora_rank)}
  for hk, d, dv in layouts.values():
    sds = jax.ShapeDtypeStruct
    args = (sds((1, n, T, d), jnp.bfloat16), sds((1, hk, T, d), jnp.bfloat16), sds((1, hk, T, dv), jnp.bfloat16),
            *[sds((1, T), jnp.int32)] * 3)

    def loss(q, k, v, *masks):
      out, lse, _ = flash_mha(q, k, v, *masks, scale=0.1, platform=platform)
      return out.astype(jnp.float32).sum() + lse.sum()

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
        lowering_platforms=("tpu" if platform == "tpu" else "cuda",))
    assert lowered.as_text()


def test_1t_decode_lowers_for_triton():
  """K2's absorbed decode step (64 heads, latent 512 + rope 64) over a 32k-slot cache stack, for Triton."""
  from k2jax.kernels.flash_decode import flash_decode
  c, sds = presets.K2_THINKING, jax.ShapeDtypeStruct
  n, C, Pd, S = c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim, 32768
  args = ((sds((4, 1, n, C), jnp.bfloat16), sds((4, 1, n, Pd), jnp.bfloat16)),
          (sds((2, 4, S, C), jnp.bfloat16), sds((2, 4, S, Pd), jnp.bfloat16)), sds((2, 4, S, C), jnp.bfloat16),
          sds((), jnp.int32), sds((4, 1), jnp.int32), sds((4, 1), jnp.int32))
  fn = lambda *a: flash_decode(*a, scale=0.1)
  assert jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_hardware_blocks_are_validated():
  with pytest.raises(ValueError, match=r"multiples of \(8, 128\)"):
    fa.fit_blocks(1024, 1024, 256, 64, "tpu", strict=True)
  with pytest.raises(ValueError, match="powers of two"):
    fa.fit_blocks(1024, 1024, 48, 64, "gpu", strict=True)
  assert fa.fit_blocks(37, 37, 256, 256, "tpu", strict=True) == (40, 40)  # one block covers a short sequence
  assert fa.fit_blocks(37, 100, 64, 64, "gpu", strict=True) == (64, 64)
  assert (fa.head_dim(192, "tpu"), fa.head_dim(576, "tpu"), fa.head_dim(192, "gpu")) == (256, 640, 256)


def test_bf16_inputs_stay_close_to_the_fp32_reference():
  """bf16 q, k, v (head dims padded, fp32 inside the kernels): out and gradients in bf16 within bf16's error."""
  ks = jax.random.split(jax.random.key(3), 4)
  q, k = jax.random.normal(ks[0], (B, N, T, D)), jax.random.normal(ks[1], (B, N, T, D))
  v, w = jax.random.normal(ks[2], (B, N, T, Dv)), jax.random.normal(ks[3], (B, N, T, Dv))
  valid = np.asarray(SEG != 0)[:, None, :, None]
  bf = lambda x: x.astype(jnp.bfloat16)

  def loss(q, k, v):
    out = flash_mha(q, k, v, SEG, IDX, SEG, scale=0.1, block_q=16, block_k=32, platform="gpu", interpret=True)[0]
    return jnp.sum(jnp.where(valid, out.astype(jnp.float32) * w, 0))

  g1 = jax.grad(loss, argnums=(0, 1, 2))(bf(q), bf(k), bf(v))
  g2 = jax.grad(lambda q, k, v: jnp.sum(jnp.where(valid, _plain(q, k, v, 0.1)[0] * w, 0)), argnums=(0, 1, 2))(
      *(bf(x).astype(jnp.float32) for x in (q, k, v)))
  for a, b in zip(g1, g2):
    assert a.dtype == jnp.bfloat16
    assert np.abs(np.asarray(a, np.float32) - b).max() <= 2e-2 * np.abs(b).max()


def test_dispatch_picks_the_kernel_per_backend():
  from k2jax.kernels import dispatch
  k2 = (192, 128, 2)  # K2's per-head q/k and v dims, bf16
  assert dispatch.flash_attention_impl(65536, *k2, backend="gpu")[:2] == ("gpu", "pallas")
  assert dispatch.flash_attention_impl(4096, *k2, backend="tpu")[:2] == ("tpu", "pallas")
  assert dispatch.flash_attention_impl(65536, *k2, backend="tpu")[:2] == ("tpu", "xla")  # K/V past VMEM
  assert dispatch.flash_attention_impl(4096, *k2, backend="cpu")[:2] == ("cpu", "xla")
  assert dispatch.flash_attention_impl(backend="cpu", impl="pallas") == ("gpu", "pallas", True)
  with pytest.raises(ValueError, match="attention impl"):
    dispatch.flash_attention_impl(impl="triton")


def test_pallas_decode_splits_the_filled_length_of_a_latent_cache_stack():
  """Split-K decode over layer 1 of a [L, B, S, .] stack (two-token steps, 3 heads, a partial last key block)
  equals the plain path; NaN in the other layer and past row 0's filled blocks is never read."""
  from k2jax.kernels.flash_decode import flash_decode
  S, C, Pd, n, t = 72, 32, 8, 3, 2
  ks = jax.random.split(jax.random.key(4), 4)
  q = (jax.random.normal(ks[0], (B, t, n, C)), jax.random.normal(ks[1], (B, t, n, Pd)))
  c_lbsc, pe_lbsp = jax.random.normal(ks[2], (2, B, S, C)), jax.random.normal(ks[3], (2, B, S, Pd))
  lengths = jnp.array([5, 66])
  seg = jnp.array([[1, 0], [1, 1]], jnp.int32)
  idx = (lengths[:, None] + jnp.arange(t)).astype(jnp.int32)
  want, m_want = reference_attention(q, (c_lbsc[1], pe_lbsp[1]), c_lbsc[1], Mask(seg, idx), 0.3)
  unread = (jnp.arange(2)[:, None, None, None] == 0) | (
      (jnp.arange(B)[None, :, None, None] == 0) & (jnp.arange(S)[None, None, :, None] >= 16))
  c_lbsc, pe_lbsp = jnp.where(unread, jnp.nan, c_lbsc), jnp.where(unread, jnp.nan, pe_lbsp)
  out, mx = flash_decode(q, (c_lbsc, pe_lbsp), c_lbsc, 1, seg, idx, scale=0.3, block_k=16, split_blocks=2,
                         interpret=True)
  valid = np.asarray(seg != 0)
  np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(want)[valid], rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(out)[~valid] == 0)
  np.testing.assert_allclose(np.where(valid[..., None], mx, -np.inf).max(axis=(0, 1)), m_want, rtol=1e-6)
