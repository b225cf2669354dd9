"""Blockwise online-softmax attention in plain XLA (FlashAttention's algorithm, any backend).

Scores are formed one [block_q, block_k] tile at a time, so memory is O(T * block) instead of O(T * S).
Key blocks that no query of a query block can see (past the last valid query index, i.e. above the causal
diagonal or past a cache's filled length) are never visited: the loops have data-dependent trip counts,
which is also what makes a decode step on a short sequence in a long cache cost the short sequence.

Heads come in two layouts, the two MLA needs: per-head keys/values [B, S, N, d] (training and prefill),
or one key/value shared by every head [B, S, d] (the absorbed latent cache; MQA). Keys are the sum of
parts (q_nope.k_nope + q_pe.k_pe) so the shared rope key is never broadcast or concatenated. A leading
layer axis [L, B, S, ...] plus `layer` reads the blocks straight from a scanned cache stack.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully masked (padding) rows stay NaN-free


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Mask:
  """Which keys a query sees: causal by index, same segment, no padding (segment id 0) on either side.

  Key s has index s. `k_seg_bs` None: every key is valid (a cache, where the filled length is enforced by
  causality since queries sit at `q_index_bt` = length + t).
  """
  q_seg_bt: jax.Array
  q_index_bt: jax.Array
  k_seg_bs: jax.Array | None = None

  def block(self, q0, bq: int, k0, bk: int) -> jax.Array:
    """[B, bq, bk] for queries [q0, q0+bq) and keys [k0, k0+bk)."""
    q_seg = jax.lax.dynamic_slice_in_dim(self.q_seg_bt, q0, bq, 1)
    q_idx = jax.lax.dynamic_slice_in_dim(self.q_index_bt, q0, bq, 1)
    k_idx = k0 + jnp.arange(bk)
    m = (k_idx[None, None, :] <= q_idx[:, :, None]) & (q_seg[:, :, None] != 0)
    if self.k_seg_bs is not None:
      k_seg = jax.lax.dynamic_slice_in_dim(self.k_seg_bs, k0, bk, 1)
      m &= (k_seg[:, None, :] == q_seg[:, :, None]) & (k_seg[:, None, :] != 0)
    return m

  def dense(self, S: int) -> jax.Array:
    return self.block(0, self.q_seg_bt.shape[1], 0, S)


def _kv_block(x, j0, bk: int, layer):
  """Keys/values [.., B, S, ...] -> block [B, bk, ...] (from layer `layer` when x is a stack)."""
  if layer is None:
    return jax.lax.dynamic_slice_in_dim(x, j0, bk, 1)
  start = (layer, 0, j0) + (0,) * (x.ndim - 3)
  return jax.lax.dynamic_slice(x, start, (1, x.shape[1], bk) + x.shape[3:])[0]


def _scores(q_parts, k_parts):
  """sum_i q_i . k_i -> [B, N, bq, bk] fp32; a 3-d key part is shared by all heads."""
  s = 0.0
  for q, k in zip(q_parts, k_parts):
    k = k.astype(q.dtype)
    eq = "btnd,bsd->bnts" if k.ndim == 3 else "btnd,bsnd->bnts"
    s = s + jnp.einsum(eq, q, k, preferred_element_type=jnp.float32)
  return s


def _pv(p_bnts, v):
  eq = "bnts,bsh->btnh" if v.ndim == 3 else "bnts,bsnh->btnh"
  return jnp.einsum(eq, p_bnts.astype(v.dtype), v, preferred_element_type=jnp.float32)


def _pad(x, axis: int, to: int, value=0):
  extra = to - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _blocks(T: int, S: int, block_q: int, block_k: int) -> tuple[int, int, int, int]:
  bq, bk = min(block_q, T), min(block_k, S)
  return bq, bk, -(-T // bq) * bq, -(-S // bk) * bk


def _k_hi(mask: Mask, bq: int, bk: int, nq: int, nk: int) -> jax.Array:
  """[nq] key blocks each query block needs: up to its largest valid query index (causality)."""
  idx = jnp.where(mask.q_seg_bt != 0, mask.q_index_bt, -1).reshape(-1, nq, bq).max(axis=(0, 2))
  return jnp.clip((idx + bk) // bk, 0, nk)


def _forward(q_parts, k_parts, v, mask: Mask, scale: float, block_q: int, block_k: int, layer=None):
  """(out [B, T, N, Dv] in v's dtype, logsumexp [B, N, T] fp32, max logit [N] fp32)."""
  B, T, N = q_parts[0].shape[:3]
  S = v.shape[1] if layer is None else v.shape[2]
  bq, bk, Tp, Sp = _blocks(T, S, block_q, block_k)
  q_parts = tuple(_pad(q, 1, Tp) for q in q_parts)
  mask = dataclasses.replace(mask, q_seg_bt=_pad(mask.q_seg_bt, 1, Tp), q_index_bt=_pad(mask.q_index_bt, 1, Tp))
  nq, nk = Tp // bq, Sp // bk
  k_hi = _k_hi(mask, bq, bk, nq, nk)
  dv = v.shape[-1]

  def q_block(i, carry):
    out, lse, mx = carry
    q0 = i * bq
    qb = tuple(jax.lax.dynamic_slice_in_dim(q, q0, bq, 1) for q in q_parts)

    def k_block(j, st):
      m, l, acc = st
      # A last partial block is read as the final bk keys, its already-seen keys masked (no padded copy).
      k0 = jnp.minimum(j * bk, S - bk)
      s = _scores(qb, tuple(_kv_block(k, k0, bk, layer) for k in k_parts)) * scale
      blk = (mask.block(q0, bq, k0, bk) & (k0 + jnp.arange(bk) >= j * bk))[:, None]
      s = jnp.where(blk, s, NEG_INF)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.where(blk, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      acc = acc * jnp.swapaxes(corr, 1, 2)[..., None] + _pv(p, _kv_block(v, k0, bk, layer))
      return m_new, l * corr + p.sum(-1), acc

    init = (jnp.full((B, N, bq), NEG_INF, jnp.float32), jnp.zeros((B, N, bq), jnp.float32),
            jnp.zeros((B, bq, N, dv), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, k_hi[i], k_block, init)
    o = acc / jnp.swapaxes(jnp.where(l > 0, l, 1.0), 1, 2)[..., None]
    out = jax.lax.dynamic_update_slice_in_dim(out, o.astype(out.dtype), q0, 1)
    lse = jax.lax.dynamic_update_slice_in_dim(lse, m + jnp.log(jnp.maximum(l, 1e-30)), q0, 2)
    return out, lse, jnp.maximum(mx, m.max(axis=(0, 2)))

  init = (jnp.zeros((B, Tp, N, dv), v.dtype), jnp.zeros((B, N, Tp), jnp.float32),
          jnp.full((N,), NEG_INF, jnp.float32))
  out, lse, mx = jax.lax.fori_loop(0, nq, q_block, init)
  return out[:, :T], lse[:, :, :T], mx


def _backward(q_parts, k_parts, v, mask: Mask, scale: float, block_q: int, block_k: int, out, lse, d_out):
  """FlashAttention-2's backward: recompute each tile's probabilities from the saved logsumexp."""
  B, T, N = q_parts[0].shape[:3]
  S = v.shape[1]
  bq, bk, Tp, Sp = _blocks(T, S, block_q, block_k)
  f32 = jnp.float32
  delta_bnt = jnp.einsum("btnh,btnh->bnt", d_out.astype(f32), out.astype(f32))
  k_seg = jnp.ones((B, S), jnp.int32) if mask.k_seg_bs is None else mask.k_seg_bs
  mask = Mask(_pad(mask.q_seg_bt, 1, Tp), _pad(mask.q_index_bt, 1, Tp), _pad(k_seg, 1, Sp))
  qs = tuple(_pad(q, 1, Tp) for q in q_parts)
  ks = tuple(_pad(k, 1, Sp) for k in k_parts)
  vp, dop = _pad(v, 1, Sp), _pad(d_out, 1, Tp)
  lse, delta_bnt = _pad(lse, 2, Tp), _pad(delta_bnt, 2, Tp)
  nq, nk = Tp // bq, Sp // bk
  k_hi = _k_hi(mask, bq, bk, nq, nk)

  def q_block(i, carry):
    dqs, dks, dvv = carry
    q0 = i * bq
    qb = tuple(jax.lax.dynamic_slice_in_dim(q, q0, bq, 1) for q in qs)
    do = jax.lax.dynamic_slice_in_dim(dop, q0, bq, 1)
    lse_b = jax.lax.dynamic_slice_in_dim(lse, q0, bq, 2)
    dl_b = jax.lax.dynamic_slice_in_dim(delta_bnt, q0, bq, 2)

    def k_block(j, st):
      dqb, dks, dvv = st
      k0 = j * bk
      kb = tuple(jax.lax.dynamic_slice_in_dim(k, k0, bk, 1) for k in ks)
      vb = jax.lax.dynamic_slice_in_dim(vp, k0, bk, 1)
      blk = mask.block(q0, bq, k0, bk)[:, None]
      s = _scores(qb, kb) * scale
      p = jnp.where(blk, jnp.exp(s - lse_b[..., None]), 0.0)
      eq_dv = "bnts,btnh->bsh" if vb.ndim == 3 else "bnts,btnh->bsnh"
      dv_blk = jnp.einsum(eq_dv, p, do.astype(f32))
      eq_dp = "btnh,bsh->bnts" if vb.ndim == 3 else "btnh,bsnh->bnts"
      dp = jnp.einsum(eq_dp, do.astype(f32), vb.astype(f32))
      ds = p * (dp - dl_b[..., None]) * scale
      new_dq, new_dk = [], []
      for q, k, dq, dk in zip(qb, kb, dqb, dks):
        eq_dq = "bnts,bsd->btnd" if k.ndim == 3 else "bnts,bsnd->btnd"
        eq_dk = "bnts,btnd->bsd" if k.ndim == 3 else "bnts,btnd->bsnd"
        new_dq.append(dq + jnp.einsum(eq_dq, ds, k.astype(f32)))
        upd = jax.lax.dynamic_slice_in_dim(dk, k0, bk, 1) + jnp.einsum(eq_dk, ds, q.astype(f32))
        new_dk.append(jax.lax.dynamic_update_slice_in_dim(dk, upd, k0, 1))
      dvv = jax.lax.dynamic_update_slice_in_dim(dvv, jax.lax.dynamic_slice_in_dim(dvv, k0, bk, 1) + dv_blk, k0, 1)
      return tuple(new_dq), tuple(new_dk), dvv

    dq0 = tuple(jnp.zeros(q.shape, f32) for q in qb)
    dqb, dks, dvv = jax.lax.fori_loop(0, k_hi[i], k_block, (dq0, dks, dvv))
    dqs = tuple(jax.lax.dynamic_update_slice_in_dim(dq, d, q0, 1) for dq, d in zip(dqs, dqb))
    return dqs, dks, dvv

  init = (tuple(jnp.zeros(q.shape, f32) for q in qs), tuple(jnp.zeros(k.shape, f32) for k in ks),
          jnp.zeros(vp.shape, f32))
  dqs, dks, dvv = jax.lax.fori_loop(0, nq, q_block, init)
  dqs = tuple(d[:, :T].astype(q.dtype) for d, q in zip(dqs, q_parts))
  dks = tuple(d[:, :S].astype(k.dtype) for d, k in zip(dks, k_parts))
  return dqs, dks, dvv[:, :S].astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q_parts, k_parts, v, mask, scale, block_q, block_k):
  out, _, mx = _forward(q_parts, k_parts, v, mask, scale, block_q, block_k)
  return out, mx


def _flash_fwd(q_parts, k_parts, v, mask, scale, block_q, block_k):
  out, lse, mx = _forward(q_parts, k_parts, v, mask, scale, block_q, block_k)
  return (out, mx), (q_parts, k_parts, v, mask, out, lse)


def _flash_bwd(scale, block_q, block_k, res, g):
  q_parts, k_parts, v, mask, out, lse = res
  dqs, dks, dv = _backward(q_parts, k_parts, v, mask, scale, block_q, block_k, out, lse, g[0])
  zeros = jax.tree.map(lambda a: None if a is None else jnp.zeros(a.shape, jax.dtypes.float0), mask)
  return dqs, dks, dv, zeros


_flash.defvjp(_flash_fwd, _flash_bwd)

BLOCK_Q, BLOCK_K = 512, 512


def flash_attention(q_parts, k_parts, v, mask: Mask, scale: float, *, block_q: int | None = None,
                    block_k: int | None = None, layer=None) -> tuple[jax.Array, jax.Array]:
  """softmax(scale * sum_i q_i k_i^T, masked) v without forming the scores.

  q_parts: [B, T, N, d_i]; k_parts: [B, S, N, d_i] or shared [B, S, d_i]; v: [B, S, N, Dv] or [B, S, Dv].
  With `layer`, k_parts and v are stacks [L, B, S, ...] and layer `layer` is read (forward only).
  Returns (out [B, T, N, Dv] in v's dtype, per-head max scaled logit over the valid entries [N] fp32,
  no gradient). Rows with no valid key give 0. Blocks default to the module's BLOCK_Q / BLOCK_K.
  """
  block_q, block_k = block_q or BLOCK_Q, block_k or BLOCK_K
  if layer is not None:
    out, _, mx = _forward(tuple(q_parts), tuple(k_parts), v, mask, scale, block_q, block_k, layer)
    return out, jax.lax.stop_gradient(mx)
  out, mx = _flash(tuple(q_parts), tuple(k_parts), v, mask, scale, block_q, block_k)
  return out, jax.lax.stop_gradient(mx)


def reference_attention(q_parts, k_parts, v, mask: Mask, scale: float) -> tuple[jax.Array, jax.Array]:
  """The plain path: full [B, N, T, S] fp32 scores (the reference the blockwise paths are tested against)."""
  if v.ndim == 3 and all(k.ndim == 3 for k in k_parts):
    return _shared_kv_attention(q_parts, k_parts, v, mask, scale)
  s = _scores(tuple(q_parts), tuple(k_parts)) * scale
  keep = mask.dense(v.shape[1])[:, None]
  logits = jnp.where(keep, s, NEG_INF)
  max_logit_n = jax.lax.stop_gradient(jnp.max(logits, axis=(0, 2, 3)))
  probs = jax.nn.softmax(logits, axis=-1)
  return _pv(probs, v).astype(v.dtype), max_logit_n


def _shared_kv_attention(q_parts, k_parts, v, mask: Mask, scale: float) -> tuple[jax.Array, jax.Array]:
  """`reference_attention` for one key/value shared by every head (the absorbed latent cache), with the
  scores laid out [B, T, N, S]: both products are then one matmul per sequence with the heads folded into
  the rows ([T*N, d] @ [d, S], [T*N, S] @ [S, Dv]), no transposed copies; XLA:CPU ran the [B, N, T, S]
  layout's per-head products several times slower. Same products, same softmax."""
  s = 0.0
  for q, k in zip(q_parts, k_parts):
    s = s + jnp.einsum("btnd,bsd->btns", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
  keep = mask.dense(v.shape[1])[:, :, None]
  logits = jnp.where(keep, s * scale, NEG_INF)
  max_logit_n = jax.lax.stop_gradient(jnp.max(logits, axis=(0, 1, 3)))
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("btns,bsh->btnh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(v.dtype), max_logit_n
