"""MLA attention on the Pallas flash kernels: adapts `flash.flash_attention`'s layouts to the kernels'.

Scores there are a sum of parts (q_nope.k_nope + q_pe.k_pe, the rope key shared by heads); the kernels take
one q/k per head, so the parts are concatenated along the head dim (a shared part broadcast over heads when
another part is per-head). When every key part and v are shared (the absorbed latent), the kernels get one
kv head and sum dK/dV over heads themselves. `pallas_decode` runs the split-K decode kernel over one layer of
the latent cache stack, read in place. Under a mesh (`sharding.use_mesh`) the kernels run per shard
in shard_map, split over batch and heads as the activations are (a Pallas call is opaque to XLA's
partitioner, which would otherwise gather every operand to each device).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from k2jax import sharding
from k2jax.attention.flash import Mask
from k2jax.kernels.flash_attention import flash_mha
from k2jax.kernels.flash_decode import flash_decode


def _per_head(x, n: int):
  """[B, S, d] (shared) or [B, S, N, d] -> [B, S, N, d]."""
  return x if x.ndim == 4 else jnp.broadcast_to(x[:, :, None], (*x.shape[:2], n, x.shape[-1]))


def _per_shard(fn, n_heads: int, batch_size: int, in_specs, out_specs):
  """`fn` in shard_map over the enclosing mesh (`sharding.use_mesh`), or `fn` itself without one.

  in_specs/out_specs: functions (batch axes, head axes) -> PartitionSpecs, so callers name only layouts.
  """
  ctx = sharding.current()
  if ctx is None or ctx[0].size == 1:
    return fn
  mesh, rules = ctx
  batch, heads = sharding.partition_spec(("batch", "heads"), mesh, rules, (batch_size, n_heads))
  # check_vma=False: pallas_call's outputs carry no varying-axes type.
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs(batch, heads), out_specs=out_specs(batch, heads),
                       check_vma=False)


def pallas_attention(q_parts, k_parts, v, mask: Mask, scale: float, *, platform: str, interpret: Any = False,
                     block_q: int | None = None, block_k: int | None = None, layer=None
                     ) -> tuple[jax.Array, jax.Array]:
  """Same contract as `flash.flash_attention`: (out [B, T, N, Dv] in v's dtype, max logit [N], no gradient)."""
  if layer is not None:
    k_parts, v = [k[layer] for k in k_parts], v[layer]
  B, T, N = q_parts[0].shape[:3]
  S = v.shape[1]
  q_bntd = jnp.concatenate(q_parts, axis=-1).transpose(0, 2, 1, 3)
  if v.ndim == 3 and all(k.ndim == 3 for k in k_parts):
    k_bhsd = jnp.concatenate(k_parts, axis=-1)[:, None]
    v_bhsv = v[:, None]
  else:
    k_bhsd = jnp.concatenate([_per_head(k, N) for k in k_parts], axis=-1).transpose(0, 2, 1, 3)
    v_bhsv = _per_head(v, N).transpose(0, 2, 1, 3)
  k_seg_bs = jnp.ones((B, S), jnp.int32) if mask.k_seg_bs is None else mask.k_seg_bs

  def run(q, k, v, q_seg, q_idx, k_seg):
    out, _, mx = flash_mha(q, k, v, q_seg, q_idx, k_seg, scale=scale, block_q=block_q, block_k=block_k,
                           platform=platform, interpret=interpret)
    return out, mx

  shared = k_bhsd.shape[1] == 1  # a shared key is replicated over head shards, its gradient summed
  run = _per_shard(run, N, B, lambda b, h: (P(b, h), P(b, None if shared else h), P(b, None if shared else h),
                                            P(b), P(b), P(b)),
                   lambda b, h: (P(b, h), P(b, h)))
  out_bntv, max_bnt = run(q_bntd, k_bhsd.astype(q_bntd.dtype), v_bhsv, mask.q_seg_bt, mask.q_index_bt, k_seg_bs)
  return out_bntv.transpose(0, 2, 1, 3), jax.lax.stop_gradient(max_bnt.max(axis=(0, 2)))


def pallas_decode(q_parts, k_stacks, v_stack, mask: Mask, scale: float, layer, *, interpret: Any = False
                  ) -> tuple[jax.Array, jax.Array]:
  """Layer `layer` of a latent cache stack ([L, B, S, d] keys shared by every head, v likewise) by the
  split-K decode kernel; same contract as `flash.flash_attention` (forward only)."""
  B, _, N = q_parts[0].shape[:3]
  n = len(q_parts)

  def run(q_parts, k_stacks, v_stack, layer, q_seg, q_idx):
    return flash_decode(q_parts, k_stacks, v_stack, layer, q_seg, q_idx, scale=scale, interpret=interpret)

  run = _per_shard(run, N, B, lambda b, h: ((P(b, None, h),) * n, (P(None, b),) * n, P(None, b), P(), P(b), P(b)),
                   lambda b, h: (P(b, None, h), P(b, None, h)))
  out_btnv, max_btn = run(tuple(q_parts), tuple(k_stacks), v_stack, jnp.asarray(layer, jnp.int32), mask.q_seg_bt,
                          mask.q_index_bt)
  return out_btnv, jax.lax.stop_gradient(max_btn.max(axis=(0, 1)))
