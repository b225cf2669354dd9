"""Where k2jax's CPU time goes at a given width: each component jitted and timed alone, fp32.

  python -m benchmarks.profile_widths --width=small [--reps=5] [--trace]

Prefill (batch 8 x 128 tokens into an empty cache) and one decode step (batch 8, cache of 208): per-layer
attention (absorbed, over the cache), the MoE layer (router, routed experts, shared expert) and the dense
MLP, times the layer counts (decoding reads the routed experts as the engine does on CPU, per expert); the
vocab head (+ greedy sampling when decoding); and the engine's own
figure for the same work (`Engine.prefill`, and `Engine.generate` per token) so that the rest (layer
scan, cache writes, norms, host work) shows as the difference. Widths as in `benchmarks/widths.py`.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.widths import NEW, PROMPT, width_config
from k2jax import attention, moe, params as params_lib, rope
from k2jax import model as model_lib
from k2jax.infer.engine import Engine
from k2jax.kernels import dispatch
from k2jax.infer.sampling import SamplingParams, sample, sample_with_logprob
from k2jax.layers import swiglu_mlp
from benchmarks.profile_train import op_self_times
from benchmarks.timing import median_ms

BATCH = 8
TRACE_STEPS = 16


def decode_op_group(op: str, op_name: str) -> str:
  """A decode op's place in the model, from the named scopes in its op_name (`model._layer`)."""
  product = op in ("dot", "ynn_fusion") or "dot_general" in op_name
  if "/moe/" in op_name:
    if "_swiglu" in op_name:
      return "routed experts: matrix-vector products" if op == "dot" else "routed experts: loop, slices, SwiGLU"
    return "MoE: other products (router, shared expert)" if product else "MoE: routing, sort, combine"
  if "/attention/" in op_name:
    return "attention: products" if product else "attention: rope, norms, cache writes, softmax, copies"
  if "/mlp/" in op_name:
    return "dense MLP"
  if "/head/" in op_name:
    return "head"
  if "sample" in op_name:
    return "sampling"
  return "rest: embedding, norms, residuals, loop"


