"""Expert parallelism: routed experts split over the `expert` mesh axis with shard_map.

Each `expert` shard holds E/n consecutive experts ([E/n, D, F] slices of every expert weight; an INT4
weight pytree splits the same way along its leading expert axis). Two ways to bring tokens to them:

  allgather   every shard gathers the tokens of its `expert` group, runs the (token, expert) pairs
              that chose one of its experts, and a reduce-scatter sums the partial outputs back to the
              tokens' owners. Only all-gather / reduce-scatter: runs everywhere, CPU included, but each
              shard's grouped matmul is sized for all T*K gathered pairs.
  all_to_all  each shard sends exactly the pairs routed to each peer with `jax.lax.ragged_all_to_all`,
              the peers run them and send the results back the same way. XLA:CPU has no ragged
              all-to-all; on CPU an equivalent made of a dense all-to-all of padded chunks stands in
              (same results, for tests), on GPU/TPU the real collective is used.

Both are dropless (receive buffers sized for the worst case) and match `moe.routed_experts`.
If `tensor` > 1 the expert MLP hidden dim F is split over it as well and the outputs psum'd.
"""
from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from k2jax import moe, sharding
from k2jax.kernels import dispatch
from k2jax.kernels.gmm_xla import num_experts

EXPERT_AXIS, TENSOR_AXIS = "expert", "tensor"
DISPATCHES = ("allgather", "all_to_all")
_IMPLS = {"ep": "allgather", "ep_a2a": "all_to_all"}


def _local_expert_count(experts: dict) -> int:
  return num_experts(experts["down_efd"])


def _local_view(experts: dict) -> dict:
  """Inside shard_map: the per-expert layout's local [1, K, N] arrays as [K, N] (a bitcast: each product
  reads its expert's matrix in place); stacks as they are."""
  return {k: tuple(a[0] for a in w) if isinstance(w, tuple) else w for k, w in experts.items()}


def _run_sorted(x_sd: jax.Array, src_m: jax.Array, local_e_m: jax.Array, experts: dict,
                partial: bool = False) -> jax.Array:
  """Pairs (row src_m of x, local expert id; E_local = not here) -> outputs [M, D] in pair order.

  `partial`: F is split over `tensor`, so these are partial sums, kept in fp32 until the psum (bf16
  partials would add one rounding per shard)."""
  E = _local_expert_count(experts)
  order_m = jnp.argsort(local_e_m, stable=True)
  group_sizes_e = jnp.bincount(local_e_m, length=E + 1)[:E].astype(jnp.int32)
  y_sorted = moe.expert_mlp(x_sd[src_m[order_m]], experts, group_sizes_e, jnp.float32 if partial else None)
  return jnp.zeros_like(y_sorted).at[order_m].set(y_sorted)


# --- dispatch: all-gather + reduce-scatter --------------------------------------------------------

def _allgather_body(x_td, weights_tk, experts_tk, experts, *, tokens_split: bool, tensor: bool):
  experts = _local_view(experts)
  if tokens_split:  # the tokens of the whole `expert` group, in shard order
    x_td, weights_tk, experts_tk = (jax.lax.all_gather(a, EXPERT_AXIS, tiled=True)
                                    for a in (x_td, weights_tk, experts_tk))
  T, K = experts_tk.shape
  E = _local_expert_count(experts)
  local_tk = experts_tk - jax.lax.axis_index(EXPERT_AXIS) * E
  mine_tk = (local_tk >= 0) & (local_tk < E)
  local_m = jnp.where(mine_tk, local_tk, E).reshape(-1)
  y_md = _run_sorted(x_td, jnp.arange(T * K) // K, local_m, experts, partial=tensor)
  w_m = jnp.where(mine_tk, weights_tk, 0.0).reshape(-1, 1)
  y_td = (y_md.astype(jnp.float32) * w_m).reshape(T, K, -1).sum(1)
  if tokens_split:
    y_td = jax.lax.psum_scatter(y_td, EXPERT_AXIS, scatter_dimension=0, tiled=True)
  else:
    y_td = jax.lax.psum(y_td, EXPERT_AXIS)
  if tensor:
    y_td = jax.lax.psum(y_td, TENSOR_AXIS)
  return y_td


# --- dispatch: ragged all-to-all ------------------------------------------------------------------

def _exclusive_cumsum(a, axis=0):
  return jnp.cumsum(a, axis=axis) - a


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
  """`jax.lax.ragged_all_to_all` from a dense all-to-all of padded chunks (for backends without it).

  Chunk j of `operand` (rows input_offsets[j] : + send_sizes[j]) lands in peer j's `output` at
  output_offsets[j]; rows of `output` that nothing lands on keep their value.
  """
  n = input_offsets.shape[0]
  M = operand.shape[0]
  row_m = jnp.arange(M)
  pad = jnp.concatenate([operand, jnp.zeros_like(operand)], axis=0)  # so every slice of M rows exists
  chunks = jax.vmap(lambda start: jax.lax.dynamic_slice_in_dim(pad, start, M, axis=0))(input_offsets)
  got = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=False)       # got[i] = chunk peer i sent me
  got_offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
  # Row r of chunk i goes to got_offsets[i] + r when r < recv_sizes[i]; others to an out-of-range row.
  dest = jnp.where(row_m[None, :] < recv_sizes[:, None], got_offsets[:, None] + row_m[None, :], output.shape[0])
  return output.at[dest.reshape(-1)].set(got.reshape(n * M, *operand.shape[1:]), mode="drop")


