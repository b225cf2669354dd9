"""Numeric fields of the run configs, checked before anything runs or is written: a value out of range
is one error naming the field (`--config.data.batch_size=0` would otherwise fail inside a data loader,
and a negative learning rate would train without a word)."""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class Number:
  """A finite real number (an integer when `integer`) between `low` and `high`, each included unless
  `*_open`. NaN and infinities are refused: NaN passes every bound (each comparison is False), and an
  infinite learning rate or batch is never meant."""
  integer: bool = False
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False

  def admits(self, value: Any) -> bool:
    kind = numbers.Integral if self.integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
      return False
    if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
      return False
    return self.high is None or (value < self.high or (not self.high_open and value == self.high))

  def __str__(self) -> str:
    what = "an integer" if self.integer else "a number"
    if self.high is None:
      return f"{what} {'>' if self.low_open else '>='} {self.low:g}"
    return f"{what} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


COUNT = Number(integer=True, low=1)                     # batch sizes, step counts, intervals that divide
STEPS = Number(integer=True, low=0)                     # 0: off (evaluation, checkpoints, warm-up)
NON_NEGATIVE = Number(low=0)                            # weights of terms, thresholds (0: off)
POSITIVE = Number(low=0, low_open=True)                 # learning rates
FRACTION = Number(low=0, high=1)
DECAY_RATE = Number(low=0, high=1, high_open=True)      # momenta, Adam's betas

# The optimizer section, shared by k2-train and k2-rl (train/train_step.make_optimizer reads it).
OPTIMIZER = {
    "optimizer.peak_lr": POSITIVE, "optimizer.end_lr": NON_NEGATIVE, "optimizer.warmup_steps": STEPS,
    "optimizer.decay_fraction": FRACTION, "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.momentum": DECAY_RATE, "optimizer.rms_scale": NON_NEGATIVE, "optimizer.adam_b1": DECAY_RATE,
    "optimizer.adam_b2": DECAY_RATE, "optimizer.grad_clip": NON_NEGATIVE,
}


def get(cfg: Any, dotted: str) -> Any:
  """cfg's field `a.b.c`."""
  for part in dotted.split("."):
    cfg = cfg[part]
  return cfg


def check_numbers(cfg: Any, rules: Mapping[str, Number]) -> None:
  """Raises ValueError naming the first field of `rules` whose value `rules` does not admit."""
  for name, rule in rules.items():
    value = get(cfg, name)
    if not rule.admits(value):
      raise ValueError(f"{name} must be {rule}, got {value!r}")