def decode_trace(engine: Engine, c, prompts, reps: int):
  """Op self times (ms per decode step, by `decode_op_group`) of TRACE_STEPS greedy decode steps over the
  engine's decode weights, after a prefill of `prompts`."""
  logits_bv, cache = engine.prefill(prompts)

  @jax.jit
  def steps(params, cache, token_b):
    if isinstance(params.get("moe_layers"), tuple):  # per-layer weights: the cache per layer too, as the engine
      cache = model_lib.unstack_cache(cache)

    def step(_, carry):
      cache, token_b = carry
      out = model_lib.forward(params, c, token_b[:, None], cache=cache)
      return out.cache, sample_with_logprob(out.logits[:, 0], jax.random.key(0), SamplingParams())[0]
    return jax.lax.fori_loop(0, TRACE_STEPS, step, (cache, token_b))

  token_b = jnp.argmax(logits_bv, -1).astype(jnp.int32)
  groups = op_self_times(steps, engine._decode_params(), cache, token_b, reps=reps, kind_of=decode_op_group)
  return {k: v / TRACE_STEPS for k, v in groups.items()}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--width", default="small")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--trace", action="store_true", help="also a decode step's op-by-op self times")
  args = ap.parse_args()
  c = width_config(args.width)
  p = params_lib.init_params(c, jax.random.key(0))
  moe_p = jax.tree.map(lambda a: a[0], p["moe_layers"])
  dense_p = jax.tree.map(lambda a: a[0], p["dense_layers"])
  n_moe, n_dense = c.num_moe_layers, c.num_dense_layers
  # Decoding reads the routed experts as the engine does (per-expert arrays on CPU, `moe.split_experts`).
  split = dispatch.split_experts_for_decode(p["moe_layers"]["moe"]["experts"]["gate_edf"])
  moe_dec = {**moe_p["moe"], "experts": moe.split_experts(moe_p["moe"]["experts"])} if split else moe_p["moe"]
  max_len = PROMPT + NEW + 16
  rng = np.random.default_rng(0)
  rows = []

  def attn(p_attn, x, cache_c, cache_pe, start_b):
    T = x.shape[1]
    q_index = start_b[:, None] + jnp.arange(T)[None]
    cos, sin = rope.cos_sin(c, q_index, x.dtype)
    mask = attention.Mask(jnp.ones(q_index.shape, jnp.int32), q_index)
    return attention.mla_absorbed(p_attn, x, c, cos, sin, mask, cache_c[None], cache_pe[None], 0, start_b)[0]

  moe_fn = jax.jit(lambda p, x: moe.moe(p, x, c, jnp.ones(x.shape[:2], bool))[0])
  mlp_fn = jax.jit(swiglu_mlp)
  attn_fn = jax.jit(attn)
  head_fn = jax.jit(lambda w, x: sample(jnp.einsum("bd,dv->bv", x, w), jax.random.key(0), SamplingParams()))
  engine = Engine(p, c, max_len=max_len)
  for phase, T, start in (("prefill", PROMPT, 0), ("decode", 1, PROMPT + NEW // 2)):
    x = jnp.asarray(rng.standard_normal((BATCH, T, c.hidden_size)), jnp.float32)
    cache_c = jnp.asarray(rng.standard_normal((BATCH, max_len, c.kv_lora_rank)), jnp.float32)
    cache_pe = jnp.asarray(rng.standard_normal((BATCH, max_len, c.qk_rope_head_dim)), jnp.float32)
    start_b = jnp.full((BATCH,), start, jnp.int32)
    parts = {
        f"attention x{c.num_hidden_layers}": c.num_hidden_layers * median_ms(
            attn_fn, moe_p["attn"], x, cache_c, cache_pe, start_b, reps=args.reps),
        f"MoE layer x{n_moe}": n_moe * median_ms(moe_fn, moe_dec if phase == "decode" else moe_p["moe"], x,
                                                 reps=args.reps),
        f"dense MLP x{n_dense}": n_dense * median_ms(mlp_fn, x, dense_p["mlp"], reps=args.reps),
        "head" + (" + sampling" if phase == "decode" else ""): median_ms(head_fn, p["lm_head_dv"], x[:, -1],
                                                                    reps=args.reps),
    }
    prompts = rng.integers(0, 2000, (BATCH, PROMPT)).tolist()
    if phase == "prefill":
      whole = median_ms(lambda: engine.prefill(prompts)[0], reps=args.reps)
    else:
      pre = median_ms(lambda: engine.prefill(prompts)[0], reps=args.reps)
      gen = median_ms(lambda: jnp.asarray(engine.generate(prompts, NEW).tokens), reps=max(1, args.reps // 2))
      whole = (gen - pre) / NEW
    rows.append((phase, parts, whole))
  print(f"# width={args.width} (d={c.hidden_size}, {c.num_hidden_layers} layers, {c.n_routed_experts} experts "
        f"top-{c.num_experts_per_tok}, vocab {c.vocab_size}), batch {BATCH}, jax {jax.__version__}, fp32")
  print("| phase | component | ms | share of engine |")
  print("|---|---|---:|---:|")
  for phase, parts, whole in rows:
    for name, t in parts.items():
      print(f"| {phase} | {name} | {t:.2f} | {t / whole:.0%} |")
    print(f"| {phase} | rest (scan, cache writes, norms, host) | {whole - sum(parts.values()):.2f} | "
          f"{1 - sum(parts.values()) / whole:.0%} |")
    print(f"| {phase} | engine ({'per token' if phase == 'decode' else 'whole prefill'}) | {whole:.2f} | 100% |")
  if args.trace:
    groups = decode_trace(engine, c, rng.integers(0, 2000, (BATCH, PROMPT)).tolist(), reps=3)
    total = sum(groups.values())
    print(f"\nOne decode step op by op (batch {BATCH}, self times, all ops {total:.2f} ms)\n"
          "| group | ms | share |\n|---|---:|---:|")
    for group, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
      print(f"| {group} | {ms:.2f} | {ms / total:.0%} |")


if __name__ == "__main__":
  main()
