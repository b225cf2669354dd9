"""Heavy mode: N trajectories rolled out in one batch, then an aggregation pass that sees them all."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from k2jax import chat
from k2jax.infer.agent import Trajectory, run_agents
from k2jax.infer.tools import Tool

DEFAULT_AGGREGATION_PROMPT = (
    "Here are {n} independent attempts at the task above.\n\n{attempts}\n\n"
    "Compare them, check their reasoning and results against each other, and write the single best final "
    "answer.")
DEFAULT_ATTEMPT = "### Attempt {i} ({tool_calls} tool calls)\n{answer}"

BatchPolicy = Callable[[list[str]], list[str]]


@dataclasses.dataclass(frozen=True)
class AggregationPrompt:
  """How the aggregation pass sees the attempts: `template` with {n} and {attempts}; each attempt is
  `attempt` with {i}, {tool_calls} and {answer}, joined by `separator`."""
  template: str = DEFAULT_AGGREGATION_PROMPT
  attempt: str = DEFAULT_ATTEMPT
  separator: str = "\n\n"

  def attempts(self, answers: Sequence[str], tool_calls: Sequence[int] | None = None) -> str:
    tool_calls = tool_calls or [0] * len(answers)
    return self.separator.join(self.attempt.format(i=i, tool_calls=k, answer=a)
                               for i, (a, k) in enumerate(zip(answers, tool_calls), 1))

  def request(self, answers: Sequence[str], tool_calls: Sequence[int] | None = None) -> str:
    return self.template.format(n=len(answers), attempts=self.attempts(answers, tool_calls))


DEFAULT = AggregationPrompt()
# For small models: one short line per attempt, no prose to read past (2-3 tokens of answer each).
COMPACT = AggregationPrompt(template="{n} answers:\n{attempts}\nMost common answer:", attempt="{answer}",
                            separator="\n")
PROMPTS = {"default": DEFAULT, "compact": COMPACT}


@dataclasses.dataclass
class HeavyResult:
  trajectories: list[Trajectory]
  final_answer: str | None
  aggregation_text: str


def _answer(t: Trajectory) -> str:
  return t.final_answer if t.final_answer is not None else f"(no answer: {t.stop_reason})"


def format_attempts(trajectories: Sequence[Trajectory]) -> str:
  """The attempts as the default prompt lists them."""
  return DEFAULT.attempts([_answer(t) for t in trajectories], [t.num_tool_calls for t in trajectories])


def _prompt(template: str | AggregationPrompt) -> AggregationPrompt:
  return template if isinstance(template, AggregationPrompt) else AggregationPrompt(template=template)


def aggregation_request(messages: Sequence[Mapping[str, Any]], trajectories: Sequence[Trajectory],
                       template: str | AggregationPrompt = DEFAULT_AGGREGATION_PROMPT) -> str:
  """The rendered prompt of the aggregation pass: the task, then every attempt's final answer.
  `template` is an `AggregationPrompt` or the string template of the default one."""
  request = _prompt(template).request([_answer(t) for t in trajectories], [t.num_tool_calls for t in trajectories])
  return chat.render([*messages, {"role": "user", "content": request}])


def heavy_mode(batch_policy: BatchPolicy, messages: Sequence[Mapping[str, Any]], *, n: int = 8,
               count_tokens: Callable[[str], int], tools: Sequence[Tool] = (), max_steps: int = 8,
               context_budget_tokens: int = 1 << 18,
               aggregation_prompt: str | AggregationPrompt = DEFAULT_AGGREGATION_PROMPT,
               aggregate_policy: BatchPolicy | None = None) -> HeavyResult:
  """Runs `n` copies of the conversation in lockstep (one batched policy call per step; sampling makes
  them differ), then asks the model once more, with every attempt in view, for the final answer.

  `count_tokens(prompt)` measures prompts in the model's tokens for the context budget (an engine
  policy's `count_tokens`); there is no default because characters are not tokens.
  """
  if n < 1:
    raise ValueError(f"heavy mode needs n >= 1 trajectories, got {n}")
  trajectories = run_agents(batch_policy, [messages] * n, tools, max_steps, context_budget_tokens, count_tokens)
  prompt = aggregation_request(messages, trajectories, aggregation_prompt)
  text = (aggregate_policy or batch_policy)([prompt])[0]
  return HeavyResult(trajectories, chat.parse(text).content, text)