def _ragged_all_to_all(*args, axis_name, emulate: bool):
  fn = emulated_ragged_all_to_all if emulate else jax.lax.ragged_all_to_all
  return fn(*args, axis_name=axis_name)


def _all_to_all_body(x_td, weights_tk, experts_tk, experts, *, n: int, tensor: bool, emulate: bool):
  experts = _local_view(experts)
  T, K = experts_tk.shape
  E = _local_expert_count(experts)
  M = T * K
  a2a = functools.partial(_ragged_all_to_all, axis_name=EXPERT_AXIS, emulate=emulate)
  flat_e = experts_tk.reshape(-1)
  order_m = jnp.argsort(flat_e, stable=True)              # by expert, hence by owning shard
  sorted_e = flat_e[order_m]
  send_n = jnp.bincount(flat_e // E, length=n).astype(jnp.int32)
  sent_nn = jax.lax.all_gather(send_n, EXPERT_AXIS)       # [sender, receiver] pair counts
  me = jax.lax.axis_index(EXPERT_AXIS)
  in_off_n = _exclusive_cumsum(send_n)
  out_off_n = _exclusive_cumsum(sent_nn, axis=0)[me]      # where my chunk starts in each receiver
  recv_n = sent_nn[:, me]
  # There: pairs and their local expert ids; the buffer holds the worst case (all n*M pairs here).
  x_recv = a2a(x_td[order_m // K], jnp.zeros((n * M, x_td.shape[1]), x_td.dtype),
               in_off_n, send_n, out_off_n, recv_n)
  e_recv = a2a(sorted_e % E, jnp.full((n * M,), E, sorted_e.dtype), in_off_n, send_n, out_off_n, recv_n)
  y_recv = _run_sorted(x_recv, jnp.arange(n * M), e_recv, experts, partial=tensor)
  # Back: each chunk returns to where its sender took it from.
  y_sorted = a2a(y_recv, jnp.zeros((M, y_recv.shape[1]), y_recv.dtype),
                 _exclusive_cumsum(recv_n), recv_n, _exclusive_cumsum(sent_nn, axis=1)[:, me], send_n)
  y_md = jnp.zeros_like(y_sorted).at[order_m].set(y_sorted)
  y_td = jnp.einsum("tkd,tk->td", y_md.reshape(T, K, -1).astype(jnp.float32), weights_tk)
  if tensor:
    y_td = jax.lax.psum(y_td, TENSOR_AXIS)
  return y_td


# --- entry points ---------------------------------------------------------------------------------

def opaque_kernels(mesh) -> bool:
  """Whether the grouped matmuls on `mesh`'s devices are kernels XLA cannot partition (Pallas on TPU/GPU,
  `dispatch.partitionable_grouped_matmul`). There the shard_maps below run without their varying-axes
  checks: a pallas_call's outputs carry no varying-axes type, which the checks reject. Gradients are right
  either way (unchecked, shard_map sums an input's cotangent over the axes its spec leaves out)."""
  return not dispatch.partitionable_grouped_matmul(sharding.mesh_platform(mesh))


def _token_axes(mesh: Mesh, rules: Mapping[str, object], n_tokens: int) -> tuple[str, ...]:
  """Mesh axes splitting the tokens: those of `batch`, with `expert` added, that divide the count."""
  spec = sharding.partition_spec(("batch",), mesh, {"batch": _with_expert(rules.get("batch"))}, (n_tokens,))
  entry = spec[0]
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _with_expert(target) -> tuple[str, ...]:
  names = (target,) if isinstance(target, str) else tuple(target or ())
  return names if EXPERT_AXIS in names else names + (EXPERT_AXIS,)


def _expert_specs(experts: dict, tensor: bool) -> dict:
  """Leading axis over `expert`; F over `tensor` when split. INT4 pytrees report their own layout; the
  per-expert layout (`split_experts`) is a tuple of [n, K, N] arrays, each over `expert`."""
  f = TENSOR_AXIS if tensor else None
  logical = {"gate_edf": P(EXPERT_AXIS, None, f), "up_edf": P(EXPERT_AXIS, None, f),
             "down_efd": P(EXPERT_AXIS, f, None)}
  return {k: (tuple(P(EXPERT_AXIS) for _ in w) if isinstance(w, tuple)
              else w.partition_specs(logical[k]) if hasattr(w, "partition_specs") else logical[k])
          for k, w in experts.items()}


def split_experts(experts: dict, mesh: Mesh, join: bool | None = None) -> dict:
  """The routed experts per expert for a mesh with `expert` > 1 (CPU inference): `moe.split_experts`'s
  layout of E/n arrays [n, K, N] (element j: every shard's local expert j), each placed with its leading
  axis over `expert`, so that each device holds its own experts' matrices as separate buffers and the
  grouped-matmul loops read them in place (`join`: gate and up as one matrix, see `moe.split_experts`).
  Call under jit; stacks sharded over `expert` split without moving any data."""
  n = mesh.shape[EXPERT_AXIS]
  out = moe.split_experts(experts, n, join)
  if out is experts:  # INT4 stays stacked
    return experts
  placed = jax.sharding.NamedSharding(mesh, P(EXPERT_AXIS))
  return {k: tuple(jax.lax.with_sharding_constraint(a, placed) for a in w) for k, w in out.items()}


def _total_experts(experts: dict, n: int) -> int:
  w = experts["down_efd"]
  if not isinstance(w, tuple):
    return w.shape[0]
  if w[0].shape[0] != n:
    raise ValueError(f"per-expert weights laid out for {w[0].shape[0]} expert shards, but the mesh's expert "
                     f"axis has {n}")
  return len(w) * n


def routed_experts_ep(x_td: jax.Array, routing: moe.Routing, experts: dict, mesh: Mesh,
                      dispatch: str = "allgather", rules: Mapping[str, object] | None = None,
                      emulate: bool | None = None) -> jax.Array:
  """`moe.routed_experts` with the experts split over the mesh's `expert` axis (see module docstring).

  `emulate`: stand in for `ragged_all_to_all` (default: on CPU meshes only); False forces the real
  collective, e.g. to export for TPU/GPU from a CPU mesh.
  """
  if dispatch not in DISPATCHES:
    raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
  rules = sharding.DEFAULT_RULES if rules is None else rules
  n = mesh.shape.get(EXPERT_AXIS, 1)
  E = _total_experts(experts, n)
  if E % n:
    raise ValueError(f"{E} experts do not split evenly over expert axis of size {n}")
  # F is split over `tensor` where it divides; the per-expert layout (CPU meshes) keeps it whole.
  tensor = (not isinstance(experts["down_efd"], tuple) and mesh.shape.get(TENSOR_AXIS, 1) > 1
            and experts["down_efd"].shape[-2] % mesh.shape[TENSOR_AXIS] == 0)
  token_axes = _token_axes(mesh, rules, x_td.shape[0])
  tokens_split = EXPERT_AXIS in token_axes
  if dispatch == "all_to_all" and tokens_split:
    emulate = mesh.devices.flat[0].platform == "cpu" if emulate is None else emulate
    body = functools.partial(_all_to_all_body, n=n, tensor=tensor, emulate=emulate)
  else:  # tokens that cannot be split over `expert` gain nothing from an all-to-all
    body = functools.partial(_allgather_body, tokens_split=tokens_split, tensor=tensor)
  tok = P(token_axes or None)
  run = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, _expert_specs(experts, tensor)),
                      out_specs=tok, check_vma=not opaque_kernels(mesh))
  y_td = run(x_td, routing.weights_tk, routing.experts_tk, experts)
  return y_td.astype(x_td.dtype)


