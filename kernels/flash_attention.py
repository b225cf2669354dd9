"""Flash attention as Pallas kernels (TPU Mosaic / GPU Triton), forward and backward, for MLA's layouts.

Keys are [B, Hk, S, D] with Hk = N (per-head; training, prefill) or Hk = 1 (the absorbed latent, shared by
every head; decode); any Hk dividing N works (grouped heads). q/k head dim and v head dim differ (MLA:
192 / 128; absorbed: 576 / 512). Key s has index s; query t has index q_index[t] (causal: s <= q_index),
segment ids pack sequences and 0 marks padding on either side.

  forward  one program per (batch row, head, query block): key blocks stream through an online softmax,
           only up to the block's last valid query index (causality; a cache's filled length).
  dQ       one program per (batch row, head, query block), streaming the same key blocks.
  dK, dV   one program per (batch row, kv head, key block), streaming the query blocks that can see it
           (and, for a shared key, every head of its group: dK/dV sum over heads).
Both backward kernels recompute p = exp(s - logsumexp) from q, k and the saved logsumexp, with
delta = rowsum(dO * O) precomputed (FlashAttention-2). A query row that sees no key (padding) gets output 0,
logsumexp ~ -1e30 and zero gradient, never NaN.

`flash_mha` is the differentiable entry point: it pads T, S and the head dims to what the backend's
compiler accepts (TPU: blocks (8, 128)-aligned, head dims a multiple of 128; Triton: powers of two) and
returns (out, logsumexp, row max); the row max is QK-Clip's statistic and carries no gradient.
`k2jax.attention.pallas` adapts MLA's q/k parts and masks to these layouts.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

NEG_INF = -1e30  # finite, so fully masked rows stay NaN-free
PLATFORMS = ("tpu", "gpu")
# (block_q, block_k). Untuned: no accelerator has run these kernels yet.
DEFAULT_BLOCKS = {"tpu": (256, 256), "gpu": (64, 64)}
f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  block_q: int
  block_k: int
  platform: str
  interpret: Any


def _nt(a, b):
  """a [m, d] . b [n, d]^T -> [m, n] fp32."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=f32)


