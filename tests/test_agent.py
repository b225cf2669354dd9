"""Agent loop with scripted policies, tool argument checks, calculator, and the python sandbox."""

from __future__ import annotations

import json
import re

import pytest

from k2jax.chat import render
from k2jax.infer.agent import HIDDEN_TOOL_OUTPUT, run_agent
from k2jax.infer.tools import CALCULATOR, Tool, ToolError, calculate, python_tool, run_python, tools_schema, validate_arguments
from k2jax.tokenizer_build import tiny_tokenizer

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"


def tool_call_text(index: int, name: str, arguments: str, reasoning: str = "step") -> str:
  return f"<think>{reasoning}</think>{SB}<|tool_call_begin|>functions.{name}:{index}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>{SE}<|im_end|>"


def answer_text(answer: str) -> str:
  return f"<think>done</think>{answer}<|im_end|>"


def count_tiny_tokens(text: str) -> int:
  return len(tiny_tokenizer().encode(text))


# A power of two carries the counter: 2**(16 n) makes tool outputs grow with n, so that they
# dominate the prompt and hiding them is what keeps a 300-call chain under the budget.
_RETURN = re.compile(r"## Return of functions\.calculator:(\d+)\n(\d+)<\|im_end\|>")
TARGET = 300


def counting_policy(prompt: str) -> str:
  returns = _RETURN.findall(prompt)
  if not returns:
    return tool_call_text(0, "calculator", json.dumps({"expression": "2**(16*1)"}))
  last_index, last_value = int(returns[-1][0]), int(returns[-1][1])
  counter = (last_value.bit_length() - 1) // 16
  if counter >= TARGET:
    return answer_text(f"counter = {counter}")
  return tool_call_text(last_index + 1, "calculator", json.dumps({"expression": f"2**(16*{counter + 1})"}), f"counter is {counter}")


def test_three_hundred_tool_calls_with_context_management():
  budget = 30_000
  question = [{"role": "user", "content": "Count to 300 with the calculator."}]
  trajectory = run_agent(counting_policy, question, [CALCULATOR], max_steps=400, context_budget_tokens=budget, count_tokens=count_tiny_tokens)
  assert trajectory.stop_reason == "answer"
  assert trajectory.final_answer == f"counter = {TARGET}"
  assert trajectory.num_tool_calls == TARGET and len(trajectory.steps) == TARGET + 1
  assert all(outcome.ok for step in trajectory.steps for outcome in step.tool_outcomes)
  # Without hiding, the prompt would have grown far past the budget.
  assert trajectory.context_compacted and trajectory.compactions >= 2
  assert max(step.prompt_tokens for step in trajectory.steps) <= budget
  tool_messages = [m for m in trajectory.messages if m["role"] == "tool"]
  assert len(tool_messages) == TARGET
  assert sum(m["content"] == HIDDEN_TOOL_OUTPUT for m in tool_messages) > TARGET // 2
  # The newest output was never hidden: the policy read it to finish.
  assert tool_messages[-1]["content"] == str(2 ** (16 * TARGET))
  assert trajectory.messages[-1]["content"] == f"counter = {TARGET}"
  # The assistant turns of the chain keep their calls and reasoning in the history.
  assert trajectory.messages[1]["tool_calls"][0]["id"] == "functions.calculator:0"
  assert trajectory.messages[-3]["reasoning_content"] == f"counter is {TARGET - 1}"


def scripted(*outputs: str):
  prompts: list[str] = []

  def policy(prompt: str) -> str:
    prompts.append(prompt)
    return outputs[len(prompts) - 1]

  return policy, prompts


def run(policy, max_steps: int = 10, budget: int = 10**9, tools=(CALCULATOR,)):
  return run_agent(policy, [{"role": "user", "content": "q"}], list(tools), max_steps, budget, len)


def test_bad_json_is_reported_to_the_model_which_retries():
  policy, prompts = scripted(
    tool_call_text(0, "calculator", '{"expression": "6*7"'),
    tool_call_text(1, "calculator", '{"expression": "6*7"}'),
    answer_text("42"),
  )
  trajectory = run(policy)
  assert trajectory.stop_reason == "answer" and trajectory.final_answer == "42"
  assert "## Return of functions.calculator:0\nError: arguments of functions.calculator:0 are not valid JSON" in prompts[1]
  assert "## Return of functions.calculator:1\n42<|im_end|>" in prompts[2]
  assert [o.ok for s in trajectory.steps for o in s.tool_outcomes] == [False, True]
  summary = trajectory.summary()
  assert (summary["steps"], summary["tool_calls"], summary["failed_tool_calls"], summary["parse_errors"]) == (3, 2, 1, 1)


def test_unknown_tool_and_invalid_arguments_become_tool_messages():
  policy, prompts = scripted(
    tool_call_text(0, "weather", '{"city": "Oslo"}'),
    tool_call_text(1, "calculator", '{"expr": "1"}'),
    tool_call_text(2, "calculator", '{"expression": "1/0"}'),
    answer_text("gave up"),
  )
  trajectory = run(policy)
  outputs = [o.output for s in trajectory.steps for o in s.tool_outcomes]
  assert outputs[0] == "Error: unknown tool 'weather'. Available tools: calculator."
  assert outputs[1] == "Error: invalid arguments for calculator: missing required property 'expression' in arguments"
  assert outputs[2] == "Error: ZeroDivisionError: division by zero"
  assert f"<|im_system|>weather<|im_middle|>## Return of functions.weather:0\n{outputs[0]}<|im_end|>" in prompts[1]


