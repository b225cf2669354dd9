"""The plain-XLA grouped matmul (the CPU path of `dispatch.grouped_matmul`) against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.int4 import QuantizedWeight
from k2jax.kernels import dispatch, gmm_xla

M, K, N = 100, 64, 48
# Empty experts first, inside and last; one expert holds half the rows; rows 97..99 are in no group.
SIZES = [0, 7, 50, 0, 1, 23, 16, 0]


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def ref_gmm(x, w, sizes):
  out = np.zeros((x.shape[0], w.shape[-1]))
  start = 0
  for e, s in enumerate(sizes):
    out[start:start + s] = x[start:start + s] @ w[e]
    start += s
  return out


def ref_dw(x, dout, sizes):
  dw, start = np.zeros((len(sizes), x.shape[1], dout.shape[1])), 0
  for e, s in enumerate(sizes):
    dw[e] = x[start:start + s].T @ dout[start:start + s]
    start += s
  return dw


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  return (rng.standard_normal((M, K)), rng.standard_normal((len(SIZES), K, N)) / np.sqrt(K),
          rng.standard_normal((M, N)))


@pytest.mark.parametrize("block", [8, 64])
def test_forward_and_grads_match_float64(data, block):
  x, w, dout = data
  sizes = jnp.asarray(SIZES, jnp.int32)
  f = jax.jit(lambda x, w: gmm_xla.gmm(x, w, sizes, block=block))
  out, vjp = jax.vjp(f, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
  assert rel(out, ref_gmm(x, w, SIZES)) < 1e-6
  assert not np.asarray(out[sum(SIZES):]).any()
  dx, dw = vjp(jnp.asarray(dout, jnp.float32))
  assert rel(dx, ref_gmm(dout, np.swapaxes(w, 1, 2), SIZES)) < 1e-6
  assert rel(dw, ref_dw(x, dout, SIZES)) < 1e-6
  assert not np.asarray(dw)[[e for e, s in enumerate(SIZES) if s == 0]].any()


@pytest.mark.parametrize("capacity", [8, 64])
def test_tgmm_batched_part_and_overflow_blocks(data, capacity):
  """dW with every group inside the batched product (capacity 64) and with nearly all rows in the masked
  overflow blocks (8); the default capacity (the mean group) is covered by the tests around."""
  x, _, dout = data
  f = jax.jit(lambda x, d, s: gmm_xla.tgmm(x, d, s, block=16, capacity=capacity))
  for sizes in (SIZES, [0, 0, 0, 0, 0, 0, 0, M], [12] * 8):
    dw = f(jnp.asarray(x, jnp.float32), jnp.asarray(dout, jnp.float32), jnp.asarray(sizes, jnp.int32))
    assert rel(dw, ref_dw(x, dout, sizes)) < 1e-6
    assert not np.asarray(dw)[[e for e, s in enumerate(sizes) if s == 0]].any()


def test_edge_splits(data):
  x, w, _ = data
  xj, wj = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
  f = jax.jit(jax.value_and_grad(lambda w, g: jnp.sum(jnp.sin(gmm_xla.gmm(xj, w, g, block=16)))))
  for sizes in ([0, 0, 0, 0, 0, 0, 0, M], [M, 0, 0, 0, 0, 0, 0, 0], [0] * 8, [1] * 8, [12] * 8):
    y = ref_gmm(x, w, sizes)
    loss, dw = f(wj, jnp.asarray(sizes, jnp.int32))
    np.testing.assert_allclose(float(loss), np.sin(y).sum(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), ref_dw(x, np.cos(y) * (y != 0), sizes), atol=1e-4)
  # block 32: whole blocks of 128 rows, then one of 16, 32, ..., 112 rows covering the rest (`block_tiers`),
  # past a group's end; the last one shifted back to end at the array's.
  rng = np.random.default_rng(1)
  x3, d3 = rng.standard_normal((300, K)), rng.standard_normal((300, N))
  sizes = [0, 150, 0, 0, 60, 0, 90, 0]  # 128 + 32 (22 rows); 64 (60 rows); 96 (shifted back by 6 rows)
  f = jax.jit(lambda x, w: gmm_xla.gmm(x, w, jnp.asarray(sizes, jnp.int32), block=32))
  out, vjp = jax.vjp(f, jnp.asarray(x3, jnp.float32), wj)
  dx, dw = vjp(jnp.asarray(d3, jnp.float32))
  assert gmm_xla.block_tiers(32) == (128, 112, 96, 80, 64, 48, 32, 16) and rel(out, ref_gmm(x3, w, sizes)) < 1e-6
  assert rel(dx, ref_gmm(d3, np.swapaxes(w, 1, 2), sizes)) < 1e-6 and rel(dw, ref_dw(x3, d3, sizes)) < 1e-6


def test_bf16_int4_and_dispatch(data):
  x, w, dout = data
  sizes = jnp.asarray(SIZES, jnp.int32)
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  x64, dout_b = np.asarray(xb, np.float64), jnp.asarray(dout, jnp.bfloat16)

  @jax.jit
  def fwd_bwd(x, w):  # dense bf16 or INT4 weights
    out, vjp = jax.vjp(lambda x, w: gmm_xla.gmm(x, w, sizes), x, w)
    return out, *vjp(dout_b)

  out, dx, dw = fwd_bwd(xb, wb)
  assert out.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  w64 = np.asarray(wb, np.float64)
  assert rel(out, ref_gmm(x64, w64, SIZES)) < 4e-3
  assert rel(dx, ref_gmm(np.asarray(dout_b, np.float64), np.swapaxes(w64, 1, 2), SIZES)) < 4e-3
  assert rel(dw, ref_dw(x64, np.asarray(dout_b, np.float64), SIZES)) < 4e-3
  q = QuantizedWeight.quantize(jnp.asarray(w, jnp.float32))
  out, dx, dq = fwd_bwd(xb, q)  # INT4: dequantised to bf16 per expert, no weight gradient
  deq = np.asarray(q.dequantize(jnp.bfloat16), np.float64)
  assert rel(out, ref_gmm(x64, deq, SIZES)) < 4e-3
  assert rel(dx, ref_gmm(np.asarray(dout_b, np.float64), np.swapaxes(deq, 1, 2), SIZES)) < 4e-3
  assert not np.asarray(dq.scales).any()


def test_dispatch_routes_cpu_to_the_loop_unless_tiny():
  s = jax.ShapeDtypeStruct
  loops = lambda m, e: "while" in str(jax.make_jaxpr(dispatch.grouped_matmul)(
      s((m, 512), jnp.float32), s((e, 512, 256), jnp.float32), s((e,), jnp.int32)))
  assert loops(4096, 32) and not loops(8, 2)


def test_inside_shard_map_with_grads(data):
  """Experts split over a 2-device mesh, rows replicated: values and both gradients match one device."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  x, w, dout = (jnp.asarray(a, jnp.float32) for a in data)
  sizes = jnp.asarray(SIZES, jnp.int32)
  mesh = jax.make_mesh((2,), ("expert",), devices=jax.devices()[:2])
  half = len(SIZES) // 2

  def body(x, w, sizes, shard_start):  # each shard runs the rows of its own experts
    start = shard_start[0]
    local = jnp.roll(x, -start, axis=0)
    return jnp.roll(gmm_xla.gmm(local, w, sizes, block=8), start, axis=0)[None]

  run = jax.shard_map(body, mesh=mesh, in_specs=(P(), P("expert"), P("expert"), P("expert")),
                      out_specs=P("expert"))
  starts = jnp.asarray([0, sum(SIZES[:half])], jnp.int32)
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  loss = lambda x, w: jnp.sum(run(x, w, put(sizes, P("expert")), put(starts, P("expert"))).sum(0) * dout)
  got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(put(x, P()), put(w, P("expert")))
  want = jax.value_and_grad(lambda x, w: jnp.sum(gmm_xla.gmm(x, w, sizes) * dout), argnums=(0, 1))(x, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel(a, b) < 1e-6


def ref_swiglu(x, gate, up, down, sizes):
  h = 1 / (1 + np.exp(-ref_gmm(x, gate, sizes))) * ref_gmm(x, gate, sizes) * ref_gmm(x, up, sizes)
  return ref_gmm(h, down, sizes)


def ref_swiglu_grads(x, gate, up, down, sizes, dloss_dout):
  """float64 (dx, dgate, dup, ddown) of a loss of `ref_swiglu`, given d loss / d out as a function of out."""
  g, u = ref_gmm(x, gate, sizes), ref_gmm(x, up, sizes)
  sig = 1 / (1 + np.exp(-g))
  h = g * sig * u
  dout = dloss_dout(ref_gmm(h, down, sizes))
  dh = ref_gmm(dout, np.swapaxes(down, 1, 2), sizes)
  dg, du = dh * u * sig * (1 + g * (1 - sig)), dh * g * sig
  dx = ref_gmm(dg, np.swapaxes(gate, 1, 2), sizes) + ref_gmm(du, np.swapaxes(up, 1, 2), sizes)
  return dx, ref_dw(x, dg, sizes), ref_dw(x, du, sizes), ref_dw(h, dout, sizes)


def test_swiglu_one_loop_equals_three_grouped_matmuls():
  """The fused loop (stacks, per-expert tuples, INT4): same values as three `gmm`s, float64 close, and
  gradients float64 close."""
  rng = np.random.default_rng(1)
  f = 64
  x = rng.standard_normal((M, K))
  ws = [rng.standard_normal(s) / np.sqrt(s[1]) for s in ((8, K, f), (8, K, f), (8, f, K))]
  sizes = jnp.asarray(SIZES, jnp.int32)
  xj, wj = jnp.asarray(x, jnp.float32), [jnp.asarray(w, jnp.float32) for w in ws]
  mm = lambda x, w: gmm_xla.gmm(x, w, sizes, block=16)
  three = lambda x, g, u, d: mm(jax.nn.silu(mm(x, g)) * mm(x, u), d)
  fused = lambda x, g, u, d: gmm_xla.swiglu(x, g, u, d, sizes, block=16)
  out = fused(xj, *wj)
  assert rel(out, ref_swiglu(x, *ws, SIZES)) < 1e-6
  np.testing.assert_array_equal(out, three(xj, *wj))
  np.testing.assert_array_equal(gmm_xla.swiglu(xj, *(tuple(w) for w in wj), sizes, block=16), out)
  # Per-expert weights at decode sizes go one row at a time (matrix-vector products: f32 sums in another
  # order); rows past the groups stay zero.
  few = [0, 2, 3, 0, 1, 0, 2, 0]  # 8 of 10 rows
  assert gmm_xla.swiglu_block_rows(10, 8, per_expert=True) == 1 < gmm_xla.swiglu_block_rows(10, 8)
  by_row = gmm_xla.swiglu(xj[:10], *(tuple(w) for w in wj), jnp.asarray(few, jnp.int32))
  assert rel(by_row, ref_swiglu(x[:10], *ws, few)) < 1e-6
  assert not np.asarray(by_row[sum(few):]).any()
  gate_up = tuple(jnp.concatenate([g, u], -1) for g, u in zip(wj[0], wj[1]))  # `moe.split_experts`' layout
  concat = gmm_xla.swiglu(xj[:10], gate_up, None, tuple(wj[2]), jnp.asarray(few, jnp.int32))
  assert rel(concat, ref_swiglu(x[:10], *ws, few)) < 1e-6
  assert not np.asarray(out[sum(SIZES):]).any()
  # Differentiated, gate and up run as one grouped matmul of twice the width (`SideBySide`): gradients of
  # sum(sin(out)) against float64, and close to the three `gmm`s' (the same sums, in wider products).
  loss = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), (0, 1, 2, 3)))
  grads = loss(fused)(xj, *wj)
  for got, want in zip(grads, ref_swiglu_grads(x, *ws, SIZES, lambda out: np.cos(out))):
    assert rel(got, want) < 3e-6
  for a, b in zip(grads, loss(three)(xj, *wj)):
    assert rel(a, b) < 1e-6
  # Layer 1 of [2, E, K, N] stacks as `LayerSlice` views (the unrolled training layers read it in place):
  # the same values and gradients, the stacks' gradients in layer 1 only.
  viewed = lambda x, *stacks: fused(x, *(gmm_xla.layer_slices(st)[1] for st in stacks))
  stacks = [jnp.stack([-w, w]) for w in wj]
  np.testing.assert_array_equal(viewed(xj, *stacks), out)
  dx, *dstacks = loss(viewed)(xj, *stacks)
  np.testing.assert_array_equal(dx, grads[0])
  for dst, dw in zip(dstacks, grads[1:]):
    np.testing.assert_array_equal(dst[1], dw)
    assert not np.asarray(dst[0]).any()
  q = [QuantizedWeight.quantize(w) for w in wj]
  xb = xj.astype(jnp.bfloat16)
  got = gmm_xla.swiglu(xb, *q, sizes)
  want = ref_swiglu(np.asarray(xb, np.float64), *(np.asarray(w.dequantize(jnp.bfloat16), np.float64) for w in q), SIZES)
  assert got.dtype == jnp.bfloat16 and rel(got, want) < 1e-2
  with pytest.raises(ValueError, match="all be stacks or all be tuples"):
    gmm_xla.swiglu(xj, tuple(wj[0]), *wj[1:], sizes)


