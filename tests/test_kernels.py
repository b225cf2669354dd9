"""Pallas expert kernels against their XLA references, run interpreted on CPU.

Each kernel family runs in the generic interpreter (`interpret=True`); the TPU family also in the TPU
interpreter (`pltpu.InterpretParams()`, which fills uninitialised buffers with NaN). A last test lowers
every kernel for TPU (Mosaic) and CUDA (Triton) without running it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from k2jax.int4 import QuantizedWeight
from k2jax.kernels import dispatch
from k2jax.kernels.gmm import gmm, gmm_items, gmm_ref, tgmm, tgmm_items
from k2jax.kernels.int4_gmm import int4_gmm, int4_gmm_ref
from k2jax.kernels.int4_matmul import int4_matmul, int4_matmul_ref

M, K, N = 72, 512, 256
TILING = (16, 256, 128)  # 5 m tiles (M padded to 80), 2 k tiles, 2 n tiles
# Empty groups first, inside and last; group ends at rows 5, 16 (a tile edge), 33 and 61; the group
# of 17 spans 3 tiles; rows 61..71 belong to no group.
SIZES = [0, 5, 11, 0, 17, 28, 0]
MODES = [("tpu", "interpret"), ("tpu", "tpu_interpret"), ("gpu", "interpret")]
F32_TOL = 1e-5


def _interp(name):
  return True if name == "interpret" else pltpu.InterpretParams()


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  e = len(SIZES)
  return {
      "x": jnp.asarray(rng.standard_normal((M, K)), jnp.float32),
      "w": jnp.asarray(rng.standard_normal((e, K, N)) / np.sqrt(K), jnp.float32),
      "dout": jnp.asarray(rng.standard_normal((M, N)), jnp.float32),
      "sizes": jnp.asarray(SIZES, jnp.int32),
      "q2": QuantizedWeight.quantize(jnp.asarray(rng.standard_normal((K, N)), jnp.float32)),
      "q3": QuantizedWeight.quantize(jnp.asarray(rng.standard_normal((e, K, N)), jnp.float32)),
  }


def test_work_item_tables_cover_every_row():
  rng = np.random.default_rng(1)
  tm, tiles_m, e = 8, 12, 6
  items = jax.jit(gmm_items, static_argnums=(1, 2))
  t_items = jax.jit(tgmm_items, static_argnums=(1, 2))
  for _ in range(20):
    sizes = rng.multinomial(int(rng.integers(0, tm * tiles_m + 1)), rng.dirichlet(np.ones(e) * 0.3))
    sizes = jnp.asarray(sizes * (rng.random(e) > 0.3), jnp.int32)
    starts, ends, grp, tile, flags = map(np.asarray, items(sizes, tiles_m, tm))
    seen = np.zeros(tiles_m * tm, int)
    for g, t, f in zip(grp, tile, flags):
      if f & 2:
        rows = np.arange(t * tm, t * tm + tm)
        seen[rows[(rows >= starts[g]) & (rows < ends[g])]] += 1
    assert (seen == (np.arange(tiles_m * tm) < ends[-1])).all()
    assert sorted(set(tile[(flags & 1) > 0])) == list(range(tiles_m))  # every tile initialised once
    assert (np.diff(tile) >= 0).all()  # output blocks revisited consecutively only
    _, _, grp_t, _, flags_t = map(np.asarray, t_items(sizes, tiles_m, tm))
    assert (np.unique(grp_t[(flags_t & 4) > 0]) == np.arange(e)).all()  # every group written
    assert (np.diff(grp_t) >= 0).all()


@pytest.mark.parametrize("platform,mode", MODES)
def test_int4_matmul(platform, mode, data):
  out = int4_matmul(data["x"], data["q2"], tiling=TILING, platform=platform, interpret=_interp(mode))
  assert rel(out, int4_matmul_ref(data["x"], data["q2"])) < F32_TOL


@pytest.mark.parametrize("platform,mode", MODES)
def test_int4_gmm(platform, mode, data):
  out = int4_gmm(data["x"], data["q3"], data["sizes"], tiling=TILING, platform=platform,
                 interpret=_interp(mode))
  ref = int4_gmm_ref(data["x"], data["q3"], data["sizes"])
  assert rel(out, ref) < F32_TOL
  assert not np.asarray(out[sum(SIZES):]).any()


@pytest.mark.parametrize("platform,mode", MODES)
def test_gmm_forward_and_grads(platform, mode, data):
  x, w, sizes, dout = data["x"], data["w"], data["sizes"], data["dout"]
  f = lambda x, w: gmm(x, w, sizes, tiling=TILING, platform=platform, interpret=_interp(mode))
  out, vjp = jax.vjp(f, x, w)
  ref, vjp_ref = jax.vjp(lambda x, w: gmm_ref(x, w, sizes), x, w)
  assert rel(out, ref) < F32_TOL
  assert not np.asarray(out[sum(SIZES):]).any()
  for got, want in zip(vjp(dout), vjp_ref(dout)):
    assert rel(got, want) < F32_TOL
  dw = np.asarray(vjp(dout)[1])
  assert not dw[[i for i, s in enumerate(SIZES) if s == 0]].any()  # empty experts get zero grad


def test_gmm_grad_via_jax_grad(data):
  x, w, sizes = data["x"], data["w"], data["sizes"]
  loss = lambda fn: lambda x, w: jnp.sum(jnp.tanh(fn(x, w)))
  kern = lambda x, w: gmm(x, w, sizes, tiling=TILING, platform="gpu", interpret=True)
  got = jax.grad(loss(kern), argnums=(0, 1))(x, w)
  want = jax.grad(loss(lambda x, w: jax.lax.ragged_dot(x, w, sizes)), argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    assert rel(g, r) < F32_TOL


def test_tgmm_all_rows_one_group_and_no_rows(data):
  x, dout = data["x"], data["dout"]
  for sizes in ([0, M, 0], [0, 0, 0]):
    sizes = jnp.asarray(sizes, jnp.int32)
    dw = tgmm(x.T, dout, sizes, tiling=TILING, platform="tpu", interpret=True)
    want = jnp.zeros((3, K, N)).at[1].set(x.T @ dout) if sizes[1] else jnp.zeros((3, K, N))
    np.testing.assert_allclose(np.asarray(dw), np.asarray(want), atol=1e-4)


def test_bf16_int4_gmm_and_dispatch(data):
  x = data["x"].astype(jnp.bfloat16)
  q3, sizes = data["q3"], data["sizes"]
  ref = int4_gmm_ref(x, q3, sizes)  # same bf16 weights, fp32 accumulation
  got = dispatch.grouped_matmul(x, q3, sizes, backend="tpu", impl="pallas", tiling=TILING, interpret=True)
  assert got.dtype == jnp.bfloat16 and rel(got, ref) < 1e-2
  xla = dispatch.grouped_matmul(x, q3, sizes, out_dtype=jnp.float32)  # CPU default: XLA path
  assert rel(xla, int4_gmm_ref(x, q3, sizes, out_dtype=jnp.float32)) < F32_TOL
  dense = dispatch.grouped_matmul(data["x"], data["w"], sizes)
  assert rel(dense, gmm_ref(data["x"], data["w"], sizes)) < F32_TOL
  y = dispatch.matmul(data["x"].reshape(8, 9, K), data["q2"], backend="gpu", impl="pallas", tiling=TILING,
                      interpret=True)
  assert y.shape == (8, 9, N) and rel(y.reshape(M, N), int4_matmul_ref(data["x"], data["q2"])) < F32_TOL
  with pytest.raises(ValueError):
    dispatch.grouped_matmul(x, q3, sizes, backend="tpu", impl="pallas")  # no TPU and no interpret


def test_kernels_lower_for_tpu_and_cuda():
  s = jax.ShapeDtypeStruct
  bf, e, k, n, m = jnp.bfloat16, 4, 1024, 2048, 256
  args = {
      "gmm": (s((m, k), bf), s((e, k, n), bf), s((e,), jnp.int32)),
      "int4_matmul": (s((m, k), bf), QuantizedWeight(s((4, k // 32, n), jnp.int32), s((k // 32, n), bf))),
      "int4_gmm": (s((m, k), bf), QuantizedWeight(s((e, 4, k // 32, n), jnp.int32), s((e, k // 32, n), bf)),
                   s((e,), jnp.int32)),
  }
  for platform, target in (("tpu", "tpu"), ("gpu", "cuda")):
    fns = {
        "gmm": jax.grad(lambda x, w, g: gmm(x, w, g, platform=platform).astype(jnp.float32).sum(), (0, 1)),
        "int4_matmul": lambda x, w: int4_matmul(x, w, platform=platform),
        "int4_gmm": lambda x, w, g: int4_gmm(x, w, g, platform=platform),
    }
    for name, fn in fns.items():
      exp = jax.export.export(jax.jit(fn), platforms=[target], disabled_checks=[
          jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args[name])
      text = exp.mlir_module()
      assert ("tpu_custom_call" if target == "tpu" else "xla.gpu.triton") in text, (target, name)


@pytest.mark.parametrize("platform,mode", MODES)
def test_bf16_gmm_forward_and_backward(platform, mode, data):
  """The training kernel in bf16 (fp32 accumulation) against `ragged_dot` in fp32 on the same values."""
  x, w, dout = (data[k].astype(jnp.bfloat16) for k in ("x", "w", "dout"))
  sizes = data["sizes"]
  f = lambda x, w: gmm(x, w, sizes, tiling=TILING, platform=platform, interpret=_interp(mode))
  out, vjp = jax.vjp(f, x, w)
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  ref, vjp_ref = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, sizes, precision=jax.lax.Precision.HIGHEST),
                         f32(x), f32(w))
  assert out.dtype == jnp.bfloat16
  valid = sum(SIZES)
  # Rounding the fp32-accumulated result to bf16 costs at most 2^-9 per element.
  assert rel(out[:valid], ref[:valid]) < 4e-3
  assert not np.asarray(out[valid:]).any()
  (dx, dw), (dx_ref, dw_ref) = vjp(dout), vjp_ref(f32(dout))
  assert dx.dtype == dw.dtype == jnp.bfloat16
  assert rel(dx, dx_ref) < 4e-3 and rel(dw, dw_ref) < 4e-3
  assert not np.asarray(dw)[[i for i, s in enumerate(SIZES) if s == 0]].any()
