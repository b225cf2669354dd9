"""k2jax vs HF transformers (torch CPU) at three model widths: prefill, decode (batch 1 and 8), train step.

  python -m benchmarks.widths --width=small [--repeats=3 --train_steps=5]

Widths: `tiny` (the tiny preset, d=64), `small` (d=512, 6 layers, 8 heads, q-LoRA 128, kv-LoRA 64, 32
experts top-4, expert width 256, vocab 8192) and `medium` (d=1024, 12 layers, 64 experts top-8, K2's
ratios of head and LoRA sizes to d, vocab 32768). Same random weights on both sides (saved by HF,
loaded with `from_hf`), fp32. Prefill: batch 8 x prompt 128; decode: 64 new tokens (greedy) after that
prompt, batch 1 and 8; train: batch 8 x 128 tokens (`--train_batch` for more), full step (k2jax MuonClip +
QK-Clip, Newton-Schulz in bf16 as the reference Muon implementations, vs torch AdamW; the same with
Newton-Schulz in fp32 (`optimizer.ns_dtype`), and k2jax with AdamW on every leaf, like for like). Muon's
Newton-Schulz costs the same whatever the batch, so the MuonClip cells depend on the tokens per step; the
AdamW cell does not.
Each side and phase runs in its own process; medians. Prints the table rows for benchmarks/NOTES.md.
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

PROMPT, NEW, BATCHES = 128, 64, (1, 8)
TRAIN_BATCH, TRAIN_SEQ = 8, 128


def width_config(name: str):
  from k2jax import presets  # noqa: PLC0415
  tiny = presets.TINY
  if name == "tiny":
    return tiny
  if name == "small":
    return tiny.replace(name="small", vocab_size=8192, hidden_size=512, intermediate_size=1280,
                        moe_intermediate_size=256, num_hidden_layers=6, num_attention_heads=8, q_lora_rank=128,
                        kv_lora_rank=64, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                        n_routed_experts=32, num_experts_per_tok=4)
  if name == "medium":  # K2 (d=7168) scaled by 1/7: heads 64->8 (head dims kept), LoRA and widths /7
    return tiny.replace(name="medium", vocab_size=32768, hidden_size=1024, intermediate_size=2624,
                        moe_intermediate_size=288, num_hidden_layers=12, num_attention_heads=8,
                        q_lora_rank=224, kv_lora_rank=72, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, n_routed_experts=64, num_experts_per_tok=8)
  raise SystemExit(f"unknown width {name!r}; one of tiny, small, medium")


def _prompts(batch):
  import numpy as np  # noqa: PLC0415
  return np.random.default_rng(0).integers(0, 2000, (batch, PROMPT))


def _median(fn, repeats):
  fn()  # warm-up: compilation, caches
  return statistics.median(fn() for _ in range(repeats))


def infer_k2jax(args) -> dict:
  import contextlib  # noqa: PLC0415
  from k2jax import sharding  # noqa: PLC0415
  sharding.set_cpu_devices(args.k2jax_mesh)  # before JAX starts: `--k2jax_mesh=expert:2` is two CPU devices
  import k2jax  # noqa: PLC0415
  from k2jax.infer.engine import Engine  # noqa: PLC0415
  model = k2jax.from_hf(args.ckpt)
  params, mesh = model.param_tree(), None
  if args.k2jax_mesh:
    mesh = sharding.make_mesh(args.k2jax_mesh)
    params = sharding.place_for_inference(params, model.config, mesh)
  engine = Engine(params, model.config, max_len=PROMPT + NEW + 16, moe_impl=sharding.choose_moe_impl(mesh))
  with sharding.use_mesh(mesh, sharding.inference_rules(mesh)) if mesh is not None else contextlib.nullcontext():
    return _infer_k2jax_cells(engine, args)


def _infer_k2jax_cells(engine, args) -> dict:
  import jax  # noqa: PLC0415
  res = {}
  for batch in BATCHES:
    prompts = _prompts(batch).tolist()

    def prefill():
      t = time.perf_counter()
      jax.block_until_ready(engine.prefill(prompts)[0])
      return time.perf_counter() - t

    def generate():
      t = time.perf_counter()
      engine.generate(prompts, NEW)
      return time.perf_counter() - t

    pre = _median(prefill, args.repeats)
    res[f"prefill_{batch}"] = pre
    res[f"decode_{batch}"] = _median(generate, args.repeats) - pre
  return res


def infer_hf(args) -> dict:
  import torch  # noqa: PLC0415
  from transformers import DeepseekV3ForCausalLM  # noqa: PLC0415
  ref = DeepseekV3ForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32).eval()
  res = {}
  for batch in BATCHES:
    x = torch.tensor(_prompts(batch))

    def prefill():
      with torch.no_grad():
        t = time.perf_counter()
        ref(x, use_cache=True)
        return time.perf_counter() - t

    def generate():
      with torch.no_grad():
        t = time.perf_counter()
        ref.generate(x, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    pre = _median(prefill, args.repeats)
    res[f"prefill_{batch}"] = pre
    res[f"decode_{batch}"] = _median(generate, args.repeats) - pre
  return res


def _train_batches(n, batch=TRAIN_BATCH):
  from k2jax.train import data  # noqa: PLC0415
  ds = data.PackedDataset(data.load_split("synthetic", "train"), batch, TRAIN_SEQ)
  return [ds.next_batch() for _ in range(n)]


def train_k2jax(args, matrices: str = "muon", ns_dtype: str = "bfloat16") -> dict:
  from k2jax import host_memory  # noqa: PLC0415
  host_memory.keep_scratch_mapped()  # as k2-train (and k2-rl, k2-tts) run their steps
  import jax  # noqa: PLC0415
  from k2jax import params as params_lib  # noqa: PLC0415
  from k2jax.configs import train_tiny  # noqa: PLC0415
  from k2jax.train import train_step as ts  # noqa: PLC0415
  c = width_config(args.width)
  cfg = train_tiny.get_config()
  cfg.num_steps = 1 + args.train_steps
  cfg.optimizer.matrices = matrices
  cfg.optimizer.ns_dtype = ns_dtype
  tx, sched = ts.make_optimizer(cfg)
  state = jax.jit(lambda k: ts.init_state(params_lib.init_params(c, k), tx))(jax.random.key(0))
  step = ts.make_train_step(c, cfg, tx, sched)
  times = []
  for b in _train_batches(1 + args.train_steps, args.train_batch):
    t = time.perf_counter()
    state, m = step(state, b)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return {"train": statistics.median(times[1:])}


def train_hf(args) -> dict:
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415
  from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: PLC0415
  c = width_config(args.width)
  torch.manual_seed(0)
  hf_cfg = {k: v for k, v in c.to_hf().items() if k not in ("architectures", "model_type", "torch_dtype")}
  model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf_cfg)).train()
  opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
  times = []
  for b in _train_batches(1 + args.train_steps, args.train_batch):
    tokens = torch.tensor(b["tokens"], dtype=torch.long)
    labels = torch.tensor(np.where(b["weights"] > 0, b["targets"], -100), dtype=torch.long)
    t = time.perf_counter()
    logits = model(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
  return {"train": statistics.median(times[1:])}


SIDES = {"k2jax_infer": infer_k2jax, "hf_infer": infer_hf, "k2jax_train": train_k2jax, "hf_train": train_hf,
         # The model's step alone, like for like with HF: AdamW on every leaf (no Newton-Schulz).
         "k2jax-adamw_train": lambda args: train_k2jax(args, matrices="adamw"),
         # Newton-Schulz in fp32 (`optimizer.ns_dtype`; the default is bf16, as the reference Muon implementations).
         "k2jax-fp32ns_train": lambda args: train_k2jax(args, ns_dtype="float32")}


def _versions() -> str:
  import importlib.metadata as md  # noqa: PLC0415
  return ", ".join(f"{p} {md.version(p)}" for p in ("jax", "torch", "transformers"))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--width", default="small", help="tiny, small or medium")
  ap.add_argument("--repeats", type=int, default=2, help="timed runs per inference cell (median)")
  ap.add_argument("--train_steps", type=int, default=3, help="timed train steps (median), after one warm-up")
  ap.add_argument("--train_batch", type=int, default=TRAIN_BATCH, help=f"sequences of {TRAIN_SEQ} tokens per train step")
  ap.add_argument("--only", default="infer,train", help="phases to run: infer, train or both")
  ap.add_argument("--rounds", type=int, default=1,
                  help="run every side this many times, alternating (a new process each), and take the median "
                       "per cell: on a shared machine, so that load drifts hit every side alike")
  ap.add_argument("--sides", default="", help="comma-separated subset of the sides (default: all of the phases')")
  ap.add_argument("--k2jax_mesh", default="",
                  help="k2jax inference on a device mesh, e.g. expert:2 (two CPU devices, the routed experts "
                       "split between them), set up in the k2jax side's own process; default one device")
  ap.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
  ap.add_argument("--ckpt", help=argparse.SUPPRESS)
  args = ap.parse_args()
  c = width_config(args.width)
  if args.side:
    print(json.dumps(SIDES[args.side](args)))
    return

  common = [f"--width={args.width}", f"--repeats={args.repeats}", f"--train_steps={args.train_steps}",
            f"--train_batch={args.train_batch}", f"--k2jax_mesh={args.k2jax_mesh}"]
  phases = args.only.split(",")
  res = {}
  with tempfile.TemporaryDirectory() as ckpt:
    if "infer" in phases:
      from hf_reference import make_reference  # noqa: PLC0415
      hf_cfg = {k: v for k, v in c.to_hf().items() if k not in ("architectures", "model_type", "torch_dtype")}
      make_reference(ckpt, seed=0, **hf_cfg)
    chosen = [s for s in SIDES if s.split("_")[1] in phases and (not args.sides or s in args.sides.split(","))]
    for rnd, side in ((r, s) for r in range(args.rounds) for s in chosen):
      out = subprocess.run([sys.executable, "-m", "benchmarks.widths", f"--side={side}", f"--ckpt={ckpt}", *common],
                           capture_output=True, text=True, cwd=os.path.join(HERE, ".."))
      if out.returncode:
        raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
      got = json.loads(out.stdout.strip().splitlines()[-1])
      load = " ".join(f"{x:.1f}" for x in os.getloadavg())
      print(f"round {rnd} {side}: " + ", ".join(f"{k} {v:.3f} s" for k, v in got.items()) + f" (load {load})",
            file=sys.stderr, flush=True)
      for k, v in got.items():
        res.setdefault(f"{side.split('_')[0]}:{k}", []).append(v)
  res = {k: statistics.median(v) for k, v in res.items()}
  mesh = f"; k2jax inference on mesh {args.k2jax_mesh}" if args.k2jax_mesh else ""
  print(f"# width={args.width} (d={c.hidden_size}, {c.num_hidden_layers} layers, {c.n_routed_experts} experts "
        f"top-{c.num_experts_per_tok}, vocab {c.vocab_size}); {_versions()}; {os.cpu_count()} CPUs{mesh}")
  print("| width | cell | k2jax tok/s | HF tok/s | ratio |")
  cells = [(f"prefill b{b}", f"prefill_{b}", b * PROMPT) for b in BATCHES if b == 8]
  cells += [(f"decode b{b}", f"decode_{b}", b * NEW) for b in BATCHES]
  train_tokens = args.train_batch * TRAIN_SEQ
  cells += [(f"train step {train_tokens} tok (MuonClip vs AdamW)", "train", train_tokens)]
  cells += [(f"train step {train_tokens} tok (MuonClip, fp32 Newton-Schulz, vs AdamW)", "train", train_tokens,
             "k2jax-fp32ns")]
  cells += [(f"train step {train_tokens} tok (AdamW both)", "train", train_tokens, "k2jax-adamw")]
  for name, key, tokens, *side in cells:
    side = side[0] if side else "k2jax"
    if f"{side}:{key}" not in res:
      continue
    a, b = tokens / res[f"{side}:{key}"], tokens / res[f"hf:{key}"]
    print(f"| {args.width} | {name} | {a:,.0f} | {b:,.0f} | {a / b:.2f} |")


if __name__ == "__main__":
  main()
