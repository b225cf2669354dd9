"""Prefill and decode throughput of the engine vs HF transformers' generate, same weights and batch, CPU.

  python benchmarks/decode.py [--batch 8 --prompt 32 --new 64 --repeats 3]

One command measures both sides, each in its own process (XLA's and torch's CPU thread pools slow each
other down when they share one), on the same checkpoint; prints medians and the ratio, and the
latent-cache bytes per token against a per-head K/V cache.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from hf_reference import installed_kernels_package  # noqa: E402

installed_kernels_package()  # before transformers is imported

TINY_HF = dict(vocab_size=2256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
               num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2)


def _prompts(args):
  import numpy as np  # noqa: PLC0415
  return np.random.default_rng(0).integers(0, 2000, (args.batch, args.prompt))


def _time(fn, repeats):
  fn()  # warm-up: compilation, caches
  runs = [fn() for _ in range(repeats)]
  return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def measure_k2jax(args) -> tuple[float, float]:
  import jax  # noqa: PLC0415
  import k2jax  # noqa: PLC0415
  from k2jax.infer.engine import Engine  # noqa: PLC0415
  model = k2jax.from_hf(args.ckpt)
  prompts = _prompts(args).tolist()
  engine = Engine(model.param_tree(), model.config, max_len=args.prompt + args.new + 16)

  def run():
    t0 = time.perf_counter()
    jax.block_until_ready(engine.prefill(prompts)[0])
    t1 = time.perf_counter()
    engine.generate(prompts, args.new)
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) - (t1 - t0)  # generate includes one prefill

  return _time(run, args.repeats)


def measure_hf(args) -> tuple[float, float]:
  import torch  # noqa: PLC0415
  from transformers import DeepseekV3ForCausalLM  # noqa: PLC0415
  ref = DeepseekV3ForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32).eval()
  x = torch.tensor(_prompts(args))

  def run():
    with torch.no_grad():
      t0 = time.perf_counter()
      ref(x, use_cache=True)
      t1 = time.perf_counter()
      ref.generate(x, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
      t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) - (t1 - t0)

  return _time(run, args.repeats)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompt", type=int, default=32)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--side", choices=["k2jax", "hf"], help=argparse.SUPPRESS)
  ap.add_argument("--ckpt", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.side:
    prefill_s, decode_s = (measure_k2jax if args.side == "k2jax" else measure_hf)(args)
    print(json.dumps({"prefill_s": prefill_s, "decode_s": decode_s}))
    return

  from hf_reference import make_reference  # noqa: PLC0415
  args.ckpt = tempfile.mkdtemp()
  make_reference(args.ckpt, seed=0, **TINY_HF)
  common = [f"--batch={args.batch}", f"--prompt={args.prompt}", f"--new={args.new}",
            f"--repeats={args.repeats}", f"--ckpt={args.ckpt}"]
  res = {}
  for side in ("k2jax", "hf"):
    out = subprocess.run([sys.executable, __file__, f"--side={side}", *common], capture_output=True, text=True,
                         check=True)
    res[side] = json.loads(out.stdout.strip().splitlines()[-1])
  pre, dec = args.batch * args.prompt, args.batch * args.new
  print(f"tiny K2 (d=64, 3 layers, 8 experts top-2), fp32, batch {args.batch}, prompt {args.prompt}, "
        f"new {args.new}; medians of {args.repeats}, each side in its own process")
  print(f"{'':<18}{'k2jax':>12}{'HF transformers':>18}{'ratio':>8}")
  for name, key, n in (("prefill tokens/s", "prefill_s", pre), ("decode tokens/s", "decode_s", dec)):
    a, b = n / res["k2jax"][key], n / res["hf"][key]
    print(f"{name:<18}{a:>12.0f}{b:>18.0f}{a / b:>8.2f}")
  from k2jax import presets  # noqa: PLC0415
  k2 = presets.K2_THINKING
  latent = k2.latent_cache_dim * k2.num_hidden_layers
  per_head = k2.num_attention_heads * (k2.qk_head_dim + k2.v_head_dim) * k2.num_hidden_layers
  print(f"K2 cache per token (bf16): latent {latent * 2:,} B vs per-head K/V {per_head * 2:,} B "
        f"({per_head / latent:.1f}x)")


if __name__ == "__main__":
  main()
