"""The train step, data pipeline and SFT masking on a very small K2."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax import chat, int4, model, params as params_lib, presets
from k2jax.configs import train_tiny
from k2jax.kernels import gmm_xla
from k2jax.tokenizer_build import tiny_tokenizer
from k2jax.train import data, train_step as ts, trainer

# Vocab stays at the tiny tokenizer's size; everything else is as small as the architecture allows.
MODEL_OVERRIDES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, n_routed_experts=4,
                       moe_intermediate_size=32)  # int4 groups of 32 along the expert input


def small_config(**overrides):
  cfg = train_tiny.get_config()
  cfg.model.update(MODEL_OVERRIDES)
  cfg.data.batch_size, cfg.data.seq_len = 4, 64
  cfg.num_steps, cfg.log_every, cfg.eval_every, cfg.eval_batches = 60, 1, 0, 1
  cfg.progress_bar, cfg.async_checkpoints = False, False
  for k, v in overrides.items():
    node, *rest = k.split(".")
    if rest:
      cfg[node][rest[0]] = v
    else:
      cfg[k] = v
  return cfg


@pytest.fixture(scope="module")
def setup():
  cfg = small_config()
  c = presets.from_config_dict(cfg.model)
  params = params_lib.init_params(c, jax.random.key(0))
  ds = data.PackedDataset(data.load_split("synthetic", "train"), 4, 64)
  return cfg, c, params, ds


def test_loss_falls_and_qk_clip_bounds_logits(setup):
  cfg, c, params, _ = setup
  tau = 0.05  # below the initial max logits (~0.06), so clipping acts from the first step
  cfg = small_config(qk_clip_tau=tau, **{"optimizer.end_lr": 0.0})
  tx, sched = ts.make_optimizer(cfg)
  state = ts.init_state(jax.tree.map(jnp.copy, params), tx)  # the step donates its state
  ds = data.PackedDataset(data.load_split("synthetic", "train"), 4, 64)
  step = ts.make_train_step(c, cfg, tx, sched).lower(state, ds.next_batch()).compile()
  # The donated routed-expert stacks are updated in place: no copy of them before the step reads them.
  copied = re.findall(r"copy\(%state_params\S*experts\S*", step.as_text())
  assert not copied, copied
  losses, clipped = [], []
  for _ in range(cfg.num_steps):
    batch = ds.next_batch()
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
    clipped.append(float(m["clipped_heads"]))
  assert np.mean(losses[-5:]) < losses[0] - 1.0, losses
  assert max(clipped) > 0
  # QK-Clip scales by tau / S where S comes from the step's forward on the pre-update weights; with the
  # schedule past its end (lr 0) the update is zero, so re-running the step's batch on the clipped
  # weights must give max logits <= tau exactly (up to rounding).
  batch = ds.next_batch()
  state, m = step(state._replace(step=jnp.asarray(cfg.num_steps, jnp.int32)), batch)
  assert float(m["lr"]) == 0.0 and float(m["max_attn_logit"]) > tau
  out = model.forward(state.params, c, batch["tokens"], segment_ids_bt=batch["segment_ids"])
  after = max(float(jnp.max(v)) for v in out.max_attn_logits.values())
  assert after <= tau * (1 + 1e-3), after


def test_update_ordering_leaves_the_gradients_as_they_are():
  """The expert stacks' ordering dependency on the embedding's gradient adds an exact zero, also where
  that gradient is NaN or Inf (a bad embedding gradient must not spill into every expert)."""
  rng = np.random.default_rng(0)
  experts = {k: jnp.asarray(rng.standard_normal((2, 4, 8, 6)), jnp.float32) for k in ("gate", "up", "down")}
  for bad in (np.nan, np.inf, -np.inf, 1.5):
    embed = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32).at[0, 0].set(bad)
    grads = {"embed_vd": embed, "moe_layers": {"moe": {"experts": experts, "router": embed[:4]}}}
    out = jax.jit(ts._after_backward)(grads)
    for k, g in experts.items():
      np.testing.assert_array_equal(np.asarray(out["moe_layers"]["moe"]["experts"][k]), np.asarray(g))
    np.testing.assert_array_equal(np.asarray(out["embed_vd"]), np.asarray(embed))


def test_grad_accumulation_matches_big_batch(setup):
  _, c, params, ds = setup
  batch = data.PackedDataset(ds.docs, 4, 64, seed=3).next_batch()
  f = jax.jit(lambda p, b, n: ts.loss_and_grads(p, c, b, num_micro=n)[:2], static_argnums=2)
  loss1, g1 = f(params, batch, 1)
  loss2, g2 = f(params, batch, 2)
  np.testing.assert_allclose(float(loss2), float(loss1), rtol=1e-5)
  flat1, flat2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
  num = np.sqrt(sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(flat1, flat2)))
  den = np.sqrt(sum(float(jnp.sum(a ** 2)) for a in flat1))
  assert num / den <= 1e-5, num / den


def test_loss_is_log_softmax_of_the_models_logits():
  """The step's 2-D head + logsumexp loss over unrolled layers (`layer_loop="unroll"`, the CPU default:
  the MoE layers' routed experts as `gmm_xla.LayerSlice` views of the stacks) equals log_softmax over
  `forward`'s [B, T, V] logits from the scanned stack, value and gradient (same fp32 products: to rounding)."""
  c = presets.from_config_dict(small_config(**{"model.num_hidden_layers": 3}).model)  # 2 MoE layers
  params = params_lib.init_params(c, jax.random.key(7))
  batch = data.PackedDataset(data.load_split("synthetic", "train"), 4, 64, seed=5).next_batch()

  def plain(p):
    logp = jax.nn.log_softmax(model.forward(p, c, batch["tokens"], segment_ids_bt=batch["segment_ids"]).logits, -1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum(nll * batch["weights"])

  ref, g_ref = jax.jit(jax.value_and_grad(plain))(params)
  got, g = jax.jit(jax.value_and_grad(lambda p: ts.loss_sums(p, c, batch, layer_loop="unroll")[0]))(params)
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))
  assert float(jnp.abs(g["lm_head_dv"]).max()) > 0
  assert float(jnp.abs(g["moe_layers"]["moe"]["experts"]["gate_edf"][1]).max()) > 0  # the last scanned layer
  views = ts._moe_layer_views(params["moe_layers"])
  assert len(views) == 2 and isinstance(views[1]["moe"]["experts"]["down_efd"], gmm_xla.LayerSlice)