def _tn(a, b):
  """a [m, n]^T . b [m, d] -> [n, d] fp32."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=f32)


def _keep(q_seg, q_idx, k_seg, k0, bk):
  """[bq, bk]: causal by index, same segment, no padding. q_seg/q_idx [bq, 1], k_seg [1, bk]."""
  k_idx = k0 + jax.lax.broadcasted_iota(jnp.int32, (q_seg.shape[0], bk), 1)
  return (k_idx <= q_idx) & (q_seg != 0) & (k_seg == q_seg) & (k_seg != 0)


def _last_query(q_seg, q_idx):
  """The largest valid query index of a block (-1 when it is all padding)."""
  return jnp.max(jnp.where(q_seg != 0, q_idx, -1))


def _key_blocks(q_seg, q_idx, bk: int, nk: int):
  """Key blocks a query block needs: up to its last valid query (lax.div: the operand is >= 0)."""
  return jnp.minimum(jax.lax.div(_last_query(q_seg, q_idx) + bk, bk), nk)


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, qidx_ref, kseg_ref, o_ref, lse_ref, m_ref, *, scale, bk, nk):
  q = q_ref[...].astype(f32)                          # [bq, D]
  q_seg, q_idx = qseg_ref[...], qidx_ref[...]         # [bq, 1]
  n_blocks = _key_blocks(q_seg, q_idx, bk, nk)

  def body(j, carry):
    m, l, acc = carry                                 # [bq, 1], [bq, 1], [bq, Dv]
    k0 = pl.multiple_of(j * bk, bk)
    keep = _keep(q_seg, q_idx, kseg_ref[:, pl.ds(k0, bk)], k0, bk)
    s = jnp.where(keep, _nt(q, k_ref[pl.ds(k0, bk), :].astype(f32)) * scale, NEG_INF)
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    p = jnp.where(keep, jnp.exp(s - m_new), 0.0)
    corr = jnp.exp(m - m_new)
    acc = acc * corr + jnp.dot(p, v_ref[pl.ds(k0, bk), :].astype(f32), preferred_element_type=f32)
    return m_new, l * corr + p.sum(axis=1, keepdims=True), acc

  bq, dv = q.shape[0], v_ref.shape[-1]
  init = (jnp.full((bq, 1), NEG_INF, f32), jnp.zeros((bq, 1), f32), jnp.zeros((bq, dv), f32))
  m, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
  o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(jnp.maximum(l, 1e-30))
  m_ref[...] = m


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, qidx_ref, kseg_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale, bk, nk):
  q, do = q_ref[...].astype(f32), do_ref[...].astype(f32)
  lse, delta = lse_ref[...], delta_ref[...]           # [bq, 1]
  q_seg, q_idx = qseg_ref[...], qidx_ref[...]
  n_blocks = _key_blocks(q_seg, q_idx, bk, nk)

  def body(j, dq):
    k0 = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(k0, bk), :].astype(f32)
    keep = _keep(q_seg, q_idx, kseg_ref[:, pl.ds(k0, bk)], k0, bk)
    p = jnp.where(keep, jnp.exp(_nt(q, k) * scale - lse), 0.0)
    ds = p * (_nt(do, v_ref[pl.ds(k0, bk), :].astype(f32)) - delta)
    return dq + jnp.dot(ds, k, preferred_element_type=f32)

  dq = jax.lax.fori_loop(0, n_blocks, body, jnp.zeros(q.shape, f32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, qidx_ref, kseg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                *, scale, bq, nq, groups):
  k, v = k_ref[...].astype(f32), v_ref[...].astype(f32)  # [bk, D], [bk, Dv]
  k_seg = kseg_ref[...]                                  # [1, bk]
  bk = k.shape[0]
  k0 = pl.program_id(2) * bk
  has_keys = jnp.max(k_seg) != 0

  def q_block(i, carry):
    q0 = pl.multiple_of(i * bq, bq)
    q_seg, q_idx = qseg_ref[pl.ds(q0, bq), :], qidx_ref[pl.ds(q0, bq), :]
    keep = _keep(q_seg, q_idx, k_seg, k0, bk)

    def head(g, carry):
      dk, dv = carry
      q = q_ref[g, pl.ds(q0, bq), :].astype(f32)
      do = do_ref[g, pl.ds(q0, bq), :].astype(f32)
      p = jnp.where(keep, jnp.exp(_nt(q, k) * scale - lse_ref[g, pl.ds(q0, bq), :]), 0.0)
      ds = p * (_nt(do, v) - delta_ref[g, pl.ds(q0, bq), :])
      return dk + _tn(ds, q), dv + _tn(p, do)

    # Causality: only query blocks whose last valid query reaches this key block contribute.
    visible = has_keys & (_last_query(q_seg, q_idx) >= k0)
    return jax.lax.cond(visible, lambda c: jax.lax.fori_loop(0, groups, head, c), lambda c: c, carry)

  dk, dv = jax.lax.fori_loop(0, nq, q_block, (jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32)))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _compiler_params(st: _Static, n_grid: int = 3):
  if st.platform == "tpu":
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_grid)
  return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _query_grid_specs(st: _Static, q, k, v):
  """Grid (B, N, query blocks) and the in_specs of q, k, v, q_seg, q_idx, k_seg for the forward and dQ."""
  B, N, Tp, D = q.shape
  Hk, Sp, Dv = k.shape[1], k.shape[2], v.shape[-1]
  bq, G = st.block_q, N // Hk
  kv = lambda d: pl.BlockSpec((None, None, Sp, d), lambda b, n, i: (b, jax.lax.div(n, G), 0, 0))
  specs = [pl.BlockSpec((None, None, bq, D), lambda b, n, i: (b, n, i, 0)), kv(D), kv(Dv),
           pl.BlockSpec((None, bq, 1), lambda b, n, i: (b, i, 0)),
           pl.BlockSpec((None, bq, 1), lambda b, n, i: (b, i, 0)),
           pl.BlockSpec((None, 1, Sp), lambda b, n, i: (b, 0, 0))]
  return (B, N, Tp // bq), specs


def _row_spec(st: _Static):
  return pl.BlockSpec((None, None, st.block_q, 1), lambda b, n, i: (b, n, i, 0))


def _fwd_call(st: _Static, q, k, v, q_seg, q_idx, k_seg):
  B, N, Tp, _ = q.shape
  Dv = v.shape[-1]
  grid, in_specs = _query_grid_specs(st, q, k, v)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=st.scale, bk=st.block_k, nk=k.shape[2] // st.block_k),
      grid=grid,
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, st.block_q, Dv), lambda b, n, i: (b, n, i, 0)), _row_spec(st),
                 _row_spec(st)],
      out_shape=[jax.ShapeDtypeStruct((B, N, Tp, Dv), v.dtype),
                 jax.ShapeDtypeStruct((B, N, Tp, 1), f32), jax.ShapeDtypeStruct((B, N, Tp, 1), f32)],
      compiler_params=_compiler_params(st),
      interpret=st.interpret,
      name="flash_mla_fwd",
  )(q, k, v, q_seg, q_idx, k_seg)


def _dq_call(st: _Static, q, k, v, q_seg, q_idx, k_seg, do, lse, delta):
  D, Dv = q.shape[-1], v.shape[-1]
  grid, in_specs = _query_grid_specs(st, q, k, v)
  do_spec = pl.BlockSpec((None, None, st.block_q, Dv), lambda b, n, i: (b, n, i, 0))
  return pl.pallas_call(
      functools.partial(_dq_kernel, scale=st.scale, bk=st.block_k, nk=k.shape[2] // st.block_k),
      grid=grid,
      in_specs=[*in_specs, do_spec, _row_spec(st), _row_spec(st)],
      out_specs=pl.BlockSpec((None, None, st.block_q, D), lambda b, n, i: (b, n, i, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(st),
      interpret=st.interpret,
      name="flash_mla_dq",
  )(q, k, v, q_seg, q_idx, k_seg, do, lse, delta)


def _dkv_call(st: _Static, q, k, v, q_seg, q_idx, k_seg, do, lse, delta):
  B, N, Tp, D = q.shape
  Hk, Sp, Dv = k.shape[1], k.shape[2], v.shape[-1]
  bq, bk, G = st.block_q, st.block_k, N // Hk
  group = lambda d: pl.BlockSpec((None, G, Tp, d), lambda b, h, j: (b, h, 0, 0))
  kernel = functools.partial(_dkv_kernel, scale=st.scale, bq=bq, nq=Tp // bq, groups=G)
  return pl.pallas_call(
      kernel,
      grid=(B, Hk, Sp // bk),
      in_specs=[
          group(D),
          pl.BlockSpec((None, None, bk, D), lambda b, h, j: (b, h, j, 0)),
          pl.BlockSpec((None, None, bk, Dv), lambda b, h, j: (b, h, j, 0)),
          pl.BlockSpec((None, Tp, 1), lambda b, h, j: (b, 0, 0)),
          pl.BlockSpec((None, Tp, 1), lambda b, h, j: (b, 0, 0)),
          pl.BlockSpec((None, 1, bk), lambda b, h, j: (b, 0, j)),
          group(Dv), group(1), group(1),
      ],
      out_specs=[pl.BlockSpec((None, None, bk, D), lambda b, h, j: (b, h, j, 0)),
                 pl.BlockSpec((None, None, bk, Dv), lambda b, h, j: (b, h, j, 0))],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(st),
      interpret=st.interpret,
      name="flash_mla_dkv",
  )(q, k, v, q_seg, q_idx, k_seg, do, lse, delta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mha(st, q, k, v, q_seg, q_idx, k_seg):
  return _fwd_call(st, q, k, v, q_seg, q_idx, k_seg)


def _mha_fwd(st, q, k, v, q_seg, q_idx, k_seg):
  out, lse, m = _fwd_call(st, q, k, v, q_seg, q_idx, k_seg)
  return (out, lse, m), (q, k, v, q_seg, q_idx, k_seg, out, lse)


def _mha_bwd(st, res, g):
  q, k, v, q_seg, q_idx, k_seg, out, lse = res
  d_out, d_lse, _ = g  # the row max carries no gradient
  # d lse_i / d s_ij = p_ij, so a logsumexp cotangent folds into delta.
  delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True) - d_lse
  args = (q, k, v, q_seg, q_idx, k_seg, d_out, lse, delta)
  dq = _dq_call(st, *args)
  dk, dv = _dkv_call(st, *args)
  return dq, dk, dv, None, None, None


_mha.defvjp(_mha_fwd, _mha_bwd)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def head_dim(d: int, platform: str) -> int:
  """A head dim padded to what the backend's matmuls take: TPU lanes (128), Triton powers of two (>= 16)."""
  return _round_up(d, 128) if platform == "tpu" else max(16, _pow2(d))


