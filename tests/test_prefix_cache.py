"""Chunked prefill and prefix-cached agent steps against full recomputation on the tiny model."""
import json

import jax
import jax.numpy as jnp
import numpy as np

from k2jax import params, presets, tokenizer_build
from k2jax.infer.agent import run_agents
from k2jax.infer.engine import Engine, PrefixCache
from k2jax.infer.policy import EnginePolicy
from k2jax.infer.sampling import SamplingParams
from k2jax.infer.tools import CALCULATOR

jax.config.update("jax_default_matmul_precision", "highest")
C = presets.TINY
PARAMS = params.init_params(C, jax.random.key(0), jnp.float32)


def test_chunked_prefill_equals_one_pass_and_dedupes_identical_prompts():
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 2000, n).tolist() for n in (5, 40, 23)] + [None]
  prompts[3] = prompts[1]  # a duplicate: prefilled once
  whole, chunked = Engine(PARAMS, C, max_len=64), Engine(PARAMS, C, max_len=64, prefill_chunk=8)
  l1, c1 = whole.prefill(prompts)
  l2, c2 = chunked.prefill(prompts, PrefixCache())  # an empty prefix cache: nothing to reuse, dedupe on
  np.testing.assert_allclose(l2, l1, atol=1e-4, rtol=1e-5)
  assert np.asarray(c2.lengths).tolist() == [5, 40, 23, 40]
  for b, p in enumerate(prompts):
    for name in c1.c_kv:
      np.testing.assert_allclose(c2.c_kv[name][:, b, :len(p)], c1.c_kv[name][:, b, :len(p)], atol=1e-5)
  assert chunked.stats["prefill_tokens"] == 5 + 40 + 23


def _tool_call(i: int) -> str:
  args = json.dumps({"expression": f"{i}*7"})
  return (f"<think>step {i}</think><|tool_calls_section_begin|><|tool_call_begin|>functions.calculator:{i}"
          f"<|tool_call_argument_begin|>{args}<|tool_call_end|><|tool_calls_section_end|><|im_end|>")


def test_cached_agent_steps_hold_the_rendered_tokens_and_give_full_recompute_logits():
  tok = tokenizer_build.tiny_tokenizer()
  engine = Engine(PARAMS, C, max_len=512, prefill_chunk=32)
  policy = EnginePolicy(engine, tok, max_new_tokens=3)
  reference = Engine(PARAMS, C, max_len=512)  # no prefix: every prompt prefilled whole
  steps, full_tokens = [], 0

  def batch(prompts):
    ids = [tok.encode(p, allow_special=True) for p in prompts]
    if policy.prefix.cache is not None:  # the cached step's logits equal a full prefill's
      cached, _ = engine.prefill(ids, policy.prefix)
      full, _ = reference.prefill(ids)
      np.testing.assert_allclose(cached, full, atol=2e-4, rtol=1e-4)
    policy.batch(prompts)  # generates with the cache; the text is replaced by a scripted tool call
    for b, row in enumerate(policy.prefix.tokens):  # the cache holds the tokenised rendering, then output
      assert row[:len(ids[b])] == ids[b]
    steps.append(len(steps))
    nonlocal full_tokens
    full_tokens += sum(map(len, ids))
    return [_tool_call(len(steps)) for _ in prompts]

  engine.stats["prefill_tokens"] = 0
  (traj,) = run_agents(batch, [[{"role": "user", "content": "Multiply."}]], [CALCULATOR], 3, 1 << 16,
                       policy.count_tokens)
  assert traj.num_tool_calls == 3
  # Only the suffix of each step (the last tool call and its output) went through prefill.
  final = len(tok.encode(traj.steps[-1].generated_text)) + traj.steps[-1].prompt_tokens
  assert engine.stats["prefill_tokens"] < 1.5 * final < full_tokens


def test_prefix_rows_are_shared_by_identical_prompts():
  engine = Engine(PARAMS, C, max_len=128)
  prefix = PrefixCache()
  prompt = list(range(10, 40))
  engine.generate([prompt] * 4, 3, prefix=prefix, sampling=SamplingParams(temperature=1.0), key=jax.random.key(1))
  assert engine.stats["prefill_tokens"] == 30
  assert all(row[:30] == prompt for row in prefix.tokens)
  assert np.asarray(prefix.cache.lengths).tolist() == [len(r) for r in prefix.tokens]
