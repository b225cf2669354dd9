"""Verifiable environments: tasks generated from a seed, rewards, tools and SFT warm-start data.

  env = envs.get("arith")          # or "lookup"
  task = env.reset(seed)           # Task(seed, messages, tools, answer)
  reward, info = env.score(task, trajectory)
"""

from __future__ import annotations

from typing import Callable

from k2jax.envs.base import EVAL_SEED_OFFSET, Env, Task, aggregation_examples, task_seeds  # noqa: F401


def _arith(**kw) -> Env:
  from k2jax.envs.arith import ArithEnv  # noqa: PLC0415
  return ArithEnv(**kw)


def _lookup(**kw) -> Env:
  from k2jax.envs.lookup import LookupEnv  # noqa: PLC0415
  return LookupEnv(**kw)


_REGISTRY: dict[str, Callable[..., Env]] = {"arith": _arith, "lookup": _lookup}


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str, **kwargs) -> Env:
  """The environment `name`, built with `kwargs` (e.g. `get("arith", digits=3)`)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown environment {name!r}; known: {', '.join(names())}")
  try:
    return _REGISTRY[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"bad options for environment {name!r}: {e}") from None
