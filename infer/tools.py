"""Tools the agent can call: a registry entry type, JSON-schema argument checks, and two built-ins.

- `calculator`: arithmetic through a whitelist over Python's `ast` (no eval), with size guards.
- `python`: a fresh interpreter per call in an OS sandbox (`k2jax.infer.sandbox`: namespaces,
  read-only filesystem, seccomp, rlimits), which says precisely what it guarantees.
"""

from __future__ import annotations

import ast
import math
import operator
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from k2jax.infer import sandbox
from k2jax.infer.sandbox import SandboxResult, SandboxUnavailable, run_python  # noqa: F401 (public API)


class ToolError(Exception):
  """A tool refused its input or failed; the message is shown to the model."""


@dataclass(frozen=True)
class Tool:
  name: str
  description: str
  parameters: Mapping[str, Any]  # JSON schema of the arguments object
  function: Callable[..., Any]

  def schema(self) -> dict[str, Any]:
    """OpenAI function-tool format, as the chat template declares it."""
    return {
      "type": "function",
      "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)},
    }

  def __call__(self, arguments: Mapping[str, Any]) -> str:
    """Validate, run, and return the result as text; raises ToolError on bad input."""
    problems = validate_arguments(self.parameters, arguments)
    if problems:
      raise ToolError(f"invalid arguments for {self.name}: " + "; ".join(problems))
    result = self.function(**arguments)
    return result if isinstance(result, str) else str(result)


def tools_schema(tools: Iterable[Tool]) -> list[dict[str, Any]]:
  return [tool.schema() for tool in tools]


# ---------------------------------------------------------------------------------------------
# Argument validation: the subset of JSON schema that function declarations use.

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
  "string": lambda v: isinstance(v, str),
  "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
  "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
  "boolean": lambda v: isinstance(v, bool),
  "array": lambda v: isinstance(v, list),
  "object": lambda v: isinstance(v, dict),
  "null": lambda v: v is None,
}


def validate_arguments(schema: Mapping[str, Any], value: Any, path: str = "arguments") -> list[str]:
  """Problems of value against schema (type, enum, required, properties, items); empty if valid."""
  problems: list[str] = []
  expected = schema.get("type")
  if expected is not None:
    allowed = [expected] if isinstance(expected, str) else list(expected)
    if not any(_JSON_TYPES.get(name, lambda v: True)(value) for name in allowed):
      return [f"{path} must be of type {' or '.join(allowed)}, got {_json_type_name(value)}"]
  if "enum" in schema and value not in schema["enum"]:
    problems.append(f"{path} must be one of {schema['enum']!r}, got {value!r}")
  if isinstance(value, dict):
    properties = schema.get("properties", {})
    for name in schema.get("required", []):
      if name not in value:
        problems.append(f"missing required property {name!r} in {path}")
    for name, item in value.items():
      if name in properties:
        problems.extend(validate_arguments(properties[name], item, f"{path}.{name}"))
      elif schema.get("additionalProperties") is False:
        problems.append(f"unexpected property {name!r} in {path}")
  if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
    for index, item in enumerate(value):
      problems.extend(validate_arguments(schema["items"], item, f"{path}[{index}]"))
  return problems


def _json_type_name(value: Any) -> str:
  for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
    if _JSON_TYPES[name](value):
      return name
  return type(value).__name__


# ---------------------------------------------------------------------------------------------
# Calculator

_MAX_INT_BITS = 100_000  # operands and results: bounds the time and memory of every operation
_MAX_EXPRESSION_CHARS = 2000
_MAX_DEPTH = 100  # nesting of the expression tree
_MAX_SHOWN_DIGITS = 4000  # longer integers are shown rounded, with their digit count
_MAX_ROUND_DIGITS = 1000
_MAX_FACTORIAL = 5000
_TIME_LIMIT_S = 1.0
_BINARY_OPS: dict[type, Callable[[Any, Any], Any]] = {
  ast.Add: operator.add,
  ast.Sub: operator.sub,
  ast.Mult: operator.mul,
  ast.Div: operator.truediv,
  ast.FloorDiv: operator.floordiv,
  ast.Mod: operator.mod,
  ast.Pow: operator.pow,
}
_UNARY_OPS: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
  "abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt, "exp": math.exp,
  "log": math.log, "log2": math.log2, "log10": math.log10, "sin": math.sin, "cos": math.cos,
  "tan": math.tan, "floor": math.floor, "ceil": math.ceil, "factorial": math.factorial, "gcd": math.gcd,
}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _check_value(value: Any) -> Any:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ToolError(f"the result is not a real number ({type(value).__name__})")
  if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
    raise ToolError(f"number too large (more than {_MAX_INT_BITS} bits)")
  return value


def _power(base: Any, exponent: Any) -> Any:
  if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1:
    if exponent * max(abs(base).bit_length() - 1, 1) > _MAX_INT_BITS:
      raise ToolError(f"number too large (more than {_MAX_INT_BITS} bits)")
  return base**exponent


def _check_call(name: str, arguments: list[Any]) -> None:
  """Refuse the arguments whose cost grows with their value, not their size."""
  if name == "factorial" and arguments and isinstance(arguments[0], int) and arguments[0] > _MAX_FACTORIAL:
    raise ToolError(f"factorial argument too large (at most {_MAX_FACTORIAL})")
  if name == "round" and len(arguments) == 2 and not (
    isinstance(arguments[1], int) and abs(arguments[1]) <= _MAX_ROUND_DIGITS
  ):
    raise ToolError(f"round's digits must be an integer between -{_MAX_ROUND_DIGITS} and {_MAX_ROUND_DIGITS}")