def fit_blocks(T: int, S: int, block_q: int, block_k: int, platform: str, strict: bool) -> tuple[int, int]:
  """(block_q, block_k) for T queries and S keys: shrunk for short sequences to the backend's unit.

  strict (compiling for hardware): TPU blocks must be multiples of (8, 128) unless one block covers the
  whole padded length; Triton blocks powers of two >= 16. Interpreted runs take any block.
  """
  if platform == "tpu":
    bq, bk = min(block_q, _round_up(T, 8)), min(block_k, _round_up(S, 8))
    if strict and (bq % 8 or (bk % 128 and bk < S)):
      raise ValueError(f"TPU flash blocks must be multiples of (8, 128), got ({block_q}, {block_k})")
  else:
    bq, bk = min(block_q, max(16, _pow2(T))), min(block_k, max(16, _pow2(S)))
    if strict and any(b < 16 or b & (b - 1) for b in (bq, bk)):
      raise ValueError(f"Triton flash blocks must be powers of two >= 16, got ({block_q}, {block_k})")
  return bq, bk


def _pad(x, axis: int, to: int):
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, to - x.shape[axis])
  return jnp.pad(x, widths)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "platform", "interpret"))
def flash_mha(q_bntd, k_bhsd, v_bhsv, q_seg_bt, q_index_bt, k_seg_bs, *, scale: float,
              block_q: int | None = None, block_k: int | None = None, platform: str = "tpu",
              interpret: Any = False):
  """(out [B, N, T, Dv] in v's dtype, logsumexp [B, N, T] fp32, row max [B, N, T] fp32, no gradient).

  Differentiable in q, k, v (through out and logsumexp). `interpret`: True (the generic interpreter) or
  `pltpu.InterpretParams()` (the TPU interpreter) to run on a host without the accelerator.
  """
  if platform not in PLATFORMS:
    raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
  B, N, T, D = q_bntd.shape
  Hk, S, Dv = k_bhsd.shape[1], k_bhsd.shape[2], v_bhsv.shape[-1]
  if Hk == 0 or N % Hk or k_bhsd.shape[-1] != D or v_bhsv.shape[:3] != k_bhsd.shape[:3]:
    raise ValueError(f"q {q_bntd.shape}, k {k_bhsd.shape}, v {v_bhsv.shape}: need k [B, Hk, S, D] with Hk "
                     "dividing N and v [B, Hk, S, Dv]")
  dq, dk = DEFAULT_BLOCKS[platform]
  bq, bk = fit_blocks(T, S, block_q or dq, block_k or dk, platform, strict=not interpret)
  Tp, Sp = _round_up(T, bq), _round_up(S, bk)
  Dp, Dvp = head_dim(D, platform), head_dim(Dv, platform)
  # Zero-padded head dims leave the scores unchanged; padded keys and queries have segment 0.
  q = _pad(_pad(q_bntd, 2, Tp), 3, Dp)
  k = _pad(_pad(k_bhsd.astype(q.dtype), 2, Sp), 3, Dp)
  v = _pad(_pad(v_bhsv, 2, Sp), 3, Dvp)
  q_seg = _pad(q_seg_bt.astype(jnp.int32), 1, Tp)[..., None]
  q_idx = _pad(q_index_bt.astype(jnp.int32), 1, Tp)[..., None]
  k_seg = _pad(k_seg_bs.astype(jnp.int32), 1, Sp)[:, None, :]
  out, lse, m = _mha(_Static(scale, bq, bk, platform, interpret), q, k, v, q_seg, q_idx, k_seg)
  return out[:, :, :T, :Dv], lse[:, :, :T, 0], jax.lax.stop_gradient(m[:, :, :T, 0])
