"""K2 Thinking chat format: render OpenAI-style messages to prompt text, parse generated text back.

Rendering follows the K2 Thinking chat template (spec §3): a tools declaration (`tools | tojson`), a
default system message, one block per message with no separators, and reasoning kept only for
assistant turns after the last assistant message without tool calls (training targets keep theirs,
see `reasoning_kept`). Parsing never raises on model output: every problem
comes back as a `ParseError` whose message can be shown to the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

IM_USER = "<|im_user|>"
IM_ASSISTANT = "<|im_assistant|>"
IM_SYSTEM = "<|im_system|>"
IM_MIDDLE = "<|im_middle|>"
IM_END = "<|im_end|>"
THINK_BEGIN = "<think>"
THINK_END = "</think>"
SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
GENERATION_PROMPT = f"{IM_ASSISTANT}assistant{IM_MIDDLE}"

_ROLE_TOKENS = {"user": IM_USER, "assistant": IM_ASSISTANT}
MAX_TOOL_CALLS = 64  # per message; more are reported, not returned
MAX_ARGUMENT_CHARS = 1 << 20
MAX_NAME_CHARS = 256
_TOOL_CALL_ID_RE = re.compile(r"functions\.(?P<name>[^\s:]+):(?P<index>\d+)")

Message = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------
# Rendering


def tool_call_id(name: str, index: int) -> str:
  """K2's id for the index-th tool call of a conversation."""
  return f"functions.{name}:{index}"


def content_text(content: Any) -> str:
  """Message content as text: a string, None, or a list of {"type": "text", "text": ...} parts."""
  if content is None:
    return ""
  if isinstance(content, str):
    return content
  if isinstance(content, Sequence):
    texts = []
    for part in content:
      if not isinstance(part, Mapping) or part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
        raise ValueError(f"only text content parts are supported, got {part!r:.120}")
      texts.append(part["text"])
    return "".join(texts)
  raise ValueError(f"message content must be a string, a list of text parts or None, got {type(content).__name__}")


def format_arguments(arguments: Any) -> str:
  """Arguments as the template writes them: strings verbatim, anything else as standard JSON."""
  if isinstance(arguments, str):
    return arguments
  return tojson(arguments)


def tojson(value: Any, sort_keys: bool = False) -> str:
  """The template's `tojson`: `json.dumps` with its default separators (", " and ": ") and non-ASCII
  kept; keys stay in the caller's order unless `sort_keys` (recursive)."""
  return json.dumps(value, ensure_ascii=False, sort_keys=sort_keys)


def render_tools_declaration(tools: Sequence[Mapping[str, Any]], sort_keys: bool = False) -> str:
  tools_json = tojson(list(tools), sort_keys=sort_keys)
  return f"{IM_SYSTEM}tool_declare{IM_MIDDLE}{tools_json}{IM_END}"


def render_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
  parts = [SECTION_BEGIN]
  for call in tool_calls:
    function = call.get("function", call)
    parts.append(f"{CALL_BEGIN}{call.get('id', '')}{ARGUMENT_BEGIN}{format_arguments(function.get('arguments', {}))}{CALL_END}")
  parts.append(SECTION_END)
  return "".join(parts)


def assistant_body(message: Message, keep_reasoning: bool = True) -> str:
  """What follows `<|im_middle|>` in an assistant block (and what the model generates)."""
  reasoning = (message.get("reasoning_content") or "") if keep_reasoning else ""
  body = f"{THINK_BEGIN}{reasoning}{THINK_END}{content_text(message.get('content'))}"
  if message.get("tool_calls"):
    body += render_tool_calls(message["tool_calls"])
  return body


def _message_body(message: Message, keep_reasoning: bool) -> str:
  role = message["role"]
  if role == "assistant":
    return assistant_body(message, keep_reasoning)
  if role == "tool":
    return f"## Return of {message.get('tool_call_id', '')}\n{content_text(message.get('content'))}"
  return content_text(message.get("content"))


def last_plain_assistant_index(messages: Sequence[Message]) -> int:
  """Index of the last assistant message without tool calls, or -1."""
  for index in range(len(messages) - 1, -1, -1):
    if messages[index]["role"] == "assistant" and not messages[index].get("tool_calls"):
      return index
  return -1


def reasoning_kept(messages: Sequence[Message], keep_reasoning_from: int | None = None) -> list[bool]:
  """Which messages render their reasoning.

  Inference (`keep_reasoning_from=None`): reasoning of turns up to the last finished answer is
  dropped; later turns (a tool-call chain still in progress) keep theirs, so the model sees its own
  interleaved thinking. Training: messages from `keep_reasoning_from` on are targets and keep their
  reasoning (a thinking model trained on `<think></think>answer` learns not to think); the history
  before them renders as it would in the prompt that produced them.
  """
  start = len(messages) if keep_reasoning_from is None else keep_reasoning_from
  last_plain = last_plain_assistant_index(messages[:start])
  return [index > last_plain or index >= start for index in range(len(messages))]


