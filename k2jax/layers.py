"""Small building blocks: RMSNorm, projections and the SwiGLU MLP."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """Normalises in fp32, casts back to the input dtype, then multiplies by the gain (reference order)."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale * x32.astype(x.dtype)


def project(x: jax.Array, w: jax.Array, contract: int = 1, out_major: bool = False) -> jax.Array:
  """x [..., *w.shape[:contract]] times w, as one 2-D matmul over the flattened rows: [..., *w.shape[contract:]].
  `out_major`: w stored the other way round, [*out, *in] (`output_major_name`), contracted on its minor axes.

  The same products as the einsum (bit for bit), but XLA:CPU ran the einsum's backward over 3-D
  operands 1.3-2x slower (it materialises transposed copies for the weight gradient)."""
  split = w.ndim - contract if out_major else contract
  k_shape, n_shape = (w.shape[split:], w.shape[:split]) if out_major else (w.shape[:split], w.shape[split:])
  lead = x.shape[:x.ndim - contract]
  if x.shape[x.ndim - contract:] != k_shape:
    raise ValueError(f"{x.shape} does not contract with {w.shape} over {contract} axes")
  k = math.prod(k_shape)
  x_mk = x.reshape(-1, k)
  y_mn = jnp.dot(x_mk, w.reshape(-1, k).T) if out_major else jnp.dot(x_mk, w.reshape(k, -1))
  return y_mn.reshape(*lead, *n_shape)


def output_major_name(name: str, contract: int = 1) -> str:
  """A weight's name with its input axes moved last: `gate_df` -> `gate_fd`, `o_nhd` (2 input axes) -> `o_dnh`."""
  prefix, axes = name.rsplit("_", 1)
  return f"{prefix}_{axes[contract:]}{axes[:contract]}"


def output_major(w: jax.Array, contract: int = 1) -> jax.Array:
  """w [*in, *out] stored [*out, *in] (its `output_major_name`), each output one contiguous row."""
  return jnp.transpose(w, (*range(contract, w.ndim), *range(contract)))


def weight(p: dict, name: str, contract: int = 1) -> tuple[jax.Array, bool]:
  """(p's weight `name` [*in, *out], or its output-major copy where p holds that instead, out_major): what
  `project` takes. The engine's decode weights store some [*out, *in] (`model.output_major_layers`)."""
  if name in p:
    return p[name], False
  return p[output_major_name(name, contract)], True


def input_major(p: dict, name: str, contract: int = 1) -> jax.Array:
  """p's weight `name` [*in, *out], an output-major copy transposed back: for weights folded per call."""
  w, out_major = weight(p, name, contract)
  return output_major(w, w.ndim - contract) if out_major else w  # [*out, *in] -> [*in, *out]


def linear(x: jax.Array, p: dict, name: str, contract: int = 1) -> jax.Array:
  """`project` of x by p's weight `name`, in whichever layout p stores it (`weight`)."""
  w, out_major = weight(p, name, contract)
  return project(x, w, contract, out_major)


def swiglu_mlp(x_btd: jax.Array, p: dict) -> jax.Array:
  """down(silu(gate(x)) * up(x)) for a dense or shared-expert MLP {gate_df, up_df, down_fd} (or output-major)."""
  gate = linear(x_btd, p, "gate_df")
  up = linear(x_btd, p, "up_df")
  return linear(jax.nn.silu(gate) * up, p, "down_fd")
