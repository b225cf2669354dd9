"""One RL iteration of k2-rl, split into rollout, log-prob recompute and update, with tokens/s for each.

  python -m benchmarks.rl_step [--width=tiny|small --prompts=8 --samples=8 --reps=5]

K2 at one of `benchmarks.widths`' widths (tiny: k2-rl's default model; small: d=512, 32 experts top-4)
with the tiny tokenizer's vocabulary, at its initialisation (the split of time does not depend on the
weights much), the arith environment, the config of `configs/rl_tiny.py`. Rollout: engine prefill +
decode of P×K samples (tokens/s = sampled tokens); recompute: the trainer's forward over the [P·K,
seq_len] batch (π_old); update: the rest of the jitted RL step (updates_per_batch forward+backward
passes, MuonClip, QK-Clip, router bias), tokens/s over the batch's positions × updates. Medians over `reps` after one warm-up.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import widths
from k2jax import envs, presets
from k2jax import params as params_lib
from k2jax.envs.base import task_seeds
from k2jax.infer.engine import Engine
from k2jax.infer.sampling import SamplingParams
from k2jax.tokenizer_build import tiny_tokenizer
from k2jax.train import train_step as ts
from k2jax.train.rl import learner, runner
from k2jax.train.rl import loss as rl_loss
from k2jax.train.rl import rollout as ro

_P = flags.DEFINE_integer("prompts", 8, "prompts per step")
_K = flags.DEFINE_integer("samples", 8, "samples per prompt")
_REPS = flags.DEFINE_integer("reps", 5, "timed iterations")
_WIDTH = flags.DEFINE_enum("width", "tiny", ["tiny", "small", "medium"], "model width (benchmarks.widths)")


def main(argv):
  del argv
  cfg = runner.default_config()
  cfg.prompts_per_step, cfg.samples_per_prompt = _P.value, _K.value
  c = presets.from_config_dict(cfg.model)
  if _WIDTH.value != "tiny":  # the rollouts decode with the tiny tokenizer: its vocabulary
    c = widths.width_config(_WIDTH.value).replace(vocab_size=c.vocab_size)
  env, tok = runner.make_env(cfg), tiny_tokenizer()
  tx, sched = learner.make_optimizer(cfg)
  params = params_lib.init_params(c, jax.random.key(0), jnp.float32)
  state = ts.init_state(params, tx)
  step_fn = learner.make_rl_step(c, cfg, tx, sched)
  recompute = jax.jit(lambda p, b: rl_loss.token_logprobs(p, c, b)[0])
  engine = Engine(params, c, max_len=2 * cfg.seq_len + cfg.turn_tokens)
  spec = runner._spec(cfg)  # noqa: SLF001
  times = {"rollout": [], "recompute": [], "step": []}
  sampled = []
  for rep in range(_REPS.value + 1):
    tasks = [env.reset(s) for s in task_seeds("train", cfg.prompts_per_step, start=rep * 100)
             for _ in range(cfg.samples_per_prompt)]
    engine.params = state.params
    t0 = time.perf_counter()
    samples = ro.rollout(engine, tok, env, tasks, spec, SamplingParams(temperature=1.0), jax.random.key(rep))
    t1 = time.perf_counter()
    batch = {**ro.to_batch(samples, cfg.seq_len), "rewards": np.asarray(
        [env.score(s.task, s.trajectory)[0] for s in samples], np.float32)}
    jax.block_until_ready(recompute(state.params, batch))
    t2 = time.perf_counter()
    state, m = step_fn(state, batch, None)
    jax.block_until_ready(m)
    t3 = time.perf_counter()
    if rep:  # the first iteration compiles
      times["rollout"].append(t1 - t0)
      times["recompute"].append(t2 - t1)
      times["step"].append(t3 - t2)
      sampled.append(sum(s.response_len for s in samples))
  B, T, U = cfg.prompts_per_step * cfg.samples_per_prompt, cfg.seq_len, cfg.updates_per_batch
  med = {k: float(np.median(v)) for k, v in times.items()}
  update = max(med["step"] - med["recompute"], 1e-9)
  print(f"width {_WIDTH.value} (d={c.hidden_size}, {c.n_routed_experts} experts), "
        f"batch {B} x {T} tokens, {U} updates per step, backend {jax.default_backend()}")
  print("| phase | median s | tokens/s |\n|---|---:|---:|")
  print(f"| rollout ({np.median(sampled):.0f} sampled tokens) | {med['rollout']:.3f} | "
        f"{np.median(sampled) / med['rollout']:.0f} |")
  print(f"| log-prob recompute (π_old) | {med['recompute']:.3f} | {B * T / med['recompute']:.0f} |")
  print(f"| update (step − recompute) | {update:.3f} | {B * T * U / update:.0f} |")
  print(f"| whole iteration | {med['rollout'] + med['step']:.3f} | |")


if __name__ == "__main__":
  app.run(main)
