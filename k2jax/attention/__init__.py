"""Multi-head Latent Attention (MLA): the per-head path (training, prefill) and the absorbed path over the
latent cache (decode, cached prefill). Both run blockwise online-softmax attention by default: the Pallas
flash kernels where the backend has them (`pallas.py`, chosen by `kernels.dispatch.flash_attention_impl`),
else XLA's blockwise loop (`flash.py`: O(T * block) memory, only the keys a query can see);
`impl="plain"` forms the full [B, N, T, S] scores and is the reference both are tested against.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from k2jax import rope
from k2jax.attention import flash
from k2jax.attention.flash import NEG_INF, Mask, flash_attention, reference_attention
from k2jax.attention.pallas import pallas_attention, pallas_decode
from k2jax.config import K2Config
from k2jax.kernels import dispatch
from k2jax.layers import input_major, linear, project, rms_norm
from k2jax.sharding import constrain

IMPLS = ("flash", "plain", "pallas")
# Query rows (tokens x heads) up to which a cached step uses the decode kernel: its rows stay in one program.
DECODE_MAX_ROWS = 256
# A cached step's single tile reads the keys up to the filled length rounded up to a multiple of this.
CACHE_KEY_BUCKET = 128

__all__ = ["IMPLS", "NEG_INF", "Mask", "attend", "attention_mask", "latent", "mla", "mla_absorbed", "queries",
           "write_latent"]


def _query_input(p: dict, x_btd: jax.Array, c: K2Config) -> tuple[jax.Array, str]:
  """(what the per-head query projection reads, the name of that weight [r, N, nope+rope]): the normed
  q-LoRA latent and `q_b_rnq`, or the input itself and the single projection `q_dnq`."""
  if "q_a_norm_r" in p:
    return rms_norm(linear(x_btd, p, "q_a_dr"), p["q_a_norm_r"], c.latent_norm_eps), "q_b_rnq"
  return x_btd, "q_dnq"


def queries(p: dict, x_btd: jax.Array, c: K2Config) -> jax.Array:
  """q [B, T, N, nope+rope] from the q-LoRA path or the single projection."""
  q_in, name = _query_input(p, x_btd, c)
  return linear(q_in, p, name)


def latent(p: dict, x_btd: jax.Array, c: K2Config, cos_btp, sin_btp) -> tuple[jax.Array, jax.Array]:
  """The per-token latent: normed c_kv [B, T, C] and roped shared k_pe [B, T, P] (what a cache stores)."""
  kv_bta = linear(x_btd, p, "kv_a_da")
  c_btc = rms_norm(kv_bta[..., :c.kv_lora_rank], p["kv_a_norm_c"], c.latent_norm_eps)
  k_pe_btp = rope.apply_rope(kv_bta[..., None, c.kv_lora_rank:], cos_btp, sin_btp)[:, :, 0]
  return c_btc, k_pe_btp


def attention_mask(segment_ids_bt: jax.Array, q_index_bt: jax.Array, k_index_bs: jax.Array,
                   k_segment_ids_bs: jax.Array | None = None) -> jax.Array:
  """[B, T, S]: causal by index, same segment, and no padding (segment id 0) on either side."""
  k_seg = segment_ids_bt if k_segment_ids_bs is None else k_segment_ids_bs
  same = segment_ids_bt[:, :, None] == k_seg[:, None, :]
  valid = (segment_ids_bt[:, :, None] != 0) & (k_seg[:, None, :] != 0)
  causal = k_index_bs[:, None, :] <= q_index_bt[:, :, None]
  return same & valid & causal


def _project(p: dict, x_btd: jax.Array, c: K2Config, cos_btp, sin_btp):
  """q_nope [B,T,N,nope], roped q_pe [B,T,N,P], and the token's latent (c [B,T,C], roped k_pe [B,T,P])."""
  nope = c.qk_nope_head_dim
  q_btnq = constrain(queries(p, x_btd, c), ("batch", "seq", "heads", "qk_head"))
  q_pe = rope.apply_rope(q_btnq[..., nope:], cos_btp, sin_btp)
  return (q_btnq[..., :nope], q_pe, *latent(p, x_btd, c, cos_btp, sin_btp))


