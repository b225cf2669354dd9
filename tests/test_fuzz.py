"""Property and adversarial tests: chat.parse and the calculator never raise (beyond ToolError) and never stall.

Time bounds here are generous (seconds) on purpose: they catch quadratic or unbounded work, whose
inputs below would take minutes, not machine-load noise.
"""

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2jax import chat
from k2jax.infer.tools import ToolError, calculate

MARKERS = [chat.THINK_BEGIN, chat.THINK_END, chat.SECTION_BEGIN, chat.SECTION_END, chat.CALL_BEGIN,
           chat.ARGUMENT_BEGIN, chat.CALL_END, chat.IM_END, chat.GENERATION_PROMPT, "functions.", "functions.f:0",
           ":", "{", "}", "[", "]", '"', ",", "\\", " ", "\n", "1" * 40, "\ud800", "{\"a\": " * 30]
model_outputs = st.lists(st.one_of(st.sampled_from(MARKERS), st.text(max_size=12)), max_size=80).map("".join)

json_values = st.recursive(
  st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False)
  | st.text(max_size=10),
  lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
  max_leaves=12,
)
tool_calls = st.lists(
  st.tuples(st.text("abcxyz_.", min_size=1, max_size=12), st.dictionaries(st.text(max_size=6), json_values, max_size=4)),
  max_size=5,
)


def check_parsed(parsed: chat.ParsedMessage) -> None:
  assert len(parsed.tool_calls) <= chat.MAX_TOOL_CALLS
  for call in parsed.tool_calls:
    assert (call.arguments is None) == (call.error is not None)
    assert call.arguments is None or isinstance(call.arguments, dict)
  chat.render([{"role": "user", "content": "q"}, chat.to_message(parsed)])  # what the agent does next


@settings(max_examples=250, deadline=None, derandomize=True, database=None)
@given(model_outputs)
def test_parse_never_raises_on_model_output(text):
  check_parsed(chat.parse(text))


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(st.text(max_size=40), tool_calls)
def test_parse_reads_back_what_render_writes(content, calls):
  message = {"role": "assistant", "content": content.replace("<", "("), "reasoning_content": "r",
             "tool_calls": [{"id": chat.tool_call_id(name, i), "function": {"name": name, "arguments": arguments}}
                            for i, (name, arguments) in enumerate(calls)]}
  parsed = chat.parse(chat.assistant_body(message))
  assert parsed.ok, (content, calls, parsed.errors)
  assert [(c.name, c.arguments) for c in parsed.tool_calls] == [(n, json.loads(json.dumps(a))) for n, a in calls]


def section(body: str) -> str:
  return f"{chat.THINK_BEGIN}x{chat.THINK_END}{chat.SECTION_BEGIN}{body}{chat.SECTION_END}"


@pytest.mark.parametrize(
  "arguments, message",
  [("[" * 100_000, "nested too deeply"), ('{"a":' * 5000, "nested too deeply"), ('{"n": ' + "7" * 5000 + "}", "cannot be read"),
   ("{" + " " * (chat.MAX_ARGUMENT_CHARS + 1) + "}", "too long")],
  ids=["deep_list", "deep_object", "long_integer", "too_long"],
)
def test_parse_reports_hostile_arguments(arguments, message):
  parsed = chat.parse(section(f"{chat.CALL_BEGIN}functions.f:0{chat.ARGUMENT_BEGIN}{arguments}{chat.CALL_END}"))
  assert [e.kind for e in parsed.errors] == ["bad_arguments"] and message in parsed.errors[0].message
  assert parsed.tool_calls[0].arguments is None and len(parsed.errors[0].message) < 300


def test_parse_is_linear_in_the_number_of_markers():
  # 200k unterminated calls: the former quadratic scan would take minutes here.
  for body in (chat.CALL_BEGIN * 200_000, (chat.CALL_BEGIN + "functions.f:0" + chat.ARGUMENT_BEGIN + "{") * 100_000,
               chat.CALL_END * 200_000 + chat.CALL_BEGIN):
    start = time.monotonic()
    parsed = chat.parse(section(body))
    assert time.monotonic() - start < 10
    assert len(parsed.tool_calls) == min(chat.MAX_TOOL_CALLS, body.count(chat.CALL_BEGIN))
    assert parsed.tool_calls[0].arguments is None
  kinds = {e.kind for e in chat.parse(section(chat.CALL_BEGIN * 200)).errors}
  assert "too_many_tool_calls" in kinds


def test_parse_refuses_non_text():
  for value in (None, b"bytes", 12, ["list"]):
    with pytest.raises(TypeError, match="parse expects the generated text as a str"):
      chat.parse(value)


calculator_inputs = st.lists(
  st.one_of(
    st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "(", ")", ",", "1", "2", "9", "0", ".5", "e", "pi", "1e308",
                     "10**", "round(", "factorial(", "gcd(", "sqrt(", "log(", "min(", "abs(", "-" * 50, "(" * 60, "x",
                     "__import__", "'a'", "[1]", "lambda: 1", "1j", "True"]),
    st.integers(-10**30, 10**30).map(str),
  ),
  max_size=40,
).map("".join)


@settings(max_examples=250, deadline=None, derandomize=True, database=None)
@given(calculator_inputs)
def test_calculator_only_raises_tool_errors(expression):
  start = time.monotonic()
  try:
    assert isinstance(calculate(expression), str)
  except ToolError:
    pass
  assert time.monotonic() - start < 5


small_integer_expressions = st.recursive(
  st.integers(-10**6, 10**6).map(lambda v: f"({v})"),
  lambda inner: st.tuples(inner, st.sampled_from(["+", "-", "*", "//", "%"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
  max_leaves=16,
)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(small_integer_expressions)
def test_calculator_agrees_with_python_on_integer_arithmetic(expression):
  try:
    expected = eval(expression)  # noqa: S307 (generated from digits and operators only)
  except ZeroDivisionError:
    with pytest.raises(ToolError, match="ZeroDivisionError"):
      calculate(expression)
    return
  assert calculate(expression) == repr(expected)


@pytest.mark.parametrize(
  "expression, message",
  [("round(1, -10**8)", "round's digits"), ("-" * 1999 + "1", "nested too deeply"), ("(" * 1000 + "1" + ")" * 1000, "too long"),
   ("10**10**10", "too large"), ("factorial(10**6)", "too large"),
   ("factorial(5000) * factorial(5000)", "too large"), ("sqrt(" * 120 + "2" + ")" * 120, "nested"),
   ("(-8) ** 0.5", "not a real number"), ("log(0)", "ValueError"), ("exp(10**4)", "OverflowError"),
   ("2 ** 99999 / 3 ** 50000", "OverflowError")],
  ids=lambda value: value if len(value) < 40 else f"{value[:20]}...({len(value)} chars)",
)
def test_calculator_bounds_hostile_expressions(expression, message):
  start = time.monotonic()
  with pytest.raises(ToolError, match=message):
    calculate(expression)
  assert time.monotonic() - start < 5


def test_calculator_shows_large_integers():
  assert calculate("2**20000") == "3.980276840337966e+6020 (an integer of 6021 digits; leading digits shown)"
  assert calculate("-(10**5000)").startswith("-1.000000000000000e+5000 (an integer of 5001 digits")
  assert calculate("2**1000 - 1") == repr(2**1000 - 1)
  assert calculate("9" * 1999) == "9" * 1999  # exact up to about 4000 digits
  with pytest.raises(ToolError, match="must be a string"):
    calculate(None)
