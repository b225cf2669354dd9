"""Heavy mode and the engine-backed policy on a tiny model; the k2-chat CLI end to end."""
import subprocess
import sys

import jax

from k2jax import chat, params, presets, tokenizer_build
from k2jax.infer.engine import Engine
from k2jax.infer import heavy
from k2jax.infer.heavy import heavy_mode
from k2jax.infer.policy import EnginePolicy
from k2jax.infer.sampling import SamplingParams
from k2jax.infer.tools import CALCULATOR


def test_heavy_mode_scripted_sees_every_attempt():
  calls = []

  def policy(prompts):
    calls.append(list(prompts))
    if "Here are 8 independent attempts" in prompts[0]:
      n = sum(f"answer {i}" in prompts[0] for i in range(8))
      return [f"<think>all {n} seen</think>final {n}"]
    return [f"<think>try</think>answer {i}" for i in range(len(prompts))]

  res = heavy_mode(policy, [{"role": "user", "content": "2+2?"}], n=8, count_tokens=len)
  assert [len(c) for c in calls] == [8, 1]  # one batch of 8, then the aggregation
  assert [t.final_answer for t in res.trajectories] == [f"answer {i}" for i in range(8)]
  assert res.final_answer == "final 8"


def test_heavy_mode_compact_prompt_lists_every_answer():
  seen = []

  def policy(prompts):
    seen.append(prompts[0])
    return ["<think></think>final"] if "answers:" in prompts[0] else [f"<think></think>{i} {i}" for i in
                                                                      range(len(prompts))]

  res = heavy_mode(policy, [{"role": "user", "content": "2+2?"}], n=3, count_tokens=len,
                   aggregation_prompt=heavy.COMPACT)
  assert "3 answers:\n0 0\n1 1\n2 2\nMost common answer:<|im_end|>" in seen[-1]
  assert res.final_answer == "final"
  # A plain string is the template of the default prompt, as before.
  assert heavy.aggregation_request([], res.trajectories, heavy.DEFAULT_AGGREGATION_PROMPT) == \
      heavy.aggregation_request([], res.trajectories, heavy.DEFAULT)
  assert "### Attempt 2 (0 tool calls)\n1 1" in heavy.format_attempts(res.trajectories)


def test_heavy_mode_on_tiny_model_in_one_batch():
  tok = tokenizer_build.tiny_tokenizer()
  c = presets.TINY
  engine = Engine(params.init_params(c, jax.random.key(0)), c, max_len=512)
  policy = EnginePolicy(engine, tok, max_new_tokens=6, sampling=SamplingParams(temperature=1.0), seed=1)
  sizes = []
  batch = lambda prompts: (sizes.append(len(prompts)), policy.batch(prompts))[1]
  res = heavy_mode(batch, [{"role": "user", "content": "What is 6*7?"}], n=8, tools=[CALCULATOR], max_steps=2,
                   count_tokens=policy.count_tokens)
  assert sizes[0] == 8 and sizes[-1] == 1
  assert len(res.trajectories) == 8
  texts = [t.steps[0].generated_text for t in res.trajectories]
  assert len(set(texts)) > 1  # sampled trajectories differ
  assert isinstance(res.aggregation_text, str)


def test_engine_policy_matches_generate():
  tok = tokenizer_build.tiny_tokenizer()
  c = presets.TINY
  engine = Engine(params.init_params(c, jax.random.key(2)), c, max_len=256)
  prompt = chat.render([{"role": "user", "content": "hello"}])
  text = EnginePolicy(engine, tok, max_new_tokens=5)(prompt)
  gen = engine.generate([tok.encode(prompt)], 5, stop_ids=sorted(tok.stop_ids | {c.eos_token_id}))
  assert text == tok.decode([t for t in gen.tokens[0] if t not in tok.stop_ids | {c.eos_token_id}])


def test_chat_cli_streams_a_turn(tmp_path):
  from k2jax import hf
  c = presets.TINY
  hf.save_hf(params.init_params(c, jax.random.key(3)), c, str(tmp_path / "m"))
  res = subprocess.run([sys.executable, "-m", "k2jax.infer.chat_cli", f"--hf_dir={tmp_path / 'm'}",
                        "--max_new_tokens=4", "--max_steps=1", "--context=512"],
                       input="hi there\n\n", capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "you>" in res.stdout and "k2>" in res.stdout and "tool calls]" in res.stdout
  # A context past the model's positions (4096 for the tiny one) is refused before the first message;
  # the default budget (8192) shrinks to fit instead.
  res = subprocess.run([sys.executable, "-m", "k2jax.infer.chat_cli", f"--hf_dir={tmp_path / 'm'}",
                        "--max_new_tokens=96", "--context=4096"], input="hi\n", capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 1 and "you>" not in res.stdout
  assert ("--context=4096 + --max_new_tokens=96 exceeds the model's max_position_embeddings=4096"
          in res.stderr.splitlines()[-1]), res.stderr[-2000:]
  # An unknown tool is named before any model is looked for: the only line said.
  res = subprocess.run([sys.executable, "-m", "k2jax.infer.chat_cli", f"--hf_dir={tmp_path / 'none'}",
                        "--tools=calculator,nope"], input="hi\n", capture_output=True, text=True, timeout=300)
  assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]
  assert "unknown tool(s) ['nope']; available: ['calculator', 'python']" in res.stderr


def test_chat_cli_heavy_mode(tmp_path):
  from k2jax import hf
  c = presets.TINY
  hf.save_hf(params.init_params(c, jax.random.key(4)), c, str(tmp_path / "m"))
  res = subprocess.run([sys.executable, "-m", "k2jax.infer.chat_cli", f"--hf_dir={tmp_path / 'm'}", "--heavy=2",
                        "--max_new_tokens=3", "--max_steps=1", "--context=512", "--temperature=1", "--tools="],
                       input="hi there\n\n", capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout.count("[attempt ") == 2 and "k2> " in res.stdout
  assert "Unable to initialize backend" not in res.stderr
