"""Decode attention over the absorbed latent cache as a Pallas kernel: split-K over the filled length.

Every head attends to the same latent keys (MQA), so a step's T x N query rows form one [R, d] matrix
and each key block is read once for all heads. The cache is read in place from its [L, B, S, d] stack
(layer `layer`), only up to the last valid query index of the row (the filled length), and that range
is split over a grid axis (FlashMLA / flash-decoding): each split returns its partial output with its
logsumexp and row max, and `flash_decode` combines them. Scores are a sum of parts (latent . c +
rope . k_pe) so the rope key is never concatenated. A last partial key block is read as the final
`block_k` keys with its already-seen keys masked, so the cache length needs no padding.

For Triton (GPU), where a block is a pointer and only the loaded tiles are read. Mosaic (TPU) would copy
the whole per-row stack into VMEM; TPU decode stays on XLA's blockwise loop.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from k2jax.kernels.flash_attention import NEG_INF, f32

BLOCK_K, SPLIT_BLOCKS = 64, 8  # keys per block; key blocks per split


def _kernel(layer_ref, qseg_ref, qidx_ref, *refs, n_parts, scale, bk, per_split, S):
  q_refs, k_refs, v_ref = refs[:n_parts], refs[n_parts:2 * n_parts], refs[2 * n_parts]
  o_ref, lse_ref, m_ref = refs[2 * n_parts + 1:]
  layer = layer_ref[0]
  q_seg, q_idx = qseg_ref[...], qidx_ref[...]      # [R, 1]
  qs = [r[...].astype(f32) for r in q_refs]        # [R, d_i]
  last = jnp.max(jnp.where(q_seg != 0, q_idx, -1))
  n_blocks = jnp.minimum(jax.lax.div(last + bk, bk), -(-S // bk))
  lo = pl.program_id(1) * per_split

  def body(j, carry):
    m, l, acc = carry
    k0 = jnp.minimum(j * bk, S - bk)               # a last partial block: the final bk keys
    k_idx = k0 + jax.lax.broadcasted_iota(jnp.int32, (q_seg.shape[0], bk), 1)
    keep = (k_idx <= q_idx) & (q_seg != 0) & (k_idx >= j * bk)
    s = 0.0
    for q, k_ref in zip(qs, k_refs):
      k = k_ref[layer, pl.ds(k0, bk), :].astype(f32)
      s = s + jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=f32)
    s = jnp.where(keep, s * scale, NEG_INF)
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    p = jnp.where(keep, jnp.exp(s - m_new), 0.0)
    corr = jnp.exp(m - m_new)
    v = v_ref[layer, pl.ds(k0, bk), :].astype(f32)
    acc = acc * corr + jnp.dot(p, v, preferred_element_type=f32)
    return m_new, l * corr + p.sum(axis=1, keepdims=True), acc

  R, dv = q_seg.shape[0], v_ref.shape[-1]
  init = (jnp.full((R, 1), NEG_INF, f32), jnp.zeros((R, 1), f32), jnp.zeros((R, dv), f32))
  m, l, acc = jax.lax.fori_loop(lo, jnp.minimum(lo + per_split, n_blocks), body, init)
  o_ref[...] = acc / jnp.where(l > 0, l, 1.0)
  lse_ref[...] = m + jnp.log(jnp.maximum(l, 1e-30))
  m_ref[...] = m


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "split_blocks", "interpret"))
def flash_decode(q_parts, k_stacks, v_stack, layer, q_seg_bt, q_index_bt, *, scale: float,
                 block_k: int = BLOCK_K, split_blocks: int = SPLIT_BLOCKS, interpret: Any = False):
  """(out [B, T, N, Dv] in v's dtype, row max [B, T, N] fp32) of queries over one layer of a latent cache.

  q_parts: [B, T, N, d_i]; k_stacks: [L, B, S, d_i] (shared by every head); v_stack: [L, B, S, Dv];
  query t sits at index q_index_bt[:, t] and sees keys 0..index (segment 0: padding, output 0).
  """
  B, T, N = q_parts[0].shape[:3]
  L, _, S, Dv = v_stack.shape
  bk = min(block_k, S)
  n_splits = -(-S // (bk * split_blocks))
  R = T * N
  Rp = max(16, _pow2(R))  # Triton tiles are powers of two
  rows = lambda x: jnp.pad(x.reshape(B, R, *x.shape[3:]), [(0, 0), (0, Rp - R)] + [(0, 0)] * (x.ndim - 3))
  qs = [rows(q) for q in q_parts]
  q_seg = rows(jnp.repeat(q_seg_bt.astype(jnp.int32)[:, :, None], N, 2))[..., None]
  q_idx = rows(jnp.repeat(q_index_bt.astype(jnp.int32)[:, :, None], N, 2))[..., None]
  layer = jnp.asarray(layer, jnp.int32).reshape(1)
  kernel = functools.partial(_kernel, n_parts=len(qs), scale=scale, bk=bk, per_split=split_blocks, S=S)
  per_row = lambda d: pl.BlockSpec((None, Rp, d), lambda b, s: (b, 0, 0))
  stack = lambda d: pl.BlockSpec((L, None, S, d), lambda b, s: (0, b, 0, 0))
  split = lambda d: pl.BlockSpec((None, None, Rp, d), lambda b, s: (b, s, 0, 0))
  o, lse, m = pl.pallas_call(
      kernel,
      grid=(B, n_splits),
      in_specs=[pl.BlockSpec((1,), lambda b, s: (0,)), per_row(1), per_row(1),
                *[per_row(q.shape[-1]) for q in qs], *[stack(k.shape[-1]) for k in k_stacks], stack(Dv)],
      out_specs=[split(Dv), split(1), split(1)],
      out_shape=[jax.ShapeDtypeStruct((B, n_splits, Rp, d), f32) for d in (Dv, 1, 1)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="flash_mla_decode",
  )(layer, q_seg, q_idx, *qs, *k_stacks, v_stack)
  # Combine the splits: weights exp(lse_s - lse); an empty split has lse ~ -1e30 and weight 0.
  lse_all = jax.nn.logsumexp(lse, axis=1, keepdims=True)
  out = jnp.sum(o * jnp.exp(lse - lse_all), axis=1)
  out = out[:, :R].reshape(B, T, N, Dv).astype(v_stack.dtype)
  return out, m.max(axis=1)[:, :R, 0].reshape(B, T, N)
