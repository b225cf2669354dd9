"""The K2 decoder: one pure forward over the parameter tree, and a thin Flax NNX wrapper around it."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax import attention, moe, params as params_lib, rope, sharding
from k2jax.config import K2Config
from k2jax.layers import output_major, output_major_name, rms_norm, swiglu_mlp, weight
from k2jax.sharding import constrain

# Rematerialisation policies for the scanned decoder layer, chosen by name from run configs.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Output:
  logits: jax.Array                 # [B, T, V] fp32
  max_attn_logits: dict             # {'dense_layers': [L, N], 'moe_layers': [L, N]} fp32, for QK-Clip
  expert_load: jax.Array | None     # [L_moe, E] tokens routed per expert (valid tokens only)
  hidden: jax.Array | None = None   # [B, T, D] final normed hidden state
  cache: "Cache | None" = None      # the updated latent cache, when one was passed in
  aux_loss: jax.Array | float = 0.0  # sequence-wise balance loss over MoE layers (with aux_loss_alpha)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Cache:
  """The MLA latent cache: per layer stack, normed latent c [L, B, S, C] and roped k_pe [L, B, S, P]; or,
  for decoding over per-layer weights (`unstack_cache`), tuples of L per-layer arrays [B, S, .]."""
  c_kv: dict
  k_pe: dict
  lengths: jax.Array  # [B] int32: tokens already in the cache, per sequence

  @property
  def max_len(self) -> int:
    a = next(iter(self.c_kv.values()))
    return (a[0] if isinstance(a, tuple) else a).shape[-2]


def unstack_cache(cache: Cache) -> Cache:
  """Each layer stack of the cache as a tuple of per-layer arrays, for `forward` over per-layer weights
  (`unstack_layers`). On XLA:CPU a layer's attention then reads its keys in place: out of a stack, every
  layer copied its [B, S, .] slice on every token. `stack_cache` undoes it."""
  split = lambda stacks: {k: tuple(a[l] for l in range(a.shape[0])) for k, a in stacks.items()}
  return Cache(split(cache.c_kv), split(cache.k_pe), cache.lengths)


def stack_cache(cache: Cache) -> Cache:
  join = lambda stacks: {k: jnp.stack(a) if isinstance(a, tuple) else a for k, a in stacks.items()}
  return Cache(join(cache.c_kv), join(cache.k_pe), cache.lengths)


def init_cache(c: K2Config, batch: int, max_len: int, dtype=jnp.bfloat16) -> Cache:
  stacks = {"dense_layers": c.num_dense_layers, "moe_layers": c.num_moe_layers}
  stacks = {k: n for k, n in stacks.items() if n}
  return Cache(
      c_kv={k: jnp.zeros((n, batch, max_len, c.kv_lora_rank), dtype) for k, n in stacks.items()},
      k_pe={k: jnp.zeros((n, batch, max_len, c.qk_rope_head_dim), dtype) for k, n in stacks.items()},
      lengths=jnp.zeros((batch,), jnp.int32))


def positions_from_segments(segment_ids_bt: jax.Array) -> jax.Array:
  """Positions that restart at 0 at each new segment (packed sequences); padding gets 0."""
  T = segment_ids_bt.shape[1]
  idx = jnp.broadcast_to(jnp.arange(T), segment_ids_bt.shape)
  starts = jnp.concatenate([jnp.ones_like(segment_ids_bt[:, :1], bool),
                            segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return jnp.where(segment_ids_bt != 0, idx - start_idx, 0).astype(jnp.int32)


def _layer(c: K2Config, is_moe: bool, moe_impl: str, fake_quant: str | None, aux_alpha: float, attn_impl: str,
           h_btd, p, layer_cache, cos, sin, mask, valid_bt, start_b):
  x = rms_norm(h_btd, p["attn_norm_d"], c.rms_norm_eps)
  # Named scopes label the ops in profiles (`benchmarks/profile_widths.py --trace`).
  with jax.named_scope("attention"):
    if layer_cache is None:
      attn_out, max_logit_n = attention.mla(p["attn"], x, c, cos, sin, mask, attn_impl)
    else:
      attn_out, max_logit_n, *layer_cache = attention.mla_absorbed(p["attn"], x, c, cos, sin, mask, *layer_cache,
                                                                   start_b, attn_impl)
  h_btd = constrain(h_btd + attn_out, ("batch", "seq", "embed"))
  x = rms_norm(h_btd, p["mlp_norm_d"], c.rms_norm_eps)
  if is_moe:
    with jax.named_scope("moe"):
      mlp_out, load_e, aux = moe.moe(p["moe"], x, c, valid_bt, impl=moe_impl, fake_quant=fake_quant,
                                     aux_alpha=aux_alpha)
  else:
    with jax.named_scope("mlp"):
      mlp_out, load_e, aux = swiglu_mlp(x, p["mlp"]), None, None
  h_btd = constrain(h_btd + mlp_out, ("batch", "seq", "embed"))
  return h_btd, (max_logit_n, load_e, aux, layer_cache)


def _run_stack(c: K2Config, stack: dict | tuple, is_moe: bool, h_btd, stack_cache, ctx, moe_impl: str, remat: str,
               fake_quant: str | None = None, aux_alpha: float = 0.0, attn_impl: str = "flash",
               unroll: bool = False):
  """Runs the layers of one stack; `stack_cache` is (c_kv [L,B,S,C], k_pe [L,B,S,P]) or None.

  A stack of [L, ...] leaves runs as a `lax.scan` (one compiled layer; `unroll`: the scan fully unrolled,
  see `forward`); a tuple of per-layer trees (`unstack_layers`) as a Python loop over the same layer
  function. Outputs are stacked [L, ...] either way.
  The cache stack rides in the scan's carry and each layer updates and reads its own rows of it in
  place: passing it as scanned input/output would copy every layer's whole [B, S, .] cache each step.
  """
  body = functools.partial(_layer, c, is_moe, moe_impl, fake_quant, aux_alpha, attn_impl)
  if REMAT_POLICIES[remat] is not None:
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
  if isinstance(stack, tuple):
    per_layer_cache = stack_cache is not None and isinstance(stack_cache[0], tuple)
    outs, new_caches = [], []
    for layer, p in enumerate(stack):
      if stack_cache is None:
        layer_cache = None
      elif per_layer_cache:  # one layer's own arrays (`unstack_cache`)
        layer_cache = (stack_cache[0][layer], stack_cache[1][layer], None)
      else:
        layer_cache = (*stack_cache, layer)
      h_btd, (*ys, new_cache) = body(h_btd, p, layer_cache, *ctx)
      if per_layer_cache:
        new_caches.append(tuple(new_cache))
      elif stack_cache is not None:
        stack_cache = tuple(new_cache)
      outs.append(tuple(ys))
    if per_layer_cache:
      stack_cache = tuple(zip(*new_caches))
    return h_btd, (*jax.tree.map(lambda *a: jnp.stack(a), *outs), stack_cache)
  if stack_cache is not None and isinstance(stack_cache[0], tuple):
    raise ValueError("a per-layer cache (`unstack_cache`) needs per-layer weights (`unstack_layers`)")
  if stack_cache is None:
    def step(h, p):
      h, (max_logit_n, load_e, aux, _) = body(h, p, None, *ctx)
      return h, (max_logit_n, load_e, aux)

    h_btd, ys = jax.lax.scan(step, h_btd, stack, unroll=bool(unroll))
    return h_btd, (*ys, None)

  def cached_step(carry, xs):
    h, cache_c, cache_pe = carry
    p, layer = xs
    h, (max_logit_n, load_e, aux, (cache_c, cache_pe)) = body(h, p, (cache_c, cache_pe, layer), *ctx)
    return (h, cache_c, cache_pe), (max_logit_n, load_e, aux)

  n_layers = stack_cache[0].shape[0]
  (h_btd, *stack_cache), ys = jax.lax.scan(cached_step, (h_btd, *stack_cache), (stack, jnp.arange(n_layers)))
  return h_btd, (*ys, tuple(stack_cache))


@jax.jit
def unstack_layers(params: dict) -> dict:
  """The same parameters with each layer stack as a tuple of per-layer trees; `forward` takes either.

  For decoding on XLA:CPU (`dispatch.unstack_layers_for_decode`): inside the jitted decode loop a stacked
  [L, ...] weight is sliced, i.e. copied, layer by layer on every token (all routed experts of the
  layer, ~250 MB per token at the small benchmark width); per-layer arrays are read in place. One copy
  per parameter tree (the engine keeps it) instead of one per token.
  """
  out = dict(params)
  for name in ("dense_layers", "moe_layers"):
    if name in params and not isinstance(params[name], tuple):
      n = jax.tree.leaves(params[name])[0].shape[0]
      out[name] = tuple(jax.tree.map(lambda a, l=l: a[l], params[name]) for l in range(n))
  return out


# Weights the engine's decode tree may store output-major ([*out, *in], `layers.output_major`), by group:
# where in a layer, and each weight's number of input axes. A few rows' products against [*in, *out] run on
# XLA:CPU as small-row GEMMs at ~2x the weight's streaming time; output-major they stream it once.
OUTPUT_MAJOR_GROUPS = {
    "attn": (("attn",), {"q_a_dr": 1, "q_b_rnq": 1, "q_dnq": 1, "kv_a_da": 1, "o_nhd": 2}),
    "mlp": (("mlp",), {"gate_df": 1, "up_df": 1, "down_fd": 1}),
    "mlp_down": (("mlp",), {"down_fd": 1}),
    "shared": (("moe", "shared"), {"gate_df": 1, "up_df": 1, "down_fd": 1}),
}
# What decoding stores output-major, where it won in place (benchmarks/NOTES.md): the head (the engine's
# decode b8 1.02-1.03x) and the dense MLP's down projection (two devices b1 1.038x, b8 1.026x; one device
# 1.00x). The whole dense MLP lost b1 on one device (0.95-0.97x, from gate and up); the attention
# projections (0.98-1.00x) and the shared expert (1.01x) did not gain.
DECODE_OUTPUT_MAJOR = ("head", "mlp_down")


def _layer_output_major(layer: dict, group: str) -> dict:
  path, names = OUTPUT_MAJOR_GROUPS[group]
  parents = [layer]
  for key in path:
    if key not in parents[-1]:
      return layer
    parents.append(parents[-1][key])
  sub = {output_major_name(k, names[k]) if k in names else k:
         output_major(w, names[k]) if k in names else w for k, w in parents[-1].items()}
  for key, parent in zip(reversed(path), reversed(parents[:-1])):
    sub = {**parent, key: sub}
  return sub


def output_major_layers(params: dict, groups: tuple[str, ...]) -> dict:
  """Per-layer parameters (`unstack_layers`) with the weights of `groups` (`OUTPUT_MAJOR_GROUPS`, and
  "head": `lm_head_vd` [V, D]) stored output-major, each output one contiguous row; `forward` takes either
  layout (`layers.weight`). For the engine's decode weights on XLA:CPU."""
  out = dict(params)
  if "head" in groups:
    del out["lm_head_dv"]
    out["lm_head_vd"] = output_major(params["lm_head_dv"])
  for name in ("dense_layers", "moe_layers"):
    if name in params:
      stack = params[name]
      for group in groups:
        if group != "head":
          stack = tuple(_layer_output_major(layer, group) for layer in stack)
      out[name] = stack
  return out


