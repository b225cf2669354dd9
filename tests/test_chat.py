"""Chat format: render against strings written out from the template rules, parse and its round trip."""

from __future__ import annotations

import json
import random

import pytest

from k2jax.chat import (
  CALL_END,
  ParsedMessage,
  assistant_body,
  parse,
  render,
  to_message,
)

SYS_DEFAULT = "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
GEN = "<|im_assistant|>assistant<|im_middle|>"

CALC_TOOL = {
  "type": "function",
  "function": {
    "name": "calculator",
    "description": "Évalue une expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
  },
}


def call(index: int, name: str, arguments) -> dict:
  return {"id": f"functions.{name}:{index}", "type": "function", "function": {"name": name, "arguments": arguments}}


def test_single_turn_gets_default_system_and_generation_prompt():
  text = render([{"role": "user", "content": "Hi"}])
  assert text == SYS_DEFAULT + "<|im_user|>user<|im_middle|>Hi<|im_end|>" + GEN


def test_own_system_message_replaces_default_and_no_generation_prompt():
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  text = render(messages, add_generation_prompt=False)
  assert text == "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|>"


def test_multi_turn_drops_reasoning_of_finished_answers():
  messages = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "add"},
    {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "text", "text": "3+3?"}]},
    {"role": "assistant", "content": "6", "reasoning_content": "add again"},
    {"role": "user", "content": "thanks", "name": "bob"},
  ]
  expected = (
    SYS_DEFAULT
    + "<|im_user|>user<|im_middle|>2+2?<|im_end|>"
    + "<|im_assistant|>assistant<|im_middle|><think></think>4<|im_end|>"
    + "<|im_user|>user<|im_middle|>and 3+3?<|im_end|>"
    + "<|im_assistant|>assistant<|im_middle|><think></think>6<|im_end|>"
    + "<|im_user|>bob<|im_middle|>thanks<|im_end|>"
    + GEN
  )
  assert render(messages) == expected


def tool_chain_messages() -> list[dict]:
  return [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "What is (2+3)*7?"},
    {"role": "assistant", "content": "", "reasoning_content": "first add", "tool_calls": [call(0, "calculator", {"expression": "2+3"})]},
    {"role": "tool", "tool_call_id": "functions.calculator:0", "name": "calculator", "content": "5"},
    {
      "role": "assistant",
      "content": "Two more.",
      "reasoning_content": "now multiply, and check",
      "tool_calls": [call(1, "calculator", {"expression": "5*7", "note": "ü"}), call(2, "calculator", '{"expression":"35"}')],
    },
    {"role": "tool", "tool_call_id": "functions.calculator:1", "name": "calculator", "content": "35"},
    {"role": "tool", "tool_call_id": "functions.calculator:2", "content": "35"},
    {"role": "assistant", "content": "35", "reasoning_content": "done"},
    {"role": "user", "content": "Now 35**2?"},
    {"role": "assistant", "content": None, "reasoning_content": "square it", "tool_calls": [call(3, "calculator", {"expression": "35**2"})]},
    {"role": "tool", "tool_call_id": "functions.calculator:3", "name": "calculator", "content": "1225"},
  ]


