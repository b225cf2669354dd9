"""Multi-digit addition, bare or as a short word problem, where a worked trace in `<think>` helps.

Numbers are written one token per digit ('3 4 7 + 5 8 9'). The reasoning adds the columns right to
left with their carries ('7+9=16 4+8+1=13 3+5+1=9'); the answer is the sum's digits ('9 3 6'). A small
model that answers directly has to do the whole carry chain in one forward pass and mostly fails; with
the trace each step is a one-column lookup. Some warm-start examples cut the trace short or leave it
empty, as the engine's thinking budget does, so the model still answers when its thinking is cut.
"""

from __future__ import annotations

import dataclasses
import random

from k2jax.envs import base
from k2jax.infer.tools import Tool

SYSTEM = "Add the numbers."
_WORDS = [("Ann", "stones", "finds"), ("Bo", "coins", "gets"), ("Cy", "shells", "picks up"), ("Di", "cards", "wins")]


@dataclasses.dataclass(frozen=True)
class ArithEnv:
  """`digits`: digits per operand (each operand has exactly this many, leading digit non-zero);
  `word_frac`: share of problems phrased as a word problem; `format_weight`: weight of the format
  reward; in `sft_examples`, `cut_frac` / `empty_frac` of traces are cut at a random point / left
  empty and `aggregate_frac` are heavy-mode aggregation examples."""
  digits: int = 3
  word_frac: float = 0.25
  format_weight: float = 0.1
  cut_frac: float = 0.1
  empty_frac: float = 0.05
  aggregate_frac: float = 0.0
  name: str = "arith"

  def __post_init__(self):
    if not 1 <= self.digits <= 12:
      raise ValueError(f"arith: digits must lie in [1, 12], got {self.digits}")

  def _operands(self, seed: int) -> tuple[int, int, random.Random]:
    rng = random.Random(f"arith:{self.digits}:{seed}")
    lo, hi = 10 ** (self.digits - 1), 10 ** self.digits - 1
    return rng.randint(lo, hi), rng.randint(lo, hi), rng

  def reset(self, seed: int) -> base.Task:
    a, b, rng = self._operands(seed)
    if rng.random() < self.word_frac:
      who, what, verb = rng.choice(_WORDS)
      question = f"{who} has {base.spaced(a)} {what} and {verb} {base.spaced(b)} more. How many {what} now?"
    else:
      question = f"{base.spaced(a)} + {base.spaced(b)}"
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return base.Task(seed=seed, messages=messages, tools=[], answer=str(a + b))

  def tool_fns(self, task: base.Task) -> dict[str, Tool]:
    return {}

  def extract_answer(self, text: str) -> str | None:
    return base.extract_digits(text)

  def score(self, task: base.Task, trajectory) -> tuple[float, dict]:
    return base.score_answer(self, task, trajectory, self.format_weight)

  def trace(self, seed: int) -> str:
    """The worked column-by-column addition of task `seed`."""
    a, b, _ = self._operands(seed)
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(xs), len(ys))):
      x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
      s = x + y + carry
      steps.append(f"{x}+{y}+{carry}={s}" if carry else f"{x}+{y}={s}")
      carry = s // 10
    return " ".join(steps)

  def sft_examples(self, seed: int, n: int) -> list[list[dict]]:
    rng = random.Random(f"arith-sft:{seed}")
    n_agg = int(round(n * self.aggregate_frac))
    out = base.aggregation_examples(self, seed + n, n_agg) if n_agg else []
    for i in range(n - n_agg):
      task = self.reset(seed + i)
      trace, u = self.trace(seed + i), rng.random()
      if u < self.empty_frac:
        trace = ""
      elif u < self.empty_frac + self.cut_frac:
        words = trace.split(" ")
        trace = " ".join(words[:rng.randrange(len(words))])
      out.append([*task.messages, {"role": "assistant", "reasoning_content": trace,
                                   "content": base.spaced(task.answer)}])
    rng.shuffle(out)
    return out
