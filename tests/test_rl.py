"""RL: K2's objective and GRPO against hand-computed values, the analytic gradient, masks of tool
outputs, engine log-probs against the trainer's, and the k2-rl pipeline (resume, bad input)."""
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax import chat, envs, presets
from k2jax import params as params_lib
from k2jax.envs import base
from k2jax.infer.engine import Engine, Generation
from k2jax.infer.sampling import SamplingParams
from k2jax.tokenizer_build import tiny_tokenizer
from k2jax.train import checkpointing
from k2jax.train import train_step as ts
from k2jax.train.rl import learner
from k2jax.train.rl import loss as rl_loss
from k2jax.train.rl import rollout as ro
from k2jax.train.rl import runner

CFG = types.SimpleNamespace(tau=0.5, clip_eps=0.2)


def _spread(delta_b, mask_bt, rng):
  """Random old log-probs and new ones whose masked sums differ by delta_b; junk where mask is 0."""
  old = -rng.uniform(0.1, 3.0, mask_bt.shape).astype(np.float32)
  share = mask_bt / mask_bt.sum(1, keepdims=True)
  new = old + share * np.asarray(delta_b, np.float32)[:, None]
  new = np.where(mask_bt > 0, new, rng.normal(size=mask_bt.shape) * 5).astype(np.float32)
  return jnp.asarray(new), jnp.asarray(old)


def test_k2_loss_hand_computed():
  rng = np.random.default_rng(0)
  mask = np.array([[0, 1, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]], np.float32)
  new, old = _spread([0.2, -0.4, 1.0, 0.0], mask, rng)
  rewards = jnp.array([1.0, 0.0, 0.5, 0.5])
  # Groups [1, 0] and [.5, .5]: advantages .5, -.5, 0, 0; residuals .5-.1, -.5+.2, -.5, 0.
  loss, m = rl_loss.k2_loss(new, old, jnp.asarray(mask), rewards, 2, CFG)
  np.testing.assert_allclose(float(loss), (0.4 ** 2 + 0.3 ** 2 + 0.5 ** 2) / 4, rtol=1e-5)
  np.testing.assert_allclose(float(m["kl_old"]), 0.8 / 4, rtol=1e-5)
  with pytest.raises(ValueError, match="K >= 2"):
    rl_loss.k2_loss(new, old, jnp.asarray(mask), rewards, 1, CFG)


def test_k2_gradient_matches_analytic_form():
  """∇ loss = mean_i −2τ (r_i − r̄ − τ Δ_i) ∇ log π_θ(y_i|x), with a small softmax policy."""
  rng = np.random.default_rng(1)
  B, T, F, V = 4, 5, 6, 7
  x = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
  y = jnp.asarray(rng.integers(0, V, (B, T)))
  mask = jnp.asarray(rng.integers(0, 2, (B, T)).astype(np.float32)).at[:, 0].set(1)
  w_old = jnp.asarray(rng.normal(size=(F, V)), jnp.float32)
  w = w_old + 0.3 * jnp.asarray(rng.normal(size=(F, V)), jnp.float32)
  rewards = jnp.asarray(rng.uniform(size=B), jnp.float32)

  def logp_bt(w_fv):
    lp = jax.nn.log_softmax(jnp.einsum("btf,fv->btv", x, w_fv), -1)
    return jnp.take_along_axis(lp, y[..., None], -1)[..., 0]

  old = logp_bt(w_old)
  grad = jax.grad(lambda w_: rl_loss.k2_loss(logp_bt(w_), old, mask, rewards, 2, CFG)[0])(w)
  seq = lambda w_: jnp.sum(logp_bt(w_) * mask, -1)  # noqa: E731
  delta = seq(w) - jnp.sum(old * mask, -1)
  r = rewards.reshape(2, 2)
  adv = (r - r.mean(-1, keepdims=True)).reshape(-1)
  jac = jax.jacrev(seq)(w)  # [B, F, V]
  analytic = jnp.mean((-2 * CFG.tau * (adv - CFG.tau * delta))[:, None, None] * jac, axis=0)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(analytic), rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(grad).max()) > 1e-3


