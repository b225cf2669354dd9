"""Long context on the tiny model: prefill memory/time against T, decode step time against filled length,
and the T = 32k check (peak RSS, logits equal a two-chunk prefill through the cache). CPU, batch 1, fp32.

  python benchmarks/long_context.py prefill [--T 2048,4096,...] [--plain_max 8192]
  python benchmarks/long_context.py decode [--caches 1024,32768] [--filled 512]
  python benchmarks/long_context.py check32k [--T 32768]

Every measurement runs in its own process (peak RSS is per process); one JSON line per measurement.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time


def _config(max_len: int):
  from k2jax import presets  # noqa: PLC0415
  return presets.TINY.replace(max_position_embeddings=max(max_len, presets.TINY.max_position_embeddings))


def _rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _setup(max_len):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from k2jax import params as params_lib  # noqa: PLC0415
  c = _config(max_len)
  return c, params_lib.init_params(c, jax.random.key(0), jnp.float32)


def one_prefill(T: int, impl: str) -> dict:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from k2jax import model as model_lib  # noqa: PLC0415
  c, p = _setup(T)
  tokens = jax.random.randint(jax.random.key(1), (1, T), 0, c.vocab_size)
  fn = jax.jit(lambda p, t: model_lib.forward(p, c, t, attn_impl=impl, logits_at_b=jnp.array([T - 1])).logits)
  t0 = time.perf_counter()
  jax.block_until_ready(fn(p, tokens))
  compile_and_run = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(fn(p, tokens))
  return {"bench": "prefill", "T": T, "impl": impl, "seconds": round(time.perf_counter() - t0, 3),
          "first_call_s": round(compile_and_run, 3), "peak_rss_gb": round(_rss_gb(), 3)}


def one_decode(max_len: int, filled: int, impl: str, steps: int = 20) -> dict:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from k2jax import model as model_lib  # noqa: PLC0415
  c, p = _setup(max_len)
  cache = model_lib.init_cache(c, 1, max_len, jnp.float32)
  cache = jax.tree.map(lambda a: jax.random.normal(jax.random.key(2), a.shape, a.dtype) if a.ndim == 4 else a, cache)
  cache.lengths = jnp.full((1,), filled, jnp.int32)

  @functools.partial(jax.jit, donate_argnums=(2,))
  def step(p, tok, cache):
    out = model_lib.forward(p, c, tok, cache=cache, attn_impl=impl)
    return out.logits, out.cache

  tok = jnp.ones((1, 1), jnp.int32)
  logits, cache = jax.block_until_ready(step(p, tok, cache))
  times = []
  for _ in range(steps):
    cache.lengths = jnp.full((1,), filled, jnp.int32)  # the same step again: filled tokens in the cache
    t0 = time.perf_counter()
    logits, cache = jax.block_until_ready(step(p, tok, cache))
    times.append(time.perf_counter() - t0)
  return {"bench": "decode", "cache": max_len, "filled": filled, "impl": impl,
          "median_ms": round(1e3 * float(np.median(times)), 3), "peak_rss_gb": round(_rss_gb(), 3)}


def one_check32k(T: int) -> dict:
  """Forward at T and a two-chunk prefill through the latent cache: last-token logits must agree."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from k2jax import model as model_lib  # noqa: PLC0415
  c, p = _setup(T)
  tokens = jax.random.randint(jax.random.key(1), (1, T), 0, c.vocab_size)
  t0 = time.perf_counter()
  full = jax.jit(lambda p, t: model_lib.forward(p, c, t, logits_at_b=jnp.array([T - 1])).logits)(p, tokens)
  full = np.asarray(full)[0, 0]
  t_full = time.perf_counter() - t0
  rss_full = _rss_gb()

  @jax.jit
  def chunk(p, t, cache):
    out = model_lib.forward(p, c, t, cache=cache, logits_at_b=jnp.array([t.shape[1] - 1]))
    return out.logits, out.cache

  cache = model_lib.init_cache(c, 1, T, jnp.float32)
  t0 = time.perf_counter()
  _, cache = chunk(p, tokens[:, :T // 2], cache)
  last, cache = chunk(p, tokens[:, T // 2:], cache)
  last = np.asarray(last)[0, 0]
  return {"bench": "check32k", "T": T, "full_forward_s": round(t_full, 2),
          "two_chunk_s": round(time.perf_counter() - t0, 2), "peak_rss_gb_full_forward": round(rss_full, 3),
          "peak_rss_gb": round(_rss_gb(), 3), "cache_len": int(cache.lengths[0]),
          "max_abs_logit_diff": float(np.abs(full - last).max()), "max_abs_logit": float(np.abs(full).max())}


def _child(fn: str, *args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "_child", fn, *map(str, args)]
  res = subprocess.run(cmd, capture_output=True, text=True)
  if res.returncode != 0:
    return {"bench": fn, "args": list(args), "error": (res.stderr.strip().splitlines() or ["killed"])[-1]}
  return json.loads(res.stdout.strip().splitlines()[-1])


def main():
  if len(sys.argv) > 1 and sys.argv[1] == "_child":
    fn, args = sys.argv[2], [a if not a.lstrip("-").isdigit() else int(a) for a in sys.argv[3:]]
    print(json.dumps(globals()["one_" + fn](*args)))
    return
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("what", choices=["prefill", "decode", "check32k"])
  ap.add_argument("--T", default=None, help="prefill: T values (2048,...,65536); check32k: one T (32768)")
  ap.add_argument("--plain_max", type=int, default=8192, help="largest T for the plain (full-score) path")
  ap.add_argument("--caches", default="1024,32768")
  ap.add_argument("--filled", type=int, default=512)
  a = ap.parse_args()
  if a.what == "prefill":
    for T in map(int, (a.T or "2048,4096,8192,16384,32768,65536").split(",")):
      for impl in ("flash", "plain"):
        if impl == "plain" and T > a.plain_max:
          continue
        print(json.dumps(_child("prefill", T, impl)), flush=True)
  elif a.what == "decode":
    for impl in ("flash", "plain"):
      for max_len in map(int, a.caches.split(",")):
        print(json.dumps(_child("decode", max_len, a.filled, impl)), flush=True)
  else:
    print(json.dumps(_child("check32k", int(a.T or 32768))), flush=True)


if __name__ == "__main__":
  main()
