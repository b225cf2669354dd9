"""The jitted RL update: π_old by the trainer's forward, then `updates_per_batch` MuonClip updates of
the chosen objective (+ the PTX loss), each followed by QK-Clip and the router-bias update exactly as in
pre-training (`train_step.apply_grads`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from k2jax import params as params_lib
from k2jax.config import K2Config
from k2jax.train import train_step as ts
from k2jax.train.rl import loss as rl_loss


def make_optimizer(cfg: ml_collections.ConfigDict):
  """MuonClip with the schedule spread over all updates (num_steps x updates_per_batch)."""
  sched_cfg = ml_collections.ConfigDict({"num_steps": cfg.num_steps * cfg.updates_per_batch,
                                         "optimizer": cfg.optimizer})
  return ts.make_optimizer(sched_cfg)


def rl_step(state: ts.TrainState, batch: dict, ptx_batch: dict | None, *, c: K2Config,
            cfg: ml_collections.ConfigDict, tx, schedule) -> tuple[ts.TrainState, dict]:
  """`batch`: tokens, targets, segment_ids, mask, engine_logprobs [B, T] and rewards [B], B = prompts x K
  (prompt-major). Returns the new state and the last update's metrics."""
  objective = rl_loss.get_objective(cfg.objective)
  fwd = functools.partial(rl_loss.token_logprobs, c=c, compute_dtype=params_lib.dtype_from_name(cfg.compute_dtype),
                          qat=cfg.qat, remat=cfg.remat, moe_impl=ts.moe_impl_of(cfg))
  mask = batch["mask"]
  logp_old_bt = jax.lax.stop_gradient(fwd(state.params, batch=batch)[0])

  def loss_fn(params):
    logp_bt, max_logits, load = fwd(params, batch=batch)
    pg, m = objective(logp_bt, logp_old_bt, mask, batch["rewards"], cfg.samples_per_prompt, cfg)
    m = {**m, "pg_loss": pg}
    total = pg
    if ptx_batch is not None:
      nll, (w, ptx_logits, ptx_load) = ts.loss_sums(params, c, ptx_batch, qat=cfg.qat, remat=cfg.remat,
                                                    moe_impl=ts.moe_impl_of(cfg),
                                                    compute_dtype=params_lib.dtype_from_name(cfg.compute_dtype))
      m["ptx_loss"] = nll / jnp.maximum(w, 1.0)
      total = pg + cfg.ptx_weight * m["ptx_loss"]
      max_logits = jax.tree.map(jnp.maximum, max_logits, ptx_logits)
      load = None if load is None else load + ptx_load
    return total, (m, max_logits, load)

  def update(state, _):
    (total, (m, max_logits, load)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, update_metrics = ts.apply_grads(state, grads, max_logits, load, c=c, cfg=cfg, tx=tx, schedule=schedule)
    return state, {"loss": total, **m, **update_metrics}

  # One compiled update, scanned: the metrics reported are the last update's.
  state, metrics = jax.lax.scan(update, state, None, length=cfg.updates_per_batch)
  metrics = jax.tree.map(lambda x: x[-1], metrics)
  # How far the engine's sampling log-probs are from the trainer's π_old (0 up to float error at T=1).
  n = jnp.maximum(jnp.sum(mask), 1.0)
  metrics["engine_logp_gap"] = jnp.sum(jnp.abs(batch["engine_logprobs"] - logp_old_bt) * mask) / n
  return state, metrics


def make_rl_step(c: K2Config, cfg: ml_collections.ConfigDict, tx, schedule):
  return jax.jit(functools.partial(rl_step, c=c, cfg=cfg, tx=tx, schedule=schedule), donate_argnums=(0,))