def test_grpo_hand_computed():
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
  old = jnp.log(jnp.array([[0.2, 0.5, 0.3], [0.4, 0.5, 0.1]]))
  ratio = jnp.array([[1.5, 0.9, 7.0], [0.5, 1.1, 7.0]])  # the third column is masked out
  loss, m = rl_loss.grpo_loss(old + jnp.log(ratio), old, mask, jnp.array([1.0, 0.0]), 2, CFG)
  # Advantages ±1. Row 0: min(1.5, 1.2), min(.9, .9) -> 1.05; row 1: min(-.5, -.8), min(-1.1, -1.1) -> -.95.
  np.testing.assert_allclose(float(loss), -(1.05 - 0.95) / 2, atol=1e-5)
  np.testing.assert_allclose(float(m["clip_frac"]), 0.5, atol=1e-6)


def test_length_penalty_and_shaping():
  lam = rl_loss.length_penalty(np.array([[10, 20, 30, 20]]), np.array([[1, 1, 0, 0]]))
  np.testing.assert_allclose(lam, [[0.5, 0.0, -0.5, 0.0]])
  assert not rl_loss.length_penalty(np.array([[7, 7]]), np.array([[1, 0]])).any()
  r = rl_loss.shaped_rewards([[1.0, 1.0]], [[1, 1]], [[10, 20]], [[False, True]], length_weight=0.2,
                             truncation_penalty=0.5)
  np.testing.assert_allclose(r, [[1.1, -0.5]])


def test_rollout_masks_prompt_and_tool_outputs():
  """A scripted engine calls the lookup tool, then answers: only its own tokens are trained."""
  tok = tiny_tokenizer()
  env = envs.get("lookup")
  task = env.reset(4)
  table, item = env.table(4)
  replies = [f'<think>look</think>{chat.SECTION_BEGIN}{chat.CALL_BEGIN}functions.lookup:0{chat.ARGUMENT_BEGIN}'
             f'{{"key": "{item}"}}{chat.CALL_END}{chat.SECTION_END}<|im_end|>',
             f"<think></think>{base.spaced(task.answer)}<|im_end|>"]
  calls = []

  def generate(prompts, n, **kw):
    ids = [tok.encode(replies[len(calls)], allow_special=True)] * len(prompts)
    calls.append(prompts)
    return Generation(ids, ["stop"] * len(ids), [len(p) for p in prompts], [0] * len(ids),
                      [[-0.5] * len(t) for t in ids])

  engine = types.SimpleNamespace(config=presets.TINY, generate=generate)
  [s] = ro.rollout(engine, tok, env, [task], ro.RolloutSpec(max_turns=3, turn_tokens=64, response_tokens=128,
                                                            seq_len=400), SamplingParams(1.0), jax.random.key(0))
  assert env.score(task, s.trajectory)[0] == 1.0 and s.trajectory.num_tool_calls == 1 and not s.truncated
  ids, mask = np.array(s.tokens), np.array(s.mask, bool)
  # The trained tokens are exactly the two replies; the tool output (the code) is context only.
  assert tok.decode(ids[mask].tolist()) == replies[0] + replies[1]
  context = tok.decode(ids[~mask].tolist())
  assert f"## Return of functions.lookup:0\n{base.spaced(task.answer)}" in context
  assert calls[1][0] == s.tokens[:len(calls[1][0])]  # turn 2 saw exactly turn 1's tokens + the tool output
  batch = ro.to_batch([s], 400)
  np.testing.assert_array_equal(batch["mask"][0, :len(ids) - 1], mask[1:])
  np.testing.assert_array_equal(batch["targets"][0, :len(ids) - 1], ids[1:])
  assert s.thought  # its first reply reasoned
  # A direct answer (empty <think>) is not thinking.
  direct = tok.encode(f"<think></think>{base.spaced(task.answer)}<|im_end|>", allow_special=True)
  engine.generate = lambda prompts, n, **kw: Generation(
      [direct] * len(prompts), ["stop"] * len(prompts), [len(p) for p in prompts], [0] * len(prompts),
      [[-0.5] * len(direct)] * len(prompts))
  [d] = ro.rollout(engine, tok, env, [task], ro.RolloutSpec(max_turns=3, turn_tokens=64, response_tokens=128,
                                                            seq_len=400), SamplingParams(1.0), jax.random.key(0))
  assert env.score(task, d.trajectory)[1]["correct"] and not d.thought