def test_unusable_tool_section_gets_a_system_note():
  policy, prompts = scripted(f"<think>r</think>{SB}{SE}<|im_end|>", answer_text("ok"))
  trajectory = run(policy)
  assert trajectory.stop_reason == "answer" and trajectory.num_tool_calls == 0
  assert "<|im_system|>system<|im_middle|>Your tool calls could not be read:\n- the tool-call section holds no tool call<|im_end|>" in prompts[1]


def test_section_level_problems_are_noted_in_the_tool_message():
  text = f'<think>r</think>{SB}<|tool_call_begin|>functions.calculator:0<|tool_call_argument_begin|>{{"expression": "2+2"}}<|tool_call_end|><|im_end|>'
  policy, prompts = scripted(text, answer_text("4"))
  run(policy)
  assert "## Return of functions.calculator:0\n4\n[format problem: the tool-call section was not closed" in prompts[1]


def test_step_limit_and_exhausted_context():
  looping = lambda prompt: tool_call_text(0, "calculator", '{"expression": "1"}')  # noqa: E731
  trajectory = run(looping, max_steps=5)
  assert trajectory.stop_reason == "max_steps" and len(trajectory.steps) == 5 and trajectory.final_answer is None
  first_prompt = render([{"role": "user", "content": "q"}], tools=tools_schema([CALCULATOR]))
  trajectory = run(looping, budget=len(first_prompt) - 1)
  assert trajectory.stop_reason == "context_exhausted" and not trajectory.steps


def test_agent_runs_the_python_tool():
  code = json.dumps({"code": "print(sum(range(101)))"})
  policy, prompts = scripted(tool_call_text(0, "python", code), answer_text("5050"))
  trajectory = run(policy, tools=(CALCULATOR, python_tool(timeout_s=5)))
  assert trajectory.steps[0].tool_outcomes[0].output == "5050\n"
  assert "## Return of functions.python:0\n5050\n<|im_end|>" in prompts[1]


# ---------------------------------------------------------------------------------------------
# Tools


def test_tools_schema_is_openai_function_format():
  assert tools_schema([CALCULATOR]) == [
    {"type": "function", "function": {"name": "calculator", "description": CALCULATOR.description, "parameters": dict(CALCULATOR.parameters)}}
  ]


SCHEMA = {
  "type": "object",
  "properties": {
    "n": {"type": "integer"},
    "x": {"type": ["number", "null"]},
    "mode": {"type": "string", "enum": ["fast", "exact"]},
    "tags": {"type": "array", "items": {"type": "string"}},
  },
  "required": ["n"],
  "additionalProperties": False,
}


@pytest.mark.parametrize(
  "arguments, problems",
  [
    ({"n": 1, "x": 2.5, "mode": "fast", "tags": ["a"]}, []),
    ({"n": 1, "x": None}, []),
    ({}, ["missing required property 'n' in arguments"]),
    ({"n": True}, ["arguments.n must be of type integer, got boolean"]),
    ({"n": 1.5}, ["arguments.n must be of type integer, got number"]),
    ({"n": 1, "mode": "slow"}, ["arguments.mode must be one of ['fast', 'exact'], got 'slow'"]),
    ({"n": 1, "tags": ["a", 3]}, ["arguments.tags[1] must be of type string, got integer"]),
    ({"n": 1, "extra": 0}, ["unexpected property 'extra' in arguments"]),
    ([1], ["arguments must be of type object, got array"]),
  ],
)
def test_validate_arguments(arguments, problems):
  assert validate_arguments(SCHEMA, arguments) == problems


def test_tool_call_validates_before_running():
  calls = []
  tool = Tool("echo", "echo n", SCHEMA, lambda **kw: calls.append(kw) or kw["n"])
  assert tool({"n": 3}) == "3" and calls == [{"n": 3}]
  with pytest.raises(ToolError, match="invalid arguments for echo"):
    tool({"n": "3"})
  assert len(calls) == 1


@pytest.mark.parametrize(
  "expression, value",
  [("(12 + 30) * 7 / 3", "98.0"), ("2**100", str(2**100)), ("-7 // 2 + 7 % 3", "-3"), ("sqrt(16) + abs(-2)", "6.0"),
   ("max(1, 5, 3) * pi", repr(5 * 3.141592653589793)), ("factorial(20)", "2432902008176640000")],
)
def test_calculator_values(expression, value):
  assert calculate(expression) == value


@pytest.mark.parametrize(
  "expression, message",
  [("9**9**9", "too large"), ("1/0", "ZeroDivisionError"), ("__import__('os')", "unsupported"), ("x + 1", "unsupported"),
   ("'a' * 3", "unsupported"), ("(1).__class__", "unsupported"), ("1 +", "cannot parse"), ("sqrt(-1)", "ValueError"),
   ("factorial(10**6)", "too large")],
)
def test_calculator_refuses(expression, message):
  with pytest.raises(ToolError, match=message):
    calculate(expression)


def test_sandbox_enforces_its_timeout():
  result = run_python("import time\nprint('started', flush=True)\nwhile True:\n    time.sleep(0.01)", timeout_s=3.0)
  assert result.timed_out and result.returncode is None
  assert 3.0 <= result.seconds < 8.0
  assert result.stdout == "started\n" and "[timed out after" in result.as_text()
