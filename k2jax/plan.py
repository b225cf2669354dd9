"""`k2-plan`: per-device memory for serving or training a model on a mesh, before owning the devices.

Every number comes from abstract trees (`jax.eval_shape`, no allocation) placed with the real sharding
rules: each leaf's `partition_spec` on an abstract mesh of the requested shape gives its shard shape.

Assumptions (stated in the output too):
  serving   parameters bf16, routed experts INT4 when the config says so (int32-packed nibbles plus a
            bf16 scale per 32, the `int4.QuantizedWeight` layout); the MLA latent cache (normed latent +
            roped k_pe per token and layer) in bf16 for `batch` sequences of `context` tokens. Transient
            activations of decoding are left out.
  training  bf16 parameters and bf16 gradients; an fp32 master copy of every bf16 parameter; fp32
            optimizer state per `train.optimizer_map`: Muon momentum (1 copy) for matrices, AdamW m and
            v (2 copies) for the rest, nothing for the router bias. All sharded like the parameters.
            Activations: an estimate for `batch` sequences of `context` tokens, see `activation_bytes`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from k2jax import params as params_lib, report, sharding
from k2jax.config import K2Config

GIB = report.GIB  # the same unit as k2-params


@dataclasses.dataclass
class Item:
  name: str
  total_bytes: int       # one unsharded copy
  device_bytes: int      # what one device holds


@dataclasses.dataclass
class Budget:
  title: str
  items: list[Item]
  device_capacity: int
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def device_bytes(self) -> int:
    return sum(i.device_bytes for i in self.items)

  @property
  def fits(self) -> bool:
    return self.device_bytes <= self.device_capacity


# --- bytes of a tree on a mesh --------------------------------------------------------------------

def _nbytes(shape, dtype) -> int:
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def tree_bytes(tree: Any, shardings: Any) -> tuple[int, int]:
  """(unsharded bytes, bytes on one device) of a tree of ShapeDtypeStructs and matching NamedShardings."""
  total = device = 0
  for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += _nbytes(leaf.shape, leaf.dtype)
    device += _nbytes(s.shard_shape(leaf.shape), leaf.dtype)
  return total, device


def _by_axes(tree: Any, axes: Any, mesh, rules) -> Any:
  """NamedShardings for a tree given a matching tree of logical-axis tuples."""
  return jax.tree.map(lambda leaf, ax: NamedSharding(mesh, sharding.partition_spec(ax, mesh, rules, leaf.shape)),
                      tree, axes, is_leaf=lambda x: isinstance(x, tuple))


def _item(name: str, tree, shardings) -> Item:
  return Item(name, *tree_bytes(tree, shardings))


def uneven_note(c: K2Config, mesh, rules, tree) -> list[str]:
  """Parameters held whole along a dim the rules would split, because the mesh axis does not divide it."""
  got = sharding.param_shardings(c, mesh, rules, params=tree)
  wanted = sharding.param_shardings(c, mesh, rules, params=tree, fit=False)
  extra, paths = 0, []
  for (kp, leaf), g, w in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(got),
                              jax.tree.leaves(wanted)):
    split = math.prod(mesh.shape[a] for e in w.spec if e for a in ((e,) if isinstance(e, str) else e))
    more = _nbytes(g.shard_shape(leaf.shape), leaf.dtype) - _nbytes(leaf.shape, leaf.dtype) // split
    if more > 0:
      extra += more
      paths.append(params_lib.path_str(kp))
  if not paths:
    return []
  more_paths = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
  return [f"{extra / GIB:.2f} GiB per device from dims the mesh does not divide: {', '.join(paths[:3])}{more_paths}"]


# --- parameters and optimizer state ---------------------------------------------------------------

def serving_params(c: K2Config, int4: bool | None = None) -> dict:
  """Abstract serving parameters: bf16, routed experts as abstract INT4 `QuantizedWeight`s if `int4`."""
  return params_lib.abstract_params(c, jnp.bfloat16,
                                   int4_experts=(c.expert_quant == "int4") if int4 is None else int4)


def _optimizer_copies(tree) -> dict[str, int]:
  """fp32 copies of state per leaf path: Muon momentum 1, AdamW m and v 2, none 0."""
  from k2jax.train import optimizer_map  # noqa: PLC0415
  copies = {"muon": 1, "adamw": 2, "none": 0}
  return {path: copies[p.optimizer] for path, p in optimizer_map.build_optimizer_map(tree).items()}


def _fp32_copies(tree, n_by_path: Mapping[str, int] | None, only_bf16: bool):
  """A tree of fp32 ShapeDtypeStructs with a leading copy axis (n copies; 0 copies -> empty)."""

  def one(kp, leaf):
    n = 1 if n_by_path is None else n_by_path[params_lib.path_str(kp)]
    if only_bf16 and leaf.dtype != jnp.bfloat16:
      n = 0
    return [jax.ShapeDtypeStruct(leaf.shape, jnp.float32)] * n

  return jax.tree_util.tree_map_with_path(one, tree)


def _repeat_shardings(copies_tree, shardings):
  return jax.tree.map(lambda cs, s: [s] * len(cs), copies_tree, shardings,
                      is_leaf=lambda x: isinstance(x, list))


# --- caches and activations -----------------------------------------------------------------------

def cache_item(c: K2Config, mesh, rules, batch: int, context: int) -> Item:
  from k2jax import model  # noqa: PLC0415
  cache = jax.eval_shape(lambda: model.init_cache(c, batch, context, jnp.bfloat16))
  axes = jax.tree.map(lambda x: ("layers", "batch", "seq", None) if x.ndim == 4 else ("batch",), cache)
  per_token_layer = sum(x.shape[-1] for x in jax.tree.leaves(cache) if x.ndim == 4) // len(cache.c_kv)
  return _item(f"MLA latent cache ({per_token_layer}/token/layer, bf16)", cache, _by_axes(cache, axes, mesh, rules))


def _layer_activations(c: K2Config, B: int, S: int, moe: bool) -> list[tuple[str, tuple, tuple, Any, bool]]:
  """One layer's main intermediates: (name, shape, logical axes, dtype, saved by the "dots" policy)."""
  D, N, bf, f32 = c.hidden_size, c.num_attention_heads, jnp.bfloat16, jnp.float32
  out = [("q", (B, S, N, c.qk_head_dim), ("batch", "seq", "heads", "qk_head"), bf, True),
         ("kv_a", (B, S, c.latent_cache_dim), ("batch", "seq", "kv_a"), bf, True),
         ("kv_b", (B, S, N, c.qk_nope_head_dim + c.v_head_dim), ("batch", "seq", "heads", "kv_b"), bf, True),
         ("scores", (B, N, S, S), ("batch", "heads", "seq", None), f32, False),
         ("probs", (B, N, S, S), ("batch", "heads", "seq", None), f32, False),
         ("attn_heads", (B, S, N, c.v_head_dim), ("batch", "seq", "heads", "v_head"), bf, False),
         ("attn_out", (B, S, D), ("batch", "seq", "embed"), bf, True)]
  if c.q_lora_rank:
    out.append(("q_a", (B, S, c.q_lora_rank), ("batch", "seq", "q_lora"), bf, True))
  if not moe:
    F = c.intermediate_size
    return out + [(n, (B, S, F), ("batch", "seq", "mlp"), bf, n != "h") for n in ("gate", "up", "h")] + [
        ("mlp_out", (B, S, D), ("batch", "seq", "embed"), bf, True)]
  M, F, Fs = B * S * c.num_experts_per_tok, c.moe_intermediate_size, c.shared_intermediate_size
  out += [("router", (B * S, c.n_routed_experts), ("batch", "router"), f32, True),
          ("expert_rows", (M, D), ("batch", "embed"), bf, False)]
  out += [(f"expert_{n}", (M, F), ("batch", "moe_mlp"), bf, n != "h") for n in ("gate", "up", "h")]
  out += [("expert_out", (M, D), ("batch", "embed"), bf, True)]
  out += [(f"shared_{n}", (B, S, Fs), ("batch", "seq", "mlp"), bf, n != "h") for n in ("gate", "up", "h")]
  return out + [("shared_out", (B, S, D), ("batch", "seq", "embed"), bf, True)]


