"""The MoE layer: sigmoid router with aux-loss-free bias, dropless routed experts, shared expert."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from k2jax.config import K2Config
from k2jax import int4, sharding
from k2jax.int4 import QuantizedWeight
from k2jax.kernels import dispatch
from k2jax.kernels.gmm_xla import num_experts
from k2jax.layers import swiglu_mlp
from k2jax.sharding import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Routing:
  weights_tk: jax.Array   # fp32 combine weights, from the *unbiased* scores
  experts_tk: jax.Array   # int32 chosen experts
  scores_te: jax.Array    # fp32 sigmoid scores (unbiased), for balance losses and stats


def route(x_td: jax.Array, router_de: jax.Array, bias_e: jax.Array, c: K2Config) -> Routing:
  """DeepSeek-V3 `noaux_tc` routing: the bias picks experts, the plain sigmoid scores weight them."""
  logits_te = jnp.einsum("td,de->te", x_td.astype(jnp.float32), router_de.astype(jnp.float32))
  scores_te = jax.nn.sigmoid(logits_te)
  choice_te = scores_te + bias_e.astype(jnp.float32)
  if c.n_group > 1:
    T, E, G = x_td.shape[0], c.n_routed_experts, c.n_group
    grouped = choice_te.reshape(T, G, E // G)
    group_score_tg = jax.lax.top_k(grouped, 2)[0].sum(-1)
    _, keep_groups = jax.lax.top_k(group_score_tg, c.topk_group)
    group_mask_tg = jnp.zeros((T, G), bool).at[jnp.arange(T)[:, None], keep_groups].set(True)
    choice_te = jnp.where(jnp.repeat(group_mask_tg, E // G, axis=1), choice_te, -jnp.inf)
  _, experts_tk = jax.lax.top_k(choice_te, c.num_experts_per_tok)
  weights_tk = jnp.take_along_axis(scores_te, experts_tk, axis=-1)
  if c.norm_topk_prob:
    weights_tk = weights_tk / (weights_tk.sum(-1, keepdims=True) + 1e-20)
  weights_tk = weights_tk * c.routed_scaling_factor
  return Routing(weights_tk, experts_tk.astype(jnp.int32), scores_te)


def dense_weight(w):
  """A routed-expert weight as a dense array (INT4 weights dequantised)."""
  return w.dequantize(jnp.float32) if isinstance(w, QuantizedWeight) else w


def expert_mlp(x_md: jax.Array, experts: dict, group_sizes_e: jax.Array, out_dtype=None, tail: bool = True
               ) -> jax.Array:
  """SwiGLU of rows sorted by (local) expert; rows past sum(group_sizes) come out as zeros.

  The one place the expert weights are used (the dense reference aside), through the backend's grouped
  matmuls (`dispatch.grouped_swiglu`), so any weight format they accept (dense, INT4, or per-expert tuples
  from `split_experts`) works here, on one device or expert-parallel.
  `out_dtype` (default x's): fp32 for partial sums that are reduced afterwards (F split over devices).
  `tail` False: the caller knows every row is in a group (nothing to zero).
  """
  gate, up = (experts["gate_up_edf"], None) if "gate_up_edf" in experts else (experts["gate_edf"], experts["up_edf"])
  y_md = dispatch.grouped_swiglu(x_md, gate, up, experts["down_efd"], group_sizes_e, out_dtype=out_dtype)
  if not tail:
    return y_md
  valid_m = jnp.arange(x_md.shape[0]) < group_sizes_e.sum()
  return jnp.where(valid_m[:, None], y_md, jnp.zeros_like(y_md))


def split_experts(experts: dict, shards: int = 1, join: bool | None = None) -> dict:
  """Dense routed-expert stacks [E, K, N] as tuples of E per-expert arrays (decoding on CPU, where
  `dispatch.split_experts_for_decode` says so: each product then reads its expert's matrix in place
  instead of a copy sliced out of the stack), gate and up concatenated (`gate_up_edf`: [D, 2F] each, one
  product) unless `dispatch.join_gate_up_for_decode` (or `join`) says apart (`gate_edf`, `up_edf`). INT4
  weights stay stacked.

  `shards` > 1 (the experts split over that many devices, shard i owning experts i*E/n ... (i+1)*E/n - 1,
  as `expert_parallel` splits them): E/n arrays [n, K, N] instead, element j stacking every shard's local
  expert j, to be placed with the leading axis over the devices (`expert_parallel.split_experts`)."""
  if any(isinstance(w, QuantizedWeight) for w in experts.values()):
    return experts
  gate, up, down = experts["gate_edf"], experts["up_edf"], experts["down_efd"]
  E = gate.shape[0]
  if E % shards:
    raise ValueError(f"{E} experts do not split evenly over {shards} devices")
  local = E // shards
  if shards == 1:
    per_local = lambda w: tuple(w[e] for e in range(E))
  else:
    per_local = lambda w: tuple(w.reshape(shards, local, *w.shape[1:])[:, j] for j in range(local))
  if join is None:
    join = dispatch.join_gate_up_for_decode(gate, shards)
  if join:
    return {"gate_up_edf": per_local(jnp.concatenate([gate, up], axis=-1)), "down_efd": per_local(down)}
  return {"gate_edf": per_local(gate), "up_edf": per_local(up), "down_efd": per_local(down)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sort_rows(x_td, order_m, inv_m, k: int):
  """x_td[order // k]: each token's row once per chosen expert, in expert order. The gradient gathers
  the rows back by the inverse permutation and sums each token's k, instead of a scatter-add (a serial
  loop over the rows on XLA:CPU)."""
  return x_td[order_m // k]


def _sort_rows_fwd(x_td, order_m, inv_m, k):
  return _sort_rows(x_td, order_m, inv_m, k), (inv_m, x_td.shape[0])


def _sort_rows_bwd(k, res, g_md):
  inv_m, t = res
  g_td = g_md[inv_m].reshape(t, k, -1).astype(jnp.float32).sum(1).astype(g_md.dtype)
  return g_td, None, None


_sort_rows.defvjp(_sort_rows_fwd, _sort_rows_bwd)


@jax.custom_vjp
def _unsort_rows(y_md, order_m, inv_m):
  """y_md[inv]: rows back in (token, choice) order; the transpose of a permutation's gather is the gather
  by its inverse (not a scatter)."""
  return y_md[inv_m]


def _unsort_rows_fwd(y_md, order_m, inv_m):
  return _unsort_rows(y_md, order_m, inv_m), order_m


def _unsort_rows_bwd(order_m, g_md):
  return g_md[order_m], None, None


_unsort_rows.defvjp(_unsort_rows_fwd, _unsort_rows_bwd)


def routed_experts(x_td: jax.Array, r: Routing, experts: dict) -> jax.Array:
  """Dropless: sort the T*K (token, expert) pairs by expert, grouped matmuls, unsort, combine in fp32.
  Sorting and unsorting are gathers both ways (forward and gradient), by the order and its inverse."""
  T, K = r.experts_tk.shape
  E = num_experts(experts["down_efd"])
  flat_e = r.experts_tk.reshape(-1)
  order = jnp.argsort(flat_e, stable=True).astype(jnp.int32)
  inv = jnp.zeros_like(order).at[order].set(jnp.arange(T * K, dtype=jnp.int32), unique_indices=True)
  group_sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)
  # Every row belongs to a group here (sum(group_sizes) = T * K): no tail to zero.
  y_md = expert_mlp(_sort_rows(x_td, order, inv, K), experts, group_sizes, tail=False)
  y_tkd = _unsort_rows(y_md, order, inv).reshape(T, K, -1)
  out = jnp.einsum("tkd,tk->td", y_tkd.astype(jnp.float32), r.weights_tk)
  return out.astype(x_td.dtype)


def routed_experts_dense(x_td: jax.Array, r: Routing, experts: dict) -> jax.Array:
  """Reference: every expert on every token, combined by a one-hot weight matrix. O(T*E), tests only."""
  E = experts["gate_edf"].shape[0]
  combine_te = jnp.einsum("tk,tke->te", r.weights_tk, jax.nn.one_hot(r.experts_tk, E, dtype=jnp.float32))
  gate, up, down = (dense_weight(experts[k]).astype(x_td.dtype) for k in ("gate_edf", "up_edf", "down_efd"))
  h = jax.nn.silu(jnp.einsum("td,edf->tef", x_td, gate)) * jnp.einsum("td,edf->tef", x_td, up)
  y_ted = jnp.einsum("tef,efd->ted", h, down)
  return jnp.einsum("ted,te->td", y_ted.astype(jnp.float32), combine_te).astype(x_td.dtype)


def fake_quant_experts(experts: dict, mode: str) -> dict:
  """QAT: dequant(quant(w)) on dense expert weights, straight-through gradient (the serving quantiser)."""
  return {k: w if isinstance(w, QuantizedWeight) else int4.fake_quant(w, mode=mode) for k, w in experts.items()}


def sequence_aux_loss(
    scores_bte: jax.Array, topk_idx_btk: jax.Array, alpha: float = 1e-4,
    mask_bt: jax.Array | None = None,
) -> jax.Array:
  """DeepSeek-V3 sequence-wise balance loss, averaged over sequences (one MoE layer).

  Per sequence of T tokens, E experts, top-K: s'_t = s_t / sum_e s_t (affinities normalised per
  token), P_e = mean_t s'_{t,e}, f_e = E / (K T) * #{t : e in topk_t}; loss = alpha * sum_e f_e P_e.
  Equals alpha when routing and affinities are uniform. mask_bt (1 = real token) drops padding.
  """
  b, t, e = scores_bte.shape
  k = topk_idx_btk.shape[-1]
  s_bte = scores_bte.astype(jnp.float32)
  s_bte = s_bte / (jnp.sum(s_bte, axis=-1, keepdims=True) + 1e-20)
  m_bt = jnp.ones((b, t), jnp.float32) if mask_bt is None else mask_bt.astype(jnp.float32)
  n_b = jnp.maximum(jnp.sum(m_bt, axis=-1), 1.0)
  chosen_bte = jnp.sum(jax.nn.one_hot(topk_idx_btk, e, dtype=jnp.float32), axis=-2)
  f_be = e / (k * n_b[:, None]) * jnp.einsum("bte,bt->be", chosen_bte, m_bt)
  p_be = jnp.einsum("bte,bt->be", s_bte, m_bt) / n_b[:, None]
  return alpha * jnp.mean(jnp.sum(f_be * p_be, axis=-1))


def _opaque_kernels_mesh():
  """(mesh, rules) of the enclosing `sharding.use_mesh` when it spans several devices and the grouped
  matmuls there are kernels XLA cannot partition (`expert_parallel.opaque_kernels`), else None."""
  ctx = sharding.current()
  if ctx is None or ctx[0].size <= 1:
    return None
  from k2jax import expert_parallel  # noqa: PLC0415  (it imports this module)
  return ctx if expert_parallel.opaque_kernels(ctx[0]) else None


def moe(p: dict, x_btd: jax.Array, c: K2Config, valid_bt: jax.Array, impl: str = "ragged",
        fake_quant: str | None = None, aux_alpha: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Returns (output [B, T, D], tokens routed to each expert [E] over the valid tokens, fp32,
  sequence-wise balance loss (0 unless `aux_alpha`; each batch row counts as one sequence)).

  `fake_quant` ("clamp7" / "full8"): quantisation-aware training of the routed experts.
  """
  B, T, D = x_btd.shape
  x_td = x_btd.reshape(B * T, D)
  r = route(x_td, p["router_de"], p["router_bias_e"], c)
  experts = fake_quant_experts(p["experts"], fake_quant) if fake_quant else p["experts"]
  if impl in ("ep", "ep_a2a"):  # experts split over the `expert` axis of the current mesh
    from k2jax import expert_parallel  # noqa: PLC0415  (it imports this module)
    run = expert_parallel.routed_experts_fn(impl)
  elif impl == "ragged" and (ctx := _opaque_kernels_mesh()) is not None:  # tokens split, every expert
    from k2jax import expert_parallel  # noqa: PLC0415
    run = functools.partial(expert_parallel.routed_experts_local, mesh=ctx[0], rules=ctx[1])
  else:
    run = {"ragged": routed_experts, "dense": routed_experts_dense}[impl]
  routed_td = run(x_td, r, experts)
  out = constrain(routed_td.reshape(B, T, D), ("batch", "seq", "embed")) + swiglu_mlp(x_btd, p["shared"])
  valid_tk = jnp.broadcast_to(valid_bt.reshape(-1, 1), r.experts_tk.shape).astype(jnp.float32)
  load_e = jnp.bincount(r.experts_tk.reshape(-1), weights=valid_tk.reshape(-1), length=c.n_routed_experts)
  aux = jnp.zeros((), jnp.float32)
  if aux_alpha:
    aux = sequence_aux_loss(r.scores_te.reshape(B, T, -1), r.experts_tk.reshape(B, T, -1), aux_alpha, valid_bt)
  return out, jax.lax.stop_gradient(load_e), aux
