"""MuonClip's optimizer step: Muon on matrix leaves, AdamW on the rest, nothing on the router bias.

Muon (per matrix W of shape n x m, heavy-ball momentum as in Moonlight/K2):
  M <- mu M + G;  O = NS5(G + mu M) (Nesterov) or NS5(M);  W <- W - lr (rms_scale sqrt(max(n, m)) O + wd W)
so every Muon matrix gets an update of RMS ~ rms_scale * lr, matched to AdamW's typical update RMS.
QK-Clip runs after this step on the new weights (see qk_clip.py).

Not built on optax.contrib.muon: its momentum is a bias-corrected EMA and its parameter routing is by
ndim; here the momentum form, the Newton-Schulz normalisation and the leaf -> matrix map are explicit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from k2jax.params import path_str
from k2jax.train.optimizer_map import LeafPlan, build_optimizer_map, optimizer_labels

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz (a, b, c)
NS_EPS = 1e-7

_partition = getattr(optax, "partition", None) or optax.multi_transform


# On CPU a stack of matrices goes through the iteration a few at a time: a whole stack falls out of cache,
# and a single small matrix leaves the bf16 products short of work. Groups of ~3 MB (fp32) measured best on
# a quiet machine: 6 expert matrices of 512 x 256 (small benchmark width) or 2 of 1024 x 288 (medium); the
# medium MuonClip step 0.94x, the small 0.95x against one matrix at a time; a 4 MB matrix goes alone.
NS_CPU_GROUP_BYTES = 3 << 20
NS_DTYPES = ("float32", "bfloat16")
MATRICES = ("muon", "adamw")  # what the 2-D weights get: MuonClip, or AdamW like the rest
NS_DTYPE = "bfloat16"  # the default: the reference Muon implementations' dtype (see `muonclip`)


def newton_schulz5(m: jax.Array, steps: int = 5, eps: float = NS_EPS, dtype: str = "float32") -> jax.Array:
  """Approximate U V^T of each matrix in `m` [..., rows, cols] (fp32 out).

  X <- a X + (b A + c A^2) X with A = X X^T, started from X = m / (|m|_F + eps); run on the
  orientation where A is the smaller Gram matrix. Singular values land in roughly [0.7, 1.2], not at 1.
  `dtype` "bfloat16" keeps X and every product in bf16 (fp32 accumulation), as the reference Muon
  implementations (Keller Jordan's, Moonlight's) do; "float32" runs it all in fp32.
  On CPU a stack of matrices goes through in groups of about `NS_CPU_GROUP_BYTES` (same result).
  """
  if dtype not in NS_DTYPES:
    raise ValueError(f"Newton-Schulz dtype must be one of {NS_DTYPES}, got {dtype!r}")
  group = _cpu_group(m)
  if group:
    return _in_groups((lambda x: _newton_schulz5(x, steps, eps, dtype),), (m.astype(jnp.float32),), group)[0]
  return _newton_schulz5(m, steps, eps, dtype)


def momentum_newton_schulz5(mom: jax.Array, g: jax.Array, momentum: float, nesterov: bool, steps: int = 5,
                            eps: float = NS_EPS, dtype: str = "float32") -> tuple[jax.Array, jax.Array]:
  """(mu M + G, NS5 of G + mu (mu M + G) (Nesterov) or of mu M + G) for matrix stacks [..., rows, cols],
  fp32. On CPU a stack goes through in the groups of `newton_schulz5`, each group's momentum computed,
  stored over the old momentum and orthogonalised in the same loop step, the result stored over the
  gradient: no pass over the whole stacks for the momentum or the Nesterov direction (at the small
  benchmark width two passes over 84 MB per expert leaf). Same arithmetic either way."""

  stages = (lambda m, g: momentum * m + g,  # the new momentum, over the old
            lambda m, g: _newton_schulz5(g + momentum * m if nesterov else m, steps, eps, dtype))  # over g
  g = g.astype(jnp.float32)
  group = _cpu_group(g)
  if group:
    return _in_groups(stages, (mom, g), group)
  mom = stages[0](mom, g)
  return mom, stages[1](mom, g)


def _cpu_group(m: jax.Array) -> int:
  """Matrices per group on CPU for a stack that goes through in groups, else 0."""
  group = max(1, NS_CPU_GROUP_BYTES // (4 * m.shape[-2] * m.shape[-1]))
  if m.ndim > 2 and m.size // (m.shape[-2] * m.shape[-1]) > group and jax.default_backend() == "cpu":
    return group
  return 0


def _in_groups(stages: tuple, bufs: tuple, group: int) -> tuple:
  """Matrix stacks `bufs` [..., r, c] updated in place, `group` matrices at a time (loop carries: no
  zero-filled output stacks, as `lax.map` would allocate): stage k maps the group's slices of every buffer
  to the new slice of buffer k. Each stage reads the slices after the earlier stages' stores: a slice
  read before a store into its buffer, and used after it, makes XLA copy the whole buffer every step."""
  shape = bufs[0].shape
  bufs = [b.reshape(-1, *shape[-2:]) for b in bufs]
  total = bufs[0].shape[0]
  n = total // group

  def run(bufs, start, size):
    for k, stage in enumerate(stages):
      xs = [jax.lax.dynamic_slice_in_dim(b, start, size) for b in bufs]
      y = stage(*[x[0] for x in xs]) if size == 1 else stage(*xs)
      bufs[k] = jax.lax.dynamic_update_slice_in_dim(bufs[k], y.reshape(size, *shape[-2:]), start, 0)
    return bufs

  bufs = jax.lax.fori_loop(0, n, lambda i, bufs: run(list(bufs), i * group, group), bufs)
  if n * group < total:  # the last, partial group
    bufs = run(list(bufs), n * group, total - n * group)
  return tuple(b.reshape(shape) for b in bufs)


def _newton_schulz5(m: jax.Array, steps: int, eps: float, dtype: str = "float32") -> jax.Array:
  if dtype != "float32":
    return _newton_schulz5_lowp(m, steps, eps, jnp.dtype(dtype))
  a, b, c = NS_COEFFS
  x = m.astype(jnp.float32)
  tall = x.shape[-2] > x.shape[-1]
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + eps)

  def step(_, x):
    gram = jnp.matmul(x, jnp.swapaxes(x, -1, -2))
    return a * x + jnp.matmul(b * gram + c * jnp.matmul(gram, gram), x)

  x = jax.lax.fori_loop(0, steps, step, x)  # a loop, not unrolled: half the compile time
  return jnp.swapaxes(x, -1, -2) if tall else x


def _newton_schulz5_lowp(m: jax.Array, steps: int, eps: float, dt) -> jax.Array:
  """The same iteration with Y and every product's operands in `dt` (fp32 accumulation), on the tall
  orientation Y [n, k] (n >= k): A = Y^T Y, Y <- a Y + Y (b A + c A^2).

  Y^T is carried next to Y (one transpose copy per iteration) because XLA:CPU multiplies bf16 natively
  only when both operands are row-major [M, K] @ [K, N]; a transposed operand (Y^T Y, X X^T) makes it
  upcast the whole product to fp32, at a third of the rate. Expert matrices [d, f] are already tall, so
  they go in and out without a transpose."""
  a, b, c = NS_COEFFS
  y = m.astype(jnp.float32)
  wide = y.shape[-2] < y.shape[-1]
  if wide:
    y = jnp.swapaxes(y, -1, -2)
  y = (y / (jnp.linalg.norm(y, axis=(-2, -1), keepdims=True) + eps)).astype(dt)

  def matmul(p, q):
    return jnp.matmul(p, q, preferred_element_type=jnp.float32)

  def step(_, carry):
    y, y_t = carry
    gram = matmul(y_t, y).astype(dt)
    poly = (b * gram.astype(jnp.float32) + c * matmul(gram, gram)).astype(dt)
    y = (a * y.astype(jnp.float32) + matmul(y, poly)).astype(dt)
    return y, jnp.swapaxes(y, -1, -2)

  y, _ = jax.lax.fori_loop(0, steps, step, (y, jnp.swapaxes(y, -1, -2)))
  y = y.astype(jnp.float32)
  return jnp.swapaxes(y, -1, -2) if wide else y


def muon_direction(mom: jax.Array, g: jax.Array, plan: LeafPlan, momentum: float, nesterov: bool,
                   ns_steps: int = 5, rms_scale: float = 0.2, ns_dtype: str = NS_DTYPE) -> tuple[jax.Array, jax.Array]:
  """(new momentum, rms_scale * sqrt(max(n, m)) * NS5 of each matrix's direction), in the leaf's shape."""
  *_, rows, cols = plan.matrix_shape
  mom, o = momentum_newton_schulz5(mom.reshape(plan.matrix_shape), g.reshape(plan.matrix_shape), momentum,
                                   nesterov, ns_steps, dtype=ns_dtype)
  return mom.reshape(plan.shape), (rms_scale * max(rows, cols) ** 0.5 * o).reshape(plan.shape)


class MuonState(NamedTuple):
  momentum: Any  # fp32 tree like the Muon leaves


def scale_by_muon_matrices(
    plans_for: Callable[[Any], Mapping[str, LeafPlan]],
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    rms_scale: float = 0.2,
    ns_dtype: str = NS_DTYPE,
) -> optax.GradientTransformation:
  """Momentum + Newton-Schulz direction per matrix; `plans_for(tree)` gives each leaf's matrix view."""

  def init_fn(params):
    return MuonState(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

  def update_fn(updates, state, params=None):
    del params
    plans = plans_for(updates)
    both = jax.tree_util.tree_map_with_path(
        lambda kp, m, g: muon_direction(m, g, plans[path_str(kp)], momentum, nesterov, ns_steps, rms_scale,
                                        ns_dtype), state.momentum, updates)
    mom, out = (jax.tree.map(lambda _, b, i=i: b[i], updates, both) for i in (0, 1))
    return out, MuonState(mom)

  return optax.GradientTransformation(init_fn, update_fn)


def _in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Run `inner` on fp32 gradients with fp32 state, whatever the parameter dtype."""

  def init_fn(params):
    return inner.init(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

  def update_fn(updates, state, params=None):
    return inner.update(jax.tree.map(lambda u: u.astype(jnp.float32), updates), state, params)

  return optax.GradientTransformation(init_fn, update_fn)


def _cast_like_params() -> optax.GradientTransformation:
  """Hand updates back in each parameter's dtype (the math above runs in fp32)."""

  def f(updates, params):
    if params is None:
      return updates
    return jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params)

  return optax.stateless(f)


def muonclip(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    rms_scale: float = 0.2,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
    optimizer_map: Mapping[str, LeafPlan] | None = None,
    matrices: str = "muon",
    ns_dtype: str = NS_DTYPE,
) -> optax.GradientTransformation:
  """K2's optimizer step as one optax transformation; `update` needs `params` (weight decay).

  optimizer_map: {path: LeafPlan} from `build_optimizer_map(params, rules)`; None builds it from the
  default rules. Both AdamW and Muon use the same learning rate (or schedule) and decoupled decay
  `lr * weight_decay * W`. Apply QK-Clip to the new params afterwards.

  matrices: "muon", or "adamw" to give the matrix leaves AdamW too (RL: Muon's update has a fixed size
  whatever the gradient's signal-to-noise, AdamW's shrinks where noisy gradients cancel in its momentum).

  ns_dtype: the Newton-Schulz iteration's dtype, "bfloat16" (the default, as the reference Muon
  implementations run it: ~2.3x faster than fp32 on a CPU with bf16 matrix units, and on accelerators;
  the result differs from fp32's by ~1% relative, see tests) or "float32" (the fp32 iteration, exact).
  """
  if matrices not in MATRICES:
    raise ValueError(f"matrices must be one of {MATRICES}, got {matrices!r}")
  if ns_dtype not in NS_DTYPES:
    raise ValueError(f"ns_dtype must be one of {NS_DTYPES}, got {ns_dtype!r}")

  def plans_for(tree):
    return optimizer_map if optimizer_map is not None else build_optimizer_map(tree)

  muon = optax.chain(
      scale_by_muon_matrices(plans_for, momentum, nesterov, ns_steps, rms_scale, ns_dtype),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
  adamw = _in_float32(optax.chain(
      optax.scale_by_adam(b1=adam_b1, b2=adam_b2, eps=adam_eps),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  ))
  return optax.chain(
      _partition(
          {"muon": muon, "adamw": adamw, "none": optax.set_to_zero()},
          lambda params: jax.tree.map(lambda o: "adamw" if o == "muon" and matrices == "adamw" else o,
                                      optimizer_labels(params, optimizer_map)),
      ),
      _cast_like_params(),
  )