def _expert_row_rules(rules, moe_impl: str):
  """Rules for the (token, expert) rows of the routed experts. Expert-parallel dispatch is dropless with
  buffers sized for the worst case, all rows of the `expert` group on one shard: `batch` loses `expert`.
  Without it ("ragged") the rows are split like the tokens."""
  if moe_impl not in ("ep", "ep_a2a"):
    return rules
  batch = rules.get("batch")
  names = (batch,) if isinstance(batch, str) else tuple(batch or ())
  return {**rules, "batch": tuple(n for n in names if n != "expert")}


def activation_bytes(c: K2Config, mesh, rules, batch: int, context: int, remat: str,
                     moe_impl: str = "ragged") -> tuple[int, int]:
  """Estimated training activations (unsharded, per device), plain (non-flash) attention.

  Kept across the scan: each layer's input (the residual), plus under "dots" the outputs of the
  weight matmuls, under "none" every intermediate listed in `_layer_activations`. On top: one layer's
  intermediates and their cotangents while its backward runs, and the fp32 logits with their cotangent.
  Expert rows are split as `moe_impl` holds them (see `_expert_row_rules`).
  """
  from k2jax.model import REMAT_POLICIES  # noqa: PLC0415
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
  B, S = batch, context
  row_rules = _expert_row_rules(rules, moe_impl)

  def size(entries):
    tree = [jax.ShapeDtypeStruct(shape, dt) for _, shape, _, dt, _ in entries]
    axes = [ax for _, _, ax, _, _ in entries]
    return sum((np.array(tree_bytes([t], _by_axes([t], [ax], mesh, row_rules if e[0].startswith("expert_") else rules)))
                for t, ax, e in zip(tree, axes, entries)), np.zeros(2, np.int64))

  residual = size([("h", (B, S, c.hidden_size), ("batch", "seq", "embed"), jnp.bfloat16, True)])
  kept = working = np.zeros(2, np.int64)
  for moe, n_layers in ((False, c.num_dense_layers), (True, c.num_moe_layers)):
    if not n_layers:
      continue
    entries = _layer_activations(c, B, S, moe)
    per_layer = {"full": residual, "dots": residual + size([e for e in entries if e[4]]),
                 "none": residual + size(entries)}[remat]
    kept = kept + n_layers * per_layer
    working = np.maximum(working, 2 * size(entries))
  logits = 2 * size([("logits", (B, S, c.vocab_size), ("batch", "seq", "vocab"), jnp.float32, False)])
  total = kept + working + logits
  return int(total[0]), int(total[1])


