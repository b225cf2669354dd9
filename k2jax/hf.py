"""HF checkpoint <-> parameter tree: one table maps every leaf to its HF tensors, both directions.

Loading checks every tensor's presence and shape from the safetensors headers before reading any data,
then fills each (possibly sharded) leaf with `jax.make_array_from_callback`, reading only the layers and
experts a device needs: a full host copy of the model is never made.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import re
import shutil
import tempfile
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from k2jax import params as params_lib
from k2jax.config import K2Config
from k2jax.host_copy import copy_into
from k2jax.safetensors_io import DTYPES, FLOAT_DTYPES, Checkpoint, apply_umask, save_sharded

FP8_BLOCK = 128


class CheckpointError(ValueError):
  """A checkpoint tensor is missing, unexpected or misshapen."""


@dataclasses.dataclass(frozen=True)
class LeafMap:
  hf: str           # HF name, `{layer}` and `{expert}` filled per slice; "" suffix-less for top-level
  linear: bool      # an nn.Linear weight [out, in]: stored transposed, may be FP8 / INT4 in the checkpoint
  n_in: int = 1     # how many leading per-layer axes form the input dim (o_nhd: heads x v_head)


_LAYER = {
    "attn_norm_d": LeafMap("input_layernorm.weight", False),
    "mlp_norm_d": LeafMap("post_attention_layernorm.weight", False),
    "attn/q_a_dr": LeafMap("self_attn.q_a_proj", True),
    "attn/q_a_norm_r": LeafMap("self_attn.q_a_layernorm.weight", False),
    "attn/q_b_rnq": LeafMap("self_attn.q_b_proj", True),
    "attn/q_dnq": LeafMap("self_attn.q_proj", True),
    "attn/kv_a_da": LeafMap("self_attn.kv_a_proj_with_mqa", True),
    "attn/kv_a_norm_c": LeafMap("self_attn.kv_a_layernorm.weight", False),
    "attn/kv_b_cnu": LeafMap("self_attn.kv_b_proj", True),
    "attn/o_nhd": LeafMap("self_attn.o_proj", True, n_in=2),
    "mlp/gate_df": LeafMap("mlp.gate_proj", True),
    "mlp/up_df": LeafMap("mlp.up_proj", True),
    "mlp/down_fd": LeafMap("mlp.down_proj", True),
    "moe/router_de": LeafMap("mlp.gate", True),
    "moe/router_bias_e": LeafMap("mlp.gate.e_score_correction_bias", False),
    "moe/experts/gate_edf": LeafMap("mlp.experts.{expert}.gate_proj", True),
    "moe/experts/up_edf": LeafMap("mlp.experts.{expert}.up_proj", True),
    "moe/experts/down_efd": LeafMap("mlp.experts.{expert}.down_proj", True),
    "moe/shared/gate_df": LeafMap("mlp.shared_experts.gate_proj", True),
    "moe/shared/up_df": LeafMap("mlp.shared_experts.up_proj", True),
    "moe/shared/down_fd": LeafMap("mlp.shared_experts.down_proj", True),
}
_TOP = {
    "embed_vd": LeafMap("model.embed_tokens.weight", False),
    "final_norm_d": LeafMap("model.norm.weight", False),
    "lm_head_dv": LeafMap("lm_head", True),
}
# Present in some checkpoints, never part of the model.
_IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"),)


@dataclasses.dataclass(frozen=True)
class Leaf:
  path: str
  spec: params_lib.ParamSpec
  map: LeafMap
  layer0: int | None     # first global layer index of the stack (None: not stacked)
  experts: bool

  def hf_name(self, layer: int | None = None, expert: int | None = None) -> str:
    if self.layer0 is None:
      return self.map.hf
    return f"model.layers.{self.layer0 + layer}." + self.map.hf.format(expert=expert)

  @property
  def batch_dims(self) -> int:
    return (self.layer0 is not None) + self.experts

  @property
  def hf_shape(self) -> tuple[int, ...]:
    """The HF tensor shape of one slice ([out, in] for linears)."""
    per = self.spec.shape[self.batch_dims:]
    if not self.map.linear:
      return per
    n = self.map.n_in
    return (math.prod(per[n:]), math.prod(per[:n]))

  def slices(self) -> Iterator[tuple[int | None, int | None]]:
    if self.layer0 is None:
      yield None, None
      return
    for layer in range(self.spec.shape[0]):
      for e in (range(self.spec.shape[1]) if self.experts else [None]):
        yield layer, e


def leaves(c: K2Config) -> list[Leaf]:
  out = []
  flat = jax.tree_util.tree_flatten_with_path(params_lib.param_specs(c), is_leaf=params_lib.is_spec)[0]
  for path, spec in flat:
    p = params_lib.path_str(path)
    if p in _TOP:
      out.append(Leaf(p, spec, _TOP[p], None, False))
      continue
    stack, rel = p.split("/", 1)
    layer0 = 0 if stack == "dense_layers" else c.first_k_dense_replace
    out.append(Leaf(p, spec, _LAYER[rel], layer0, rel.startswith("moe/experts/")))
  return out


# --- reading --------------------------------------------------------------------------------------

def slice_tensor_names(leaf: Leaf, ckpt: Checkpoint, layer, expert) -> list[str]:
  """The checkpoint tensors one layer/expert slice of a leaf is read from."""
  name = leaf.hf_name(layer, expert)
  if not leaf.map.linear:
    return [name]
  suffixes = ("weight", "weight_scale_inv", "weight_packed", "weight_scale", "weight_shape")
  return [f"{name}.{s}" for s in suffixes if f"{name}.{s}" in ckpt]


def _linear_forms(ckpt: Checkpoint, base: str) -> str:
  if f"{base}.weight" in ckpt:
    return "fp8" if f"{base}.weight_scale_inv" in ckpt else "dense"
  if f"{base}.weight_packed" in ckpt:
    return "int4"
  # Name the tensor that is missing from the form its siblings show.
  which = "weight_packed" if f"{base}.weight_scale" in ckpt or f"{base}.weight_shape" in ckpt else "weight"
  raise CheckpointError(f"{ckpt.folder}: missing tensor {base}.{which}")


def expect_tensor(ckpt: Checkpoint, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...],
                  error=None) -> None:
  """`name` is present, of `shape` and one of the safetensors `dtypes`; errors name the shard file."""
  error = error or CheckpointError
  if name not in ckpt:
    raise error(f"{ckpt.folder}: missing tensor {name}")
  got = ckpt.shape(name)
  if tuple(got) != tuple(shape):
    raise error(f"{ckpt.file_of(name)}: tensor {name} has shape {list(got)}, expected {list(shape)}")
  if ckpt.dtype_name(name) not in dtypes:
    raise error(f"{ckpt.file_of(name)}: tensor {name} has dtype {ckpt.dtype_name(name)}, expected one of "
                f"{list(dtypes)}")


def _check_linear(ckpt: Checkpoint, base: str, out_in: tuple[int, int]) -> list[str]:
  form = _linear_forms(ckpt, base)
  o, i = out_in
  if form == "dense":
    expect_tensor(ckpt, f"{base}.weight", out_in, FLOAT_DTYPES)
    return [f"{base}.weight"]
  if form == "fp8":
    expect_tensor(ckpt, f"{base}.weight", out_in, ("F8_E4M3",))
    expect_tensor(ckpt, f"{base}.weight_scale_inv", (-(-o // FP8_BLOCK), -(-i // FP8_BLOCK)), FLOAT_DTYPES)
    return [f"{base}.weight", f"{base}.weight_scale_inv"]
  from k2jax import int4  # noqa: PLC0415
  return int4.check_hf_tensors(ckpt, base, out_in, error=CheckpointError)


def validate(ckpt: Checkpoint, c: K2Config) -> None:
  """Every expected tensor present with the right shape and dtype, nothing unexpected: before any data is
  read."""
  used: set[str] = set()
  for leaf in leaves(c):
    for layer, e in leaf.slices():
      name = leaf.hf_name(layer, e)
      if leaf.map.linear:
        used.update(_check_linear(ckpt, name, leaf.hf_shape))
      else:
        expect_tensor(ckpt, name, leaf.hf_shape, FLOAT_DTYPES)
        used.add(name)
  # MTP (next-n prediction) layers sit after the last decoder layer; K2 has none, and they are unused.
  mtp = re.compile(rf"model\.layers\.({'|'.join(str(k) for k in range(c.num_hidden_layers, c.num_hidden_layers + 4))})\.")
  unexpected = sorted(n for n in ckpt.keys()
                      if n not in used and not mtp.match(n) and not any(p.match(n) for p in _IGNORED))
  if unexpected:
    more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
    files = sorted({os.path.basename(ckpt.file_of(n)) for n in unexpected})
    raise CheckpointError(f"{ckpt.folder}: unexpected tensor(s) {unexpected[:5]}{more} in {files[:3]} "
                          "(the checkpoint does not match config.json)")


def read_linear(ckpt: Checkpoint, base: str, as_stored: bool = False) -> np.ndarray:
  """An HF linear weight [out, in] as float32, dequantising FP8 block-scaled or INT4 storage; a dense
  weight in its stored dtype with `as_stored` (no float32 round trip when the caller casts anyway)."""
  form = _linear_forms(ckpt, base)
  if form == "dense":
    w = ckpt.get(f"{base}.weight")
    return w if as_stored else np.asarray(w, np.float32)
  if form == "fp8":
    w = np.asarray(ckpt.get(f"{base}.weight"), np.float32)
    # Despite its name, `weight_scale_inv` multiplies: one scale per 128x128 block.
    s = np.asarray(ckpt.get(f"{base}.weight_scale_inv"), np.float32)
    s = np.repeat(np.repeat(s, FP8_BLOCK, axis=0), FP8_BLOCK, axis=1)[:w.shape[0], :w.shape[1]]
    return w * s
  from k2jax import int4  # noqa: PLC0415
  return int4.read_hf_dequantized(ckpt, base)


def _per_slice(leaf: Leaf, ckpt: Checkpoint, layer, expert, dtype) -> np.ndarray:
  """One layer/expert slice in our layout (in -> out), cast to `dtype`."""
  name = leaf.hf_name(layer, expert)
  per = leaf.spec.shape[leaf.batch_dims:]
  if not leaf.map.linear:
    return np.asarray(ckpt.get(name)).astype(dtype).reshape(per)
  # Transposing while casting makes the one copy; a bf16 -> bf16 slice is not widened on the way.
  return read_linear(ckpt, name, as_stored=True).T.astype(dtype).reshape(per)


def _fill(batch: tuple[int, ...], per_shape: tuple[int, ...], dtype, get: Callable, index) -> np.ndarray:
  """The block `index` of a [*batch, *per_shape] leaf, filled slice by slice from `get(layer, expert)` into
  one preallocated buffer (peak: the block plus one slice)."""
  shape = tuple(batch) + tuple(per_shape)
  idx = tuple(index) + (slice(None),) * (len(shape) - len(index))
  dims = [range(*s.indices(n)) for s, n in zip(idx, shape)]
  rest = idx[len(batch):]
  out = np.empty([len(r) for r in dims], dtype)
  for pos in itertools.product(*(list(enumerate(r)) for r in dims[:len(batch)])):
    layer_expert = [p[1] for p in pos] + [None] * (2 - len(batch))
    copy_into(out[tuple(p[0] for p in pos)], np.asarray(get(*layer_expert))[rest])
  return out


def _stacked(leaf: Leaf, per_shape: tuple[int, ...], dtype, get: Callable, sharding) -> jax.Array:
  """[*layers, *experts, *per_shape] filled from `get(layer, expert)`, one callback per device shard, so
  each device reads only the layers and experts its shard covers."""
  batch = tuple(leaf.spec.shape[:leaf.batch_dims])
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.make_array_from_callback(batch + tuple(per_shape), sharding,
                                      functools.partial(_fill, batch, per_shape, dtype, get))


def is_int4_leaf(leaf: Leaf, ckpt: Checkpoint) -> bool:
  """A routed-expert leaf stored pack-quantized INT4 in the checkpoint."""
  return leaf.experts and _linear_forms(ckpt, leaf.hf_name(0, 0)) == "int4"


def slice_reader(leaf: Leaf, ckpt: Checkpoint, dtype, keep_int4: bool) -> Callable:
  """`get(layer, expert)` -> one slice in our layout: a dense array in `dtype` (the spec's own dtype wins),
  or with `keep_int4` a numpy `QuantizedWeight` (packed, scales), never dequantised."""
  if keep_int4:
    from k2jax import int4  # noqa: PLC0415
    # Views: `_fill` copies each slice into place, transposing on the way.
    return lambda layer, expert: int4.read_hf(ckpt, leaf.hf_name(layer, expert), copy=False)
  dt = np.dtype(leaf.spec.dtype or dtype)
  return lambda layer, expert: _per_slice(leaf, ckpt, layer, expert, dt)


def load_leaf(leaf: Leaf, ckpt: Checkpoint, dtype, sharding, keep_int4: bool, get: Callable | None = None):
  """One leaf as a (possibly sharded) jax.Array, or a QuantizedWeight of them for INT4 experts.
  `get`: the slice reader (default `slice_reader(leaf, ckpt, dtype, keep_int4)`)."""
  from k2jax import int4  # noqa: PLC0415
  get = get or slice_reader(leaf, ckpt, dtype, keep_int4)
  if sharding is not None and len(jax.tree.leaves(sharding)[0].device_set) > 1:
    get = functools.lru_cache(maxsize=None)(get)  # replicated shards ask for the same slices
  per = tuple(leaf.spec.shape[leaf.batch_dims:])
  if not keep_int4:
    return _stacked(leaf, per, np.dtype(leaf.spec.dtype or dtype), get, sharding)
  (k, n), scale_dtype = per, DTYPES[ckpt.dtype_name(leaf.hf_name(0, 0) + ".weight_scale")]
  sh = sharding or int4.QuantizedWeight(None, None)
  return int4.QuantizedWeight(
      _stacked(leaf, (int4.WORDS_PER_GROUP, k // int4.GROUP, n), np.int32, lambda l, e: get(l, e).packed,
               sh.packed),
      _stacked(leaf, (k // int4.GROUP, n), scale_dtype, lambda l, e: get(l, e).scales, sh.scales))


def set_path(tree: dict, path: str, value) -> None:
  """tree[a][b][c] = value for path 'a/b/c', making the dicts on the way."""
  *parents, last = path.split("/")
  for k in parents:
    tree = tree.setdefault(k, {})
  tree[last] = value


def load_params(folder: str, c: K2Config, dtype=jnp.float32, shardings: dict | None = None,
                progress: Callable[[str], None] | None = None, dequantize_experts: bool = False,
                check_finite: bool = True) -> dict:
  """The parameter tree from an HF checkpoint folder (dense, FP8 block-scaled or INT4 pack-quantized).

  INT4 routed experts stay INT4 (`int4.QuantizedWeight` leaves) unless `dequantize_experts`.
  `check_finite`: a NaN or Inf in any float tensor is an error naming the file and tensor.
  """
  from k2jax import int4  # noqa: PLC0415
  ckpt = Checkpoint(folder, check_finite=check_finite)
  validate(ckpt, c)
  flat_shardings = {}
  if shardings is not None:
    is_qw = lambda x: isinstance(x, int4.QuantizedWeight)
    flat_shardings = {params_lib.path_str(p): s for p, s in
                      jax.tree_util.tree_flatten_with_path(shardings, is_leaf=is_qw)[0]}
  out: dict = {}
  for leaf in leaves(c):
    if progress:
      progress(leaf.path)
    keep_int4 = is_int4_leaf(leaf, ckpt) and not dequantize_experts
    set_path(out, leaf.path, load_leaf(leaf, ckpt, dtype, flat_shardings.get(leaf.path), keep_int4))
  return out


def checkpoint_bytes(folder: str) -> int:
  return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


class _LeafBar:
  """A tqdm bar over parameter leaves that names the leaf being read."""

  def __init__(self, total: int):
    from tqdm.auto import tqdm  # noqa: PLC0415
    self.bar = tqdm(total=total, desc="loading", unit="leaf")

  def update_leaf(self, path: str) -> None:
    self.bar.set_postfix_str(path, refresh=False)
    self.bar.update(1)

  def close(self) -> None:
    self.bar.close()


def progress_bar(c: K2Config) -> _LeafBar:
  return _LeafBar(len(leaves(c)))


# --- writing --------------------------------------------------------------------------------------

def hf_tensors(params: dict, c: K2Config, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) pairs for a parameter tree, one layer/expert slice at a time.

  INT4 experts are written as compressed-tensors pack-quantized (`weight_packed/_scale/_shape`).
  """
  from k2jax import int4  # noqa: PLC0415
  is_qw = lambda x: isinstance(x, int4.QuantizedWeight)
  flat = {params_lib.path_str(p): a for p, a in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qw)[0]}
  for leaf in leaves(c):
    yield from leaf_hf_tensors(leaf, flat[leaf.path], dtype)


