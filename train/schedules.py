"""Learning-rate schedules (optax schedules: step -> lr)."""

from __future__ import annotations

import optax

DECAYS = ("cosine", "linear")


def _decay(kind: str, peak_value: float, end_value: float, decay_steps: int) -> optax.Schedule:
  if kind == "cosine":
    return optax.cosine_decay_schedule(peak_value, decay_steps, alpha=end_value / peak_value)
  if kind == "linear":
    return optax.linear_schedule(peak_value, end_value, decay_steps)
  raise ValueError(f"unknown decay {kind!r}: expected 'cosine' or 'linear'")


def warmup_stable_decay(
    peak_value: float,
    warmup_steps: int,
    stable_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    init_value: float = 0.0,
    decay: str = "cosine",
) -> optax.Schedule:
  """WSD: linear init -> peak over warmup_steps, flat for stable_steps, then cosine/linear to end_value.

  Holds end_value after warmup + stable + decay steps.
  """
  return optax.join_schedules(
      [optax.linear_schedule(init_value, peak_value, warmup_steps),
       optax.constant_schedule(peak_value),
       _decay(decay, peak_value, end_value, decay_steps)],
      boundaries=[warmup_steps, warmup_steps + stable_steps],
  )


def warmup_cosine(
    peak_value: float, warmup_steps: int, decay_steps: int, end_value: float = 0.0,
    init_value: float = 0.0,
) -> optax.Schedule:
  """Linear warm-up to peak_value, then cosine over decay_steps (counted after warm-up) to end_value."""
  return warmup_stable_decay(peak_value, warmup_steps, 0, decay_steps, end_value, init_value, "cosine")


def k2_pretrain_schedule(tokens_per_step: float = 67e6) -> optax.Schedule:
  """K2's pre-training WSD: 500 warm-up steps to 2e-4, flat to 10T tokens, cosine to 2e-5 at 15.5T.

  Step counts derive from tokens_per_step (K2: ~67M-token global batch); the warm-up is counted
  inside the first 10T tokens.
  """
  warmup = 500
  stable = round(10e12 / tokens_per_step) - warmup
  decay = round(5.5e12 / tokens_per_step)
  return warmup_stable_decay(2e-4, warmup, stable, decay, end_value=2e-5)