@pytest.mark.parametrize("qat", [False, True])
def test_engine_logprobs_equal_trainer_logprobs(qat):
  c = presets.TINY
  params = params_lib.init_params(c, jax.random.key(1), jnp.float32)
  tok, env = tiny_tokenizer(), envs.get("arith")
  tasks = [env.reset(s) for s in range(2) for _ in range(2)]
  # With `qat` the engine runs real INT4 experts, the trainer fake-quantises the dense ones.
  engine = Engine(params_lib.quantize_experts(params) if qat else params, c, max_len=64)
  samples = ro.rollout(engine, tok, env, tasks, ro.RolloutSpec(turn_tokens=8, response_tokens=8, seq_len=48),
                       SamplingParams(temperature=1.0), jax.random.key(3))
  batch = ro.to_batch(samples, 48)
  logp, _, _ = rl_loss.token_logprobs(params, c, batch, qat=qat)
  m = batch["mask"] > 0
  assert m.sum() == 4 * 8
  np.testing.assert_allclose(np.asarray(logp)[m], batch["engine_logprobs"][m], atol=1e-5)
  if qat:  # the INT4 numbers matter: the plain model gives different log-probs
    plain, _, _ = rl_loss.token_logprobs(params, c, batch, qat=False)
    assert np.abs(np.asarray(plain)[m] - batch["engine_logprobs"][m]).max() > 1e-4


def test_overfit_one_batch_moves_logprobs_by_advantage():
  """Many updates on one fixed batch: the log-probs of samples with positive advantage rise, those with
  negative advantage fall (the loss's sign, masks and optimizer wiring together)."""
  c = presets.TINY
  cfg = _tiny_cfg(samples_per_prompt=4, updates_per_batch=4, num_steps=3)
  cfg.optimizer.matrices, cfg.optimizer.peak_lr, cfg.optimizer.end_lr = "adamw", 1e-3, 1e-3
  rng = np.random.default_rng(0)
  B, T = 8, 24
  tokens = rng.integers(0, c.vocab_size, (B, T + 1)).astype(np.int32)
  mask = np.zeros((B, T), np.float32)
  mask[:, 8:20] = 1.0
  rewards = np.array([1, 0, 0, 1, 0, 1, 1, 1], np.float32)  # two prompts x K=4
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((B, T), np.int32),
           "mask": mask, "engine_logprobs": np.zeros((B, T), np.float32), "rewards": rewards}
  tx, schedule = learner.make_optimizer(cfg)
  state = ts.init_state(params_lib.init_params(c, jax.random.key(0), jnp.float32), tx)
  seq_logp = lambda p: np.sum(np.asarray(rl_loss.token_logprobs(p, c, batch)[0]) * mask, -1)  # noqa: E731
  before = seq_logp(state.params)
  step = learner.make_rl_step(c, cfg, tx, schedule)
  for _ in range(cfg.num_steps):
    state, _ = step(state, batch, None)
  moved = seq_logp(state.params) - before
  adv = rewards.reshape(2, 4) - rewards.reshape(2, 4).mean(-1, keepdims=True)
  assert np.all(moved[adv.reshape(-1) > 0] > 0.05) and np.all(moved[adv.reshape(-1) < 0] < -0.05), (moved, adv)


