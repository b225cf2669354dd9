"""`k2-chat`: an interactive session that streams tokens and shows reasoning and tool calls as they come.

  k2-chat --hf_dir=DIR [--tools=calculator,python] [--temperature=1.0] [--think_budget=N] [--heavy=N]
Type a message and press enter; an empty line or end of input quits.
"""
from __future__ import annotations

import sys

from absl import app, flags

from k2jax import sharding

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "HF checkpoint folder.")
flags.DEFINE_string("checkpoint", None, "k2-train workdir or checkpoint folder.")
sharding.define_mesh_flag()
flags.DEFINE_list("tools", ["calculator", "python"], "Built-in tools to offer the model (empty: none).")
flags.DEFINE_enum("python_isolation", "bwrap", ["bwrap", "unsafe"],
                  "How the python tool isolates model-written code: bwrap (OS sandbox, required by default) or "
                  "unsafe (no isolation at all).")
flags.DEFINE_integer("max_new_tokens", 512, "Tokens per model turn.", lower_bound=1)
flags.DEFINE_integer("max_steps", 16, "Model turns (tool-call rounds) per user message.", lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus cut.")
flags.DEFINE_integer("think_budget", None, "Force </think> after this many thinking tokens.", lower_bound=0)
flags.DEFINE_integer("context", 8192, "Context budget in tokens (earlier tool outputs are hidden past it); "
                     "the default shrinks to fit the model's positions with --max_new_tokens.", lower_bound=1)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
flags.DEFINE_string("system", None, "Optional system message.")
flags.DEFINE_integer("heavy", 0, "Heavy mode: answer each message with this many trajectories in one batch, "
                     "then an aggregation pass that sees them all. 0: off (tokens stream as they come).")


class _Printer:
  """Streams decoded text, dimming reasoning and marking tool-call sections."""

  def __init__(self, tok, out=sys.stdout):
    self.tok, self.out = tok, out
    self.decoder = tok.stream_decoder()
    self.names = {i: n for n, i in tok.special_tokens.items()}

  def __call__(self, row: int, token: int) -> None:
    name = self.names.get(token)
    if name is None:
      self.out.write(self.decoder.push(token))
    elif name == "<think>":
      self.out.write("[thinking] ")
    elif name == "</think>":
      self.out.write("\n[answer] ")
    elif name == "<|tool_calls_section_begin|>":
      self.out.write("\n[tool calls] ")
    elif name in ("<|tool_call_begin|>", "<|tool_call_argument_begin|>"):
      self.out.write(" ")
    self.out.flush()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from k2jax.infer import cli_common, sandbox, tools as tools_lib  # noqa: PLC0415
  from k2jax.infer.engine import Engine  # noqa: PLC0415
  from k2jax.infer.policy import EnginePolicy  # noqa: PLC0415

  if FLAGS.heavy < 0:
    raise app.UsageError(f"--heavy must be >= 0, got {FLAGS.heavy}")
  cli_common.warn_greedy_heavy("k2-chat", FLAGS.heavy, FLAGS.temperature)
  sampling = cli_common.sampling_params(FLAGS.temperature, 0, FLAGS.top_p)
  known = {t.name: t for t in tools_lib.BUILTIN_TOOLS}
  unknown = [t for t in FLAGS.tools if t not in known]
  if unknown:
    raise app.UsageError(f"unknown tool(s) {unknown}; available: {sorted(known)}")
  mesh, moe_impl, params, config = cli_common.mesh_and_model(FLAGS.hf_dir, FLAGS.checkpoint, FLAGS.dtype)
  tools = [known[t] for t in FLAGS.tools]
  if "python" in FLAGS.tools:
    tools[FLAGS.tools.index("python")] = tools_lib.python_tool(isolation=FLAGS.python_isolation)
    if FLAGS.python_isolation == "bwrap":
      try:
        sandbox.require_sandbox()
      except sandbox.SandboxUnavailable as e:
        raise app.UsageError(f"{e} (flag --python_isolation=unsafe, or drop python from --tools)") from None
  try:
    tok = cli_common.load_tokenizer(FLAGS.hf_dir, config, FLAGS.checkpoint)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  context = _context_budget(config.max_position_embeddings)
  params = sharding.place_for_inference(params, config, mesh)
  engine = Engine(params, config, max_len=context + FLAGS.max_new_tokens, moe_impl=moe_impl)
  # Heavy mode decodes many rows at once: no streaming, the attempts are shown when they are done.
  policy = EnginePolicy(engine, tok, FLAGS.max_new_tokens, sampling, FLAGS.think_budget,
                        on_token=None if FLAGS.heavy else _Printer(tok))
  messages = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
  with sharding.use_mesh(mesh, sharding.inference_rules(mesh)):
    (_heavy_loop if FLAGS.heavy else _loop)(policy, tools, messages, policy.count_tokens, context)


def _context_budget(positions: int) -> int:
  """--context, fitted to the model: a conversation plus a turn stays within the positions it was trained
  on. The default budget shrinks to fit; one given on the command line that does not fit is an error."""
  room = positions - FLAGS.max_new_tokens
  if room < 1:
    raise app.UsageError(f"--max_new_tokens={FLAGS.max_new_tokens} leaves no room for a conversation in the "
                         f"model's max_position_embeddings={positions}")
  if FLAGS.context <= room:
    return FLAGS.context
  if FLAGS["context"].present:
    raise app.UsageError(f"--context={FLAGS.context} + --max_new_tokens={FLAGS.max_new_tokens} exceeds the "
                         f"model's max_position_embeddings={positions}")
  return room


def _read_message() -> str | None:
  sys.stdout.write("\nyou> ")
  sys.stdout.flush()
  line = sys.stdin.readline()
  return line.rstrip("\n") if line.strip() else None


def _heavy_loop(policy, tools, messages, count, context):
  from k2jax.infer.heavy import heavy_mode  # noqa: PLC0415
  while (line := _read_message()) is not None:
    asked = messages + [{"role": "user", "content": line}]
    try:
      result = heavy_mode(policy.batch, asked, n=FLAGS.heavy, count_tokens=count, tools=tools,
                          max_steps=FLAGS.max_steps, context_budget_tokens=context)
    except ValueError as e:  # e.g. the aggregation prompt does not fit the context
      sys.stdout.write(f"[heavy mode failed: {e}]\n")
      continue
    for i, t in enumerate(result.trajectories, 1):
      answer = t.final_answer if t.final_answer is not None else f"({t.stop_reason})"
      sys.stdout.write(f"[attempt {i}, {t.num_tool_calls} tool calls] {answer[:200]}\n")
    sys.stdout.write(f"k2> {result.final_answer or ''}\n")
    messages = asked + [{"role": "assistant", "content": result.final_answer or ""}]


def _loop(policy, tools, messages, count, context):
  from k2jax.infer.agent import AgentRun  # noqa: PLC0415
  while (line := _read_message()) is not None:
    run = AgentRun(messages + [{"role": "user", "content": line}], tools, FLAGS.max_steps, context, count)
    while (prompt := run.prompt()) is not None:
      sys.stdout.write("k2> ")
      run.advance(policy(prompt))
      step = run.trajectory.steps[-1]
      for outcome in step.tool_outcomes:
        sys.stdout.write(f"\n[{outcome.name} -> {outcome.output[:200]}]\n")
      for err in step.parsed.errors:
        sys.stdout.write(f"\n[format problem: {err.message}]\n")
    sys.stdout.write(f"\n[{run.trajectory.stop_reason}, {run.trajectory.num_tool_calls} tool calls]\n")
    messages = run.history


def run():
  from k2jax import cli  # noqa: PLC0415
  cli.run(main, [__name__, "k2jax.sharding"])


if __name__ == "__main__":
  run()
