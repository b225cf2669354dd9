"""Where k2jax's train step spends its CPU time at a given width: each component jitted and timed alone.

  python -m benchmarks.profile_train --width=small [--batch=8 --reps=3] [--trace]

Forward, and forward + backward (gradients of params and input), of one layer's attention (the per-head
training path), the MoE layer, the dense MLP, and the vocab head + loss, times the layer counts; the whole
`loss_and_grads`; the optimizer update alone (MuonClip with Newton-Schulz in fp32 and in bf16, and AdamW on
every leaf); and the matmul rates that bound Newton-Schulz (one 2-D product and a batched one, fp32 and
bf16 with fp32 accumulation). Batch x 128 tokens, fp32, widths as in `benchmarks/widths.py`.
`--trace`: also where the whole `loss_and_grads` spends its time op by op (a `jax.profiler` trace; each
XLA op's self time, grouped by op kind, ops inside the grouped-matmul loops apart).
`--trace_step=adamw|muon`: the same for the whole jitted train step (loss, gradients, optimizer update),
each op kind split by the source line it came from (the HLO's op_name, jit names dropped); the step
donates its state and each call takes the last one's, as in training.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import median_ms
from benchmarks.widths import TRAIN_SEQ, _train_batches, width_config
from k2jax import attention, moe, params as params_lib, rope
from k2jax.configs import train_tiny
from k2jax.layers import swiglu_mlp
from k2jax.train import train_step as ts


def _matmul_rates(reps: int) -> list[tuple[str, float]]:
  rng = np.random.default_rng(0)
  rows = []
  for name, shape_a, shape_b in (("1024x1024x1024", (1024, 1024), (1024, 1024)),
                                 ("256x512x256", (256, 512), (512, 256)),
                                 ("batched 160x[256x512x256]", (160, 256, 512), (160, 512, 256))):
    for dt in (jnp.float32, jnp.bfloat16):
      a, b = (jnp.asarray(rng.standard_normal(s), dt) for s in (shape_a, shape_b))
      f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
      ms = median_ms(f, a, b, reps=reps)
      flops = 2 * np.prod(shape_a) * shape_b[-1]
      rows.append((f"matmul {name} {jnp.dtype(dt).name}", flops / ms / 1e6))
  return rows


def hlo_op_names(hlo: str) -> dict[str, str]:
  """Each instruction's op_name in a compiled HLO text. Instructions a pass created without one (the
  products inside a switch's branches) take the op_name of the instruction that calls their computation."""
  own, computation_of, caller_of = {}, {}, {}
  computation = None
  for line in hlo.splitlines():
    if not line.startswith(" "):
      m = re.match(r"(?:ENTRY )?%(\S+) ", line)
      computation = m.group(1) if m else computation
      continue
    m = re.match(r"\s+(?:ROOT )?%(\S+) = ", line)
    if not m:
      continue
    name = m.group(1)
    computation_of[name] = computation
    op_name = re.search(r'op_name="([^"]*)"', line)
    if op_name:
      own[name] = op_name.group(1)
    for called in re.findall(r"(?:calls|body|condition|to_apply|branch_computations)=(\{[^}]*\}|%[\w.\-]+)", line):
      for c in re.findall(r"%([\w.\-]+)", called):
        caller_of.setdefault(c, name)

  def resolve(name, depth=0):
    caller = caller_of.get(computation_of.get(name))
    return own.get(name) or (resolve(caller, depth + 1) if caller and depth < 64 else None)

  return {name: op for name in computation_of if (op := resolve(name))}


def op_self_times(fn, *args, reps: int, kind_of=None, feed_back: bool = False) -> collections.Counter:
  """ms per call of each XLA op kind inside `fn` (self time: nested ops subtracted), from a profiler trace.
  Kinds are op names without their numeric suffix ("fusion.12" -> "fusion"), prefixed "gmm:" for ops in
  the grouped-matmul loops (`kernels/gmm_xla.py`), found through the compiled HLO's op_name metadata;
  or `kind_of(op, op_name)`. `feed_back`: `fn` returns (new first argument, ...) and each call takes the
  last call's, as a step that donates its state is run."""
  source = hlo_op_names(fn.lower(*args).compile().as_text())

  def call(args):
    out = jax.block_until_ready(fn(*args))
    return (out[0], *args[1:]) if feed_back else args

  args = call(args)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(reps):
        args = call(args)
    trace = json.load(gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]))
  by_thread = collections.defaultdict(list)
  for e in trace["traceEvents"] if isinstance(trace, dict) else trace:
    if e.get("ph") == "X":
      by_thread[(e["pid"], e["tid"])].append(e)
  self_us = collections.Counter()
  for events in by_thread.values():
    events.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
    stack = []
    for e in events:
      while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
        stack.pop()
      if stack:
        self_us[stack[-1]["name"]] -= e["dur"]
      self_us[e["name"]] += e["dur"]
      stack.append(e)
  kinds = collections.Counter()
  for name, us in self_us.items():
    if name in source:  # XLA ops only (not the runtime's own events)
      op = re.sub(r"\.\d+$", "", name)
      kind = kind_of(op, source[name]) if kind_of else (
          ("gmm:" if re.search(r"_gmm|_swiglu", source[name]) else "") + op)
      kinds[kind] += us / 1e3 / reps
  return kinds