def test_dispatch_swiglu_routes_like_grouped_matmul():
  s = jax.ShapeDtypeStruct
  jaxpr = lambda m, e: str(jax.make_jaxpr(lambda x, g, u, d, n: dispatch.grouped_swiglu(x, g, u, d, n))(
      s((m, 512), jnp.float32), s((e, 512, 256), jnp.float32), s((e, 512, 256), jnp.float32),
      s((e, 256, 512), jnp.float32), s((e,), jnp.int32)))
  assert "custom_vjp" in jaxpr(4096, 32) and "ragged_dot" in jaxpr(8, 2)
  assert dispatch.split_experts_for_decode(jnp.zeros((4, 512, 256)), "cpu")
  many = jax.ShapeDtypeStruct((11, 64, 512, 256), jnp.float32)  # layers x experts: one branch each
  assert dispatch.split_experts_for_decode(many, "cpu")
  assert not dispatch.split_experts_for_decode(jax.ShapeDtypeStruct((60, 384, 512, 256), jnp.float32), "cpu")
  assert not dispatch.split_experts_for_decode(jnp.zeros((4, 64, 32)), "cpu")
  assert not dispatch.split_experts_for_decode(jnp.zeros((4, 512, 256)), "tpu")
  # gate | up per expert: on an expert mesh joined while it fits a core's L2 ([512, 512] fp32, 1 MB), else
  # apart (2.4 MB); on one device joined
  assert dispatch.join_gate_up_for_decode(s((32, 512, 256), jnp.float32), 2)
  assert not dispatch.join_gate_up_for_decode(s((64, 1024, 288), jnp.float32), 2)
  assert dispatch.join_gate_up_for_decode(s((64, 1024, 288), jnp.float32))


def test_full_size_shapes_are_static():
  s = jax.ShapeDtypeStruct
  m, e, d, f = 8192, 384, 7168, 2048  # K2: 384 experts, 7168 -> 2048
  fn = jax.grad(lambda x, w, g: gmm_xla.gmm(x, w, g).astype(jnp.float32).sum(), (0, 1))
  dx, dw = jax.eval_shape(fn, s((m, d), jnp.bfloat16), s((e, d, f), jnp.bfloat16), s((e,), jnp.int32))
  assert dx.shape == (m, d) and dw.shape == (e, d, f)
  q = QuantizedWeight(s((e, 4, d // 32, f), jnp.int32), s((e, d // 32, f), jnp.bfloat16))
  assert jax.eval_shape(gmm_xla.gmm, s((m, d), jnp.bfloat16), q, s((e,), jnp.int32)).shape == (m, f)