def test_tool_chain_keeps_reasoning_only_after_last_plain_answer():
  # `tools | tojson`: default separators, keys in the caller's order, non-ASCII kept.
  tools_json = (
    '[{"type": "function", "function": {"name": "calculator", "description": "Évalue une expression", '
    '"parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]'
  )
  expected = (
    f"<|im_system|>tool_declare<|im_middle|>{tools_json}<|im_end|>"
    "<|im_system|>system<|im_middle|>Use tools.<|im_end|>"
    "<|im_user|>user<|im_middle|>What is (2+3)*7?<|im_end|>"
    # Before and at the last assistant message without tool calls: reasoning dropped.
    "<|im_assistant|>assistant<|im_middle|><think></think><|tool_calls_section_begin|>"
    '<|tool_call_begin|>functions.calculator:0<|tool_call_argument_begin|>{"expression": "2+3"}<|tool_call_end|>'
    "<|tool_calls_section_end|><|im_end|>"
    "<|im_system|>calculator<|im_middle|>## Return of functions.calculator:0\n5<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|><think></think>Two more.<|tool_calls_section_begin|>"
    '<|tool_call_begin|>functions.calculator:1<|tool_call_argument_begin|>{"expression": "5*7", "note": "ü"}<|tool_call_end|>'
    '<|tool_call_begin|>functions.calculator:2<|tool_call_argument_begin|>{"expression":"35"}<|tool_call_end|>'
    "<|tool_calls_section_end|><|im_end|>"
    "<|im_system|>calculator<|im_middle|>## Return of functions.calculator:1\n35<|im_end|>"
    "<|im_system|>tool<|im_middle|>## Return of functions.calculator:2\n35<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|><think></think>35<|im_end|>"
    "<|im_user|>user<|im_middle|>Now 35**2?<|im_end|>"
    # After it: the chain in progress keeps its reasoning.
    "<|im_assistant|>assistant<|im_middle|><think>square it</think><|tool_calls_section_begin|>"
    '<|tool_call_begin|>functions.calculator:3<|tool_call_argument_begin|>{"expression": "35**2"}<|tool_call_end|>'
    "<|tool_calls_section_end|><|im_end|>"
    "<|im_system|>calculator<|im_middle|>## Return of functions.calculator:3\n1225<|im_end|>"
    + GEN
  )
  assert render(tool_chain_messages(), tools=[CALC_TOOL]) == expected


def test_without_a_plain_answer_every_turn_keeps_reasoning():
  messages = tool_chain_messages()[:7]
  text = render(messages)
  assert text.startswith("<|im_system|>system<|im_middle|>Use tools.<|im_end|>")  # own system, no tools
  assert "<think>first add</think>" in text and "<think>now multiply, and check</think>Two more." in text
  assert "<think></think>" not in text


def test_unicode_conversation():
  messages = [
    {"role": "user", "content": "北京今天天气怎么样？🙂"},
    {"role": "assistant", "content": "", "reasoning_content": "需要查天气", "tool_calls": [call(0, "weather", {"city": "北京"})]},
    {"role": "tool", "tool_call_id": "functions.weather:0", "name": "weather", "content": "晴，25°C"},
    {"role": "assistant", "content": "晴天，25°C。", "reasoning_content": "直接回答"},
  ]
  expected = (
    SYS_DEFAULT
    + "<|im_user|>user<|im_middle|>北京今天天气怎么样？🙂<|im_end|>"
    + "<|im_assistant|>assistant<|im_middle|><think></think><|tool_calls_section_begin|>"
    + '<|tool_call_begin|>functions.weather:0<|tool_call_argument_begin|>{"city": "北京"}<|tool_call_end|>'
    + "<|tool_calls_section_end|><|im_end|>"
    + "<|im_system|>weather<|im_middle|>## Return of functions.weather:0\n晴，25°C<|im_end|>"
    + "<|im_assistant|>assistant<|im_middle|><think></think>晴天，25°C。<|im_end|>"
  )
  assert render(messages, add_generation_prompt=False) == expected


def test_render_rejects_non_text_parts_and_roleless_messages():
  with pytest.raises(ValueError, match="only text content parts"):
    render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
  with pytest.raises(ValueError, match="message 0"):
    render([{"content": "no role"}])


# ---------------------------------------------------------------------------------------------
# Parsing