def leaf_hf_tensors(leaf: Leaf, arr, dtype=None, dequantize: bool = False) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) pairs of one leaf, a slice at a time; `dtype` casts float leaves that have no dtype
  of their own. INT4 leaves are written pack-quantized, or dense in `dtype` when `dequantize`."""
  from k2jax import int4  # noqa: PLC0415
  for layer, e in leaf.slices():
    idx = tuple(i for i in (layer, e) if i is not None)
    name = leaf.hf_name(layer, e)
    if isinstance(arr, int4.QuantizedWeight):
      q = int4.QuantizedWeight(np.asarray(arr.packed[idx]), np.asarray(arr.scales[idx]))
      if not dequantize:
        for suffix, t in int4.to_hf(q).items():
          yield f"{name}.{suffix}", t
        continue
      a = q.dequantize(np.float32)
    else:
      a = np.asarray(arr[idx] if idx else arr)
    if leaf.map.linear:
      a = a.reshape(leaf.hf_shape[::-1]).T
    if dtype is not None and leaf.spec.dtype is None:
      a = a.astype(dtype)
    yield (f"{name}.weight" if leaf.map.linear else name), np.ascontiguousarray(a)


def save_hf(params: dict, c: K2Config, folder: str, dtype=None, max_shard_bytes: int = 4 << 30) -> None:
  """Writes an HF checkpoint folder (config.json + sharded safetensors); all or nothing."""
  if os.path.exists(folder) and os.listdir(folder):
    raise FileExistsError(f"{folder} exists and is not empty; refusing to overwrite it")
  parent = os.path.dirname(os.path.abspath(folder))
  os.makedirs(parent, exist_ok=True)
  from k2jax import int4  # noqa: PLC0415
  experts = params.get("moe_layers", {}).get("moe", {}).get("experts", {})
  c = c.replace(expert_quant="int4" if any(isinstance(w, int4.QuantizedWeight) for w in experts.values()) else None)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".partial-")
  apply_umask(tmp, folder=True)
  try:
    save_sharded(hf_tensors(params, c, dtype), tmp, max_shard_bytes)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(c.to_hf(), f, indent=2)
    if os.path.exists(folder):
      os.rmdir(folder)
    os.replace(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