def forward(params: dict, c: K2Config, tokens_bt: jax.Array, *, positions_bt: jax.Array | None = None,
            segment_ids_bt: jax.Array | None = None, cache: Cache | None = None, moe_impl: str = "ragged",
            remat: str = "none", expert_fake_quant: str | None = None, aux_loss_alpha: float = 0.0,
            logits_at_b: jax.Array | None = None, return_hidden: bool = False, attn_impl: str = "flash",
            unroll_layers: bool = False) -> Output:
  """The model: int tokens [B, T] -> Output with fp32 logits [B, T, V].

  `segment_ids_bt`: 0 marks padding; tokens attend only within their own segment (packed sequences).
  `positions_bt`: RoPE positions; by default they restart at each segment (with a cache: continue from
  each sequence's length).
  `cache`: a latent `Cache`; the tokens are appended at each row's length (right padding allowed; padded
  slots are overwritten by the next call) and attention runs absorbed over the cache. The updated cache is
  returned in `Output.cache`.
  `expert_fake_quant`: "clamp7" or "full8" fake-quantises dense routed experts (QAT, straight-through).
  `aux_loss_alpha`: > 0 adds DeepSeek-V3's sequence-wise balance loss, summed over MoE layers, as
  `Output.aux_loss`.
  `logits_at_b`: one position per row; logits come back [B, 1, V] for it alone (prefill needs only the
  last prompt token's, and the head over the whole prompt would cost T x vocab).
  `attn_impl`: "flash" (blockwise, the default: Pallas kernels on TPU/GPU, XLA's loop on CPU), "pallas"
  (the kernels forced, interpreted on a CPU host) or "plain" (full score matrix; the reference).
  `unroll_layers`: the layer scan (without a cache) fully unrolled; same result. On XLA:CPU a scan's
  backward zero-fills [L, ...] buffers for every stacked residual and gradient and copies each layer's
  weights out of the stacks; unrolled, neither happens (`dispatch.unroll_layers_for_train`).
  """
  tokens_bt = jnp.asarray(tokens_bt, jnp.int32)
  B, T = tokens_bt.shape
  if segment_ids_bt is None:
    segment_ids_bt = jnp.ones_like(tokens_bt)
  valid_bt = segment_ids_bt != 0
  h_btd = constrain(jnp.take(params["embed_vd"], tokens_bt, axis=0), ("batch", "seq", "embed"))
  index_bt = jnp.broadcast_to(jnp.arange(T), (B, T))
  if cache is None:
    if positions_bt is None:
      positions_bt = positions_from_segments(segment_ids_bt)
    mask = attention.Mask(segment_ids_bt, index_bt, segment_ids_bt)
    start_b = None
  else:
    start_b = cache.lengths
    q_index_bt = start_b[:, None] + index_bt
    if positions_bt is None:
      positions_bt = q_index_bt
    # Keys: everything already cached plus this call's valid tokens, causally.
    mask = attention.Mask(valid_bt.astype(jnp.int32), q_index_bt)
  cos, sin = rope.cos_sin(c, positions_bt, h_btd.dtype)
  ctx = (cos, sin, mask, valid_bt, start_b)
  max_logits, load, aux_loss, new_c, new_pe = {}, None, jnp.zeros((), jnp.float32), {}, {}
  for name, is_moe in (("dense_layers", False), ("moe_layers", True)):
    if name not in params:
      continue
    stack_cache = None if cache is None else (cache.c_kv[name], cache.k_pe[name])
    h_btd, (max_logits[name], stack_load, stack_aux, stack_cache) = _run_stack(
        c, params[name], is_moe, h_btd, stack_cache, ctx, moe_impl, remat, expert_fake_quant, aux_loss_alpha,
        attn_impl, unroll_layers)
    if is_moe:
      load, aux_loss = stack_load, stack_aux.sum()
    if cache is not None:
      new_c[name], new_pe[name] = stack_cache
  h_btd = rms_norm(h_btd, params["final_norm_d"], c.rms_norm_eps)
  head_in = h_btd if logits_at_b is None else jnp.take_along_axis(h_btd, logits_at_b[:, None, None], axis=1)
  with jax.named_scope("head"):
    # [D, V], or [V, D] in the engine's decode layout (`output_major_layers`).
    w, vocab_major = weight(params, "lm_head_dv")
    logits = jnp.einsum("btd,vd->btv" if vocab_major else "btd,dv->btv", head_in, w,
                        preferred_element_type=jnp.float32)
  logits = constrain(logits, ("batch", "seq", "vocab"))
  new_cache = None
  if cache is not None:
    new_cache = Cache(new_c, new_pe, cache.lengths + valid_bt.sum(1).astype(jnp.int32))
  return Output(logits=logits, max_attn_logits=max_logits, expert_load=load,
                hidden=h_btd if return_hidden else None, cache=new_cache, aux_loss=aux_loss)


