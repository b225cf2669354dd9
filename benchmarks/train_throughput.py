"""Training tokens/s: k2jax (MuonClip train step) vs HF transformers DeepseekV3ForCausalLM + torch AdamW.

  python -m benchmarks.train_throughput [--batch=8 --seq_len=128 --steps=20 --preset=tiny]

Same model config (the preset's `to_hf()`), batch and sequence length; both run full steps (forward,
backward, optimizer). k2jax adds QK-Clip and the router-bias update; HF's MoE runs its own routing
(eager, per-expert loop). Times exclude the first (compiling / warming) steps; medians of `steps`.
By default each side runs in its own process (see `_run_apart`).
"""

import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

from k2jax import params as params_lib, presets
from k2jax.configs import train_tiny
from k2jax.train import data, train_step as ts

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from hf_reference import installed_kernels_package  # noqa: E402

installed_kernels_package()  # before transformers is imported

_PRESET = flags.DEFINE_string("preset", "tiny", "model preset")
_BATCH = flags.DEFINE_integer("batch", 8, "sequences per step")
_SEQ = flags.DEFINE_integer("seq_len", 128, "tokens per sequence")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps first")
_ONLY = flags.DEFINE_enum("only", "both", ["both", "jax", "hf"], "run one side alone (no thread-pool sharing)")


def _batches(n):
  ds = data.PackedDataset(data.load_split("synthetic", "train"), _BATCH.value, _SEQ.value)
  return [ds.next_batch() for _ in range(n)]


def bench_jax(c, batches) -> list[float]:
  cfg = train_tiny.get_config()
  cfg.model.preset = _PRESET.value
  cfg.num_steps = len(batches)
  tx, sched = ts.make_optimizer(cfg)
  state = jax.jit(lambda k: ts.init_state(params_lib.init_params(c, k), tx))(jax.random.key(0))
  step = ts.make_train_step(c, cfg, tx, sched)
  times = []
  for b in batches:
    t = time.perf_counter()
    state, m = step(state, b)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return times


def bench_hf(c, batches) -> list[float]:
  import torch  # noqa: PLC0415
  from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: PLC0415

  torch.manual_seed(0)
  hf_cfg = {k: v for k, v in c.to_hf().items() if k not in ("architectures", "model_type", "torch_dtype")}
  model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf_cfg)).train()
  opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
  times = []
  for b in batches:
    tokens = torch.tensor(b["tokens"], dtype=torch.long)
    labels = torch.tensor(np.where(b["weights"] > 0, b["targets"], -100), dtype=torch.long)
    t = time.perf_counter()
    logits = model(tokens).logits  # packed rows attend across documents here (plain causal mask)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
  return times


def _run_apart(argv) -> None:
  """Each side in its own process: in one process the idle XLA CPU thread pool slows torch down
  several-fold, which would measure the sharing, not the trainers."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  lines = []
  for side in ("jax", "hf"):
    out = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput", *argv[1:], f"--only={side}"],
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()
    lines.append(out)
  tps = [float(o[-1].split("|")[2].replace(",", "")) for o in lines]
  print(lines[0][0] + " (each side in its own process)")
  print(lines[0][1].replace("vs last row", "vs HF"))
  print(lines[0][2])
  for o, t in zip(lines, tps):
    cells = o[-1].split("|")
    cells[4] = f" {t / tps[-1]:.2f}x "
    print("|".join(cells))


def main(argv):
  if _ONLY.value == "both":
    return _run_apart(argv)
  c = presets.get(_PRESET.value)
  batches = _batches(_WARMUP.value + _STEPS.value)
  tokens = _BATCH.value * _SEQ.value
  rows = []
  for key, name, fn in (("jax", "k2jax (jit, MuonClip)", bench_jax), ("hf", "HF DeepseekV3 + torch AdamW", bench_hf)):
    if _ONLY.value in ("both", key):
      times = fn(c, batches)[_WARMUP.value:]
      rows.append((name, tokens / float(np.median(times)), float(np.min(times)), float(np.max(times))))
  print(f"preset={_PRESET.value} batch={_BATCH.value} seq_len={_SEQ.value} steps={_STEPS.value} "
        f"jax={jax.__version__} backend={jax.default_backend()}")
  print("| trainer | tokens/s (median step) | step ms min / max | vs last row |")
  print("|---|---:|---:|---:|")
  for name, tps, lo, hi in rows:
    print(f"| {name} | {tps:,.0f} | {lo * 1e3:.0f} / {hi * 1e3:.0f} | {tps / rows[-1][1]:.2f}x |")


if __name__ == "__main__":
  app.run(main)