def _depth(tree: ast.AST) -> int:
  """Nesting depth of the tree, found without recursion."""
  deepest, stack = 0, [(tree, 1)]
  while stack:
    node, depth = stack.pop()
    deepest = max(deepest, depth)
    stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
  return deepest


def _evaluate(node: ast.AST, deadline: float) -> Any:
  if time.monotonic() > deadline:
    raise ToolError(f"the expression took too long (more than {_TIME_LIMIT_S:g} s)")
  if isinstance(node, ast.Expression):
    return _evaluate(node.body, deadline)
  if isinstance(node, ast.Constant) and type(node.value) in (int, float):
    return _check_value(node.value)
  if isinstance(node, ast.Name) and node.id in _CONSTANTS:
    return _CONSTANTS[node.id]
  if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
    return _UNARY_OPS[type(node.op)](_evaluate(node.operand, deadline))
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
    left, right = _evaluate(node.left, deadline), _evaluate(node.right, deadline)
    if isinstance(node.op, ast.Pow):
      return _check_value(_power(left, right))
    return _check_value(_BINARY_OPS[type(node.op)](left, right))
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and not node.keywords:
    arguments = [_evaluate(argument, deadline) for argument in node.args]
    _check_call(node.func.id, arguments)
    return _check_value(_FUNCTIONS[node.func.id](*arguments))
  raise ToolError(f"unsupported expression element: {ast.dump(node)[:80]}")


def _show(value: int | float) -> str:
  if isinstance(value, int) and value.bit_length() > _MAX_SHOWN_DIGITS * 3.32:
    digits = int(math.log10(abs(value))) + 1  # float log10 of an int: off by one only at exact powers of ten
    lead = abs(value) // 10 ** (digits - 17)
    digits += len(str(lead)) - 17
    lead_text = str(lead)
    sign = "-" if value < 0 else ""
    return f"{sign}{lead_text[0]}.{lead_text[1:16]}e+{digits - 1} (an integer of {digits} digits; leading digits shown)"
  return repr(value)


def calculate(expression: str) -> str:
  """Value of an arithmetic expression (+ - * / // % **, parentheses, math functions and constants).

  Every failure is a ToolError: too long, nested too deeply, too large a number, too slow, bad math."""
  if not isinstance(expression, str):
    raise ToolError(f"the expression must be a string, got {type(expression).__name__}")
  if len(expression) > _MAX_EXPRESSION_CHARS:
    raise ToolError(f"expression too long (at most {_MAX_EXPRESSION_CHARS} characters)")
  try:
    tree = ast.parse(expression.strip(), mode="eval")
  except SyntaxError as err:
    raise ToolError(f"cannot parse expression: {err.msg}") from None
  except (RecursionError, MemoryError, ValueError):  # the parser's own limits
    raise ToolError("cannot parse expression: nested too deeply") from None
  if _depth(tree) > _MAX_DEPTH:
    raise ToolError(f"expression nested too deeply (at most {_MAX_DEPTH} levels)")
  try:
    return _show(_evaluate(tree, time.monotonic() + _TIME_LIMIT_S))
  except ToolError:
    raise
  except Exception as err:  # ZeroDivisionError, math domain and overflow errors, wrong argument types, ...
    raise ToolError(f"{type(err).__name__}: {err}") from None


CALCULATOR = Tool(
  name="calculator",
  description="Evaluate an arithmetic expression: integers are exact up to 100000 bits, other numbers are "
  "64-bit floats. Supports + - * / // % **, parentheses, pi, e, tau, and abs round min max sqrt exp log log2 log10 "
  "sin cos tan floor ceil factorial gcd. At most 2000 characters and 100 levels of nesting.",
  parameters={
    "type": "object",
    "properties": {"expression": {"type": "string", "description": "for example (12 + 30) * 7 / 3"}},
    "required": ["expression"],
  },
  function=calculate,
)


# ---------------------------------------------------------------------------------------------
# Python, in the OS sandbox of `k2jax.infer.sandbox`


def python_tool(timeout_s: float = 10.0, memory_mb: int = 1024, max_output_chars: int = 8000,
                isolation: str = "bwrap") -> Tool:
  """The python tool. isolation="bwrap" refuses to run where the sandbox cannot be set up (the error
  says why); "unsafe" runs model-written code in a plain child process, with no isolation at all."""
  if isolation not in sandbox.ISOLATIONS:
    raise ValueError(f"isolation must be one of {sandbox.ISOLATIONS}, got {isolation!r}")

  def run(code: str) -> str:
    try:
      result = sandbox.run_python(code, timeout_s=timeout_s, memory_mb=memory_mb, max_output_chars=max_output_chars,
                                  isolation=isolation)
    except (sandbox.SandboxUnavailable, ValueError) as err:
      raise ToolError(str(err)) from None
    return result.as_text()

  limits = "no isolation" if isolation == "unsafe" else "no network, no subprocesses, only /tmp writable"
  return Tool(
    name="python",
    description=f"Run a Python 3 program and return what it prints. {limits}; {timeout_s:g} s time limit; "
    "each call starts fresh, so print what you need.",
    parameters={
      "type": "object",
      "properties": {"code": {"type": "string", "description": "the program; use print() for results"}},
      "required": ["code"],
    },
    function=run,
  )


PYTHON = python_tool()
BUILTIN_TOOLS: tuple[Tool, ...] = (CALCULATOR, PYTHON)
