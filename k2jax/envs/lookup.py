"""A task that needs a tool: the code of an item sits in a table only the `lookup` tool can read.

Each task makes its own table from its seed (items -> three-digit codes), so codes cannot be
memorised: without the tool the answer is a guess (about 1 in 900). The warm-start trajectory thinks
briefly, calls `lookup` with the item, and copies the code it returns.
"""

from __future__ import annotations

import dataclasses
import json
import random

from k2jax import chat
from k2jax.envs import base
from k2jax.infer.tools import Tool, ToolError

SYSTEM = "Use the lookup tool to answer."
ITEMS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "star", "fish", "bird", "rain")


@dataclasses.dataclass(frozen=True)
class LookupEnv:
  """`table_size`: items per table; `format_weight`: weight of the format reward."""
  table_size: int = 6
  format_weight: float = 0.1
  aggregate_frac: float = 0.0
  name: str = "lookup"

  def __post_init__(self):
    if not 1 <= self.table_size <= len(ITEMS):
      raise ValueError(f"lookup: table_size must lie in [1, {len(ITEMS)}], got {self.table_size}")

  def table(self, seed: int) -> tuple[dict[str, str], str]:
    """(item -> code, the item asked about) of task `seed`."""
    rng = random.Random(f"lookup:{self.table_size}:{seed}")
    items = rng.sample(ITEMS, self.table_size)
    return {item: str(rng.randint(100, 999)) for item in items}, rng.choice(items)

  def _tool(self, table: dict[str, str]) -> Tool:
    def lookup(key: str) -> str:
      if key not in table:
        raise ToolError(f"no item {key[:40]!r}; items: {', '.join(sorted(table))}")
      return base.spaced(table[key])
    return Tool("lookup", "Code of an item.",
                {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}, lookup)

  def reset(self, seed: int) -> base.Task:
    table, item = self.table(seed)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Code of {item}?"}]
    return base.Task(seed=seed, messages=messages, tools=[self._tool(table).schema()], answer=table[item])

  def tool_fns(self, task: base.Task) -> dict[str, Tool]:
    return {"lookup": self._tool(self.table(task.seed)[0])}

  def extract_answer(self, text: str) -> str | None:
    return base.extract_digits(text)

  def score(self, task: base.Task, trajectory) -> tuple[float, dict]:
    return base.score_answer(self, task, trajectory, self.format_weight)

  def sft_examples(self, seed: int, n: int) -> list[list[dict]]:
    n_agg = int(round(n * self.aggregate_frac))
    out = base.aggregation_examples(self, seed + n, n_agg) if n_agg else []
    for i in range(n - n_agg):
      task = self.reset(seed + i)
      table, item = self.table(seed + i)
      call_id = chat.tool_call_id("lookup", 0)
      code = base.spaced(table[item])
      call = {"id": call_id, "type": "function",
              "function": {"name": "lookup", "arguments": json.dumps({"key": item})}}
      out.append([*task.messages,
                  {"role": "assistant", "reasoning_content": f"look up {item}", "content": "", "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": call_id, "name": "lookup", "content": code},
                  {"role": "assistant", "reasoning_content": "", "content": code}])
    random.Random(f"lookup-sft:{seed}").shuffle(out)
    return out
