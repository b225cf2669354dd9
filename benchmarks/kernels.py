"""Expert matmul timings: INT4 Pallas kernel vs XLA dequantise-then-matmul vs bf16 matmul.

  python -m benchmarks.kernels [--experts=8 --m_per_expert=1,8,64 --prefill_rows=512 --reps=5]

Shapes are K2's gate/up projection (D=7168 -> F=2048). "single" is one expert, x[M, D] @ W[D, F];
"grouped" is `experts` experts with M rows each (decode) or `prefill_rows` rows split evenly (prefill).
On CPU only the XLA paths run; the Pallas rows appear when a TPU or GPU backend is present.
"""


import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from k2jax.int4 import QuantizedWeight
from k2jax.kernels import dispatch
from benchmarks.timing import median_ms

_D = flags.DEFINE_integer("d", 7168, "input dim K")
_F = flags.DEFINE_integer("f", 2048, "output dim N")
_EXPERTS = flags.DEFINE_integer("experts", 8, "experts in the grouped cases")
_M = flags.DEFINE_list("m_per_expert", ["1", "8", "64"], "decode rows per expert")
_PREFILL = flags.DEFINE_integer("prefill_rows", 512, "rows in the prefill case (0 to skip)")
_REPS = flags.DEFINE_integer("reps", 5, "timed repetitions (median reported)")


def main(_):
  backend = jax.default_backend()
  has_kernels = backend in ("tpu", "gpu", "cuda", "rocm")
  d, f, e, reps = _D.value, _F.value, _EXPERTS.value, _REPS.value
  rng = np.random.default_rng(0)
  w_bf16 = jnp.asarray(rng.standard_normal((e, d, f), np.float32) * d ** -0.5, jnp.bfloat16)
  w_int4 = jax.jit(QuantizedWeight.quantize)(w_bf16)
  jax.block_until_ready(w_int4)

  single = {
      "bf16": jax.jit(lambda x, w: dispatch.matmul(x, w, impl="xla")),
      "int4 xla": jax.jit(lambda x, w: dispatch.matmul(x, w, impl="xla")),
      "int4 pallas": jax.jit(lambda x, w: dispatch.matmul(x, w, impl="pallas")),
  }
  grouped = {
      "bf16": jax.jit(lambda x, w, g: dispatch.grouped_matmul(x, w, g, impl="xla")),
      "int4 xla": jax.jit(lambda x, w, g: dispatch.grouped_matmul(x, w, g, impl="xla")),
      "int4 pallas": jax.jit(lambda x, w, g: dispatch.grouped_matmul(x, w, g, impl="pallas")),
  }

  cases = [("single", int(m), None) for m in _M.value]
  cases += [("grouped", int(m) * e, [int(m)] * e) for m in _M.value]
  if _PREFILL.value:
    rows = _PREFILL.value // e * e
    cases.append(("prefill", rows, [rows // e] * e))

  print(f"backend={backend} D={d} F={f} experts={e} reps={reps}")
  print(f"{'case':<9}{'M':>6}{'bf16 ms':>10}{'int4 xla ms':>13}{'xla/bf16':>10}"
        + (f"{'int4 pallas ms':>16}{'pallas/bf16':>13}" if has_kernels else ""))
  for kind, m, sizes in cases:
    x = jnp.asarray(rng.standard_normal((m, d), np.float32), jnp.bfloat16)
    if kind == "single":
      fns, w_dense, w_q, extra = single, w_bf16[0], w_int4[0], ()
    else:
      fns, w_dense, w_q, extra = grouped, w_bf16, w_int4, (jnp.asarray(sizes, jnp.int32),)
    t_bf16 = median_ms(fns["bf16"], x, w_dense, *extra, reps=reps)
    t_xla = median_ms(fns["int4 xla"], x, w_q, *extra, reps=reps)
    line = f"{kind:<9}{m:>6}{t_bf16:>10.2f}{t_xla:>13.2f}{t_xla / t_bf16:>10.2f}"
    if has_kernels:
      t_pl = median_ms(fns["int4 pallas"], x, w_q, *extra, reps=reps)
      line += f"{t_pl:>16.2f}{t_pl / t_bf16:>13.2f}"
    print(line, flush=True)


if __name__ == "__main__":
  app.run(main)