def render_message(message: Message, keep_reasoning: bool = True) -> str:
  header = message.get("name") or message["role"]
  role_token = _ROLE_TOKENS.get(message["role"], IM_SYSTEM)
  return f"{role_token}{header}{IM_MIDDLE}{_message_body(message, keep_reasoning)}{IM_END}"


def render(
  messages: Sequence[Message],
  tools: Sequence[Mapping[str, Any]] | None = None,
  add_generation_prompt: bool = True,
  *,
  sort_tool_keys: bool = False,
  keep_reasoning_from: int | None = None,
) -> str:
  """Prompt text for a conversation, as the K2 Thinking chat template writes it.

  `sort_tool_keys` sorts the keys of the tool declarations recursively (off: the caller's order, as
  the released template writes them). `keep_reasoning_from`: see `reasoning_kept`.
  """
  for index, message in enumerate(messages):
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
      raise ValueError(f"message {index} must be a mapping with a string 'role'")
  parts = []
  if tools:
    parts.append(render_tools_declaration(tools, sort_keys=sort_tool_keys))
  if not messages or messages[0]["role"] != "system":
    parts.append(f"{IM_SYSTEM}system{IM_MIDDLE}{DEFAULT_SYSTEM_PROMPT}{IM_END}")
  for message, keep in zip(messages, reasoning_kept(messages, keep_reasoning_from)):
    parts.append(render_message(message, keep_reasoning=keep))
  if add_generation_prompt:
    parts.append(GENERATION_PROMPT)
  return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class ToolCall:
  id: str
  name: str
  arguments: dict[str, Any] | None  # None when the call cannot be executed (see error)
  raw_arguments: str
  error: str | None = None


@dataclass(frozen=True)
class ParseError:
  kind: str
  message: str
  call_index: int | None = None


@dataclass
class ParsedMessage:
  reasoning: str
  content: str
  tool_calls: list[ToolCall] = field(default_factory=list)
  errors: list[ParseError] = field(default_factory=list)
  # The model tried to call tools (a section or call marker appeared), even if nothing parsed.
  wants_tools: bool = False

  @property
  def ok(self) -> bool:
    return not self.errors

  def error_report(self) -> str:
    return "\n".join(f"- {error.message}" for error in self.errors)


def _parse_arguments(raw: str, call_id: str) -> tuple[dict[str, Any] | None, str | None]:
  if not raw.strip():
    return {}, None
  if len(raw) > MAX_ARGUMENT_CHARS:
    return None, f"arguments of {call_id} are too long ({len(raw)} characters, at most {MAX_ARGUMENT_CHARS})"
  try:
    value = json.loads(raw)
  except json.JSONDecodeError as err:
    return None, f"arguments of {call_id} are not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
  except RecursionError:
    return None, f"arguments of {call_id} are nested too deeply"
  except ValueError as err:  # e.g. an integer of more digits than Python converts
    return None, f"arguments of {call_id} cannot be read: {str(err)[:120]}"
  if not isinstance(value, dict):
    return None, f"arguments of {call_id} must be a JSON object, got {type(value).__name__}"
  return value, None


def _short(text: str, limit: int = 80) -> str:
  """repr of text cut to limit characters, for error messages."""
  return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _name_from_id(call_id: str) -> tuple[str, str | None]:
  match = _TOOL_CALL_ID_RE.fullmatch(call_id)
  if match and len(match["name"]) <= MAX_NAME_CHARS:
    return match["name"], None
  # Best effort, so the error can name the tool the model probably meant.
  guess = call_id.rsplit(":", 1)[0].removeprefix("functions.")[:MAX_NAME_CHARS]
  return guess, f"tool call id {_short(call_id)} is not of the form functions.NAME:INDEX"


def _parse_call(region: str, index: int, terminated: bool) -> tuple[ToolCall, list[ParseError]]:
  errors = []
  if ARGUMENT_BEGIN in region:
    call_id, raw_arguments = region.split(ARGUMENT_BEGIN, 1)
  else:
    call_id, raw_arguments = region, ""
    errors.append(ParseError("missing_argument_begin", f"tool call {index} has no {ARGUMENT_BEGIN}", index))
  call_id = call_id.strip()
  name, id_error = _name_from_id(call_id)
  if id_error:
    errors.append(ParseError("bad_call_id", id_error, index))
  if not name:
    errors.append(ParseError("missing_tool_name", f"tool call {index} names no tool", index))
  label = (call_id if len(call_id) <= 80 else call_id[:80] + "...") or f"tool call {index}"
  arguments, argument_error = _parse_arguments(raw_arguments, label)
  if argument_error:
    errors.append(ParseError("bad_arguments", argument_error, index))
  if not terminated:
    errors.append(ParseError("missing_call_end", f"tool call {label if call_id else index} is not closed by {CALL_END}", index))
  # Any problem blocks execution: running a guessed call could do what the model did not mean.
  call = ToolCall(
    id=call_id,
    name=name,
    arguments=None if errors else arguments,
    raw_arguments=raw_arguments,
    error="; ".join(e.message for e in errors) or None,
  )
  return call, errors


