"""Flash-attention forward as a Pallas kernel (TPU Mosaic / GPU Triton), for MLA's two layouts.

One program per (batch row, head, query block): the query block stays in VMEM / registers, key and value
blocks stream through an online softmax, and only key blocks up to the block's last valid query index are
visited (causality; a cache's filled length), so decode over a long cache reads the short sequence.
Keys are [B, Hk, S, D] with Hk = N (per-head; training, prefill) or Hk = 1 (the absorbed latent, shared by
every head; decode). q/k head dim and v head dim differ (MLA: 192 / 128; absorbed: 576 / 512).
Returns the output, the logsumexp and the running max per row; `k2jax.attention.flash` owns the masks'
meaning, the XLA reference path and the backward (recomputed blockwise in XLA from the logsumexp).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

NEG_INF = -1e30


def _kernel(q_ref, k_ref, v_ref, qseg_ref, qidx_ref, kseg_ref, o_ref, lse_ref, m_ref, *, scale, bk, n_kblocks):
  q = q_ref[...].astype(jnp.float32)                 # [bq, D]
  q_seg, q_idx = qseg_ref[...], qidx_ref[...]        # [bq]
  bq = q.shape[0]
  hi = jnp.max(jnp.where(q_seg != 0, q_idx, -1))
  n_blocks = jnp.clip((hi + bk) // bk, 0, n_kblocks)

  def body(j, carry):
    m, l, acc = carry
    k0 = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(k0, bk), :].astype(jnp.float32)  # [bk, D]
    v = v_ref[pl.ds(k0, bk), :].astype(jnp.float32)  # [bk, Dv]
    k_seg = kseg_ref[pl.ds(k0, bk)]
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    k_idx = k0 + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    keep = ((k_idx <= q_idx[:, None]) & (q_seg[:, None] != 0) & (k_seg[None, :] == q_seg[:, None])
            & (k_seg[None, :] != 0))
    s = jnp.where(keep, s, NEG_INF)
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.where(keep, jnp.exp(s - m_new[:, None]), 0.0)
    corr = jnp.exp(m - m_new)
    acc = acc * corr[:, None] + jnp.dot(p, v, preferred_element_type=jnp.float32)
    return m_new, l * corr + p.sum(axis=1), acc

  dv = v_ref.shape[-1]
  init = (jnp.full((bq,), NEG_INF, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, dv), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
  o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(jnp.maximum(l, 1e-30))
  m_ref[...] = m


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "interpret"))
def flash_forward(q_bntd, k_bhsd, v_bhsv, q_seg_bt, q_index_bt, k_seg_bs, *, scale: float, block_q: int = 128,
                  block_k: int = 128, interpret: Any = False):
  """out [B, N, T, Dv] (v's dtype), logsumexp [B, N, T] and row max [B, N, T] (fp32).

  T must be a multiple of block_q and S of block_k (the caller pads; padded keys have segment 0).
  """
  B, N, T, D = q_bntd.shape
  Hk, S, Dv = k_bhsd.shape[1], k_bhsd.shape[2], v_bhsv.shape[-1]
  if Hk not in (1, N) or T % block_q or S % block_k:
    raise ValueError(f"q {q_bntd.shape}, k {k_bhsd.shape}: need Hk in (1, N), T % {block_q} == S % {block_k} == 0")
  kv_head = (lambda n: n) if Hk == N else (lambda n: 0)
  kernel = functools.partial(_kernel, scale=scale, bk=block_k, n_kblocks=S // block_k)
  row = pl.BlockSpec((None, None, block_q), lambda b, n, i: (b, n, i))
  return pl.pallas_call(
      kernel,
      grid=(B, N, T // block_q),
      in_specs=[
          pl.BlockSpec((None, None, block_q, D), lambda b, n, i: (b, n, i, 0)),
          pl.BlockSpec((None, None, S, D), lambda b, n, i: (b, kv_head(n), 0, 0)),
          pl.BlockSpec((None, None, S, Dv), lambda b, n, i: (b, kv_head(n), 0, 0)),
          pl.BlockSpec((None, block_q), lambda b, n, i: (b, i)),
          pl.BlockSpec((None, block_q), lambda b, n, i: (b, i)),
          pl.BlockSpec((None, S), lambda b, n, i: (b, 0)),
      ],
      out_specs=[pl.BlockSpec((None, None, block_q, Dv), lambda b, n, i: (b, n, i, 0)), row, row],
      out_shape=[jax.ShapeDtypeStruct((B, N, T, Dv), v_bhsv.dtype),
                 jax.ShapeDtypeStruct((B, N, T), jnp.float32), jax.ShapeDtypeStruct((B, N, T), jnp.float32)],
      interpret=interpret,
  )(q_bntd, k_bhsd, v_bhsv, q_seg_bt, q_index_bt, k_seg_bs)