# --- plans ----------------------------------------------------------------------------------------

def _capacity(device_memory_gib: float) -> int:
  return int(device_memory_gib * GIB)


def gathered_experts_item(c: K2Config, tree, shardings, moe_impl: str) -> list[Item]:
  """Without expert parallelism each device runs every expert, so where the routed experts are split
  over the mesh (over `expert`, or over `fsdp` as FSDP splits every large weight) it gathers a whole
  layer's while that layer runs (GSPMD's all-gather, or the shard_map boundary of the Pallas kernels):
  one layer's worth, unsharded, per device. `shardings`: the parameters' (`sharding.param_shardings`)."""
  if moe_impl in ("ep", "ep_a2a") or "moe_layers" not in tree:
    return []
  total, device = tree_bytes(tree["moe_layers"]["moe"]["experts"], shardings["moe_layers"]["moe"]["experts"])
  if device >= total:  # held whole on every device already
    return []
  one_layer = total // c.num_moe_layers
  return [Item(f"routed experts of one layer, gathered (moe_impl={moe_impl})", one_layer, one_layer)]


def serving_plan(c: K2Config, mesh, batch: int, context: int, device_memory_gib: float,
                 rules: Mapping[str, object] | None = None, int4: bool | None = None,
                 moe_impl: str | None = None) -> Budget:
  rules = sharding.DEFAULT_RULES if rules is None else rules
  moe_impl = sharding.choose_moe_impl(mesh, moe_impl)
  tree = serving_params(c, int4)
  quant = any(hasattr(x, "packed") for x in jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "packed")))
  label = "parameters (INT4 routed experts, bf16 rest)" if quant else "parameters (bf16)"
  shardings = sharding.param_shardings(c, mesh, rules, params=tree)
  items = [_item(label, tree, shardings),
           cache_item(c, mesh, rules, batch, context)] + gathered_experts_item(c, tree, shardings, moe_impl)
  return Budget(f"serving: {batch} sequences x {context} tokens", items, _capacity(device_memory_gib),
                uneven_note(c, mesh, rules, tree) + ["decoding activations not counted"])


def training_plan(c: K2Config, mesh, batch: int, context: int, device_memory_gib: float,
                  rules: Mapping[str, object] | None = None, remat: str = "full",
                  moe_impl: str | None = None) -> Budget:
  rules = sharding.DEFAULT_RULES if rules is None else rules
  moe_impl = sharding.choose_moe_impl(mesh, moe_impl)
  tree = params_lib.abstract_params(c, jnp.bfloat16)
  shardings = sharding.param_shardings(c, mesh, rules)
  master = _fp32_copies(tree, None, only_bf16=True)
  state = _fp32_copies(tree, _optimizer_copies(tree), only_bf16=False)
  items = [_item("parameters (bf16)", tree, shardings),
           _item("fp32 master copy", master, _repeat_shardings(master, shardings)),
           _item("optimizer state (fp32 Muon momentum / AdamW m, v)", state, _repeat_shardings(state, shardings)),
           _item("gradients (bf16)", tree, shardings),
           Item(f"activations (estimate, remat={remat})",
                *activation_bytes(c, mesh, rules, batch, context, remat, moe_impl))]
  items += gathered_experts_item(c, tree, shardings, moe_impl)
  rows = ("expert rows sized for the whole expert group (dropless expert-parallel buffers)"
          if moe_impl in ("ep", "ep_a2a") else "expert rows sharded like tokens")
  return Budget(f"training: {batch} sequences x {context} tokens per step", items, _capacity(device_memory_gib),
                uneven_note(c, mesh, rules, tree) + [f"activations: plain attention scores, {rows}"])


