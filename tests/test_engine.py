"""The inference engine: absorbed latent-cache decoding against the plain forward, and against HF generate."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax import model as model_lib, params, presets
from k2jax.infer.engine import Engine
from k2jax.infer.sampling import SamplingParams, sample
from hf_reference import make_reference, rel_err

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.mark.parametrize("preset", ["tiny", "tiny_no_qlora"])
def test_cached_decode_equals_full_forward_every_step(preset):
  c = presets.get(preset)
  p = params.init_params(c, jax.random.key(0))
  p["moe_layers"]["moe"]["router_bias_e"] = 0.2 * jax.random.normal(jax.random.key(9), (c.num_moe_layers, c.n_routed_experts))
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(0, c.vocab_size, n)) for n in (9, 4, 6)]
  engine = Engine(p, c, max_len=32, cache_dtype=jnp.float32)
  logits_bv, cache = engine.prefill(prompts)
  seqs = [list(q) for q in prompts]
  cached = []  # per step: [B, V] logits predicting the next token
  step_fn = jax.jit(lambda p, t, cache: model_lib.forward(p, c, t, cache=cache))
  for step in range(6):
    cached.append(np.asarray(logits_bv))
    nxt = np.asarray(jnp.argmax(logits_bv, -1))
    for b in range(len(seqs)):
      seqs[b].append(int(nxt[b]))
    out = step_fn(p, jnp.asarray(nxt)[:, None], cache)
    logits_bv, cache = out.logits[:, 0], out.cache
  # One plain forward over the final sequences gives the logits after every prefix (causal attention).
  T = max(map(len, seqs))
  toks = np.array([s + [0] * (T - len(s)) for s in seqs])
  seg = np.array([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
  full = np.asarray(jax.jit(lambda p: model_lib.forward(p, c, toks, segment_ids_bt=seg).logits)(p))
  for step in range(6):
    for b, q in enumerate(prompts):
      assert rel_err(cached[step][b], full[b, len(q) - 1 + step]) <= 1e-5, (step, b)
  np.testing.assert_array_equal(cache.lengths, [len(s) for s in seqs])


def test_latent_cache_is_576_values_per_token_for_k2():
  c = presets.K2_THINKING
  cache = jax.eval_shape(lambda: model_lib.init_cache(c, 1, 8, jnp.bfloat16))
  per_token = sum(a.shape[-1] * a.shape[0] for a in jax.tree.leaves((cache.c_kv, cache.k_pe))) // 1
  assert c.latent_cache_dim == 576 and per_token == 576 * 61
  assert per_token * 2 == 70_272  # bytes per token in bf16 over 61 layers


def test_greedy_cli_matches_transformers_generate(tmp_path):
  torch = pytest.importorskip("torch")
  ref = make_reference(str(tmp_path), seed=5, vocab_size=97, eos_token_id=96, bos_token_id=95)
  prompts = [[3, 17, 42, 8, 64, 23], [5, 9, 77]]
  want = []
  for pr in prompts:
    with torch.no_grad():
      g = ref.generate(torch.tensor([pr]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    want.append(g[0, len(pr):].tolist())
  ids = ";".join(",".join(map(str, pr)) for pr in prompts)
  res = subprocess.run([sys.executable, "-m", "k2jax.infer.generate", f"--hf_dir={tmp_path}", f"--prompt_ids={ids}",
                        "--max_new_tokens=12", "--temperature=0", "--output=ids"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert res.returncode == 0, res.stderr[-2000:]
  got = [[int(t) for t in line.split(",")] for line in res.stdout.strip().splitlines()]
  assert got == want


def test_cli_rejects_bad_prompt_ids(tmp_path):
  make_reference(str(tmp_path), seed=1)
  res = subprocess.run([sys.executable, "-m", "k2jax.infer.generate", f"--hf_dir={tmp_path}", "--prompt_ids=1,x,3"],
                       capture_output=True, text=True, timeout=300)
  assert res.returncode != 0 and "--prompt_ids must be comma-separated integers" in res.stderr


def test_sampling_filters_and_key():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 4000)
  draw = lambda sp: np.asarray(jax.vmap(lambda k: sample(logits, k, sp))(keys))[:, 0]
  freq = np.bincount(draw(SamplingParams(temperature=1.0)), minlength=4) / 4000
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  assert set(draw(SamplingParams(temperature=1.0, top_k=2))) == {0, 1}
  assert set(draw(SamplingParams(temperature=1.0, top_p=0.7))) == {0, 1}  # 0.5 < 0.7 <= 0.8
  assert set(draw(SamplingParams(temperature=1.0, top_p=0.4))) == {0}
  assert int(sample(logits, keys[0], SamplingParams())[0]) == 0
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(top_p=0)
  for bad in (-1.0, float("nan"), float("inf")):  # NaN used to pass the check and sample garbage
    with pytest.raises(ValueError, match=f"temperature must be a finite number >= 0, got {bad}"):
      SamplingParams(temperature=bad)


def test_think_budget_forces_end_of_thinking():
  c = presets.TINY
  p = params.init_params(c, jax.random.key(1))
  think, end = 2022, 2023
  engine = Engine(p, c, max_len=64)
  free = engine.generate([[5, 6, think]], 12, think_ids=(think, end))
  capped = engine.generate([[5, 6, think]], 12, think_ids=(think, end), think_budget=4)
  assert end not in free.tokens[0][:4]
  assert capped.tokens[0][:4] == free.tokens[0][:4]  # same greedy path until the budget is spent
  assert capped.tokens[0][4] == end and capped.think_tokens == [4]


def test_engine_with_int4_experts_matches_plain_forward():
  c = presets.TINY
  p = params.quantize_experts(params.init_params(c, jax.random.key(4)))
  engine = Engine(p, c, max_len=32, cache_dtype=jnp.float32)
  prompt = list(np.random.default_rng(4).integers(0, c.vocab_size, 7))
  gen = engine.generate([prompt], 5)
  seq = prompt + gen.tokens[0]
  full = np.asarray(jax.jit(lambda p: model_lib.forward(p, c, jnp.asarray([seq])).logits)(p))[0]
  # Greedy decoding over the cache picks the plain forward's argmax at every step.
  np.testing.assert_array_equal(full[len(prompt) - 1:-1].argmax(-1), gen.tokens[0])


def test_decode_weights_are_per_expert_where_experts_are_large(monkeypatch):
  """On CPU the engine decodes over per-expert weight tuples (read in place) where experts are large
  (the values are tested in test_model's `test_unstacked_layers_equal_scanned_stack`)."""
  from k2jax.kernels import dispatch
  c = presets.TINY
  p = params.init_params(c, jax.random.key(6))
  for split in (False, True):
    monkeypatch.setattr(dispatch, "SPLIT_EXPERT_MIN_ELEMENTS", 1 if split else 1 << 40)
    experts = Engine(p, c, max_len=32)._decode_params()["moe_layers"][0]["moe"]["experts"]
    assert all(isinstance(w, tuple) == split for w in experts.values())
    assert not split or len(experts["down_efd"]) == c.n_routed_experts
  # too many experts x layers (one switch branch each)
  monkeypatch.setattr(dispatch, "SPLIT_EXPERT_MAX_BRANCHES", c.n_routed_experts * c.num_moe_layers - 1)
  experts = Engine(p, c, max_len=32)._decode_params()["moe_layers"][0]["moe"]["experts"]
  assert not any(isinstance(w, tuple) for w in experts.values())


@pytest.mark.parametrize("preset", ["tiny", "tiny_no_qlora"])
def test_output_major_decode_weights_give_the_plain_logits_and_ids(monkeypatch, preset):
  """The engine's decode weights with every output-major group (`model.OUTPUT_MAJOR_GROUPS`: attention
  projections, dense MLP, shared expert; and the head), as tried: prefill logits within float32 rounding of the
  plain forward's, and greedy decoding picks the plain forward's argmax at every step."""
  from k2jax.kernels import dispatch
  c = presets.get(preset)
  p = params.init_params(c, jax.random.key(7))
  # As landed: the head and the dense MLP's down projection output-major, gate and up as trained.
  assert set(Engine(p, c, max_len=32)._decode_params()["dense_layers"][0]["mlp"]) == {"gate_df", "up_df", "down_df"}
  monkeypatch.setattr(model_lib, "DECODE_OUTPUT_MAJOR", ("head", *model_lib.OUTPUT_MAJOR_GROUPS))
  monkeypatch.setattr(dispatch, "SPLIT_EXPERT_MIN_ELEMENTS", 1)  # experts per expert: prefill on these weights too
  engine = Engine(p, c, max_len=32, cache_dtype=jnp.float32)
  layer = engine._decode_params()["moe_layers"][0]
  assert {"q_a_rd" if c.q_lora_rank else "q_nqd", "kv_a_ad", "o_dnh"} <= set(layer["attn"])
  assert "down_df" in layer["moe"]["shared"] and "gate_fd" in engine._decode_params()["dense_layers"][0]["mlp"]
  prompts = [list(np.random.default_rng(7).integers(0, c.vocab_size, n)) for n in (7, 3)]
  logits_bv, _ = engine.prefill(prompts)
  gen = engine.generate(prompts, 6)
  for b, prompt in enumerate(prompts):
    seq = prompt + gen.tokens[b]
    full = np.asarray(jax.jit(lambda p: model_lib.forward(p, c, jnp.asarray([seq])).logits)(p))[0]
    assert rel_err(logits_bv[b], full[len(prompt) - 1]) <= 1e-6
    np.testing.assert_array_equal(full[len(prompt) - 1:-1].argmax(-1), gen.tokens[b])


def test_bucketing_never_rejects_a_prompt_that_fits():
  c = presets.TINY
  p = params.init_params(c, jax.random.key(6))
  engine = Engine(p, c, max_len=44, cache_dtype=jnp.float32)
  prompt = list(np.random.default_rng(6).integers(0, c.vocab_size, 40))  # rounds up to 64 > max_len
  gen = engine.generate([prompt], 4)
  seq = prompt + gen.tokens[0]
  full = np.asarray(jax.jit(lambda p: model_lib.forward(p, c, jnp.asarray([seq])).logits)(p))[0]
  np.testing.assert_array_equal(full[len(prompt) - 1:-1].argmax(-1), gen.tokens[0])
  with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -5"):
    engine.generate([prompt], -5)
  with pytest.raises(ValueError, match="exceeds the cache"):
    engine.generate([prompt], 5)
  with pytest.raises(ValueError, match="prompt of 45 tokens does not fit the cache"):
    engine.prefill([prompt + [1] * 5])
