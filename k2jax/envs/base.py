"""The environment interface shared by RL, SFT warm start and the test-time-scaling sweep.

An environment makes verifiable tasks from a seed (no downloads): `reset(seed)` gives the prompt
messages and tool declarations, `tool_fns(task)` the callable tools, `score(task, trajectory)` a
reward in [0, 1] with an info dict, and `sft_examples(seed, n)` warm-start conversations in the K2
chat format (reasoning in `reasoning_content`, tool calls, final answer).

Training and evaluation seeds are disjoint: `task_seeds("eval", n)` starts at `EVAL_SEED_OFFSET`.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from typing import Any, Protocol, Sequence, runtime_checkable

from k2jax.infer.tools import Tool

EVAL_SEED_OFFSET = 1_000_000_000  # training seeds lie below, held-out evaluation seeds from here on


@dataclasses.dataclass(frozen=True)
class Task:
  seed: int
  messages: list[dict]   # system/user messages to render (k2jax.chat)
  tools: list[dict]      # tool declarations offered for this task ([] when none is needed)
  answer: str            # canonical final answer


@runtime_checkable
class Env(Protocol):
  name: str

  def reset(self, seed: int) -> Task: ...

  def tool_fns(self, task: Task) -> dict[str, Tool]: ...

  def extract_answer(self, text: str) -> str | None: ...

  def score(self, task: Task, trajectory: Any) -> tuple[float, dict]: ...

  def sft_examples(self, seed: int, n: int) -> list[list[dict]]: ...


def task_seeds(split: str, n: int, start: int = 0) -> list[int]:
  """`n` task seeds of a split ('train' or 'eval'); the two never overlap."""
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  if start < 0 or start + n > EVAL_SEED_OFFSET:
    raise ValueError(f"seeds [{start}, {start + n}) leave the split's range of {EVAL_SEED_OFFSET}")
  base = EVAL_SEED_OFFSET if split == "eval" else 0
  return [base + start + i for i in range(n)]


# ------------------------------------------------------------------ answers in digits


def spaced(number: int | str) -> str:
  """'936' -> '9 3 6': the tiny tokenizer merges up to three digits, spaces give one token per digit."""
  return " ".join(str(number))


def extract_digits(text: str | None) -> str | None:
  """The final answer of a reply as a digit string ('9 3 6.' -> '936'), or None when it holds none or
  more than one number. Spaces between single digits join them. Model text is hostile: over-long
  text is refused, nothing is evaluated."""
  if text is None or len(text) > 512:
    return None
  words = text.replace(",", " ").strip().rstrip(".").split()
  if not words or not all(w.isdigit() and w.isascii() for w in words):
    return None
  if len(words) > 1 and not all(len(w) == 1 for w in words):
    return None
  return "".join(words).lstrip("0") or "0"


# ------------------------------------------------------------------ scoring


def _final_text(trajectory: Any) -> tuple[str | None, dict]:
  """(final answer text, format facts) of an agent `Trajectory` or of a plain reply string."""
  if trajectory is None or isinstance(trajectory, str):
    return trajectory, {"parse_errors": 0, "failed_tool_calls": 0, "tool_calls": 0, "answered": trajectory is not None}
  s = trajectory.summary()
  return trajectory.final_answer, {"parse_errors": s["parse_errors"], "failed_tool_calls": s["failed_tool_calls"],
                                   "tool_calls": s["tool_calls"], "answered": s["stop_reason"] == "answer"}


def format_score(facts: dict, answer: str | None) -> float:
  """1 for a well-formed trajectory: it ends in a final answer that parses, every tool call parsed and
  ran; partial credit otherwise."""
  return (0.5 * (facts["answered"] and answer is not None)
          + 0.25 * (facts["parse_errors"] == 0) + 0.25 * (facts["failed_tool_calls"] == 0))


def score_answer(env: Env, task: Task, trajectory: Any, format_weight: float) -> tuple[float, dict]:
  """Reward = (1 - format_weight) * correct + format_weight * format_score, in [0, 1]."""
  text, facts = _final_text(trajectory)
  answer = env.extract_answer(text) if text is not None else None
  correct = answer is not None and answer == task.answer
  fmt = format_score(facts, answer)
  reward = (1.0 - format_weight) * float(correct) + format_weight * fmt
  return reward, {"correct": correct, "answer": answer, "expected": task.answer, "format": fmt, **facts}


# ------------------------------------------------------------------ heavy-mode aggregation examples


def _near_miss(answer: str, rng: random.Random) -> str:
  """`answer` with one digit changed, as a sampling model's wrong answers mostly are."""
  digits = list(answer)
  k = rng.randrange(len(digits))
  digits[k] = str((int(digits[k]) + rng.randint(1, 9)) % 10)
  return "".join(digits)


def aggregation_examples(env: Env, seed: int, n: int, num_candidates: Sequence[int] = (1, 2, 4, 8), *,
                         prompt=None, right_frac: float = 1.0) -> list[list[dict]]:
  """Conversations teaching the aggregation pass of heavy mode (`infer/heavy.py`): the task, then the
  candidate answers in heavy mode's prompt (`prompt`, an `AggregationPrompt`; default: heavy mode's
  own), then the answer most candidates agree on. Each example has N candidates, N drawn from
  `num_candidates` (heavy mode runs with any N); the top answer holds a strict plurality, often below
  half, and the others are near misses (one digit changed), as a sampling model's are. The top answer
  is the task's answer in a share `right_frac` of the examples and a near miss otherwise, so that the
  target is always the plurality: the pass learns to read the attempts, not to solve the task again."""
  from k2jax.infer import heavy  # noqa: PLC0415
  prompt = prompt or heavy.DEFAULT
  rng = random.Random(f"aggregate:{env.name}:{seed}")
  out = []
  for i in range(n):
    task = env.reset(seed + i)
    top = task.answer if rng.random() < right_frac else _near_miss(task.answer, rng)
    size = rng.choice(tuple(num_candidates))
    while True:
      n_top = rng.randint(1, size)
      # Next to a wrong top answer the right one may stand in a minority, as it does in sampling.
      others = [task.answer if top != task.answer and rng.random() < 0.3 else _near_miss(task.answer, rng)
                for _ in range(size - n_top)]
      counts = collections.Counter([top] * n_top + others).most_common(2)
      if counts[0][0] == top and (len(counts) == 1 or counts[1][1] < n_top):
        break
    answers = [spaced(a) for a in [top] * n_top + others]
    rng.shuffle(answers)
    out.append([*task.messages, {"role": "user", "content": prompt.request(answers)},
                {"role": "assistant", "reasoning_content": "", "content": spaced(top)}])
  return out


def check_tasks(tasks: Sequence[Task]) -> None:
  for t in tasks:
    if not t.answer:
      raise ValueError(f"task {t.seed} has an empty answer")
