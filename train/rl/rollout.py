"""Rollouts from the shared engine, in tokens: prompts x K samples, multi-turn through the agent loop.

The engine samples on the trainer's own parameters (no copy to another process) and reports each
sampled token's log-prob. The agent loop (`infer/agent.AgentRun`) parses each reply and runs its tool
calls; the tool messages are rendered and appended as context (mask 0), never trained. The token list
a sample ends with is exactly what the engine conditioned on, so the trainer's recomputed log-probs
are of the same sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from k2jax import chat
from k2jax.envs.base import Env, Task
from k2jax.infer.agent import AgentRun, Trajectory
from k2jax.infer.engine import Engine
from k2jax.infer.sampling import SamplingParams


@dataclasses.dataclass
class Sample:
  task: Task
  tokens: list[int]        # prompt, replies, tool outputs: the whole context
  prompt_len: int
  mask: list[int]          # 1 on tokens the policy sampled
  logprobs: list[float]    # the engine's log-prob of each sampled token (0 elsewhere)
  trajectory: Trajectory
  truncated: bool = False  # cut at its token budget before it finished

  @property
  def response_len(self) -> int:
    return int(sum(self.mask))

  @property
  def thought(self) -> bool:
    """Whether a reply of this sample reasoned (non-empty `<think>`) rather than answering directly."""
    return any(step.parsed.reasoning.strip() for step in self.trajectory.steps)


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
  max_turns: int = 1          # policy calls per sample (tool calls need >= 2)
  turn_tokens: int = 64       # new tokens per policy call
  response_tokens: int = 64   # sampled tokens per sample over all turns: the per-sample token budget
  seq_len: int = 128          # whole context (prompt + replies + tool outputs) per sample


def _encode(tokenizer, text: str) -> list[int]:
  return tokenizer.encode(text, allow_special=True)


def rollout(engine: Engine, tokenizer, env: Env, tasks: Sequence[Task], spec: RolloutSpec,
            sampling: SamplingParams, key: jax.Array) -> list[Sample]:
  """One sample per entry of `tasks` (repeat a task K times for K samples); every policy call is one
  engine batch of all rows, so the compiled shapes stay the same from step to step."""
  stop_ids = sorted(set(tokenizer.stop_ids) | {engine.config.eos_token_id})
  samples, runs = [], []
  for task in tasks:
    ids = _encode(tokenizer, chat.render(task.messages, tools=task.tools or None))
    if len(ids) >= spec.seq_len:
      raise ValueError(f"task {task.seed}: prompt of {len(ids)} tokens does not fit seq_len={spec.seq_len}")
    samples.append(Sample(task, ids, len(ids), [0] * len(ids), [0.0] * len(ids), None))
    runs.append(AgentRun(task.messages, list(env.tool_fns(task).values()), spec.max_turns, 1 << 30, len))
  for turn in range(spec.max_turns):
    live = [i for i, r in enumerate(runs) if not r.done]
    if not live:
      break
    budget = {i: min(spec.response_tokens - samples[i].response_len, spec.seq_len - len(samples[i].tokens))
              for i in live}
    n_new = min(spec.turn_tokens, max(budget.values()))
    if n_new <= 0:
      for i in live:
        samples[i].truncated, runs[i].done = True, True
      break
    # Finished rows ride along (their output is dropped) so the batch shape never changes.
    prompts = [samples[i if i in budget else live[0]].tokens for i in range(len(samples))]
    gen = engine.generate(prompts, n_new, sampling=sampling, key=jax.random.fold_in(key, turn), stop_ids=stop_ids)
    for i in live:
      s, toks, logps = samples[i], gen.tokens[i], gen.logprobs[i]
      finished = gen.finish_reasons[i] == "stop" and len(toks) <= budget[i]
      toks, logps = toks[:max(budget[i], 0)], logps[:max(budget[i], 0)]
      s.tokens += toks
      s.mask += [1] * len(toks)
      s.logprobs += logps
      if not finished:
        s.truncated, runs[i].done = True, True
        continue
      n_before = len(runs[i].history)
      runs[i].advance(tokenizer.decode([t for t in toks if t not in stop_ids]))
      if runs[i].done:
        continue
      # The tool results (and format notes) the loop appended, then the next generation prompt.
      context = _encode(tokenizer, "".join(chat.render_message(m) for m in runs[i].history[n_before + 1:])
                        + chat.GENERATION_PROMPT)
      if len(s.tokens) + len(context) >= spec.seq_len:
        s.truncated, runs[i].done = True, True
        continue
      s.tokens += context
      s.mask += [0] * len(context)
      s.logprobs += [0.0] * len(context)
  for s, r in zip(samples, runs):
    s.trajectory = r.trajectory
  return samples


def to_batch(samples: Sequence[Sample], seq_len: int) -> dict[str, np.ndarray]:
  """[B, T] arrays: tokens = ids[:-1], targets = ids[1:], mask and engine log-probs on targets,
  segment ids 1 on real tokens (0 = padding)."""
  B = len(samples)
  out = {"tokens": np.zeros((B, seq_len), np.int32), "targets": np.zeros((B, seq_len), np.int32),
         "segment_ids": np.zeros((B, seq_len), np.int32), "mask": np.zeros((B, seq_len), np.float32),
         "engine_logprobs": np.zeros((B, seq_len), np.float32)}
  for b, s in enumerate(samples):
    n = len(s.tokens) - 1
    if n > seq_len:
      raise ValueError(f"sample of {n + 1} tokens does not fit seq_len={seq_len}")
    out["tokens"][b, :n] = s.tokens[:-1]
    out["targets"][b, :n] = s.tokens[1:]
    out["segment_ids"][b, :n] = 1
    out["mask"][b, :n] = s.mask[1:]
    out["engine_logprobs"][b, :n] = s.logprobs[1:]
  return out