def test_layer_loop_choice():
  from k2jax.kernels import dispatch  # noqa: PLC0415
  assert dispatch.unroll_layers_for_train(3, "cpu") and not dispatch.unroll_layers_for_train(3, "tpu")
  assert not dispatch.unroll_layers_for_train(60, "cpu")  # K2's 60 MoE layers compile as one scanned layer
  assert ts.unroll_layers(presets.TINY, "unroll") and not ts.unroll_layers(presets.TINY, "scan")
  with pytest.raises(ValueError, match="layer_loop must be one of"):
    ts.unroll_layers(presets.TINY, "loop")


def test_qat_uses_fake_quantised_experts(setup):
  _, c, params, ds = setup
  batch = ds.docs[:1]
  rows = data.pack_rows(batch, 32)
  p_qat = ts.compute_params(params, jnp.float32, qat=True)
  experts = params["moe_layers"]["moe"]["experts"]
  for name in ("gate_edf", "up_edf", "down_efd"):
    np.testing.assert_array_equal(p_qat["moe_layers"]["moe"]["experts"][name], int4.fake_quant(experts[name]))
    assert not np.array_equal(p_qat["moe_layers"]["moe"]["experts"][name], experts[name])
  np.testing.assert_array_equal(p_qat["moe_layers"]["attn"]["kv_b_cnu"], params["moe_layers"]["attn"]["kv_b_cnu"])
  loss_qat = ts.loss_sums(params, c, rows, qat=True)[0]
  loss_ref = ts.loss_sums(p_qat, c, rows, qat=False)[0]
  loss_plain = ts.loss_sums(params, c, rows, qat=False)[0]
  np.testing.assert_allclose(float(loss_qat), float(loss_ref), rtol=1e-6)
  assert float(loss_qat) != float(loss_plain)


def _weighted_spans(w):
  edges = np.flatnonzero(np.diff(np.concatenate([[0.0], w, [0.0]])))
  return list(zip(edges[::2], edges[1::2]))


