"""RL of the tiny K2 on the arithmetic environment: a short SFT warm start, then K2's objective.

  k2-rl --workdir=/tmp/rl                                 # warm start + RL, a few CPU minutes
  k2-rl --workdir=/tmp/rl --config.objective=grpo --config.env=lookup --config.max_turns=2
"""
import ml_collections

from k2jax import presets
from k2jax.configs import train_tiny


def get_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.model = presets.model_config_section("tiny")
  cfg.param_dtype = "float32"
  cfg.compute_dtype = "float32"
  cfg.seed = 0

  cfg.env = "arith"                      # k2jax.envs name
  # 3-digit sums: answered directly (empty <think>) they almost always fail, worked column by column they
  # often succeed. The warm start mixes the two as real SFT data does (60 % direct answers), so RL has a
  # behaviour to select: working pays, and K2's objective shifts the policy to it (docs/RL.md, "Measured").
  cfg.env_options = ml_collections.ConfigDict({"digits": 3, "empty_frac": 0.6}, type_safe=False)  # env keyword options

  # Objective: "k2" (squared residual, Kimi k1.5/K2) or "grpo" (clipped ratio, normalised advantages).
  cfg.objective = "k2"
  cfg.tau = 0.1                          # k2: weight of log π_θ - log π_old inside the residual
  cfg.clip_eps = 0.2                     # grpo: ratio clip
  cfg.prompts_per_step = 16              # more prompts, less noise: the reward varies most with the problems drawn
  cfg.samples_per_prompt = 8             # K
  cfg.updates_per_batch = 1              # optimizer updates on each batch of rollouts (1: on-policy, kl_old = 0)
  cfg.num_steps = 40
  cfg.stop_after_steps = 0               # > 0: stop early (for resumption tests)

  # Rollouts. A sample is cut at response_tokens (its per-sample token budget): truncated.
  cfg.max_turns = 1                      # policy calls per sample; >= 2 for tool use
  cfg.turn_tokens = 49                   # 1 + a multiple of the engine chunk (16): fewer compiles
  cfg.response_tokens = 49               # a 3-digit worked answer takes up to 34 tokens
  cfg.seq_len = 112                      # whole context per sample
  cfg.temperature = 0.6                  # sampling temperature, decaying linearly to temperature_end; at 1.0
  cfg.temperature_end = 0.6              # the tiny model's traces slip too often for working to pay
  cfg.temperature_decay_steps = 0        # 0: constant temperature
  cfg.temperature_quantum = 0.05         # temperatures are rounded to this (each value compiles once)

  # Reward shaping.
  cfg.length_penalty_weight = 0.0        # Kimi k1.5 length reward weight (0: off)
  cfg.truncation_penalty = 0.0           # a truncated sample scores -truncation_penalty

  # PTX: the supervised loss on the environment's warm-start data, mixed in with this weight.
  cfg.ptx_weight = 0.0                   # 0: off
  cfg.ptx_batch_size = 8

  # Shared with pre-training.
  cfg.qat = False                        # rollouts on INT4 experts, the loss on fake-quantised ones
  cfg.qk_clip_tau = 100.0
  cfg.router_bias_u = 1e-3
  cfg.remat = "none"
  cfg.moe_impl = "auto"

  cfg.optimizer = train_tiny.get_config().optimizer
  # AdamW on every matrix: Muon's orthogonalised step has a fixed size whatever the gradient's signal; on
  # the 2-digit polishing task every rate >= 1e-4 lowered the reward, on the think-or-not choice 1e-4 and
  # 2e-4 both raise it fast (docs/RL.md, "Measured").
  cfg.optimizer.matrices = "adamw"       # "muon": MuonClip as in pre-training
  cfg.optimizer.peak_lr = 1e-4
  cfg.optimizer.end_lr = 1e-4
  cfg.optimizer.warmup_steps = 0
  cfg.optimizer.decay_fraction = 0.0

  cfg.init_checkpoint = ""               # a k2-train / k2-rl workdir or step; '' = the warm start below
  cfg.warm_start = ml_collections.ConfigDict()
  cfg.warm_start.num_steps = 800         # enough for worked 3-digit traces to beat direct answers
  cfg.warm_start.examples = 8000
  cfg.warm_start.batch_size = 16
  cfg.warm_start.seq_len = 128
  cfg.warm_start.peak_lr = 3e-3

  cfg.eval_every = 10
  cfg.eval_tasks = 64                    # greedy, on held-out seeds
  cfg.log_every = 1
  cfg.checkpoint_every = 10
  cfg.keep_checkpoints = 2
  cfg.progress_bar = True
  return cfg
