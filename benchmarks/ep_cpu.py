"""The engine on one CPU device vs the routed experts split over N CPU devices (`expert:N`), in one process.

  python -m benchmarks.ep_cpu --width=small --cells=prefill8,decode1,decode8 --rounds=7
  python -m benchmarks.ep_cpu --width=medium --cells=decode8 --rounds=1

XLA:CPU runs each program's loops on one thread; with N CPU devices (`jax_num_cpu_devices`) each device
runs its own experts' loops on its own thread. Both engines get the same random weights (fp32) and
prompts (batch x 128 tokens); prefill is `Engine.prefill`, decode is `Engine.generate` of 64 greedy tokens
minus the prefill of the same round. The two alternate (order flipped every round); per cell the median
wall time, min, and process CPU time over the rounds, after a warm-up call each; the greedy ids of the
two engines must be equal.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

PROMPT, NEW = 128, 64


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--width", default="small", help="tiny, small or medium (benchmarks/widths.py)")
  ap.add_argument("--devices", type=int, default=2, help="CPU devices for the split engine (expert:N)")
  ap.add_argument("--cells", default="prefill8,decode1,decode8", help="prefill<B> and decode<B>, comma-separated")
  ap.add_argument("--rounds", type=int, default=7, help="timed rounds per cell (median), after a warm-up")
  args = ap.parse_args()

  from k2jax import sharding  # noqa: PLC0415
  sharding.set_cpu_devices(f"expert:{args.devices}")  # before JAX starts its backend
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from benchmarks.widths import width_config  # noqa: PLC0415
  from k2jax import params as params_lib  # noqa: PLC0415
  from k2jax.infer.engine import Engine  # noqa: PLC0415

  c = width_config(args.width)
  params = jax.device_put(params_lib.init_params(c, jax.random.key(0)), jax.devices()[0])
  mesh = sharding.make_mesh(f"expert:{args.devices}")
  rules = sharding.inference_rules(mesh)
  one = Engine(params, c, max_len=PROMPT + NEW + 16)
  split = Engine(sharding.place_for_inference(params, c, mesh), c, max_len=PROMPT + NEW + 16,
                 moe_impl=sharding.choose_moe_impl(mesh))
  engines = {"1 device": (one, lambda: sharding.use_mesh(sharding.make_mesh("fsdp:1", jax.devices()[:1]))),
             f"{args.devices} devices": (split, lambda: sharding.use_mesh(mesh, rules))}

  def timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0

  print(f"# width={c.name} d={c.hidden_size}, {c.num_hidden_layers} layers, {c.n_routed_experts} experts "
        f"top-{c.num_experts_per_tok}; jax {jax.__version__}; {os.cpu_count()} CPUs")
  for cell in args.cells.split(","):
    kind, batch = cell.rstrip("0123456789"), int(cell[len(cell.rstrip("0123456789")):])
    prompts = np.random.default_rng(0).integers(0, 2000, (batch, PROMPT)).tolist()
    res = {name: {"wall": [], "cpu": []} for name in engines}
    ids = {}
    loads = []
    for r in range(args.rounds + 1):  # round 0: warm-up (compilation)
      for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
        eng, ctx = engines[name]
        with ctx():
          _, pre_wall, pre_cpu = timed(lambda: jax.block_until_ready(eng.prefill(prompts)[0]))
          if kind == "decode":
            gen, wall, cpu = timed(lambda: eng.generate(prompts, NEW))
            ids[name] = gen.tokens
            wall, cpu = wall - pre_wall, cpu - pre_cpu
          else:
            wall, cpu = pre_wall, pre_cpu
        if r:
          res[name]["wall"].append(wall)
          res[name]["cpu"].append(cpu)
      loads.append(os.getloadavg()[0])
    same = "" if kind != "decode" else f", same ids: {len(set(map(str, ids.values()))) == 1}"
    print(f"## {cell} ({args.rounds} rounds, load {min(loads):.1f}-{max(loads):.1f}{same})")
    base = statistics.median(res["1 device"]["wall"])
    for name, r in res.items():
      med = statistics.median(r["wall"])
      print(f"{name:>10}: wall median {med:.3f} s (min {min(r['wall']):.3f}), process CPU median "
            f"{statistics.median(r['cpu']):.3f} s, 1 device / this {base / med:.2f}x", flush=True)


if __name__ == "__main__":
  main()