ROUND_TRIP_MESSAGES = [
  {"role": "assistant", "content": "Plain answer.", "reasoning_content": "thinking\nover lines"},
  {"role": "assistant", "content": "", "reasoning_content": "", },
  {"role": "assistant", "content": "中文答案 🙂", "reasoning_content": "用中文思考"},
  {
    "role": "assistant",
    "content": "Checking two things.",
    "reasoning_content": "call both",
    "tool_calls": [call(4, "search", '{"query": "K2 \\"Thinking\\"", "top_k": 3}'), call(5, "python", '{"code": "print(1)\\n"}')],
  },
  {"role": "assistant", "content": "", "reasoning_content": "no args", "tool_calls": [call(0, "get_time", "{}")]},
]


@pytest.mark.parametrize("message", ROUND_TRIP_MESSAGES)
def test_parse_round_trips_render(message):
  body = assistant_body(message)
  parsed = parse(body + "<|im_end|>")
  assert parsed.ok, parsed.errors
  assert parsed.reasoning == message["reasoning_content"]
  assert parsed.content == message["content"]
  expected_calls = message.get("tool_calls", [])
  assert [(c.id, c.name, c.raw_arguments) for c in parsed.tool_calls] == [
    (c["id"], c["function"]["name"], c["function"]["arguments"]) for c in expected_calls
  ]
  assert [c.arguments for c in parsed.tool_calls] == [json.loads(c["function"]["arguments"]) for c in expected_calls]
  # The message rebuilt from the parse renders to the same conversation.
  history = [{"role": "user", "content": "q"}]
  assert render(history + [to_message(parsed)]) == render(history + [message])


def test_parse_reads_the_tail_of_a_rendered_conversation():
  text = render(tool_chain_messages(), tools=[CALC_TOOL], add_generation_prompt=False)
  last_turn = text[text.rindex(GEN) + len(GEN) :]
  last_turn = last_turn[: last_turn.index("<|im_end|>") + len("<|im_end|>")]
  parsed = parse(last_turn)
  assert parsed.ok and parsed.reasoning == "square it" and parsed.content == ""
  assert [(c.id, c.name, c.arguments) for c in parsed.tool_calls] == [("functions.calculator:3", "calculator", {"expression": "35**2"})]


def test_dict_arguments_round_trip_as_their_json_text():
  message = {"role": "assistant", "content": "", "reasoning_content": "r", "tool_calls": [call(0, "f", {"a": [1, 2], "b": "ü"})]}
  parsed = parse(assistant_body(message))
  assert parsed.tool_calls[0].raw_arguments == '{"a": [1, 2], "b": "ü"}'
  assert parsed.tool_calls[0].arguments == {"a": [1, 2], "b": "ü"}


def test_reasoning_ends_implicitly_at_tool_section():
  text = '<think>plan<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{"x": 1}<|tool_call_end|><|tool_calls_section_end|>'
  parsed = parse(text)
  assert parsed.ok and parsed.reasoning == "plan" and parsed.tool_calls[0].arguments == {"x": 1}


def test_prefilled_think_and_plain_text():
  assert (parse("reason</think>answer").reasoning, parse("reason</think>answer").content) == ("reason", "answer")
  plain = parse("just text")
  assert plain.ok and plain.content == "just text" and plain.reasoning == ""
  assert parse(GEN + "<think>r</think>a<|im_end|>").content == "a"


VALID_CALL = '<|tool_call_begin|>functions.calc:0<|tool_call_argument_begin|>{"expression": "1+1"}<|tool_call_end|>'
SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"

