"""The parameter tree: shapes, logical axes and initialisers, from one table (see docs/PARAMS.md)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.config import K2Config

Tree = dict[str, Any]


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # parameter / compute dtypes by config name


def dtype_from_name(name: str):
  try:
    return DTYPES[name]
  except KeyError:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  shape: tuple[int, ...]
  axes: tuple[str, ...]          # logical axis names, one per dim; sharding maps them to mesh axes
  init: str = "normal"           # "normal" (std = initializer_range), "ones" or "zeros"
  dtype: Any = None              # None: the model's param dtype

  def __post_init__(self):
    assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def _attn_specs(c: K2Config, n_layers: int) -> Tree:
  L, D, N = n_layers, c.hidden_size, c.num_attention_heads
  Q, C, P = c.qk_head_dim, c.kv_lora_rank, c.qk_rope_head_dim
  out: Tree = {}
  if c.q_lora_rank is not None:
    R = c.q_lora_rank
    out["q_a_dr"] = ParamSpec((L, D, R), ("layers", "embed", "q_lora"))
    out["q_a_norm_r"] = ParamSpec((L, R), ("layers", "norm"), "ones")
    out["q_b_rnq"] = ParamSpec((L, R, N, Q), ("layers", "q_lora", "heads", "qk_head"))
  else:
    out["q_dnq"] = ParamSpec((L, D, N, Q), ("layers", "embed", "heads", "qk_head"))
  out["kv_a_da"] = ParamSpec((L, D, C + P), ("layers", "embed", "kv_a"))
  out["kv_a_norm_c"] = ParamSpec((L, C), ("layers", "norm"), "ones")
  out["kv_b_cnu"] = ParamSpec((L, C, N, c.qk_nope_head_dim + c.v_head_dim), ("layers", "kv_lora", "heads", "kv_b"))
  out["o_nhd"] = ParamSpec((L, N, c.v_head_dim, D), ("layers", "heads", "v_head", "embed"))
  return out


def _mlp_specs(L: int, D: int, F: int, mlp_axis: str = "mlp") -> Tree:
  return {
      "gate_df": ParamSpec((L, D, F), ("layers", "embed", mlp_axis)),
      "up_df": ParamSpec((L, D, F), ("layers", "embed", mlp_axis)),
      "down_fd": ParamSpec((L, F, D), ("layers", mlp_axis, "embed")),
  }


def _layer_specs(c: K2Config, n_layers: int, moe: bool) -> Tree:
  L, D = n_layers, c.hidden_size
  out: Tree = {
      "attn_norm_d": ParamSpec((L, D), ("layers", "norm"), "ones"),
      "attn": _attn_specs(c, L),
      "mlp_norm_d": ParamSpec((L, D), ("layers", "norm"), "ones"),
  }
  if not moe:
    out["mlp"] = _mlp_specs(L, D, c.intermediate_size)
    return out
  E, F = c.n_routed_experts, c.moe_intermediate_size
  out["moe"] = {
      "router_de": ParamSpec((L, D, E), ("layers", "embed", "router")),
      "router_bias_e": ParamSpec((L, E), ("layers", "router"), "zeros", jnp.float32),
      "experts": {
          "gate_edf": ParamSpec((L, E, D, F), ("layers", "expert", "embed", "moe_mlp")),
          "up_edf": ParamSpec((L, E, D, F), ("layers", "expert", "embed", "moe_mlp")),
          "down_efd": ParamSpec((L, E, F, D), ("layers", "expert", "moe_mlp", "embed")),
      },
      "shared": _mlp_specs(L, D, c.shared_intermediate_size),
  }
  return out


def param_specs(c: K2Config) -> Tree:
  """The tree of ParamSpecs for a config (stacked layer groups; an empty group is left out)."""
  V, D = c.vocab_size, c.hidden_size
  tree: Tree = {"embed_vd": ParamSpec((V, D), ("vocab", "embed"))}
  if c.num_dense_layers:
    tree["dense_layers"] = _layer_specs(c, c.num_dense_layers, moe=False)
  if c.num_moe_layers:
    tree["moe_layers"] = _layer_specs(c, c.num_moe_layers, moe=True)
  tree["final_norm_d"] = ParamSpec((D,), ("norm",), "ones")
  tree["lm_head_dv"] = ParamSpec((D, V), ("embed", "vocab"))
  return tree


def path_str(key_path: Sequence[Any]) -> str:
  """'/'-joined names of a jax key path (dict keys, attributes or indices)."""
  parts = []
  for k in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def map_specs(fn: Callable[[ParamSpec], Any], specs: Tree) -> Tree:
  return jax.tree.map(fn, specs, is_leaf=is_spec)


def logical_axes(c: K2Config) -> Tree:
  return map_specs(lambda s: s.axes, param_specs(c))


def init_params(c: K2Config, key: jax.Array, dtype=jnp.float32) -> Tree:
  """Random parameters (normal std = initializer_range; norms 1; router bias 0)."""
  specs = param_specs(c)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
  keys = jax.random.split(key, len(leaves))

  def make(spec: ParamSpec, k):
    dt = spec.dtype or dtype
    if spec.init == "ones":
      return jnp.ones(spec.shape, dt)
    if spec.init == "zeros":
      return jnp.zeros(spec.shape, dt)
    return (c.initializer_range * jax.random.normal(k, spec.shape, jnp.float32)).astype(dt)

  return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def abstract_params(c: K2Config, dtype=jnp.bfloat16, *, int4_experts: bool = False) -> Tree:
  """ShapeDtypeStructs of every parameter, without allocating: works for the 1T config on a laptop.
  `int4_experts`: routed experts as INT4 `QuantizedWeight`s, as a K2 Thinking checkpoint holds them."""
  like = jax.eval_shape(lambda: init_params(c, jax.random.key(0), dtype))
  return jax.eval_shape(quantize_experts, like) if int4_experts else like


def cast(tree: Tree, dtype) -> Tree:
  """Floating leaves in `dtype`, except the router bias, which stays fp32 (it only selects experts), and
  INT4 weights, which stay as stored."""
  def one(path, x):
    if (_is_qw(x) or getattr(path[-1], "key", "") == "router_bias_e"
        or not jnp.issubdtype(x.dtype, jnp.floating)):
      return x
    return x.astype(dtype)
  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_qw)


def count(tree: Tree) -> int:
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def _is_qw(x) -> bool:
  from k2jax.int4 import QuantizedWeight  # noqa: PLC0415
  return isinstance(x, QuantizedWeight)


def quantize_experts(params: Tree, mode: str = "clamp7") -> Tree:
  """The same tree with routed-expert weights as INT4 `QuantizedWeight`s (for serving)."""
  from k2jax.int4 import QuantizedWeight  # noqa: PLC0415
  if "moe_layers" not in params:
    return params
  experts = params["moe_layers"]["moe"]["experts"]
  q = {k: w if _is_qw(w) else QuantizedWeight.quantize(w, mode) for k, w in experts.items()}
  moe = {**params["moe_layers"]["moe"], "experts": q}
  return {**params, "moe_layers": {**params["moe_layers"], "moe": moe}}


def axes_like(params: Tree, c: K2Config) -> Tree:
  """Logical axes matching `params`, INT4 expert leaves included (packed: an extra unsharded axis)."""
  from k2jax.int4 import QuantizedWeight  # noqa: PLC0415
  axes = logical_axes(c)
  if "moe_layers" in params:
    experts = params["moe_layers"]["moe"]["experts"]
    for k, w in experts.items():
      if _is_qw(w):
        *lead, k_ax, n_ax = axes["moe_layers"]["moe"]["experts"][k]
        axes["moe_layers"]["moe"]["experts"][k] = QuantizedWeight((*lead, None, k_ax, n_ax), (*lead, k_ax, n_ax))
  return axes
