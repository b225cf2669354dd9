"""The Pallas flash-attention forward against the plain full-score path, run interpreted on CPU
(no accelerator in CI): the generic interpreter (`interpret=True`, the GPU kernel) and the TPU
interpreter (`pltpu.InterpretParams()`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from k2jax.attention.flash import Mask, reference_attention
from k2jax.kernels.flash_attention import flash_forward

jax.config.update("jax_default_matmul_precision", "highest")
B, N, D, Dv = 2, 2, 12, 8


@pytest.mark.parametrize("interpret", ["interpret", "tpu_interpret"])
@pytest.mark.parametrize("shared_kv", [False, True])
def test_pallas_flash_forward_equals_plain(interpret, shared_kv):
  T = 32
  ks = jax.random.split(jax.random.key(0), 3)
  hk = 1 if shared_kv else N
  q = jax.random.normal(ks[0], (B, N, T, D))
  k, v = jax.random.normal(ks[1], (B, hk, T, D)), jax.random.normal(ks[2], (B, hk, T, Dv))
  seg = jnp.array([[1] * 10 + [2] * 16 + [0] * 6, [1] * 30 + [0] * 2], jnp.int32)  # packed + padding
  idx = jnp.broadcast_to(jnp.arange(T), (B, T)).astype(jnp.int32)
  interp = True if interpret == "interpret" else pltpu.InterpretParams()
  out, lse, m = flash_forward(q, k, v, seg, idx, seg, scale=0.3, block_q=8, block_k=16, interpret=interp)
  # The reference's layouts: q [B, T, N, D]; per-head k [B, S, N, D] or shared [B, S, D].
  kr = k[:, 0] if shared_kv else k.transpose(0, 2, 1, 3)
  vr = v[:, 0] if shared_kv else v.transpose(0, 2, 1, 3)
  want, mx = reference_attention((q.transpose(0, 2, 1, 3),), (kr,), vr, Mask(seg, idx, seg), 0.3)
  valid = np.asarray(seg != 0)
  np.testing.assert_allclose(np.asarray(out.transpose(0, 2, 1, 3))[valid], np.asarray(want)[valid], atol=1e-5)
  np.testing.assert_allclose(m.max(axis=(0, 2)), mx, rtol=1e-6)


def test_pallas_decode_reads_the_filled_length_of_a_cache():
  """One query per row at its own offset in a 64-slot latent cache; NaN past the filled length is never read."""
  S = 64
  ks = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(ks[0], (B, N, 8, D))
  k, v = jax.random.normal(ks[1], (B, 1, S, D)), jax.random.normal(ks[2], (B, 1, S, Dv))
  lengths = jnp.array([5, 20])
  k = jnp.where(jnp.arange(S)[None, None, :, None] > 31, jnp.nan, k)  # beyond every row's key blocks
  seg = jnp.zeros((B, 8), jnp.int32).at[:, 0].set(1)
  idx = (lengths[:, None] + jnp.arange(8)).astype(jnp.int32)
  out, _, _ = flash_forward(q, k, v, seg, idx, jnp.ones((B, S), jnp.int32), scale=0.5, block_q=8, block_k=16,
                            interpret=True)
  want, _ = reference_attention((q.transpose(0, 2, 1, 3)[:, :1],), (k[:, 0, :32],), v[:, 0, :32],
                                Mask(seg[:, :1], idx[:, :1]), 0.5)
  np.testing.assert_allclose(np.asarray(out[:, :, 0]), np.asarray(want[:, 0]), atol=1e-5)