def test_sft_mask_covers_exactly_assistant_tokens():
  tok = tiny_tokenizer()
  messages = [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "What is 2 plus 3?"},
      {"role": "assistant", "content": "5.", "reasoning_content": "small sum"},
      {"role": "user", "content": "And 4 plus 4?"},
      {"role": "assistant", "content": "8.", "reasoning_content": "add them"},
  ]
  header = chat.IM_ASSISTANT + "assistant" + chat.IM_MIDDLE
  for targets, answers in (("all", ["<think>small sum</think>5.", "<think>add them</think>8."]),
                           ("last", ["<think>add them</think>8."])):
    ids, w = data.chat_document(tok, messages, targets=targets)
    start = data.target_start(messages, targets)
    assert ids.tolist() == tok.encode(chat.render(messages, add_generation_prompt=False, keep_reasoning_from=start),
                                      allow_special=True)
    # Weighted tokens form one span per target reply: after the assistant header, up to its <|im_end|>.
    spans = _weighted_spans(w)
    assert len(spans) == len(answers)
    for (s, e), answer in zip(spans, answers):
      assert tok.decode(ids[:s].tolist()).endswith(header)
      assert tok.decode(ids[s:e].tolist()) == answer + chat.IM_END
    if targets == "last":  # the history turn renders as the prompt of the last turn shows it
      assert "<think></think>5." in tok.decode(ids.tolist())
  # Packing shifts weights onto targets: a target is weighted iff it is an assistant token.
  rows = data.pack_rows([(ids, w)], 256)
  n = len(ids) - 1
  np.testing.assert_array_equal(rows["weights"][0, :n], w[1:])
  np.testing.assert_array_equal(rows["targets"][0, :n], ids[1:])


def test_sft_targets_keep_their_reasoning():
  tok = tiny_tokenizer()
  messages = [{"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4", "reasoning_content": "add two and two"}]
  ids, w = data.chat_document(tok, messages)
  (s, e), = _weighted_spans(w)
  assert tok.decode(ids[s:e].tolist()) == "<think>add two and two</think>4<|im_end|>"
  # A tool-call chain after the last user message is trained whole, each turn with its reasoning.
  chain = [messages[0],
           {"role": "assistant", "content": "", "reasoning_content": "use calc",
            "tool_calls": [{"id": "functions.calc:0", "function": {"name": "calc", "arguments": {"e": "2+2"}}}]},
           {"role": "tool", "tool_call_id": "functions.calc:0", "content": "4"},
           {"role": "assistant", "content": "4", "reasoning_content": "calc says 4"}]
  ids, w = data.chat_document(tok, chain)
  texts = [tok.decode(ids[s:e].tolist()) for s, e in _weighted_spans(w)]
  assert len(texts) == 2 and texts[0].startswith("<think>use calc</think><|tool_calls_section_begin|>")
  assert texts[1] == "<think>calc says 4</think>4<|im_end|>"
  with pytest.raises(ValueError, match="no assistant reply"):
    data.chat_document(tok, messages + [{"role": "user", "content": "and 3+3?"}])
  with pytest.raises(ValueError, match="chat targets"):
    data.chat_document(tok, messages, targets="first")


def test_text_documents_end_with_the_document_eos(tmp_path):
  tok = tiny_tokenizer()
  (tmp_path / "a.txt").write_text("one two three\n\nfour five\n")
  for ids, _ in data.read_documents(tmp_path / "a.txt", tok) + data.synthetic_documents(n=3, tokenizer=tok):
    assert ids[0] == tok.bos_id and ids[-1] == tok.id_of("[EOS]") != tok.id_of("<|im_end|>")
    assert tok.id_of("<|im_end|>") not in ids.tolist()


def test_data_deterministic_and_resumable(tmp_path):
  docs = data.load_split("synthetic", "train")
  a = data.PackedDataset(docs, 8, 64, seed=5)
  b = data.PackedDataset(docs, 8, 64, seed=5)
  n_per_epoch = len(a._epoch_rows()["tokens"]) // 8
  seen = [a.next_batch() for _ in range(n_per_epoch + 3)]  # crosses an epoch boundary
  assert a.state()["epoch"] == 1
  for x in seen[:3]:
    y = b.next_batch()
    assert all(np.array_equal(x[k], y[k]) for k in x)
  resumed = data.PackedDataset(docs, 8, 64, seed=5)
  resumed.restore(json.loads(json.dumps(b.state())))
  for x in seen[3:]:
    y = resumed.next_batch()
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert not np.array_equal(seen[0]["tokens"], seen[n_per_epoch]["tokens"])  # reshuffled per epoch
  first = seen[0]
  assert first["tokens"].shape == (8, 64) and first["segment_ids"].max() > 1
  assert np.all(first["weights"][first["segment_ids"] == 0] == 0)