def attend(q_parts, k_parts, v, mask: Mask, scale: float, impl: str = "flash", layer=None):
  """Masked softmax attention with scores sum_i q_i . k_i; see `flash.flash_attention` for the layouts.

  impl: "flash" (blockwise: the backend's Pallas kernels, or XLA's loop on CPU), "pallas" (the kernels
  forced; interpreted on a host without TPU/GPU, for tests) or "plain" (full scores, the reference).
  Returns (out [B, T, N, Dv], per-head max scaled logit over the valid entries [N] fp32)."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
  T, S = q_parts[0].shape[1], v.shape[1 if layer is None else 2]
  if impl == "pallas":
    platform, _, interpret = dispatch.flash_attention_impl(impl="pallas")
    return _pallas(q_parts, k_parts, v, mask, scale, platform, interpret, layer)
  # One tile covers everything: the blockwise loop would compute the same single tile, with loop overhead.
  if impl == "flash" and (T > flash.BLOCK_Q or S > flash.BLOCK_K):
    platform, kind, interpret = dispatch.flash_attention_impl(
        max(T, S), sum(q.shape[-1] for q in q_parts), v.shape[-1], v.dtype.itemsize)
    # A cache stack (`layer`) on TPU stays on XLA's loop, which reads only the filled blocks in place.
    if kind == "pallas" and (layer is None or platform == "gpu"):
      return _pallas(q_parts, k_parts, v, mask, scale, platform, interpret, layer)
    return flash_attention(q_parts, k_parts, v, mask, scale, layer=layer)
  if impl == "flash" and mask.k_seg_bs is None and S > CACHE_KEY_BUCKET:  # a cache: keys are its slots
    return _filled_keys_tile(q_parts, k_parts, v, mask, scale, layer)
  if layer is not None:
    k_parts, v = [k[layer] for k in k_parts], v[layer]
  return reference_attention(q_parts, k_parts, v, mask, scale)


def _filled_keys_tile(q_parts, k_parts, v, mask: Mask, scale: float, layer):
  """One tile over a cache (layer `layer` of a stack, or one layer's own arrays when `layer` is None),
  reading keys [0, n) only: n is the filled length (the largest valid query index + 1) rounded up to a
  multiple of CACHE_KEY_BUCKET, one switch branch per length, so a prefill into a longer cache does not
  score its empty slots (they are masked either way). A layer's own arrays are read in place at n = S."""
  S = v.shape[1 if layer is None else 2]
  lengths = [*range(CACHE_KEY_BUCKET, S, CACHE_KEY_BUCKET), S]

  def keys(x, n):
    if layer is not None:
      return x[layer, :, :n]
    return x if n == S else x[:, :n]

  def tile(n):
    return lambda q_parts, k_parts, v: reference_attention(
        q_parts, [keys(k, n) for k in k_parts], keys(v, n), mask, scale)

  filled = jnp.max(jnp.where(mask.q_seg_bt != 0, mask.q_index_bt, 0)) + 1
  branch = jnp.clip((filled - 1) // CACHE_KEY_BUCKET, 0, len(lengths) - 1)
  return jax.lax.switch(branch, [tile(n) for n in lengths], list(q_parts), list(k_parts), v)


def _pallas(q_parts, k_parts, v, mask: Mask, scale: float, platform: str, interpret, layer):
  """The Pallas kernels: split-K decode over a cache stack for a few query rows on GPU, else flash."""
  T, N = q_parts[0].shape[1:3]
  if layer is not None and platform == "gpu" and T * N <= DECODE_MAX_ROWS:
    return pallas_decode(q_parts, k_parts, v, mask, scale, layer, interpret=interpret)
  return pallas_attention(q_parts, k_parts, v, mask, scale, platform=platform, interpret=interpret, layer=layer)


def mla(p: dict, x_btd: jax.Array, c: K2Config, cos_btp, sin_btp, mask: Mask, impl: str = "flash"
        ) -> tuple[jax.Array, jax.Array]:
  """Returns (output [B, T, D], per-head max pre-softmax logit over the valid entries [N], fp32)."""
  nope = c.qk_nope_head_dim
  q_nope, q_pe, c_btc, k_pe_btp = _project(p, x_btd, c, cos_btp, sin_btp)
  kv_btnu = project(c_btc, p["kv_b_cnu"])
  k_nope, v_btnh = kv_btnu[..., :nope], kv_btnu[..., nope:]
  # Scores: the content part per head plus the rope part against the one shared k_pe.
  out_btnh, max_logit_n = attend((q_nope, q_pe), (k_nope, k_pe_btp), v_btnh, mask, c.softmax_scale, impl)
  return linear(out_btnh, p, "o_nhd", 2), max_logit_n


def write_latent(cache_lbsx: jax.Array, new_btx: jax.Array, layer, start_b: jax.Array,
                 valid_bt: jax.Array) -> jax.Array:
  """Writes each row's valid new latents into layer `layer` of a cache stack (or into one layer's own
  cache [B, S, .] when `layer` is None) at the row's own offset.

  Each row rewrites a window of T slots that always lies inside the cache (slots not written keep their
  contents), so padded tokens are never clamped onto earlier entries, and the update is an in-place
  scatter of B x T slots: a masked or out-of-bounds write would make XLA select over the whole cache.
  """
  B, T = valid_bt.shape
  S = cache_lbsx.shape[-2]
  s0_b = jnp.clip(start_b, 0, S - T)
  pos_bt = s0_b[:, None] + jnp.arange(T)
  t_bt = pos_bt - start_b[:, None]  # which new token lands in each window slot
  keep_bt = (t_bt >= 0) & jnp.take_along_axis(valid_bt, jnp.clip(t_bt, 0, T - 1), axis=1)
  new_btx = jnp.take_along_axis(new_btx, jnp.clip(t_bt, 0, T - 1)[..., None], axis=1)
  rows_bt = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
  at = (rows_bt, pos_bt) if layer is None else (layer, rows_bt, pos_bt)
  upd_btx = jnp.where(keep_bt[..., None], new_btx.astype(cache_lbsx.dtype), cache_lbsx[at])
  return cache_lbsx.at[at].set(upd_btx, mode="promise_in_bounds")


def absorbed_folds(c: K2Config, tokens: int) -> tuple[bool, bool]:
  """(fold W_UK into the query weight, fold W_UV into the output weight) for an absorbed step over
  `tokens` query tokens: each where it costs fewer multiply-adds at this many tokens, the fold itself
  (once per call, on the weights) included. Folded, the query's latent and the output come out of one 2-D
  matmul each instead of a per-head batched product (and its transposed copies on XLA:CPU): a prefill at
  the small benchmark width folds both; decode steps and K2's shapes (C = 512 > nope = 128) fold neither."""
  N, k, h, C, D = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank, c.hidden_size
  r = c.q_lora_rank or D
  fold_q = tokens * N * r * C + r * N * k * C < tokens * N * k * (r + C)
  fold_o = tokens * N * C * D + N * C * h * D < tokens * N * h * (C + D)
  return fold_q, fold_o


def _absorbed_queries(p: dict, x_btd: jax.Array, c: K2Config, cos_btp, sin_btp, w_uk_cnk, fold: bool):
  """(q_lat [B, T, N, C] = q_nope . W_UK per head, roped q_pe [B, T, N, P]); `fold`: q_lat straight from
  the query input through W_q[..., :nope] . W_UK^T, one [r, N * C] matmul."""
  nope = c.qk_nope_head_dim
  if not fold:
    q_btnq = constrain(queries(p, x_btd, c), ("batch", "seq", "heads", "qk_head"))
    q_lat = jnp.einsum("btnk,cnk->btnc", q_btnq[..., :nope], w_uk_cnk)
    return q_lat, rope.apply_rope(q_btnq[..., nope:], cos_btp, sin_btp)
  q_in, name = _query_input(p, x_btd, c)
  w_rnq = input_major(p, name)
  w_rnc = jnp.einsum("rnk,cnk->rnc", w_rnq[..., :nope], w_uk_cnk,
                     preferred_element_type=jnp.float32).astype(w_rnq.dtype)
  heads = ("batch", "seq", "heads", "qk_head")
  q_pe = rope.apply_rope(constrain(project(q_in, w_rnq[..., nope:]), heads), cos_btp, sin_btp)
  return constrain(project(q_in, w_rnc), heads), q_pe


def mla_absorbed(p: dict, x_btd: jax.Array, c: K2Config, cos_btp, sin_btp, mask: Mask,
                 cache_c_lbsc: jax.Array, cache_pe_lbsp: jax.Array, layer, start_b: jax.Array,
                 impl: str = "flash"):
  """MLA over the latent cache: W_UK folded into the query, W_UV applied after attention.

  Only the normed latent c (kv_lora_rank) and the roped k_pe (rope dim) are cached per token: for K2 576
  values per layer instead of 2 x heads x 128+ for per-head K/V. Same math as `mla`, reassociated: one
  key/value (the latent) shared by every head. The cache is the whole stack [L, B, S, .] and `layer` the
  layer's index, so a step writes and reads only its own rows and, blockwise, only the filled length; or,
  with `layer` None, the layer's own arrays [B, S, .] (`model.unstack_cache`). With many tokens (prefill)
  W_UK and W_UV also go into the projections' weights (`absorbed_folds`).
  Returns (output [B, T, D], max logit [N], updated cache c stack, updated cache k_pe stack).
  """
  nope = c.qk_nope_head_dim
  B, T, _ = x_btd.shape
  fold_q, fold_o = absorbed_folds(c, B * T)
  w_uk_cnk, w_uv_cnh = p["kv_b_cnu"][..., :nope], p["kv_b_cnu"][..., nope:]
  q_lat_btnc, q_pe = _absorbed_queries(p, x_btd, c, cos_btp, sin_btp, w_uk_cnk, fold_q)
  c_btc, k_pe_btp = latent(p, x_btd, c, cos_btp, sin_btp)
  valid_bt = mask.q_seg_bt != 0
  cache_c_lbsc = write_latent(cache_c_lbsc, c_btc, layer, start_b, valid_bt)
  cache_pe_lbsp = write_latent(cache_pe_lbsp, k_pe_btp, layer, start_b, valid_bt)
  o_lat_btnc, max_logit_n = attend((q_lat_btnc, q_pe), (cache_c_lbsc, cache_pe_lbsp), cache_c_lbsc, mask,
                                   c.softmax_scale, impl, layer=layer)
  o_lat_btnc = o_lat_btnc.astype(x_btd.dtype)
  if fold_o:
    w_nhd = input_major(p, "o_nhd", 2)
    w_ncd = jnp.einsum("cnh,nhd->ncd", w_uv_cnh, w_nhd, preferred_element_type=jnp.float32)
    out_btd = project(o_lat_btnc, w_ncd.astype(w_nhd.dtype), 2)
  else:
    out_btd = linear(jnp.einsum("btnc,cnh->btnh", o_lat_btnc, w_uv_cnh), p, "o_nhd", 2)
  return out_btd, max_logit_n, cache_c_lbsc, cache_pe_lbsp
