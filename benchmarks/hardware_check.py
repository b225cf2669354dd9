"""Every Pallas kernel and the expert-parallel forward, compiled and run on the accelerator, against CPU.

  python -m benchmarks.hardware_check                    # on a TPU / GPU host: K2 shapes, appends to NOTES.md
  python -m benchmarks.hardware_check --notes=           # the same, printed only
  python -m benchmarks.hardware_check --reduced          # CPU: small shapes, kernels interpreted, 8 fake devices

Checks (each: max relative error vs the CPU reference in fp32 on the same bf16 values, and the median
time of `--reps` calls after compilation):
  gmm fwd / gmm fwd+bwd    bf16 grouped matmul (the training kernel) and its VJP, vs `ragged_dot`
  int4_matmul / int4_gmm   INT4 kernels vs dequantise-then-matmul
  expert-parallel routed   `expert_parallel.routed_experts_ep`, both dispatches, vs `moe.routed_experts`
                           (one device: the ragged all-to-all body over a 1-device `expert` axis)
  model forward            the tiny model with the mesh's `choose_moe_impl`, vs single-device CPU
On CPU the kernels run in the Pallas interpreter (both families) and the all-to-all is emulated, so
the reduced run only shows the script works; the timings mean nothing there.
"""
from __future__ import annotations

import os
import sys

if "--reduced" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"

import dataclasses
import datetime
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from benchmarks.timing import median_ms

_REDUCED = flags.DEFINE_bool("reduced", False, "Small shapes, interpreted kernels (for CPU).")
_REPS = flags.DEFINE_integer("reps", 5, "Timed calls per check (median reported).")
_NOTES = flags.DEFINE_string("notes", "benchmarks/NOTES.md",
                             "Append the results here when an accelerator ran them ('' to only print).")

BF16_TOL = 1e-2   # bf16 outputs of fp32-accumulated products: ~2^-9 per element
F32_TOL = 1e-4    # the INT4 kernels against the same dequantised values


@dataclasses.dataclass
class Row:
  check: str
  shape: str
  rel_err: float
  tol: float
  ms: float

  @property
  def ok(self) -> bool:
    return bool(self.rel_err <= self.tol)


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def f32(a):
  return a.astype(jnp.float32)


def on_cpu(fn, *args):
  cpu = jax.devices("cpu")[0]
  return jax.jit(fn)(*jax.device_put(args, cpu))


def _platforms(backend: str) -> list[tuple[str, object]]:
  """(kernel family, interpret) pairs to run: the device's own family, or both interpreted on CPU."""
  if backend == "tpu":
    return [("tpu", False)]
  if backend in ("gpu", "cuda", "rocm"):
    return [("gpu", False)]
  return [("tpu", True), ("gpu", True)]


def kernel_checks(backend: str, reduced: bool, reps: int) -> list[Row]:
  from k2jax.int4 import QuantizedWeight  # noqa: PLC0415
  from k2jax.kernels.gmm import gmm  # noqa: PLC0415
  from k2jax.kernels.int4_gmm import int4_gmm, int4_gmm_ref  # noqa: PLC0415
  from k2jax.kernels.int4_matmul import int4_matmul, int4_matmul_ref  # noqa: PLC0415

  m, k, n, sizes = (72, 512, 256, [0, 5, 11, 0, 17, 28, 0]) if reduced else (2048, 7168, 2048, [256] * 8)
  tiling = (16, 256, 128) if reduced else None
  rng = np.random.default_rng(0)
  e = len(sizes)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((e, k, n)) / np.sqrt(k), jnp.bfloat16)
  dout = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
  g = jnp.asarray(sizes, jnp.int32)
  q2 = QuantizedWeight.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32))
  q3 = QuantizedWeight.quantize(jnp.asarray(rng.standard_normal((e, k, n)), jnp.float32))
  hi = jax.lax.Precision.HIGHEST
  ref_fwd = np.asarray(on_cpu(lambda x, w: jax.lax.ragged_dot(f32(x), f32(w), g, precision=hi), x, w))
  ref_bwd = on_cpu(lambda x, w, d: jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, g, precision=hi),
                                           f32(x), f32(w))[1](f32(d)), x, w, dout)
  ref_i2 = on_cpu(lambda x: int4_matmul_ref(x, q2, out_dtype=jnp.float32), x)
  ref_i3 = on_cpu(lambda x: int4_gmm_ref(x, q3, g, out_dtype=jnp.float32), x)
  rows = []
  for platform, interpret in _platforms(backend):
    kw = dict(tiling=tiling, platform=platform, interpret=interpret)
    tag = f"[{platform}{' interpret' if interpret else ''}]"
    fwd = jax.jit(lambda x, w: gmm(x, w, g, **kw))
    bwd = jax.jit(lambda x, w, d: jax.vjp(lambda x, w: gmm(x, w, g, **kw), x, w)[1](d))
    i2 = jax.jit(lambda x: int4_matmul(x, q2, out_dtype=jnp.float32, **kw))
    i3 = jax.jit(lambda x: int4_gmm(x, q3, g, out_dtype=jnp.float32, **kw))
    got_b = bwd(x, w, dout)
    rows += [
        Row(f"gmm fwd {tag}", f"{m}x{k} @ {e}x{k}x{n} bf16", rel(fwd(x, w), ref_fwd), BF16_TOL,
            median_ms(fwd, x, w, reps=reps)),
        Row(f"gmm bwd (dx, dw) {tag}", f"{m}x{n} cotangent", max(rel(a, b) for a, b in zip(got_b, ref_bwd)),
            BF16_TOL, median_ms(bwd, x, w, dout, reps=reps)),
        Row(f"int4_matmul {tag}", f"{m}x{k} @ {k}x{n} int4", rel(i2(x), ref_i2), F32_TOL, median_ms(i2, x, reps=reps)),
        Row(f"int4_gmm {tag}", f"{m}x{k} @ {e}x{k}x{n} int4", rel(i3(x), ref_i3), F32_TOL,
            median_ms(i3, x, reps=reps)),
    ]
  return rows


