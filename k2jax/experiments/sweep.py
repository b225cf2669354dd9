"""Measuring one point of a test-time-scaling sweep: accuracy, its 95 % interval and the tokens spent.

A point fixes the thinking budget, the tool-step limit, the number of trajectories (parallel: majority
vote over their final answers; heavy: an aggregation pass by the same model, `infer/heavy.py`) and the
model (an RL step). Every problem's trajectories run through the agent loop (`infer/agent.AgentRun`)
in lockstep; each policy call is one engine batch cut into fixed-size pieces, so a whole sweep compiles
a handful of shapes.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any, Sequence

import jax

from k2jax import chat
from k2jax.infer import heavy
from k2jax.infer.agent import AgentRun, Trajectory
from k2jax.infer.engine import Engine
from k2jax.infer.sampling import SamplingParams

AXES = ("thinking_budget", "tool_steps", "parallel", "heavy", "rl_step")


@dataclasses.dataclass(frozen=True)
class Setting:
  """What a point of the sweep runs with; `thinking_budget` -1 means no budget."""
  thinking_budget: int = -1
  tool_steps: int = 2
  parallel: int = 1
  heavy: int = 0
  rl_step: int = -1
  temperature: float = 0.0

  def __post_init__(self):
    if self.parallel < 1 or self.heavy < 0 or self.tool_steps < 0 or self.thinking_budget < -1:
      raise ValueError(f"bad setting {self}: parallel >= 1, heavy >= 0, tool_steps >= 0, "
                       "thinking_budget >= -1 (-1: none)")
    if self.parallel > 1 and self.heavy:
      raise ValueError(f"a point runs parallel voting or heavy mode, not both: {self}")


@dataclasses.dataclass
class PointResult:
  axis: str
  value: int
  accuracy: float
  ci_low: float
  ci_high: float
  mean_tokens: float
  seconds: float
  n_problems: int
  env: str = ""
  answered: float = 0.0          # share of trajectories that ended in a final answer
  mean_tool_calls: float = 0.0   # per trajectory

  CSV_COLUMNS = ("axis", "value", "accuracy", "ci_low", "ci_high", "mean_tokens", "seconds", "n_problems",
                 "env", "answered", "mean_tool_calls")

  def row(self) -> dict[str, Any]:
    return {k: getattr(self, k) for k in self.CSV_COLUMNS}


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
  """95 % Wilson score interval of a proportion (over problems); sound at 0 and n, unlike the normal one."""
  if n == 0:
    return 0.0, 1.0
  p = correct / n
  den = 1 + z * z / n
  mid = (p + z * z / (2 * n)) / den
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
  return max(0.0, min(p, mid - half)), min(1.0, max(p, mid + half))  # p itself despite rounding


def majority_vote(answers: Sequence[str | None]) -> str | None:
  """The most common non-empty answer; ties go to the one seen first (trajectory order, not
  correctness). None when no trajectory answered."""
  counts = collections.Counter(a for a in answers if a is not None)
  return counts.most_common(1)[0][0] if counts else None


class Generator:
  """Texts from rendered prompts on one engine: fixed-size batches (the last padded by repeating a
  prompt, its rows dropped), a thinking budget, and a count of the tokens generated for real rows."""

  def __init__(self, engine: Engine, tokenizer, *, batch_size: int, max_new_tokens: int, seed: int = 0):
    self.engine, self.tokenizer, self.batch_size = engine, tokenizer, batch_size
    # 1 + k * 16 new tokens: decoding runs in 16-step device calls, so no odd-sized last call compiles.
    self.max_new_tokens = 1 + 16 * max(1, (max_new_tokens - 1 + 15) // 16)
    self.key = jax.random.key(seed)
    self.stop_ids = sorted(set(tokenizer.stop_ids) | {engine.config.eos_token_id})
    self.think_ids = (tokenizer.id_of(chat.THINK_BEGIN), tokenizer.id_of(chat.THINK_END))
    self.tokens_generated = 0

  def __call__(self, prompts: list[str], sampling: SamplingParams, think_budget: int) -> list[str]:
    ids = [self.tokenizer.encode(p, allow_special=True) for p in prompts]
    texts = []
    for start in range(0, len(ids), self.batch_size):
      rows = ids[start:start + self.batch_size]
      padded = rows + [rows[0]] * (self.batch_size - len(rows))
      self.key, key = jax.random.split(self.key)
      gen = self.engine.generate(padded, self.max_new_tokens, sampling=sampling, key=key, stop_ids=self.stop_ids,
                                 think_ids=self.think_ids, think_budget=None if think_budget < 0 else think_budget)
      for toks in gen.tokens[:len(rows)]:
        self.tokens_generated += len(toks)
        texts.append(self.tokenizer.decode([t for t in toks if t not in self.stop_ids]))
    return texts


def rollouts(generate: Generator, env, tasks: Sequence, n: int, setting: Setting,
             sampling: SamplingParams) -> list[list[Trajectory]]:
  """`n` trajectories per task, all tasks in lockstep (one batched call per agent step)."""
  runs = []
  for task in tasks:
    tools = list(env.tool_fns(task).values()) if setting.tool_steps > 0 else []
    # tool_steps tool-calling turns, then one turn to answer; tools off: no declaration, one turn.
    runs.append([AgentRun(task.messages, tools, setting.tool_steps + 1, 1 << 30, len) for _ in range(n)])
  flat = [r for group in runs for r in group]
  while True:
    pending = [(r, p) for r in flat if (p := r.prompt()) is not None]
    if not pending:
      return [[r.trajectory for r in group] for group in runs]
    for (r, _), text in zip(pending, generate([p for _, p in pending], sampling, setting.thinking_budget)):
      r.advance(text)


def measure(generate: Generator, env, tasks: Sequence, setting: Setting, axis: str, value: int,
            aggregation_prompt: str | heavy.AggregationPrompt = heavy.DEFAULT_AGGREGATION_PROMPT) -> PointResult:
  """Accuracy of `setting` on `tasks` with its Wilson interval, mean generated tokens per problem
  (every trajectory and the aggregation pass counted) and wall seconds; heavy mode's aggregation pass
  sees the attempts in `aggregation_prompt`."""
  t0, tokens0 = time.perf_counter(), generate.tokens_generated
  sampling = SamplingParams(temperature=setting.temperature)
  n = max(setting.parallel, setting.heavy, 1)
  groups = rollouts(generate, env, tasks, n, setting, sampling)
  if setting.heavy:
    prompts = [heavy.aggregation_request(task.messages, trajs, aggregation_prompt) for task, trajs in zip(tasks, groups)]
    finals = [chat.parse(text).content for text in generate(prompts, sampling, setting.thinking_budget)]
  elif setting.parallel > 1:
    finals = [majority_vote([env.extract_answer(t.final_answer) if t.final_answer is not None else None
                             for t in trajs]) for trajs in groups]
  else:
    finals = [trajs[0] for trajs in groups]
  correct = sum(bool(env.score(task, final)[1]["correct"]) for task, final in zip(tasks, finals))
  lo, hi = wilson_interval(correct, len(tasks))
  trajs = [t for g in groups for t in g]
  return PointResult(
      axis=axis, value=value, accuracy=correct / len(tasks), ci_low=lo, ci_high=hi,
      mean_tokens=(generate.tokens_generated - tokens0) / len(tasks), seconds=time.perf_counter() - t0,
      n_problems=len(tasks), env=env.name, answered=sum(t.stop_reason == "answer" for t in trajs) / len(trajs),
      mean_tool_calls=sum(t.num_tool_calls for t in trajs) / len(trajs))