def format_budget(b: Budget) -> str:
  lines = [b.title, f"  {'':<52}{'one copy GiB':>14}{'per device GiB':>16}"]
  for i in b.items:
    lines.append(f"  {i.name:<52}{i.total_bytes / GIB:>14.2f}{i.device_bytes / GIB:>16.2f}")
  cap = b.device_capacity / GIB
  lines.append(f"  {'total':<52}{'':>14}{b.device_bytes / GIB:>16.2f}")
  free = cap - b.device_bytes / GIB
  verdict = f"fits, {free:.1f} GiB free" if b.fits else f"does NOT fit, short by {-free:.1f} GiB"
  lines.append(f"  {'device memory':<52}{'':>14}{cap:>16.2f}   {verdict}")
  lines += [f"  ({n})" for n in b.notes]
  return "\n".join(lines)


def format_plan(c: K2Config, mesh, budgets: list[Budget], moe_impl: str | None = None, mesh_note: str = "") -> str:
  n = params_lib.count(params_lib.abstract_params(c, jnp.bfloat16))
  head = [f"{c.name}: {n:,} parameters",
          f"mesh {sharding.format_mesh(mesh)} = {math.prod(dict(mesh.shape).values())} devices{mesh_note}",
          sharding.describe_moe_impl(sharding.choose_moe_impl(mesh, moe_impl), mesh)]
  return "\n\n".join(["\n".join(head)] + [format_budget(b) for b in budgets])


def run(argv=None):
  """`k2-plan`: per-device memory of serving and/or training a preset (or HF config) on a mesh."""
  from k2jax import cli  # noqa: PLC0415
  from absl import app, flags  # noqa: PLC0415

  flags.DEFINE_string("preset", "k2_thinking", "Model preset name.")
  flags.DEFINE_string("hf_config", None, "Path to an HF config.json (or its folder); overrides --preset.")
  flags.DEFINE_integer("devices", None, "Device count, when --mesh leaves an axis open (-1) or is unset "
                       "(default: this machine's devices).")
  flags.DEFINE_float("device_memory_gib", 95.0, "Memory per device in GiB.")
  flags.register_validator("device_memory_gib", lambda gib: gib > 0, "--device_memory_gib must be > 0")
  flags.DEFINE_integer("batch", 16, "Sequences: served concurrently, or per training step.", lower_bound=1)
  flags.DEFINE_integer("context", 4096, "Tokens per sequence.", lower_bound=1)
  flags.DEFINE_enum("mode", "both", ["serve", "train", "both"], "Which budget(s) to print.")
  flags.DEFINE_enum("remat", "full", ["none", "full", "dots"], "Rematerialisation policy for training.")
  sharding.define_mesh_flag()

  def main(_):
    from k2jax import presets  # noqa: PLC0415
    F = flags.FLAGS
    c = K2Config.from_hf(F.hf_config) if F.hf_config else presets.get(F.preset)
    devices, note = F.devices, ""
    open_mesh = F.mesh is None or F.mesh.strip() in ("", "auto") or "-1" in F.mesh
    if devices is None and open_mesh:  # the default mesh: every device of this machine on fsdp
      devices = jax.device_count()
      note = f" (this machine's {devices} {jax.devices()[0].platform} device(s); --devices=N or --mesh plans for others)"
    try:
      mesh = sharding.abstract_mesh(F.mesh, devices)
    except sharding.MeshError as e:
      raise app.UsageError(f"{e} (set --mesh, and --devices when an axis is -1)") from None
    budgets = []
    if F.mode in ("serve", "both"):
      budgets.append(serving_plan(c, mesh, F.batch, F.context, F.device_memory_gib, moe_impl=F.moe_impl))
    if F.mode in ("train", "both"):
      budgets.append(training_plan(c, mesh, F.batch, F.context, F.device_memory_gib, remat=F.remat,
                                   moe_impl=F.moe_impl))
    print(format_plan(c, mesh, budgets, F.moe_impl, note))

  cli.run(main, [__name__, "k2jax.sharding"], argv)


if __name__ == "__main__":
  run()
