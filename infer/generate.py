"""`k2-generate`: generate from an HF checkpoint or a k2-train checkpoint.

  k2-generate --hf_dir=DIR --prompt_ids=1,2,3 --max_new_tokens=20 --temperature=0 --output=ids
  k2-generate --checkpoint=WORKDIR --prompt="2+2=" --chat --output=text
  k2-generate --hf_dir=DIR --prompt="What is 6*7?" --chat --heavy=4 --temperature=1

Text output leaves out stop tokens; the generation speed goes to stderr.
"""
from __future__ import annotations

import sys
import time

from absl import app, flags

from k2jax import sharding

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "HF checkpoint folder (config.json + safetensors).")
flags.DEFINE_string("checkpoint", None, "k2-train workdir or checkpoint folder.")
sharding.define_mesh_flag()
flags.DEFINE_string("prompt", None, "Prompt text (tokenized with the checkpoint's tokenizer).")
flags.DEFINE_string("prompt_ids", None, "Prompt token ids, comma-separated; ';' separates batch rows.")
flags.DEFINE_bool("chat", False, "Wrap --prompt as a user message in the K2 chat template.")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per sequence.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "Top-k cut (0: off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus cut (1: off).")
flags.DEFINE_integer("num_samples", 1, "Sequences per prompt.")
flags.DEFINE_integer("think_budget", None, "Force </think> after this many thinking tokens.", lower_bound=0)
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_enum("output", "text", ["ids", "text"], "Print generated ids (comma-separated) or text.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
flags.DEFINE_integer("max_len", 0, "Cache length (0: prompt + max_new_tokens, rounded up).")
flags.DEFINE_integer("heavy", 0, "Heavy mode (with --chat): this many trajectories in one batch, then an "
                     "aggregation pass that sees them all and writes the final answer. 0: off.")


def _parse_ids(text: str) -> list[list[int]]:
  rows = []
  for row in text.split(";"):
    try:
      ids = [int(t) for t in row.replace(" ", "").split(",") if t]
    except ValueError:
      raise app.UsageError(f"--prompt_ids must be comma-separated integers, got {row!r}") from None
    if not ids:
      raise app.UsageError("--prompt_ids has an empty row")
    rows.append(ids)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (FLAGS.prompt is None) == (FLAGS.prompt_ids is None):
    raise app.UsageError("give exactly one of --prompt and --prompt_ids")
  for name in ("max_new_tokens", "heavy", "max_len"):
    if FLAGS[name].value < 0:
      raise app.UsageError(f"--{name} must be >= 0, got {FLAGS[name].value}")
  if FLAGS.num_samples < 1:
    raise app.UsageError(f"--num_samples must be >= 1, got {FLAGS.num_samples}")
  if FLAGS.heavy and not (FLAGS.chat and FLAGS.prompt is not None and FLAGS.output == "text"):
    raise app.UsageError("--heavy needs --chat with a text --prompt and --output=text")
  id_prompts = _parse_ids(FLAGS.prompt_ids) if FLAGS.prompt_ids is not None else None  # bad ids fail first
  import jax  # noqa: PLC0415

  from k2jax.infer import cli_common  # noqa: PLC0415
  from k2jax.infer.engine import Engine  # noqa: PLC0415
  cli_common.warn_greedy_heavy("k2-generate", FLAGS.heavy, FLAGS.temperature)
  sampling = cli_common.sampling_params(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  mesh, moe_impl, params, config = cli_common.mesh_and_model(FLAGS.hf_dir, FLAGS.checkpoint, FLAGS.dtype)
  try:  # ids in and out need no tokenizer, but its stop ids count when there is one
    tok = cli_common.load_tokenizer(FLAGS.hf_dir, config, FLAGS.checkpoint)
  except ValueError as e:
    if FLAGS.prompt is not None or FLAGS.output == "text":
      raise app.UsageError(str(e)) from None
    tok = None
  if id_prompts is not None:
    prompts = id_prompts
  else:
    text = FLAGS.prompt
    if FLAGS.chat:
      from k2jax import chat  # noqa: PLC0415
      text = chat.render([{"role": "user", "content": text}])
    prompts = [tok.encode(text)]
  bad = [i for row in prompts for i in row if not 0 <= i < config.vocab_size]
  if bad:
    raise app.UsageError(f"prompt ids {bad[:5]} are outside the vocabulary [0, {config.vocab_size})")
  prompts = [p for p in prompts for _ in range(FLAGS.num_samples)]
  stop = {config.eos_token_id} | (set(tok.stop_ids) if tok else set())
  think = (tok.id_of("<think>"), tok.id_of("</think>")) if tok and FLAGS.think_budget is not None else None
  longest = max(len(p) for p in prompts)
  limit = config.max_position_embeddings  # positions past it are outside what the model was trained on
  if longest > limit:
    raise app.UsageError(f"the prompt has {longest} tokens, more than the model's max_position_embeddings={limit}")
  if longest + FLAGS.max_new_tokens > limit:
    raise app.UsageError(f"prompt ({longest} tokens) + --max_new_tokens={FLAGS.max_new_tokens} exceeds the "
                         f"model's max_position_embeddings={limit}")
  if FLAGS.heavy:  # the aggregation prompt carries every attempt's answer
    longest += FLAGS.heavy * (FLAGS.max_new_tokens + 16) + 128
  max_len = FLAGS.max_len or longest + FLAGS.max_new_tokens + 16
  start = time.perf_counter()
  params = sharding.place_for_inference(params, config, mesh)
  with sharding.use_mesh(mesh, sharding.inference_rules(mesh)):
    engine = Engine(params, config, max_len=max_len, moe_impl=moe_impl)
    try:
      if FLAGS.heavy:
        outputs, n_generated = _heavy(engine, tok, sampling), None
      else:
        gen = engine.generate(prompts, FLAGS.max_new_tokens, sampling=sampling, key=jax.random.key(FLAGS.seed),
                              stop_ids=sorted(stop), think_ids=think, think_budget=FLAGS.think_budget)
        n_generated = sum(map(len, gen.tokens))
        outputs = [",".join(map(str, ids)) if FLAGS.output == "ids" else tok.decode([t for t in ids if t not in stop])
                   for ids in gen.tokens]
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  seconds = time.perf_counter() - start
  for line in outputs:
    print(line)
  if n_generated is not None:
    print(f"{n_generated} tokens in {seconds:.2f} s: {n_generated / max(seconds, 1e-9):.1f} tokens/s "
          "(compilation included)", file=sys.stderr)


def _heavy(engine, tok, sampling) -> list[str]:
  from k2jax.infer.heavy import heavy_mode  # noqa: PLC0415
  from k2jax.infer.policy import EnginePolicy  # noqa: PLC0415
  policy = EnginePolicy(engine, tok, FLAGS.max_new_tokens, sampling, FLAGS.think_budget, seed=FLAGS.seed)
  result = heavy_mode(policy.batch, [{"role": "user", "content": FLAGS.prompt}], n=FLAGS.heavy,
                      count_tokens=policy.count_tokens, max_steps=1,
                      context_budget_tokens=engine.max_len - FLAGS.max_new_tokens)
  for i, t in enumerate(result.trajectories, 1):
    print(f"[attempt {i}] {t.final_answer if t.final_answer is not None else '(' + t.stop_reason + ')'}",
          file=sys.stderr)
  return [result.final_answer or ""]


def run():
  from k2jax import cli  # noqa: PLC0415
  cli.run(main, [__name__, "k2jax.sharding"])


if __name__ == "__main__":
  run()
