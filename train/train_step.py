"""One training step: masked next-token loss, micro-batch accumulation, MuonClip, QK-Clip, router bias.

Loss = sum_t w_t * nll_t / sum_t w_t over the whole global batch (fp32). Micro-batches accumulate the
unnormalised sums and divide once at the end, so A micro-batches give the gradient of one big batch.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from k2jax import model, moe, params as params_lib, sharding
from k2jax.config import K2Config
from k2jax.kernels import dispatch, gmm_xla
from k2jax.train import qk_clip as qk_clip_lib
from k2jax.train import schedules
from k2jax.train.muonclip import NS_DTYPE, muonclip

QAT_MODE = "clamp7"  # scale = max|w|/7, q in [-7, 7]: the rounding of the open K2 QAT reproduction


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar
  params: Any      # master weights (param dtype)
  opt_state: Any


def lr_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """WSD over cfg.num_steps: warm-up, flat, then `decay_fraction` of the run decaying to end_lr."""
  o = cfg.optimizer
  decay = max(1, int(round(cfg.num_steps * o.decay_fraction)))
  stable = max(0, cfg.num_steps - o.warmup_steps - decay)
  return schedules.warmup_stable_decay(o.peak_lr, o.warmup_steps, stable, decay, end_value=o.end_lr,
                                       decay=o.get("decay", "cosine"))


def make_optimizer(cfg: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  o = cfg.optimizer
  sched = lr_schedule(cfg)
  tx = muonclip(sched, weight_decay=o.weight_decay, momentum=o.momentum, rms_scale=o.rms_scale,
                adam_b1=o.adam_b1, adam_b2=o.adam_b2, matrices=o.get("matrices", "muon"),
                ns_dtype=o.get("ns_dtype", NS_DTYPE))
  if o.get("grad_clip", 0.0):
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx, sched


def init_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def compute_params(params: dict, compute_dtype, qat: bool) -> dict:
  """Params as the forward sees them: floating leaves in compute dtype (the fp32 router bias kept),
  routed experts fake-quantised to INT4 (straight-through gradient) when `qat` is on, with the MoE
  layer's own QAT quantiser, the one serving uses."""
  p = params_lib.cast(params, compute_dtype)
  if qat and "moe_layers" in p:
    experts = moe.fake_quant_experts(p["moe_layers"]["moe"]["experts"], QAT_MODE)
    p = {**p, "moe_layers": {**p["moe_layers"], "moe": {**p["moe_layers"]["moe"], "experts": experts}}}
  return p


def token_nll(hidden_btd: jax.Array, head_dv: jax.Array, targets_bt: jax.Array) -> jax.Array:
  """-log softmax(hidden @ head)[target] per token, fp32: the model's head and the loss as 2-D matmuls over
  the B*T rows (logsumexp minus the target's logit). Equal to log_softmax over `forward`'s [B, T, V]
  logits to the bit; XLA:CPU ran the 3-D form's backward ~2-3x slower (transposed copies of [B*T, V])."""
  B, T, D = hidden_btd.shape
  logits_mv = jnp.dot(hidden_btd.reshape(B * T, D), head_dv, preferred_element_type=jnp.float32)
  target_m = jnp.take_along_axis(logits_mv, targets_bt.reshape(B * T, 1), axis=-1)[:, 0]
  return (jax.nn.logsumexp(logits_mv, axis=-1) - target_m).reshape(B, T)


LAYER_LOOPS = ("auto", "scan", "unroll")


def unroll_layers(c: K2Config, layer_loop: str = "auto") -> bool:
  """`forward`'s unroll_layers for a run's `layer_loop`: "scan", "unroll", or "auto" (the backend decides,
  `dispatch.unroll_layers_for_train`)."""
  if layer_loop not in LAYER_LOOPS:
    raise ValueError(f"layer_loop must be one of {LAYER_LOOPS}, got {layer_loop!r}")
  if layer_loop == "auto":
    return dispatch.unroll_layers_for_train(max(c.num_dense_layers, c.num_moe_layers))
  return layer_loop == "unroll"


def _moe_layer_views(stack: dict) -> tuple:
  """The MoE layer stack as per-layer trees for the unrolled layers (`forward` takes either): each leaf
  split along L (the gradient is one concatenate per leaf), the routed experts as `gmm_xla.LayerSlice`
  views that the grouped-matmul loops read in place instead of copying each layer out of the stack."""
  experts = stack["moe"]["experts"]
  rest = {**stack, "moe": {k: v for k, v in stack["moe"].items() if k != "experts"}}
  n = experts["gate_edf"].shape[0]
  rows = jax.tree.map(lambda a: [r[0] for r in jnp.split(a, n, axis=0)], rest)
  views = {k: gmm_xla.layer_slices(w) for k, w in experts.items()}
  layers = []
  for l in range(n):
    p = jax.tree.map(lambda r, l=l: r[l], rows, is_leaf=lambda x: isinstance(x, list))
    layers.append({**p, "moe": {**p["moe"], "experts": {k: v[l] for k, v in views.items()}}})
  return tuple(layers)


