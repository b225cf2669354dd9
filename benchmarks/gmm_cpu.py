"""Grouped matmul on CPU: `gmm_xla` and `lax.ragged_dot` against one dense matmul with the same FLOPs.

  python -m benchmarks.gmm_cpu [--m=4096 --d=512 --f=256 --experts=32 --reps=9]

Rows x[M, D] sorted by expert, W[E, D, F]; "equal" gives every expert M/E rows, "uneven" gives one expert
half the rows, five none and the rest an equal share. Forward, and forward + backward (dx, dW) of
sum(out * g). The dense baseline is x[M, D] @ W[0] (the same multiply-adds as any split). Timings are
interleaved (one call of each per round), medians of `reps` rounds.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from k2jax.kernels import gmm_xla

_M = flags.DEFINE_integer("m", 4096, "rows")
_D = flags.DEFINE_integer("d", 512, "contraction dim")
_F = flags.DEFINE_integer("f", 256, "output dim")
_E = flags.DEFINE_integer("experts", 32, "experts")
_REPS = flags.DEFINE_integer("reps", 9, "timed rounds (median)")
_BLOCKS = flags.DEFINE_list("blocks", [], "also time gmm_xla with these fixed block sizes")
_RAGGED = flags.DEFINE_bool("ragged", True, "also time lax.ragged_dot (slow on CPU)")


def splits(m, e):
  equal = np.full(e, m // e)
  equal[: m - equal.sum()] += 1
  uneven = np.zeros(e, int)
  uneven[1] = m // 2
  rest = [i for i in range(e) if i not in (0, 1, 7, 8, e - 1)][: e - 5]
  uneven[rest] = (m - m // 2) // len(rest)
  uneven[rest[0]] += m - uneven.sum()
  return {"equal": equal, "uneven": uneven}


def main(_):
  m, d, f, e = _M.value, _D.value, _F.value, _E.value
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((m, d)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(d), jnp.float32)
  g = jnp.asarray(rng.standard_normal((m, f)), jnp.float32)
  grad = lambda fn: jax.jit(jax.grad(lambda x, w, s: jnp.sum(fn(x, w, s) * g), argnums=(0, 1)))
  impls = {"dense": lambda x, w, s: x @ w[0], "gmm_xla": gmm_xla.gmm}
  for b in _BLOCKS.value:
    impls[f"gmm_xla block={b}"] = lambda x, w, s, b=int(b): gmm_xla.gmm(x, w, s, block=b)
  if _RAGGED.value:
    impls["ragged_dot"] = lambda x, w, s: jax.lax.ragged_dot(x, w, s)
  cases = {}
  for split, sizes in splits(m, e).items():
    s = jnp.asarray(sizes, jnp.int32)
    for name, fn in impls.items():
      if name == "dense" and split != "equal":
        continue
      cases[(name, split, "fwd")] = (jax.jit(fn), s)
      cases[(name, split, "fwd+bwd")] = (grad(fn), s)
  times = {k: [] for k in cases}
  for fn, s in cases.values():
    jax.block_until_ready(fn(x, w, s))
  for _ in range(_REPS.value):
    for k, (fn, s) in cases.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(x, w, s))
      times[k].append(time.perf_counter() - t)
  ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
  print(f"M={m} D={d} F={f} E={e} fp32, jax {jax.__version__} {jax.default_backend()}, medians of {_REPS.value}")
  print("| impl | split | pass | ms | vs dense |")
  print("|---|---|---|---:|---:|")
  for (name, split, pas), t in ms.items():
    print(f"| {name} | {split} | {pas} | {t:.1f} | {t / ms[('dense', 'equal', pas)]:.2f} |")


if __name__ == "__main__":
  app.run(main)