class K2Model(nnx.Module):
  """NNX face of the model: `nnx.Param` leaves carry logical axes; `__call__` runs the pure `forward`."""

  def __init__(self, config: K2Config, params: dict | None = None, *, rngs: nnx.Rngs | None = None,
               dtype=jnp.float32):
    self.config = config
    if params is None:
      key = (rngs or nnx.Rngs(0)).params()
      params = params_lib.init_params(config, key, dtype)
    axes = params_lib.axes_like(params, config)
    self.params = nnx.data(jax.tree.map(
        lambda ax, a: nnx.Param(a, logical_axes=ax), axes, params, is_leaf=lambda x: isinstance(x, tuple)))

  def param_tree(self) -> dict:
    """The plain array tree that `forward` takes."""
    return jax.tree.map(lambda v: v[...], self.params, is_leaf=lambda x: isinstance(x, nnx.Variable))

  def __call__(self, tokens_bt, *, positions_bt=None, segment_ids_bt=None, **kw: Any) -> Output:
    # The active mesh is part of the cache key: `constrain` reads it while tracing.
    ctx = sharding.current()
    mesh_key = None if ctx is None else (ctx[0], tuple((k, tuple(v) if isinstance(v, list) else v)
                                                       for k, v in sorted(ctx[1].items())))
    return _jit_forward(self.param_tree(), self.config, jnp.asarray(tokens_bt), positions_bt, segment_ids_bt,
                        mesh_key=mesh_key, **kw)


@functools.partial(jax.jit, static_argnames=("c", "moe_impl", "remat", "return_hidden", "mesh_key", "attn_impl"))
def _jit_forward(p, c, tokens_bt, positions_bt, segment_ids_bt, moe_impl="ragged", remat="none",
                 return_hidden=False, mesh_key=None, attn_impl="flash"):
  del mesh_key
  return forward(p, c, tokens_bt, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt, moe_impl=moe_impl,
                 remat=remat, return_hidden=return_hidden, attn_impl=attn_impl)