def routed_experts_local(x_td: jax.Array, routing: moe.Routing, experts: dict, mesh: Mesh,
                         rules: Mapping[str, object] | None = None) -> jax.Array:
  """`moe.routed_experts` ("ragged": every expert on every device) under a mesh, in shard_map: each device
  runs its own tokens (split as the batch is, over `expert` too) through every expert, the expert weights
  gathered whole at the boundary as FSDP gathers a layer's. For grouped-matmul kernels XLA cannot
  partition (`dispatch.partitionable_grouped_matmul`): left to XLA, a Pallas kernel would run on
  replicated operands, each device doing the whole batch's expert work."""
  rules = sharding.DEFAULT_RULES if rules is None else rules
  tok = P(_token_axes(mesh, rules, x_td.shape[0]) or None)

  def body(x, weights_tk, experts_tk, local):
    return moe.routed_experts(x, moe.Routing(weights_tk, experts_tk, None), local)

  run = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, P()), out_specs=tok, check_vma=not opaque_kernels(mesh))
  return run(x_td, routing.weights_tk, routing.experts_tk, experts)


def routed_experts_fn(impl: str):
  """The routed-experts function for `moe.moe(impl=...)`: "ep" (all-gather) or "ep_a2a" (all-to-all),
  on the mesh of the enclosing `sharding.use_mesh`; without one, the single-device path."""
  dispatch = _IMPLS[impl]

  def run(x_td, routing, experts):
    ctx = sharding.current()
    if ctx is None:
      return moe.routed_experts(x_td, routing, experts)
    mesh, rules = ctx
    return routed_experts_ep(x_td, routing, experts, mesh, dispatch, rules)

  return run