def _positions(text: str, marker: str) -> list[int]:
  return [match.start() for match in re.finditer(re.escape(marker), text)]


def _parse_section(section: str) -> tuple[list[ToolCall], list[ParseError]]:
  """Tool calls of a section body (between the section markers), in one pass over the markers."""
  calls: list[ToolCall] = []
  errors: list[ParseError] = []
  begins, ends = _positions(section, CALL_BEGIN), _positions(section, CALL_END)
  position, next_end = 0, 0  # next_end: index into ends of the first end not before position
  for number, begin in enumerate(begins):  # the markers cannot overlap, so begins[number + 1] >= start
    stray = section[position:begin]
    if stray.strip():
      errors.append(ParseError("stray_text", f"text outside any tool call was ignored: {_short(stray.strip())}"))
    if len(calls) == MAX_TOOL_CALLS:
      errors.append(ParseError("too_many_tool_calls", f"more than {MAX_TOOL_CALLS} tool calls; the rest were ignored"))
      return calls, errors
    start = begin + len(CALL_BEGIN)
    while next_end < len(ends) and ends[next_end] < start:
      next_end += 1
    next_begin = begins[number + 1] if number + 1 < len(begins) else -1
    end = ends[next_end] if next_end < len(ends) else -1
    terminated = end >= 0 and (next_begin < 0 or end < next_begin)
    stop = end if terminated else (next_begin if next_begin >= 0 else len(section))
    call, call_errors = _parse_call(section[start:stop], len(calls), terminated)
    calls.append(call)
    errors.extend(call_errors)
    position = stop + len(CALL_END) if terminated else stop
  stray = section[position:]
  if stray.strip():
    errors.append(ParseError("stray_text", f"text outside any tool call was ignored: {_short(stray.strip())}"))
  return calls, errors


def _split_reasoning(head: str, tools_follow: bool) -> tuple[str, str, list[ParseError]]:
  stripped = head.lstrip()
  if stripped.startswith(THINK_BEGIN):
    inner = stripped[len(THINK_BEGIN) :]
    if THINK_END in inner:
      reasoning, content = inner.split(THINK_END, 1)
      return reasoning, content, []
    if tools_follow:  # reasoning ends implicitly where the tool-call section begins
      return inner, "", []
    return inner, "", [ParseError("unterminated_think", f"the reasoning was not closed with {THINK_END}")]
  if THINK_END in head:  # the prompt may have opened <think> already
    reasoning, content = head.split(THINK_END, 1)
    return reasoning, content, []
  return "", head, []


def parse(generated_text: str) -> ParsedMessage:
  """Split model output into reasoning, content and tool calls.

  Never raises on a string, and runs in time linear in its length: every problem becomes a ParseError.
  A non-string is a TypeError."""
  if not isinstance(generated_text, str):
    raise TypeError(f"parse expects the generated text as a str, got {type(generated_text).__name__}")
  text = generated_text
  errors: list[ParseError] = []
  if text.startswith(GENERATION_PROMPT):
    text = text[len(GENERATION_PROMPT) :]
  if IM_END in text:
    text, trailing = text.split(IM_END, 1)
    if trailing.strip():
      errors.append(ParseError("text_after_end", f"text after {IM_END} was ignored: {_short(trailing.strip())}"))
  markers = [at for at in (text.find(SECTION_BEGIN), text.find(CALL_BEGIN)) if at >= 0]
  tools_at = min(markers) if markers else len(text)
  head, tail = text[:tools_at], text[tools_at:]
  reasoning, content, reasoning_errors = _split_reasoning(head, tools_follow=bool(tail))
  errors.extend(reasoning_errors)
  calls: list[ToolCall] = []
  if tail:
    if tail.startswith(SECTION_BEGIN):
      tail = tail[len(SECTION_BEGIN) :]
    else:
      errors.append(ParseError("missing_section_begin", f"tool calls must start with {SECTION_BEGIN}"))
    if SECTION_END in tail:
      tail, after = tail.split(SECTION_END, 1)
      if after.strip():
        errors.append(ParseError("text_after_tool_calls", f"text after {SECTION_END} was ignored: {_short(after.strip())}"))
    else:
      errors.append(ParseError("missing_section_end", f"the tool-call section was not closed with {SECTION_END}"))
    calls, section_errors = _parse_section(tail)
    errors.extend(section_errors)
    if not calls:
      errors.append(ParseError("empty_tool_section", "the tool-call section holds no tool call"))
  return ParsedMessage(reasoning, content, calls, errors, wants_tools=bool(markers))


def to_message(parsed: ParsedMessage) -> dict[str, Any]:
  """An assistant message for `render`; arguments stay as the model wrote them."""
  message: dict[str, Any] = {"role": "assistant", "content": parsed.content, "reasoning_content": parsed.reasoning}
  if parsed.tool_calls:
    message["tool_calls"] = [
      {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.raw_arguments}}
      for call in parsed.tool_calls
    ]
  return message