MALFORMED = [
  ("<think>never closed", {"unterminated_think"}),
  (f'<think>r</think>{SB}<|tool_call_begin|>functions.calc:0<|tool_call_argument_begin|>{{"expression": 1+}}<|tool_call_end|>{SE}', {"bad_arguments"}),
  (f"<think>r</think>{SB}<|tool_call_begin|>functions.calc:0<|tool_call_argument_begin|>[1, 2]<|tool_call_end|>{SE}", {"bad_arguments"}),
  (f'<think>r</think>{SB}<|tool_call_begin|>functions.calc:0<|tool_call_argument_begin|>{{"expression": "1"}}{SE}', {"missing_call_end"}),
  (f"<think>r</think>{SB}{VALID_CALL}", {"missing_section_end"}),
  (f'<think>r</think>{SB}<|tool_call_begin|>calculator<|tool_call_argument_begin|>{{"expression": "1"}}<|tool_call_end|>{SE}', {"bad_call_id"}),
  (f'<think>r</think>{SB}<|tool_call_begin|>functions.calc<|tool_call_argument_begin|>{{}}<|tool_call_end|>{SE}', {"bad_call_id"}),
  (f"<think>r</think>{SB}<|tool_call_begin|>functions.calc:0{{}}<|tool_call_end|>{SE}", {"missing_argument_begin", "bad_call_id"}),
  (f"<think>r</think>{SB}{SE}", {"empty_tool_section"}),
  (f"<think>r</think>{VALID_CALL}{SE}", {"missing_section_begin"}),
  (f"<think>r</think>{SB}{VALID_CALL}{SE}and then some", {"text_after_tool_calls"}),
  (f"<think>r</think>{SB}stray {VALID_CALL}{SE}", {"stray_text"}),
  ("<think>r</think>answer<|im_end|>more text", {"text_after_end"}),
  (f"<think>r</think>{SB}<|tool_call_begin|><|tool_call_begin|>{VALID_CALL}{SE}", {"missing_argument_begin", "bad_call_id", "missing_call_end", "missing_tool_name"}),
  (f"<think>r</think>{SB}<|tool_call_begin|><|tool_call_argument_begin|>{{}}<|tool_call_end|>{SE}", {"bad_call_id", "missing_tool_name"}),
]


@pytest.mark.parametrize("text, kinds", MALFORMED)
def test_malformed_output_comes_back_as_errors(text, kinds):
  parsed = parse(text)
  assert {error.kind for error in parsed.errors} == kinds
  assert all(error.message for error in parsed.errors) and parsed.error_report()
  for tool_call in parsed.tool_calls:
    # A call is executable only when nothing about it was wrong.
    assert (tool_call.arguments is None) == (tool_call.error is not None)
    if tool_call.error:
      assert any(e.call_index is not None for e in parsed.errors)
  assert isinstance(to_message(parsed), dict)
  render([{"role": "user", "content": "q"}, to_message(parsed)])  # feeds back into the history


def test_complete_calls_survive_a_missing_section_end():
  parsed = parse(f"<think>r</think>{SB}{VALID_CALL}")
  assert parsed.tool_calls[0].arguments == {"expression": "1+1"}


def _valid_output() -> tuple[str, ParsedMessage]:
  message = ROUND_TRIP_MESSAGES[3]
  text = assistant_body(message) + "<|im_end|>"
  return text, parse(text)


def _check_well_formed(parsed: ParsedMessage, full: ParsedMessage) -> None:
  assert isinstance(parsed.reasoning, str) and isinstance(parsed.content, str)
  full_calls = {(c.id, c.raw_arguments) for c in full.tool_calls}
  for tool_call in parsed.tool_calls:
    if tool_call.arguments is not None:
      # Never executes a half-written call: only ones that are complete in the full output.
      assert (tool_call.id, tool_call.raw_arguments) in full_calls


def test_parse_survives_every_truncation_of_a_valid_output():
  text, full = _valid_output()
  for cut in range(len(text) + 1):
    parsed = parse(text[:cut])
    _check_well_formed(parsed, full)
    if CALL_END not in text[:cut]:
      assert all(c.arguments is None for c in parsed.tool_calls)
  assert parse(text) == full and full.ok