def test_ptx_term_enters_the_loss():
  """ptx_weight > 0: the reported loss is the objective plus ptx_weight times the supervised NLL."""
  c = presets.TINY
  cfg = _tiny_cfg(samples_per_prompt=2, updates_per_batch=1, ptx_weight=0.5)
  rng = np.random.default_rng(1)
  B, T = 4, 16
  toks = rng.integers(0, c.vocab_size, (2, B, T + 1)).astype(np.int32)
  mask = np.ones((B, T), np.float32)
  batch = {"tokens": toks[0, :, :-1], "targets": toks[0, :, 1:], "segment_ids": np.ones((B, T), np.int32),
           "mask": mask, "engine_logprobs": np.zeros((B, T), np.float32),
           "rewards": np.array([1, 0, 0, 1], np.float32)}
  ptx = {"tokens": toks[1, :, :-1], "targets": toks[1, :, 1:], "segment_ids": np.ones((B, T), np.int32),
         "weights": mask}
  tx, schedule = learner.make_optimizer(cfg)
  state = ts.init_state(params_lib.init_params(c, jax.random.key(0), jnp.float32), tx)
  _, m = learner.rl_step(state, batch, ptx, c=c, cfg=cfg, tx=tx, schedule=schedule)
  nll = -np.mean(np.asarray(rl_loss.token_logprobs(state.params, c, ptx)[0]))
  np.testing.assert_allclose(m["ptx_loss"], nll, rtol=1e-5)
  assert nll > 1.0  # an untrained model: the supervised term is far from 0
  np.testing.assert_allclose(m["loss"], m["pg_loss"] + 0.5 * nll, rtol=1e-5)


def _tiny_cfg(**kw):
  cfg = runner.default_config()
  cfg.prompts_per_step, cfg.samples_per_prompt, cfg.num_steps = 2, 2, 3
  cfg.turn_tokens = cfg.response_tokens = 8
  cfg.seq_len, cfg.eval_tasks, cfg.eval_every, cfg.checkpoint_every = 80, 4, 2, 1
  cfg.warm_start.num_steps, cfg.warm_start.examples, cfg.warm_start.batch_size = 2, 64, 4
  cfg.warm_start.seq_len = 64
  cfg.temperature = cfg.temperature_end = 1.0  # the engine's sampling log-probs are π_old's only at 1
  cfg.progress_bar = False
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def test_pipeline_resume_and_checkpoints(tmp_path):
  full = runner.train_rl(_tiny_cfg(), tmp_path / "a")
  steps = [r for r in full if "reward_mean" in r]
  for k in ("step", "reward_mean", "reward_std", "response_len_mean", "thinking_frac", "truncated_frac",
            "tool_calls_mean", "loss", "kl_old", "max_attn_logit"):
    assert all(np.isfinite(r[k]) for r in steps), k
  assert [r["step"] for r in full if "eval_reward" in r] == [0, 2, 3]
  assert steps[-1]["engine_logp_gap"] < 1e-4
  # Killed after step 1 (same warm start), resumed: the same rollouts and losses.
  init = str(tmp_path / "a" / runner.WARM_START_DIR)
  runner.train_rl(_tiny_cfg(stop_after_steps=1, init_checkpoint=init), tmp_path / "b")
  runner.train_rl(_tiny_cfg(init_checkpoint=init), tmp_path / "b")
  resumed = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  assert [r for r in resumed if "resumed" not in r] == full
  # The checkpoint is what inference loads.
  params, c = checkpointing.load_params_for_inference(tmp_path / "b", jnp.float32)
  assert c == presets.TINY
  # A checkpoint of another model config is refused, naming the difference.
  other = _tiny_cfg(init_checkpoint=init)
  other.model.hidden_size = 32
  with pytest.raises(checkpointing.CheckpointError, match="another model config.*hidden_size"):
    runner.train_rl(other, tmp_path / "c")


def test_bad_input_errors(tmp_path):
  with pytest.raises(ValueError, match="K\\) >= 2"):
    runner.train_rl(_tiny_cfg(samples_per_prompt=1), tmp_path / "k1")
  with pytest.raises(ValueError, match="unknown environment 'maze'"):
    runner.train_rl(_tiny_cfg(env="maze"), tmp_path / "env")
  with pytest.raises(ValueError, match="unknown RL objective 'ppo'"):
    runner.train_rl(_tiny_cfg(objective="ppo"), tmp_path / "obj")
  other_vocab = _tiny_cfg()
  other_vocab.model.vocab_size = 4096  # no checkpoint to bring its tokenizer, and not the tiny one's vocabulary
  with pytest.raises(ValueError, match="no tokenizer folder was given, and the model's vocabulary \\(4096 ids\\)"):
    runner.train_rl(other_vocab, tmp_path / "vocab")
  assert not any((tmp_path / d).exists() for d in ("k1", "env", "vocab"))