def loss_forward(params: dict, c: K2Config, batch: dict, *, compute_dtype=jnp.float32, qat: bool = False,
                 remat: str = "none", aux_loss_alpha: float = 0.0, moe_impl: str = "ragged",
                 layer_loop: str = "auto"):
  """(params as the forward saw them, `forward`'s Output with `hidden`) for a loss over `batch`: the
  params in the compute dtype (experts fake-quantised under QAT), the layers unrolled or scanned as
  `layer_loop` says. The head is left to the loss (`token_nll`). Pre-training and RL losses both use it."""
  p = compute_params(params, compute_dtype, qat)
  unroll = unroll_layers(c, layer_loop)
  if unroll and moe_impl == "ragged" and jax.default_backend() == "cpu" and "moe_layers" in p:
    p = {**p, "moe_layers": _moe_layer_views(p["moe_layers"])}
  out = model.forward(p, c, batch["tokens"], segment_ids_bt=batch["segment_ids"], remat=remat,
                      aux_loss_alpha=aux_loss_alpha, moe_impl=moe_impl, return_hidden=True, unroll_layers=unroll)
  return p, out  # out.logits goes unused (DCE'd)


def loss_sums(params: dict, c: K2Config, batch: dict, **kw):
  """(sum_t w_t nll_t, (sum_t w_t, max_attn_logits, expert_load)) for one (micro-)batch, fp32.

  With `aux_loss_alpha` > 0 the sequence-wise balance loss is added, weighted by the batch's token
  weight so that the mean over (micro-)batches stays exact. Keywords: see `loss_forward`.
  """
  p, out = loss_forward(params, c, batch, **kw)
  nll_bt = token_nll(out.hidden, p["lm_head_dv"], batch["targets"])
  w_bt = batch["weights"].astype(jnp.float32)
  w_sum = jnp.sum(w_bt)
  return jnp.sum(nll_bt * w_bt) + out.aux_loss * w_sum, (w_sum, out.max_attn_logits, out.expert_load)


def _split_micro(batch: dict, num_micro: int) -> dict:
  def split(x):
    if x.shape[0] % num_micro:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by micro_batches={num_micro}")
    return x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:])
  return jax.tree.map(split, batch)


def loss_and_grads(params: dict, c: K2Config, batch: dict, *, num_micro: int = 1, **kw):
  """Mean weighted loss, its gradient, and the step's max logits / expert load, over `num_micro`
  micro-batches run one after another (lax.scan).

  The denominator (the batch's token weight) depends on the batch alone, so the loss is divided by it
  before differentiating: the backward starts from a scaled seed instead of a pass over every gradient
  afterwards (at the small benchmark width ~300 MB of fp32 gradients read and written once more)."""
  denom = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)

  def scaled(params, batch):
    nll_sum, aux = loss_sums(params, c, batch, **kw)
    return nll_sum / denom, (nll_sum, aux)

  grad_fn = jax.value_and_grad(scaled, has_aux=True)
  if num_micro == 1:
    (_, (nll_sum, (w_sum, max_logits, load))), grads = grad_fn(params, batch)
  else:
    micro = _split_micro(batch, num_micro)

    def body(carry, mb):
      (_, (nll_sum, (w_sum, ml, load))), g = grad_fn(params, mb)
      acc_g, acc_nll, acc_w, acc_ml, acc_load = carry
      return (jax.tree.map(jnp.add, acc_g, g), acc_nll + nll_sum, acc_w + w_sum,
              jax.tree.map(jnp.maximum, acc_ml, ml), acc_load + load), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: grad_fn(params, first))
    (_, (_, (_, ml_shape, load_shape))), g_shape = shapes
    zeros = lambda s: jnp.zeros(s.shape, s.dtype)  # noqa: E731
    init = (jax.tree.map(zeros, g_shape), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.full(s.shape, -jnp.inf, s.dtype), ml_shape), zeros(load_shape))
    (grads, nll_sum, w_sum, max_logits, load), _ = jax.lax.scan(body, init, micro)
  return nll_sum / denom, grads, max_logits, load, w_sum


def moe_impl_of(cfg: ml_collections.ConfigDict) -> str:
  """The run's `moe_impl` ("auto" when unset), resolved for the mesh the step is traced under."""
  ctx = sharding.current()
  return sharding.choose_moe_impl(ctx[0] if ctx else None, cfg.get("moe_impl", "auto"))