def expert_parallel_checks(reduced: bool, reps: int) -> list[Row]:
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  from k2jax import expert_parallel, model as model_lib, moe, params as params_lib, presets, sharding  # noqa: PLC0415
  devices = jax.devices()
  n_dev = len(devices)
  c = presets.TINY
  T, D, E, F = (64, 64, 8, 64) if reduced else (1024, 7168, 8 * n_dev, 2048)
  ks = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(ks[0], (T, D), jnp.float32).astype(jnp.bfloat16)
  router = jax.random.normal(ks[1], (D, E)) / np.sqrt(D)
  experts = {"gate_edf": jax.random.normal(ks[2], (E, D, F)) / np.sqrt(D),
             "up_edf": jax.random.normal(ks[3], (E, D, F)) / np.sqrt(D),
             "down_efd": jax.random.normal(ks[4], (E, F, D)) / np.sqrt(F)}
  experts = jax.tree.map(lambda a: a.astype(jnp.bfloat16), experts)
  route = functools.partial(moe.route, c=dataclasses.replace(c, n_routed_experts=E, n_group=1, topk_group=1))
  ref = on_cpu(lambda x, r, e: moe.routed_experts(f32(x), route(x, r, jnp.zeros(E)), jax.tree.map(f32, e)),
               x, router, experts)
  rows = []
  spec = "expert:4,data:2" if n_dev == 8 and reduced else f"expert:{n_dev}"
  mesh = sharding.make_mesh(spec)
  shape = f"T={T} D={D} E={E} F={F} on {spec}"
  if n_dev > 1:
    for dispatch in expert_parallel.DISPATCHES:
      fn = jax.jit(lambda x, r, e, d=dispatch: expert_parallel.routed_experts_ep(
          x, route(x, r, jnp.zeros(E)), e, mesh, d))
      rows.append(Row(f"expert-parallel routed ({dispatch})", shape, rel(fn(x, router, experts), ref), BF16_TOL,
                      median_ms(fn, x, router, experts, reps=reps)))
  else:  # one device: the real ragged all-to-all over an `expert` axis of 1
    body = functools.partial(expert_parallel._all_to_all_body, n=1, tensor=False,  # noqa: SLF001
                             emulate=devices[0].platform == "cpu")
    # Tokens "split" over the 1-device expert axis, as the multi-device path splits them.
    tok = P(expert_parallel.EXPERT_AXIS)
    run = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, P(expert_parallel.EXPERT_AXIS)), out_specs=tok)

    def fn(x, r, e):
      rt = route(x, r, jnp.zeros(E))
      return run(x, rt.weights_tk, rt.experts_tk, e)
    fn = jax.jit(fn)
    rows.append(Row("expert-parallel routed (all_to_all, 1 device)", shape, rel(fn(x, router, experts), ref),
                    BF16_TOL, median_ms(fn, x, router, experts, reps=reps)))
  # The model forward with the implementation the entry points would choose for this mesh.
  p = params_lib.init_params(c, jax.random.key(1))
  tokens = jax.random.randint(jax.random.key(2), (8, 32), 0, c.vocab_size)
  want = on_cpu(lambda p, t: model_lib.forward(p, c, t).logits, p, tokens)
  impl = sharding.choose_moe_impl(mesh)
  with sharding.use_mesh(mesh):
    fwd = jax.jit(lambda p, t: model_lib.forward(p, c, t, moe_impl=impl).logits)
    placed = sharding.place_params(p, c, mesh)
    got = fwd(placed, tokens)
    ms = median_ms(fwd, placed, tokens, reps=reps)
  rows.append(Row(f"model forward (moe_impl={impl})", f"tiny fp32, 8x32 tokens on {spec}", rel(got, want),
                  F32_TOL if jax.default_backend() == "cpu" else 2e-2, ms))
  return rows


def format_rows(rows: list[Row], header: str) -> str:
  lines = [header, "", "| check | shape | rel. error | tolerance | ok | median ms |", "|---|---|---:|---:|---|---:|"]
  lines += [f"| {r.check} | {r.shape} | {r.rel_err:.2e} | {r.tol:.0e} | {'yes' if r.ok else 'NO'} | {r.ms:.3f} |"
            for r in rows]
  return "\n".join(lines)


def run_checks(reduced: bool, reps: int) -> list[Row]:
  backend = jax.default_backend()
  return kernel_checks(backend, reduced, reps) + expert_parallel_checks(reduced, reps)


def main(argv):
  del argv
  backend = jax.default_backend()
  reduced = _REDUCED.value or backend == "cpu"
  rows = run_checks(reduced, _REPS.value)
  dev = jax.devices()[0]
  when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
  header = (f"## Hardware check: {getattr(dev, 'device_kind', backend)} x{len(jax.devices())} ({when}, jax "
            f"{jax.__version__})\n\n`python -m benchmarks.hardware_check{' --reduced' if reduced else ''}`"
            f"{'; reduced shapes, kernels interpreted' if reduced else ''}.")
  text = format_rows(rows, header)
  print(text)
  if _NOTES.value and backend != "cpu":
    with open(_NOTES.value, "a", encoding="utf-8") as f:
      f.write("\n\n" + text + "\n")
  if not all(r.ok for r in rows):
    sys.exit(f"hardware check failed: {', '.join(r.check for r in rows if not r.ok)}")


if __name__ == "__main__":
  app.run(main)