def _train_step_fn(c, matrices: str, batch: int):
  """The jitted train step of `benchmarks.widths` (bf16 Newton-Schulz, state donated), its state, and one
  batch."""
  cfg = train_tiny.get_config()
  cfg.optimizer.matrices, cfg.optimizer.ns_dtype = matrices, "bfloat16"
  tx, sched = ts.make_optimizer(cfg)
  state = jax.jit(lambda k: ts.init_state(params_lib.init_params(c, k), tx))(jax.random.key(0))
  return ts.make_train_step(c, cfg, tx, sched), state, _train_batches(1, batch)[0]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--width", default="small")
  ap.add_argument("--batch", type=int, default=8, help=f"sequences of {TRAIN_SEQ} tokens")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--trace", action="store_true", help="also the op-by-op self times of loss_and_grads")
  ap.add_argument("--trace_step", choices=("adamw", "muon"),
                  help="only the op-by-op self times of the whole train step (AdamW on every leaf, or MuonClip), "
                       "by op kind and source")
  ap.add_argument("--top", type=int, default=25, help="rows of the op-by-op tables")
  args = ap.parse_args()
  c = width_config(args.width)
  if args.trace_step:
    by_source = lambda op, src: op + "  " + re.sub(r"jit\([^)]*\)/", "", src)[:120]  # noqa: E731
    kinds = op_self_times(*_train_step_fn(c, args.trace_step, args.batch), reps=args.reps, kind_of=by_source,
                          feed_back=True)
    print(f"# width={args.width}, {args.batch * TRAIN_SEQ} tokens, train step ({args.trace_step}): op self time, "
          f"all ops {sum(kinds.values()):.0f} ms\n| ms | op kind and source |\n|---:|---|")
    for kind, ms in kinds.most_common(args.top):
      print(f"| {ms:.1f} | `{kind}` |")
    return
  p = params_lib.init_params(c, jax.random.key(0))
  rng = np.random.default_rng(0)
  B, T = args.batch, TRAIN_SEQ
  x = jnp.asarray(rng.standard_normal((B, T, c.hidden_size)), jnp.float32)
  layer = lambda name: jax.tree.map(lambda a: a[0], p[name])  # noqa: E731
  moe_p, dense_p = layer("moe_layers"), layer("dense_layers")
  seg = jnp.ones((B, T), jnp.int32)
  idx = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask = attention.Mask(seg, idx, seg)
  cos, sin = rope.cos_sin(c, idx, jnp.float32)
  targets = jnp.asarray(rng.integers(0, c.vocab_size, (B, T)))
  parts = (
      ("attention", lambda pa, h: attention.mla(pa, h, c, cos, sin, mask)[0], moe_p["attn"], c.num_hidden_layers),
      ("MoE layer", lambda pm, h: moe.moe(pm, h, c, jnp.ones(h.shape[:2], bool))[0], moe_p["moe"], c.num_moe_layers),
      ("dense MLP", lambda pm, h: swiglu_mlp(h, pm), dense_p["mlp"], c.num_dense_layers),
      ("head + loss", lambda w, h: ts.token_nll(h, w, targets), p["lm_head_dv"], 1),
  )
  print(f"# width={args.width} (d={c.hidden_size}, {c.num_hidden_layers} layers, {c.n_routed_experts} experts "
        f"top-{c.num_experts_per_tok}, vocab {c.vocab_size}), {B * T} tokens, jax {jax.__version__}, fp32")
  print("| component | forward ms | forward + backward ms |")
  print("|---|---:|---:|")
  for name, f, params, n in parts:
    fb = jax.jit(jax.grad(lambda pp, h, f=f: jnp.sum(f(pp, h)), argnums=(0, 1)))
    print(f"| {name} x{n} | {n * median_ms(jax.jit(f), params, x, reps=args.reps):.0f} | "
          f"{n * median_ms(fb, params, x, reps=args.reps):.0f} |", flush=True)
  batch = _train_batches(1, B)[0]
  lg = jax.jit(lambda pp, b: ts.loss_and_grads(pp, c, b)[:2])
  print(f"| whole loss_and_grads | | {median_ms(lg, p, batch, reps=args.reps):.0f} |", flush=True)
  if args.trace:
    kinds = op_self_times(lg, p, batch, reps=args.reps)
    print(f"\nloss_and_grads op by op (self time, all ops {sum(kinds.values()):.0f} ms)\n| op kind | ms |\n|---|---:|")
    for kind, ms in kinds.most_common(args.top):
      print(f"| {kind} | {ms:.1f} |", flush=True)
    print()
  grads = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), p)
  for name, matrices, ns_dtype in (("MuonClip, NS fp32", "muon", "float32"), ("MuonClip, NS bf16", "muon", "bfloat16"),
                                   ("AdamW on every leaf", "adamw", "float32")):
    cfg = train_tiny.get_config()
    cfg.optimizer.matrices, cfg.optimizer.ns_dtype = matrices, ns_dtype
    tx, _ = ts.make_optimizer(cfg)
    update = jax.jit(lambda g, s, pp, tx=tx: tx.update(g, s, pp)[0])
    print(f"| optimizer update: {name} | | {median_ms(update, grads, tx.init(p), p, reps=args.reps):.0f} |", flush=True)
  print("\n| product | GFLOP/s |\n|---|---:|")
  for name, rate in _matmul_rates(max(args.reps, 5)):
    print(f"| {name} | {rate:.0f} |")


if __name__ == "__main__":
  main()
