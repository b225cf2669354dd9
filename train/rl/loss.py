"""RL objectives as pure functions of per-token log-probs, masks and rewards.

Rows come in groups of K consecutive samples of one prompt ([P*K] rows, prompt-major). Masks are 1
on the response tokens the policy sampled and 0 on the prompt, tool outputs and padding.

- `k2`: Kimi k1.5 / K2, mean_i (r_i - r̄ - τ·(log π_θ(y_i|x) - log π_old(y_i|x)))², sequence log-probs
  summed over masked tokens, r̄ the group's mean reward. No value network, no clipping.
- `grpo`: group-normalised advantages (r_i - mean r)/std r, PPO-style clipped ratio per token,
  averaged per sequence then over sequences.

Every objective has the signature `(logp_bt, logp_old_bt, mask_bt, rewards_b, group_size, cfg) ->
(loss, metrics)`; `OBJECTIVES` maps names to them, the seam for new objectives.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.config import K2Config
from k2jax.train import train_step as ts


def token_logprobs(params: dict, c: K2Config, batch: dict, *, compute_dtype=jnp.float32, qat: bool = False,
                   remat: str = "none", moe_impl: str = "ragged", layer_loop: str = "auto"):
  """(log π(target_t | tokens_≤t) [B, T] fp32, max attention logits, expert load) with the train step's
  forward (`train_step.loss_forward`: compute dtype, fake-quantised experts under QAT, its layer loop)
  and head (`token_nll`: 2-D products over the B*T rows, no [B, T, V] log-softmax kept)."""
  p, out = ts.loss_forward(params, c, batch, compute_dtype=compute_dtype, qat=qat, remat=remat,
                           moe_impl=moe_impl, layer_loop=layer_loop)
  return -ts.token_nll(out.hidden, p["lm_head_dv"], batch["targets"]), out.max_attn_logits, out.expert_load


def _groups(x_b: jax.Array, group_size: int) -> jax.Array:
  if x_b.shape[0] % group_size:
    raise ValueError(f"{x_b.shape[0]} rows do not split into groups of {group_size}")
  return x_b.reshape(-1, group_size)


def k2_loss(logp_bt, logp_old_bt, mask_bt, rewards_b, group_size: int, cfg) -> tuple[jax.Array, dict]:
  """K2's squared-residual policy loss; τ = cfg.tau."""
  if group_size < 2:
    raise ValueError(f"the k2 objective needs K >= 2 samples per prompt (its baseline is their mean reward), "
                     f"got K={group_size}")
  mask = mask_bt.astype(jnp.float32)
  delta_b = jnp.sum((logp_bt - logp_old_bt) * mask, axis=-1)
  r_pk = _groups(rewards_b.astype(jnp.float32), group_size)
  adv_pk = r_pk - jnp.mean(r_pk, axis=-1, keepdims=True)
  resid_pk = adv_pk - cfg.tau * _groups(delta_b, group_size)
  return jnp.mean(jnp.square(resid_pk)), {"kl_old": jnp.mean(delta_b)}


def grpo_loss(logp_bt, logp_old_bt, mask_bt, rewards_b, group_size: int, cfg) -> tuple[jax.Array, dict]:
  """GRPO with a clipped per-token ratio (ε = cfg.clip_eps); no reference-policy KL."""
  if group_size < 2:
    raise ValueError(f"grpo needs K >= 2 samples per prompt, got K={group_size}")
  mask = mask_bt.astype(jnp.float32)
  r_pk = _groups(rewards_b.astype(jnp.float32), group_size)
  adv_pk = (r_pk - jnp.mean(r_pk, axis=-1, keepdims=True)) / (jnp.std(r_pk, axis=-1, keepdims=True) + 1e-6)
  adv_b1 = adv_pk.reshape(-1, 1)
  ratio_bt = jnp.exp(logp_bt - logp_old_bt)
  clipped_bt = jnp.clip(ratio_bt, 1 - cfg.clip_eps, 1 + cfg.clip_eps)
  obj_bt = jnp.minimum(ratio_bt * adv_b1, clipped_bt * adv_b1)
  per_seq_b = jnp.sum(obj_bt * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  delta_b = jnp.sum((logp_bt - logp_old_bt) * mask, axis=-1)
  clip_frac = jnp.sum((jnp.abs(ratio_bt - 1) > cfg.clip_eps) * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  return -jnp.mean(per_seq_b), {"kl_old": jnp.mean(delta_b), "clip_frac": clip_frac}


Objective = Callable[..., tuple[jax.Array, dict]]
OBJECTIVES: dict[str, Objective] = {"k2": k2_loss, "grpo": grpo_loss}


def get_objective(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"unknown RL objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
  return OBJECTIVES[name]


# ------------------------------------------------------------------ reward shaping (host side)


def length_penalty(lengths_pk: np.ndarray, correct_pk: np.ndarray) -> np.ndarray:
  """Kimi k1.5's length reward per group: λ = 0.5 - (len - min)/(max - min); λ for a correct answer,
  min(0, λ) for a wrong one; 0 when all K lengths are equal."""
  lengths = np.asarray(lengths_pk, np.float64)
  lo, hi = lengths.min(-1, keepdims=True), lengths.max(-1, keepdims=True)
  lam = np.where(hi > lo, 0.5 - (lengths - lo) / np.maximum(hi - lo, 1e-9), 0.0)
  return np.where(np.asarray(correct_pk, bool), lam, np.minimum(0.0, lam))


def shaped_rewards(env_rewards_pk, correct_pk, lengths_pk, truncated_pk, *, length_weight: float,
                   truncation_penalty: float) -> np.ndarray:
  """Env reward + length_weight·length penalty; a response cut at its token budget scores 0 minus
  `truncation_penalty` (it never finished, so its answer does not count)."""
  r = np.asarray(env_rewards_pk, np.float64)
  if length_weight:
    r = r + length_weight * length_penalty(lengths_pk, correct_pk)
  truncated = np.asarray(truncated_pk, bool)
  return np.where(truncated, -truncation_penalty, r).astype(np.float32)