def train_step(state: TrainState, batch: dict, *, c: K2Config, cfg: ml_collections.ConfigDict,
               tx: optax.GradientTransformation, schedule: optax.Schedule) -> tuple[TrainState, dict]:
  """Loss and grads -> MuonClip update -> QK-Clip on the new weights -> router-bias sign update."""
  loss, grads, max_logits, load, n_tokens = loss_and_grads(
      state.params, c, batch, num_micro=cfg.micro_batches, compute_dtype=params_lib.dtype_from_name(cfg.compute_dtype),
      qat=cfg.qat, remat=cfg.remat, aux_loss_alpha=cfg.get("aux_loss_alpha", 0.0), moe_impl=moe_impl_of(cfg),
      layer_loop=cfg.get("layer_loop", "auto"))
  state, metrics = apply_grads(state, grads, max_logits, load, c=c, cfg=cfg, tx=tx, schedule=schedule)
  return state, {"loss": loss, "tokens": n_tokens, **metrics}


def global_norm(tree: Any) -> jax.Array:
  """optax.global_norm with each leaf's sum of squares as a dot product (fp32): XLA:CPU hands a plain
  reduction to a library kernel that takes its operand materialised, so sum(g ** 2) wrote g ** 2 out and read
  it back (a pass over every gradient, ~250 MB at the small benchmark width); the dot reads each gradient
  once, as long as no elementwise op sits between it and the gradient (the square then fuses into that op's
  pass and is written out again: `apply_grads` takes the norm before `_after_backward`). Equal to optax's
  within float32 rounding (another summation order)."""
  sq = [jnp.dot(g.ravel(), g.ravel(), preferred_element_type=jnp.float32) for g in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(sq))


def _after_backward(grads: Any) -> Any:
  """The routed-expert stacks' gradients with a data dependency on the embedding's, the backward's last
  product (+ 0 x one element made finite: a zero XLA cannot fold, fused into the optimizer's passes,
  and 0 even where that element is NaN or Inf, so a bad embedding gradient does not spill into the experts').

  The grouped-matmul loops read the stacks in place through the whole backward, the first MoE layer's dlhs
  loops last; those feed no weight's gradient, so without this nothing orders them before the optimizer's
  in-place update of the donated stacks, and XLA copies every stack before the step (3 x 84 MB at the small
  benchmark width). Ordering the update, not dW, leaves the grouped matmul's dW and dlhs free to overlap."""
  if "embed_vd" not in grads or "moe_layers" not in grads:
    return grads
  late = 0 * jnp.nan_to_num(grads["embed_vd"][0, 0])
  moe_g = grads["moe_layers"]["moe"]
  experts = jax.tree.map(lambda g: g + late.astype(g.dtype), moe_g["experts"])
  return {**grads, "moe_layers": {**grads["moe_layers"], "moe": {**moe_g, "experts": experts}}}


def apply_grads(state: TrainState, grads: Any, max_logits: dict, load: jax.Array | None, *, c: K2Config,
                cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                schedule: optax.Schedule) -> tuple[TrainState, dict]:
  """The update shared by pre-training, SFT and RL: MuonClip, then QK-Clip on the new weights (from the
  step's max attention logits), then the aux-loss-free router-bias update (from the expert load)."""
  updates, opt_state = tx.update(_after_backward(grads), state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"grad_norm": global_norm(grads), "lr": schedule(state.step)}
  if cfg.qk_clip_tau > 0:
    params, clip_stats = qk_clip_lib.qk_clip(params, max_logits, c, tau=cfg.qk_clip_tau)
    metrics["max_attn_logit"] = clip_stats["qk_clip/max_logit"]
    metrics["clipped_heads"] = clip_stats["qk_clip/fraction_clipped"]
  else:
    metrics["max_attn_logit"] = jnp.max(jnp.stack([jnp.max(v) for v in max_logits.values()]))
    metrics["clipped_heads"] = jnp.zeros((), jnp.float32)
  if load is not None:
    if cfg.router_bias_u > 0:
      params = qk_clip_lib.update_router_bias(params, load, u=cfg.router_bias_u)
    load_le = load.astype(jnp.float32)
    mean_l = jnp.maximum(jnp.mean(load_le, axis=-1), 1e-9)
    metrics["expert_load_max_over_mean"] = jnp.max(jnp.max(load_le, axis=-1) / mean_l)
  return TrainState(state.step + 1, params, opt_state), metrics


def make_train_step(c: K2Config, cfg: ml_collections.ConfigDict, tx, schedule):
  """The jitted step (state buffers donated)."""
  return jax.jit(functools.partial(train_step, c=c, cfg=cfg, tx=tx, schedule=schedule), donate_argnums=(0,))


def make_eval_step(c: K2Config, cfg: ml_collections.ConfigDict):
  """Jitted (params, batch) -> (sum w nll, sum w)."""

  def f(params, batch):
    nll_sum, (w_sum, _, _) = loss_sums(params, c, batch, compute_dtype=params_lib.dtype_from_name(cfg.compute_dtype),
                                       qat=cfg.qat, moe_impl=moe_impl_of(cfg), layer_loop=cfg.get("layer_loop", "auto"))
    return nll_sum, w_sum

  return jax.jit(f)