def test_parse_survives_random_corruption():
  text, full = _valid_output()
  markers = ["<think>", "</think>", SB, SE, "<|tool_call_begin|>", "<|tool_call_argument_begin|>", CALL_END, "<|im_end|>", "{", '"', ":"]
  rng = random.Random(99)
  for _ in range(400):
    corrupted = list(text)
    for _ in range(rng.randrange(1, 4)):
      at = rng.randrange(len(corrupted) + 1)
      if rng.random() < 0.5:
        corrupted.insert(at, rng.choice(markers))
      elif corrupted:
        del corrupted[min(at, len(corrupted) - 1)]
    parsed = parse("".join(corrupted))
    assert isinstance(parsed, ParsedMessage)
    render([{"role": "user", "content": "q"}, to_message(parsed)])


def _hf_tojson(tools, sort_keys=False) -> str:
  """The declaration as HF transformers' chat-template engine writes `tools | tojson`."""
  pytest.importorskip("transformers")
  from transformers.utils.chat_template_utils import _compile_jinja_template  # noqa: PLC0415
  template = "{{ tools | tojson(sort_keys=true) }}" if sort_keys else "{{ tools | tojson }}"
  return _compile_jinja_template(template).render(tools=tools)


def _random_tool(rng: random.Random) -> dict:
  def value(depth):
    kind = rng.randrange(5 if depth < 3 else 3)
    if kind == 0:
      return rng.choice(["x", "Évalue", "北京", 'quote " and \\ back', "tab\tnew\nline", "🙂"])
    if kind == 1:
      return rng.choice([0, -3, 2.5, True, False, None])
    if kind == 2:
      return rng.randrange(1000)
    if kind == 3:
      return [value(depth + 1) for _ in range(rng.randrange(3))]
    keys = rng.sample(["zeta", "alpha", "type", "name", "mu", "description", "b", "a"], rng.randrange(1, 5))
    return {k: value(depth + 1) for k in keys}
  return {"type": "function", "function": {"name": f"tool_{rng.randrange(100)}", "parameters": value(0),
                                           "description": value(2)}}


@pytest.mark.parametrize("sort_keys", [False, True])
def test_tools_declaration_bytes_match_hf_tojson(sort_keys):
  rng = random.Random(7)
  for _ in range(20):
    tools = [_random_tool(rng) for _ in range(rng.randrange(1, 4))]
    text = render([{"role": "user", "content": "q"}], tools=tools, sort_tool_keys=sort_keys)
    declaration = f"<|im_system|>tool_declare<|im_middle|>{_hf_tojson(tools, sort_keys)}<|im_end|>"
    assert text.startswith(declaration + SYS_DEFAULT)
  # Off by default: the caller's key order; on: sorted at every depth.
  tools = [{"type": "function", "function": {"name": "f", "parameters": {"z": 1, "a": {"y": 2, "b": 3}}}}]
  assert '{"z": 1, "a": {"y": 2, "b": 3}}' in render([], tools=tools)
  assert '"parameters": {"a": {"b": 3, "y": 2}, "z": 1}' in render([], tools=tools, sort_tool_keys=True)


def test_training_targets_keep_reasoning_history_follows_the_inference_rule():
  messages = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "add two and two"},
    {"role": "user", "content": "times 3?"},
    {"role": "assistant", "content": "", "reasoning_content": "use the tool", "tool_calls": [call(0, "calc", {"e": "4*3"})]},
    {"role": "tool", "tool_call_id": "functions.calc:0", "content": "12"},
    {"role": "assistant", "content": "12", "reasoning_content": "the tool says 12"},
  ]
  # Inference: everything up to the last plain answer loses its reasoning.
  assert render(messages).count("<think></think>") == 3
  # Targets from index 3: the final chain keeps its reasoning; the history renders exactly as the
  # prompt that produced message 3 does.
  text = render(messages, add_generation_prompt=False, keep_reasoning_from=3)
  prompt = render(messages[:3])
  assert text.startswith(prompt.removesuffix(GEN))
  assert "<think></think>4" in text
  for reasoning in ("use the tool", "the tool says 12"):
    assert f"<think>{reasoning}</think>" in text
  everything = render(messages, keep_reasoning_from=0)
  assert "<think></think>" not in everything and "<think>add two and two</think>4" in everything