def test_file_sources(tmp_path):
  tok = tiny_tokenizer()
  (tmp_path / "a.txt").write_text("one two three\n\nfour five six\n")
  (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one two"}) + "\n" + json.dumps({"ids": [5, 6, 7]}) + "\n")
  np.save(tmp_path / "c.npy", np.arange(12, dtype=np.int32).reshape(3, 4))
  txt = data.read_documents(tmp_path / "a.txt", tok)
  assert len(txt) == 2 and tok.decode(txt[1][0][1:-1].tolist()) == "four five six"
  js = data.read_documents(tmp_path / "b.jsonl", tok)
  assert js[1][0].tolist() == [5, 6, 7]
  npy = data.read_documents(tmp_path / "c.npy")
  assert [d[0].tolist() for d in npy] == np.arange(12).reshape(3, 4).tolist()


def test_sequence_aux_loss_enters_the_objective():
  import jax.numpy as jnp
  from k2jax import model, params, presets
  c = presets.TINY
  p = params.init_params(c, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, c.vocab_size)
  out = jax.jit(lambda p: model.forward(p, c, tokens, aux_loss_alpha=1e-2))(p)
  twice = jax.jit(lambda p: model.forward(p, c, tokens, aux_loss_alpha=2e-2))(p)
  # The per-layer loss is alpha * sum_e f_e P_e with sum_e f_e P_e >= 0 (the loop reference for one
  # layer is in test_qk_clip); over the MoE layers it is positive and linear in alpha.
  assert float(out.aux_loss) > 0
  np.testing.assert_allclose(float(twice.aux_loss), 2 * float(out.aux_loss), rtol=1e-6)
  plain = jax.jit(lambda p: model.forward(p, c, tokens))(p)
  np.testing.assert_array_equal(out.logits, plain.logits)
  assert float(plain.aux_loss) == 0.0
  # Gradients reach the router weights through the balance loss.
  g = jax.grad(lambda p: model.forward(p, c, tokens, aux_loss_alpha=1.0).aux_loss)(p)
  assert float(jnp.abs(g["moe_layers"]["moe"]["router_de"]).max()) > 0


def _plain_max_logits(params, c, tokens, segments) -> np.ndarray:
  """Per-head max pre-softmax logit of a one-layer model, recomputed in float64 numpy from the raw
  weights (the layer's input is the embedding): the measure QK-Clip bounds, outside the model's code."""
  from k2jax import rope  # noqa: PLC0415
  a = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  stack = a["moe_layers"] if "moe_layers" in a else a["dense_layers"]
  attn = {k: v[0] for k, v in stack["attn"].items()}

  def norm(x, g, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g

  tokens, segments = np.asarray(tokens), np.asarray(segments)
  x = norm(a["embed_vd"][tokens], stack["attn_norm_d"][0], c.rms_norm_eps)
  if "q_a_dr" in attn:
    q = np.einsum("btr,rnq->btnq", norm(x @ attn["q_a_dr"], attn["q_a_norm_r"], c.latent_norm_eps), attn["q_b_rnq"])
  else:
    q = np.einsum("btd,dnq->btnq", x, attn["q_dnq"])
  kv = x @ attn["kv_a_da"]
  k_nope = np.einsum("btc,cnu->btnu", norm(kv[..., :c.kv_lora_rank], attn["kv_a_norm_c"], c.latent_norm_eps),
                     attn["kv_b_cnu"])[..., :c.qk_nope_head_dim]
  pos = np.asarray(model.positions_from_segments(jnp.asarray(segments)), np.float64)
  turn = np.exp(1j * pos[..., None] * rope.inv_frequencies(c.rope, c.qk_rope_head_dim)) * rope.attention_factor(c.rope)

  def roped(v):  # interleaved pairs (v[2i], v[2i+1]) as complex numbers, rotated
    return (v[..., 0::2] + 1j * v[..., 1::2]) * turn[:, :, None, :]

  q_pe, k_pe = roped(q[..., c.qk_nope_head_dim:]), roped(kv[..., None, c.kv_lora_rank:])[:, :, 0]
  logits = (np.einsum("btnk,bsnk->bnts", q[..., :c.qk_nope_head_dim], k_nope)
            + np.einsum("btnp,bsp->bnts", q_pe, np.conj(k_pe)).real) * c.softmax_scale
  T = tokens.shape[1]
  mask = ((segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] != 0)
          & (np.arange(T)[None, :, None] >= np.arange(T)[None, None, :]))
  return np.where(mask[:, None], logits, -np.inf).max(axis=(0, 2, 3))


def test_qk_clip_after_real_optimizer_steps():
  """With lr > 0 the clip (from the step's own forward, as in K2) scales each clipped head's logits
  by gamma = tau / S_before: after the step its max logit is gamma times what the unclipped update
  gives, unclipped heads are untouched; checked with an independent plain-attention measure."""
  cfg = small_config(num_steps=20, **{"model.num_hidden_layers": 1, "model.first_k_dense_replace": 0,
                                      "optimizer.warmup_steps": 1})
  c = presets.from_config_dict(cfg.model)
  params = params_lib.init_params(c, jax.random.key(0))
  ds = data.PackedDataset(data.load_split("synthetic", "train"), 4, 64)
  tx, sched = ts.make_optimizer(cfg)
  free_step = ts.make_train_step(c, _with(cfg, qk_clip_tau=0.0), tx, sched)
  state = ts.init_state(jax.tree.map(jnp.copy, params), tx)
  for _ in range(3):  # real steps first, so the state has moved
    state, _ = free_step(state, ds.next_batch())
  batch = ds.next_batch()
  s_before = _plain_max_logits(state.params, c, batch["tokens"], batch["segment_ids"])
  tau = float(np.median(s_before))  # half the heads over it
  clip_step = ts.make_train_step(c, _with(cfg, qk_clip_tau=tau), tx, sched)
  copy = lambda s: jax.tree.map(jnp.copy, s)  # noqa: E731  (the steps donate their state)
  clipped_state, m = clip_step(copy(state), batch)
  free_state, _ = free_step(copy(state), batch)
  assert float(m["lr"]) > 0
  np.testing.assert_allclose(float(m["max_attn_logit"]), s_before.max(), rtol=1e-5)  # the model's measure
  s_clip = _plain_max_logits(clipped_state.params, c, batch["tokens"], batch["segment_ids"])
  s_free = _plain_max_logits(free_state.params, c, batch["tokens"], batch["segment_ids"])
  hot = s_before > tau
  assert hot.any() and (~hot).any()
  assert np.abs(s_free / s_before - 1).max() > 1e-3  # the update itself moved the logits
  gamma = np.where(hot, tau / s_before, 1.0)
  np.testing.assert_allclose(s_clip, gamma * s_free, rtol=1e-5)
  # So a clipped head lands within the update's own growth of tau.
  assert np.all(np.abs(s_clip[hot] / tau - 1) <= np.abs(s_free[hot] / s_before[hot] - 1) + 1e-5)


def _with(cfg, **overrides):
  cfg = cfg.copy_and_resolve_references()
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


@pytest.mark.parametrize("name, save, message", [
    ("floats.npy", lambda p: np.save(p, np.random.default_rng(0).random((4, 64))), "token ids must be integers"),
    ("past.npy", lambda p: np.save(p, np.full((4, 64), 99_999, np.int32)), "token id 99999, outside the model's vocabulary"),
    ("negative.jsonl", lambda p: p.write_text(json.dumps({"ids": [3, -2, 5] * 40}) + "\n"), "token id -2, outside"),
    ("broken.jsonl", lambda p: p.write_text('{"text": "one"\n'), "broken.jsonl:1: "),
    ("empty.txt", lambda p: p.write_text(""), "no documents in"),
    ("short.npy", lambda p: np.save(p, np.arange(40, dtype=np.int32)), r"short.npy: one epoch packs into 1 rows"),
])
def test_bad_training_data_is_named_before_the_workdir_exists(tmp_path, name, save, message):
  # Ids past the embedding table were once trained on silently (the lookup clamps); floats were cast to ids.
  from k2jax import cli
  save(tmp_path / name)
  cfg = train_tiny.get_config()
  cfg.data.train, cfg.num_steps = str(tmp_path / name), 2
  with pytest.raises(data.DataError, match=message) as error:
    trainer.train(cfg, tmp_path / "run")
  assert cli.is_expected(error.value) and not (tmp_path / "run").exists()


def test_a_bad_init_source_is_refused_before_the_workdir_exists(tmp_path):
  from k2jax.train import checkpointing
  from k2jax.train.rl import runner
  (tmp_path / "empty").mkdir()
  cfg = train_tiny.get_config()
  cfg.init_from, cfg.num_steps = str(tmp_path / "empty"), 2
  with pytest.raises(checkpointing.CheckpointError, match="no checkpoint steps under"):
    trainer.train(cfg, tmp_path / "run")
  rl_cfg = runner.default_config()
  rl_cfg.init_checkpoint = str(tmp_path / "missing")
  with pytest.raises(checkpointing.CheckpointError, match="does not exist"):
    runner.train_rl(rl_cfg, tmp_path / "rl")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
