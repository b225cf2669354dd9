"""Token sampling: greedy, temperature, top-k and top-p, with an explicit RNG key."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0            # 0: no top-k cut
  top_p: float = 1.0        # 1: no nucleus cut

  def __post_init__(self):
    if not (self.temperature >= 0 and math.isfinite(self.temperature)):  # NaN fails every comparison
      raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


def sample(logits_bv: jax.Array, key: jax.Array, sp: SamplingParams) -> jax.Array:
  """Next token per row [B] int32."""
  return sample_with_logprob(logits_bv, key, sp)[0]


def sample_with_logprob(logits_bv: jax.Array, key: jax.Array, sp: SamplingParams) -> tuple[jax.Array, jax.Array]:
  """Next token per row [B] int32 and its log-probability [B] fp32 under the distribution it was drawn
  from (temperature, top-k and top-p applied); greedy decoding reports the temperature-1 log-probability."""
  logits_bv = sampling_logits(logits_bv, sp)
  if sp.temperature == 0:
    token_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  else:
    token_b = jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)
  logp_bv = jax.nn.log_softmax(logits_bv, axis=-1)
  return token_b, jnp.take_along_axis(logp_bv, token_b[:, None], axis=-1)[:, 0]


def sampling_logits(logits_bv: jax.Array, sp: SamplingParams) -> jax.Array:
  """fp32 logits of the distribution tokens are drawn from (cut tokens at -inf)."""
  logits_bv = logits_bv.astype(jnp.float32)
  if sp.temperature == 0:
    return logits_bv
  logits_bv = logits_bv / sp.temperature
  if sp.top_k:
    kth = jax.lax.top_k(logits_bv, sp.top_k)[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
  if sp.top_p < 1:
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_bv, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < sp.top_p, sorted_bv, jnp.inf), axis=-1, keepdims=True)
    logits_bv = jnp.where(logits_bv < cutoff, -jnp.inf, logits_bv)
  return logits_bv