def test_temperature_schedule():
  cfg = _tiny_cfg(temperature=1.0, temperature_end=0.6, temperature_decay_steps=10, temperature_quantum=0.05)
  assert [runner.temperature_at(cfg, s) for s in (0, 5, 10, 20)] == [1.0, 0.8, 0.6, 0.6]
  assert runner.temperature_at(_tiny_cfg(), 7) == 1.0


def test_cli_bad_input_is_one_line(tmp_path):
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  for flag, needle in [("--config.env=maze", "unknown environment 'maze'"),
                       ("--config.samples_per_prompt=1", "samples_per_prompt (K) >= 2")]:
    p = subprocess.run([sys.executable, "-m", "k2jax.train.rl.runner", f"--workdir={tmp_path / 'w'}", flag],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and needle in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0
  assert not (tmp_path / "w").exists()


def test_out_of_range_fields_are_named(tmp_path):
  for change, message in [({"clip_eps": 0.0}, "clip_eps must be a number > 0"),
                          ({"temperature": -1.0}, "temperature must be a number >= 0"),
                          ({"ptx_batch_size": 0}, "ptx_batch_size must be an integer >= 1")]:
    with pytest.raises(ValueError, match=message):
      runner.train_rl(_tiny_cfg(**change), tmp_path / "w")
  cfg = _tiny_cfg()
  cfg.warm_start.seq_len = 1
  with pytest.raises(ValueError, match="warm_start.seq_len must be an integer >= 2"):
    runner.train_rl(cfg, tmp_path / "w")
  assert not (tmp_path / "w").exists()


def test_rl_on_a_mesh_matches_one_device_and_resumes_there(tmp_path):
  """k2-rl on `fsdp:2,expert:4`: the learner and optimizer state sharded as k2-train's, rollouts on the engine's
  expert-parallel layout; the same samples, rewards and losses as one device, and a run killed
  after a step resumes on the mesh from its sharded checkpoint."""
  from k2jax import sharding
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets 8 CPU devices)")
  init = str(runner.warm_start(_tiny_cfg(), tmp_path / "ws"))
  # A PTX term: the tiny warm start's rewards are all equal, and the policy term alone has no gradient.
  kw = dict(num_steps=2, eval_every=0, init_checkpoint=init, ptx_weight=0.5, ptx_batch_size=2)
  single = runner.train_rl(_tiny_cfg(**kw), tmp_path / "one")
  mesh = sharding.make_mesh("fsdp:2,expert:4")
  runner.train_rl(_tiny_cfg(**kw, stop_after_steps=1), tmp_path / "mesh", mesh)
  runner.train_rl(_tiny_cfg(**kw), tmp_path / "mesh", mesh)
  sharded = [json.loads(x) for x in (tmp_path / "mesh" / "metrics.jsonl").read_text().splitlines()]
  sharded = [r for r in sharded if "resumed" not in r]
  assert [r["step"] for r in sharded] == [r["step"] for r in single] == [1, 2]
  for a, b in zip(sharded, single):
    for k in ("reward_mean", "response_len_mean", "thinking_frac", "tool_calls_mean"):
      assert a[k] == b[k], k  # the same samples
    assert a["ptx_loss"] > 1.0 and a["grad_norm"] > 1e-3
    for k in ("loss", "ptx_loss", "grad_norm", "max_attn_logit"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, err_msg=k)
  assert json.loads((tmp_path / "mesh" / "config.json").read_text())["moe_impl"] == "ep"
  # (Step 2's losses and gradient norm are of the weights step 1 made, restored from the mesh's checkpoint.
  # The weights themselves are not compared: AdamW moves a weight whose gradient is rounding noise by ~lr.)
