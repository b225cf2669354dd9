"""Grouped matmul in plain XLA for backends without a Pallas kernel (CPU, and any fallback).

XLA:CPU lowers `lax.ragged_dot` to a dense product per group (about E times the useful work). Here the
rows, already sorted by expert, are walked in blocks of `block` rows: a loop over the experts that
have rows takes that expert's matrix once (dequantising an INT4 weight there, so only experts with
rows are dequantised), and inner loops multiply its row blocks: of 4 x `block` rows while they fit,
then one block of a multiple of `block` / 2 rows that covers the rest (`block_tiers`). That last block
may run into the next expert's rows; it stores only its own, so nothing is padded or masked afterwards.
Work is about M + (experts with rows) * block / 2 rows, whatever the split.

Shapes are static (the loops have dynamic trip counts, a while loop each), so it runs under jit,
inside shard_map and under eval_shape. The custom VJP gives dlhs by the same loop over w[e]^T and the
per-expert dw by one batched product over each expert's first `capacity_rows` rows plus masked blocks
for the rest (`tgmm`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from k2jax.int4 import QuantizedWeight

MIN_BLOCK, MAX_BLOCK = 8, 128


def block_rows(m: int, num_groups: int) -> int:
  """Rows per block: about half the mean group size (a power of two in [8, 128])."""
  target = max(1, m // (2 * max(num_groups, 1)))
  return int(min(MAX_BLOCK, max(MIN_BLOCK, 1 << (target.bit_length() - 1))))


def _compute_dtype(dtype):
  # XLA:CPU multiplies bf16 much slower than f32; blocks are upcast (exact: f32 accumulation either way).
  return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype


def _bounds(group_sizes):
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  nonempty = sizes > 0
  nz_ids = jnp.nonzero(nonempty, size=sizes.shape[0], fill_value=0)[0].astype(jnp.int32)
  return ends - sizes, ends, nz_ids, nonempty.sum(dtype=jnp.int32)


@jax.tree_util.register_pytree_node_class
class LayerSlice:
  """Layer `layer` of a stacked routed-expert weight [L, E, K, N], for the unrolled training layers: the
  grouped-matmul loops read w[layer, e] out of the stack in place, where a slice `stack[layer]` passed to
  a loop is a copy of the whole [E, K, N] layer per step (~16 MB per matrix at the small benchmark width).

  `row` is that layer's slice of a `jnp.split` of the stack: the forward never reads it (dead code), the
  backward gives it the layer's dW, so the split's transpose assembles the stack's gradient as one
  concatenate (`layer_slices`)."""

  def __init__(self, stack, row, layer: int):
    self.stack, self.row, self.layer = stack, row, layer

  shape = property(lambda self: self.stack.shape[1:])
  dtype = property(lambda self: self.stack.dtype)
  ndim = property(lambda self: self.stack.ndim - 1)

  def tree_flatten(self):
    return (self.stack, self.row), self.layer

  @classmethod
  def tree_unflatten(cls, layer, children):
    return cls(*children, layer)


@jax.tree_util.register_pytree_node_class
class SideBySide:
  """Two routed-expert weights [E, K, Na] and [E, K, Nb] read as one [E, K, Na + Nb], w[e] = [a[e] | b[e]]:
  gate and up as one grouped matmul of twice the width (wider products, one loop and one dW gather instead
  of two) without a concatenated copy of the stacks: each expert's pair is joined where a loop takes it,
  in place of the copy it makes of each matrix anyway. `a`, `b`: dense stacks or `LayerSlice`s."""

  def __init__(self, a, b):
    self.a, self.b = a, b

  shape = property(lambda self: (*self.a.shape[:-1], self.a.shape[-1] + self.b.shape[-1]))
  dtype = property(lambda self: self.a.dtype)

  def tree_flatten(self):
    return (self.a, self.b), None

  @classmethod
  def tree_unflatten(cls, _, children):
    return cls(*children)


def layer_slices(stack_lekn) -> tuple:
  """Every layer of a stack [L, E, K, N] as a `LayerSlice`."""
  rows = jnp.split(stack_lekn, stack_lekn.shape[0], axis=0)
  return tuple(LayerSlice(stack_lekn, row[0], layer) for layer, row in enumerate(rows))


def _expert_weight(w, e, dtype, cdt):
  """w[e] as a dense [K, N] array: INT4 dequantised to `dtype` (this expert only), then cast to `cdt`."""
  if isinstance(w, QuantizedWeight):
    return w[e].dequantize(dtype).astype(cdt)
  if isinstance(w, SideBySide):
    return jnp.concatenate([_expert_weight(w.a, e, dtype, cdt), _expert_weight(w.b, e, dtype, cdt)], axis=-1)
  if isinstance(w, LayerSlice):
    _, _, k, n = w.stack.shape
    return lax.dynamic_slice(w.stack, (w.layer, e, 0, 0), (1, 1, k, n))[0, 0].astype(dtype).astype(cdt)
  return lax.dynamic_index_in_dim(w, e, keepdims=False).astype(dtype).astype(cdt)


def _varying_axes(a) -> set:
  t = jax.typeof(a)
  names = getattr(t, "vma", None)
  if names is None:  # newer jax keeps them on the manual-axis type
    names = getattr(getattr(t, "mat", None), "varying", ())
  return set(names or ())


def _varying_like(init, *operands):
  """`init` marked as varying over the manual mesh axes the operands vary over (inside shard_map a loop
  carry must keep its type; outside it this is the identity)."""
  axes = set().union(*(_varying_axes(a) for a in jax.tree.leaves(operands)))
  return lax.pcast(init, tuple(sorted(axes)), to="varying") if axes else init


def _sum_to_varying_of(ct, primal):
  """A cotangent summed over the manual axes it varies over but its primal does not (inside shard_map,
  the gradient of an operand replicated over an axis is the sum of the shards' contributions)."""
  extra = _varying_axes(ct) - _varying_axes(primal)
  return lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _pad_rows(x, rows):
  return jnp.pad(x, ((0, rows), (0, 0)))


def block_tiers(block: int, granule: int | None = None) -> tuple[int, ...]:
  """Row-block sizes of the forward loops, largest first: 4 x `block`, then every multiple of `granule`
  (`block` / 2) below it. A group goes through whole blocks of the largest size, then one block of the
  smallest size that covers the rest: each product has a fixed cost (XLA:CPU packs the expert's matrix
  for it, worth tens of rows at the benchmark widths), so a group of up to 4 x `block` rows (twice the
  mean) is one product, running fewer than `granule` rows past its end. Blocks under 32 rows (decode's
  single rows, small groups) keep the one size."""
  if block < 32:
    return (block,)
  granule = granule or block // 2
  return tuple(range(4 * block, 0, -granule))


def _walk_rows(lhs, start, end, tiers, products, out):
  """out[start:end] = products(lhs[start:end]): whole blocks of `tiers[0]` rows, then one block of the
  smallest of `tiers` that covers the rest (a loop each, run once or not at all). A block that would run
  past the array is shifted back to end at it, and each block stores only the rows in [start, end): the
  others keep what they hold (earlier groups' results, or rows that the next group overwrites), so the
  operand needs no padding and the result no masking afterwards. Sizes above the array's rows are
  skipped."""
  m = lhs.shape[0]
  if m == 0:
    return out
  tiers = tuple(t for t in tiers if t <= m) or (m,)

  def block(row0, rows, out, inside=False):
    # `inside`: the block lies in [start, end) (the whole blocks, and every one-row block), a plain store.
    if not inside:
      row0 = jnp.minimum(row0, m - rows)
    y = products(lax.dynamic_slice_in_dim(lhs, row0, rows)).astype(out.dtype)
    if not inside:
      i = row0 + jnp.arange(rows)
      mine = ((i >= start) & (i < end))[:, None]
      y = jnp.where(mine, y, lax.dynamic_slice_in_dim(out, row0, rows))
    return lax.dynamic_update_slice_in_dim(out, y, row0, 0)

  top = tiers[0]
  whole = (end - start) // top
  out = lax.fori_loop(0, whole, lambda j, o: block(start + j * top, top, o, inside=True), out)
  if top == 1:  # one row at a time (decode): the whole blocks cover the group, no covering block's loop
    return out
  row0, left = start + whole * top, end - start - whole * top
  for rows, smaller in zip(tiers, tiers[1:] + (0,)):
    once = ((left > smaller) & (left <= rows)).astype(jnp.int32)
    # The index keeps the block in the loop: loop-invariant, XLA would hoist it out and run it always.
    out = lax.fori_loop(0, once, lambda j, o, rows=rows: block(row0 + j, rows, o), out)
  return out


def _gmm_loop(lhs_mk, w, group_sizes, block, out_dtype, transpose_rhs):
  """out[M, N] rows of group e times w[e] (or w[e]^T); rows past the groups are 0."""
  m = lhs_mk.shape[0]
  n = w.shape[1] if transpose_rhs else w.shape[2]
  cdt = _compute_dtype(lhs_mk.dtype)
  starts, ends, nz_ids, n_nz = _bounds(group_sizes)
  dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def expert(r, out):
    e = nz_ids[r]
    w_kn = _expert_weight(w, e, lhs_mk.dtype, cdt)
    products = lambda x: lax.dot_general(x.astype(cdt), w_kn, dims, preferred_element_type=jnp.float32)
    return _walk_rows(lhs_mk, starts[e], ends[e], block_tiers(block), products, out)

  return lax.fori_loop(0, n_nz, expert, _varying_like(jnp.zeros((m, n), out_dtype), lhs_mk, w, group_sizes))


def capacity_rows(m: int, num_groups: int) -> int:
  """Rows per group that `tgmm` takes in one batched product: the mean group, rounded up to 8."""
  return -(-max(1, -(-m // max(num_groups, 1))) // 8) * 8


def tgmm(lhs_mk, dout_mn, group_sizes, *, block: int | None = None, capacity: int | None = None, out_dtype=None):
  """dw[E, K, N] = lhs[rows of e]^T @ dout[rows of e] per group; zeros for empty groups.

  Each group's first `capacity` rows (the mean group by default) are gathered into [E, C, K] and
  [E, C, N] (dout masked past the group's end) and contracted in one batched product, which XLA:CPU runs
  at about a plain matmul's rate; rows past the capacity (the larger groups) are added by masked blocks of
  `block` rows. A per-block loop over every group costs ~2x that: each block's accumulate, mask and
  store, and a zero-filled [E, K, N] to store into. f32 accumulation either way.
  """
  m, k = lhs_mk.shape
  n = dout_mn.shape[1]
  num_groups = group_sizes.shape[0]
  block = block or block_rows(m, num_groups)
  cap = capacity or capacity_rows(m, num_groups)
  out_dtype = jnp.dtype(out_dtype or lhs_mk.dtype)
  cdt = _compute_dtype(lhs_mk.dtype)
  starts, ends, _, _ = _bounds(group_sizes)
  sizes = ends - starts
  i_c = jnp.arange(cap)
  rows_ec = jnp.minimum(starts[:, None] + i_c, m - 1)  # clipped rows are masked: past their group's end
  x_eck = jnp.take(lhs_mk, rows_ec, axis=0).astype(cdt)
  d_ecn = jnp.where((i_c < sizes[:, None])[..., None], jnp.take(dout_mn, rows_ec, axis=0).astype(cdt),
                    jnp.zeros((), cdt))
  dw = jnp.einsum("eck,ecn->ekn", x_eck, d_ecn, preferred_element_type=jnp.float32)

  over = sizes > cap
  over_ids = jnp.nonzero(over, size=num_groups, fill_value=0)[0].astype(jnp.int32)
  lhs, dout = _pad_rows(lhs_mk, block), _pad_rows(dout_mn, block)

  def expert(r, dw):
    e = over_ids[r]
    start, end = starts[e] + cap, ends[e]

    def row_block(j, acc):
      row0 = start + j * block
      x = lax.dynamic_slice_in_dim(lhs, row0, block).astype(cdt)
      d = lax.dynamic_slice_in_dim(dout, row0, block).astype(cdt)
      d = jnp.where((row0 + jnp.arange(block) < end)[:, None], d, jnp.zeros((), cdt))
      return acc + lax.dot_general(x, d, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, (end - start + block - 1) // block, row_block, lax.dynamic_index_in_dim(dw, e, 0, False))
    return lax.dynamic_update_index_in_dim(dw, acc, e, 0)

  dw = lax.fori_loop(0, over.sum(dtype=jnp.int32), expert, dw)
  return dw.astype(out_dtype)


def _zero_cotangent(a):
  if jnp.issubdtype(a.dtype, jnp.floating):
    return jnp.zeros_like(a)
  return np.zeros(a.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(lhs, w, group_sizes, block, out_dtype):
  return _gmm_loop(lhs, w, group_sizes, block, out_dtype, transpose_rhs=False)


def _gmm_fwd(lhs, w, group_sizes, block, out_dtype):
  return _gmm(lhs, w, group_sizes, block, out_dtype), (lhs, w, group_sizes)


def _gmm_bwd(block, out_dtype, res, dout):
  lhs, w, group_sizes = res
  dlhs = _gmm_loop(dout, w, group_sizes, block, lhs.dtype, transpose_rhs=True)
  if isinstance(w, QuantizedWeight):  # inference weights: no gradient (integer leaves take float0)
    dw = jax.tree.map(_zero_cotangent, w)
  else:
    dw = _weight_cotangent(w, tgmm(lhs, dout, group_sizes, block=block, out_dtype=w.dtype))
  return _sum_to_varying_of(dlhs, lhs), dw, None


def _weight_cotangent(w, dw):
  """dW [E, K, N] as the cotangent of `w`: a `LayerSlice` takes it in its row of the split (the stack
  itself gets none), a `SideBySide` splits it between its two weights."""
  if isinstance(w, SideBySide):
    n_a = w.a.shape[-1]
    return SideBySide(_weight_cotangent(w.a, dw[..., :n_a]), _weight_cotangent(w.b, dw[..., n_a:]))
  if isinstance(w, LayerSlice):
    return LayerSlice(None, _sum_to_varying_of(dw, w.row), w.layer)
  return _sum_to_varying_of(dw, w)


_gmm.defvjp(_gmm_fwd, _gmm_bwd)
# jit so that eager callers reuse one compiled loop instead of tracing fresh loop bodies every call.
_gmm_jit = jax.jit(_gmm, static_argnums=(3, 4))


def gmm(lhs_mk, w_ekn, group_sizes, *, block: int | None = None, out_dtype=None):
  """out[M, N]: rows [start_e, start_e + group_sizes[e]) of lhs_mk times w_ekn[e]; rows past the groups
  are 0. w_ekn dense [E, K, N] (differentiable in lhs and w) or a QuantizedWeight (differentiable in lhs;
  dequantised to lhs's dtype, as the Pallas kernels do)."""
  m, k = lhs_mk.shape
  num_groups, k_w, _ = w_ekn.shape
  if k_w != k:
    raise ValueError(f"lhs {lhs_mk.shape} does not contract with w {w_ekn.shape}")
  if group_sizes.shape != (num_groups,):
    raise ValueError(f"group_sizes {group_sizes.shape} does not match {num_groups} experts")
  block = block or block_rows(m, num_groups)
  out_dtype = jnp.dtype(out_dtype or lhs_mk.dtype)
  return _gmm_jit(lhs_mk, w_ekn, group_sizes.astype(jnp.int32), block, out_dtype)


def num_experts(w) -> int:
  """Experts in a routed-expert weight: a stack [E, K, N] (dense or INT4) or a tuple of E [K, N] arrays."""
  return len(w) if isinstance(w, tuple) else w.shape[0]


def _swiglu_loop(x_md, ws, group_sizes, block, out_dtype):
  """down(silu(x @ gate) * (x @ up)) per expert in one loop: each expert's three matrices are taken once
  and each row block goes through all three products while it is in cache. Same products and roundings
  as three `_gmm_loop`s (gate and up outputs in x's dtype, as `gmm` returns them).

  `ws` (gate, up, down): stacks, sliced per expert (a copy of each matrix), or tuples of per-expert arrays
  (decode, where the copies cost as much as the products), picked by a switch on the expert so that each
  product reads its matrix in place. Only the products sit in the switch's branches (E x 2 per layer; XLA:CPU
  compiles a matrix-vector product per branch, so gate and up may come concatenated, `ws[1]` None: one
  product for both); anything else in them would compile E times over. One row at a time over gate and up
  apart, the rows go matrix by matrix (`_swiglu_rows_by_matrix`)."""
  if isinstance(ws[0], tuple) and ws[1] is not None and block == 1:
    return _swiglu_rows_by_matrix(x_md, ws, group_sizes, out_dtype)
  m = x_md.shape[0]
  n = ws[2][0].shape[-1] if isinstance(ws[2], tuple) else ws[2].shape[-1]
  cdt = _compute_dtype(x_md.dtype)
  starts, ends, nz_ids, n_nz = _bounds(group_sizes)
  dot = lambda a, w: jnp.dot(a, w.astype(cdt), preferred_element_type=jnp.float32)

  if isinstance(ws[0], tuple):
    if ws[1] is None:  # gate and up concatenated per expert: one product (and one branch) for both
      f = ws[0][0].shape[-1] // 2
      gate_up = [lambda x, e=e: dot(x, ws[0][e]) for e in range(len(ws[0]))]
      split = lambda y: (y[:, :f], y[:, f:])
    else:
      gate_up = [lambda x, e=e: (dot(x, ws[0][e]), dot(x, ws[1][e])) for e in range(len(ws[0]))]
      split = lambda y: y
    down = [lambda h, e=e: dot(h, ws[2][e]) for e in range(len(ws[0]))]
    products = lambda e: (lambda x: split(lax.switch(e, gate_up, x)), lambda h: lax.switch(e, down, h))
  else:
    def products(e):
      w_gate, w_up, w_down = (_expert_weight(w, e, x_md.dtype, cdt) for w in ws)
      return lambda x: (dot(x, w_gate), dot(x, w_up)), lambda h: dot(h, w_down)

  def expert(r, out):
    e = nz_ids[r]
    gate_up_fn, down_fn = products(e)

    def swiglu_rows(x):
      gate, up = (y.astype(x_md.dtype) for y in gate_up_fn(x.astype(cdt)))
      return down_fn((jax.nn.silu(gate) * up).astype(cdt))

    return _walk_rows(x_md, starts[e], ends[e], block_tiers(block), swiglu_rows, out)

  return lax.fori_loop(0, n_nz, expert, _varying_like(jnp.zeros((m, n), out_dtype), x_md, ws, group_sizes))


def _swiglu_rows_by_matrix(x_md, ws, group_sizes, out_dtype):
  """`_swiglu_loop` one row at a time over per-expert gate, up and down arrays, matrix by matrix: an
  expert's rows go through its gate matrix, then its up matrix, then its down matrix, so each matrix
  streams from memory once and the expert's further rows find it in the core's cache. (Row by row, a
  gate | up pair larger than L2, 2.4 MB at the medium benchmark width, streams again for every row.)
  Same products and roundings; one switch branch per expert and matrix."""
  m = x_md.shape[0]
  f, n = ws[0][0].shape[-1], ws[2][0].shape[-1]
  cdt = _compute_dtype(x_md.dtype)
  starts, ends, nz_ids, n_nz = _bounds(group_sizes)
  gate, up, down = ([lambda v, w=w: jnp.dot(v, w.astype(cdt), preferred_element_type=jnp.float32) for w in ws_k]
                    for ws_k in ws)

  def rows(start, end, product, src, buf):
    row = lambda i, buf: lax.dynamic_update_slice_in_dim(
        buf, product(lax.dynamic_slice_in_dim(src, i, 1)).astype(buf.dtype), i, 0)
    return lax.fori_loop(start, end, row, buf)

  def expert(r, carry):
    out, gate_mf, up_mf = carry
    e = nz_ids[r]
    gate_mf = rows(starts[e], ends[e], lambda v: lax.switch(e, gate, v.astype(cdt)), x_md, gate_mf)
    up_mf = rows(starts[e], ends[e], lambda v: lax.switch(e, up, v.astype(cdt)), x_md, up_mf)

    def down_row(i, out):
      h = jax.nn.silu(lax.dynamic_slice_in_dim(gate_mf, i, 1)) * lax.dynamic_slice_in_dim(up_mf, i, 1)
      return lax.dynamic_update_slice_in_dim(out, lax.switch(e, down, h.astype(cdt)).astype(out.dtype), i, 0)

    return lax.fori_loop(starts[e], ends[e], down_row, out), gate_mf, up_mf

  init = (jnp.zeros((m, n), out_dtype), jnp.zeros((m, f), x_md.dtype), jnp.zeros((m, f), x_md.dtype))
  return lax.fori_loop(0, n_nz, expert, tuple(_varying_like(a, x_md, ws, group_sizes) for a in init))[0]


def _swiglu_unfused(x_md, ws, group_sizes, block, out_dtype):
  """The same as three grouped matmuls (what the gradient is taken through), gate and up as one of twice
  the width where they are dense (`SideBySide`)."""
  gate, up, down = (jnp.stack(w) if isinstance(w, tuple) else w for w in ws)
  if isinstance(gate, QuantizedWeight):
    gate_mf, up_mf = (_gmm(x_md, w, group_sizes, block, x_md.dtype) for w in (gate, up))
  else:  # one grouped matmul for [gate | up] (per-expert tuples come joined already)
    gate_up_mf = _gmm(x_md, gate if up is None else SideBySide(gate, up), group_sizes, block, x_md.dtype)
    gate_mf, up_mf = jnp.split(gate_up_mf, 2, axis=-1)
  return _gmm(jax.nn.silu(gate_mf) * up_mf, down, group_sizes, block, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _swiglu(x_md, ws, group_sizes, block, out_dtype):
  return _swiglu_loop(x_md, ws, group_sizes, block, out_dtype)


def _swiglu_fwd(x_md, ws, group_sizes, block, out_dtype):
  # Differentiated, the forward runs as the three grouped matmuls, whose custom VJPs give the gradients
  # (the fused loop would have to keep gate, up and h per block for the backward anyway).
  out, vjp = jax.vjp(lambda x, ws: _swiglu_unfused(x, ws, group_sizes, block, out_dtype), x_md, ws)
  return out, vjp


def _swiglu_bwd(block, out_dtype, vjp, dout):
  return (*vjp(dout), None)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
_swiglu_jit = jax.jit(_swiglu, static_argnums=(3, 4))


# Per-expert weights (decode) are multiplied one row at a time up to this many rows per expert on average:
# XLA:CPU runs a [1, K] @ [K, N] product as a matrix-vector product that streams the matrix once, and a
# product of a few rows as a general one that first packs it (2-3x slower per row at decode sizes).
ROW_AT_A_TIME_MAX_MEAN_ROWS = 4


def swiglu_block_rows(m: int, num_groups: int, per_expert: bool = False) -> int:
  """Rows per block of `swiglu`: one for per-expert weights at decode sizes, else `block_rows`."""
  return 1 if per_expert and m <= ROW_AT_A_TIME_MAX_MEAN_ROWS * num_groups else block_rows(m, num_groups)


def swiglu(x_md, w_gate, w_up, w_down, group_sizes, *, block: int | None = None, out_dtype=None):
  """out[M, D]: down_e(silu(x @ gate_e) * (x @ up_e)) for the rows of group e (sorted by expert); rows past
  the groups are 0. Weights: dense stacks [E, K, N], QuantizedWeights, or tuples of E dense [K, N] arrays
  (`w_up` None with tuples: `w_gate` holds [gate | up], [K, 2N], per expert). Equal to `gmm` three times
  (the gradient is taken through exactly that), in one loop over experts."""
  m, k = x_md.shape
  num_groups = num_experts(w_gate)
  if group_sizes.shape != (num_groups,):
    raise ValueError(f"group_sizes {group_sizes.shape} does not match {num_groups} experts")
  kinds = {isinstance(w, tuple) for w in (w_gate, w_up, w_down) if w is not None}
  if len(kinds) > 1:
    raise ValueError("gate, up and down must all be stacks or all be tuples of per-expert arrays")
  if w_up is None and kinds != {True}:
    raise ValueError("gate and up come concatenated only as tuples of per-expert arrays")
  block = block or swiglu_block_rows(m, num_groups, per_expert=kinds == {True})
  out_dtype = jnp.dtype(out_dtype or x_md.dtype)
  return _swiglu_jit(x_md, (w_gate, w_up, w_down), group_sizes.astype(jnp.int32), block, out_dtype)
