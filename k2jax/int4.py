"""INT4 routed-expert weights: the compressed-tensors `pack-quantized` format and our in-memory layout.

Checkpoint format (HF, one tensor per expert linear, rows = out, cols = in):
  `weight_packed` int32 [out, in/8]: word j of row o holds input columns 8j..8j+7, element 8j+k in bits
  [4k, 4k+4), stored as the offset-binary nibble q + 8 (q in [-8, 7]);
  `weight_scale` [out, in/32] (bf16): w[o, i] = q[o, i] * scale[o, i // 32]; symmetric, no zero point.

In-memory layout (`QuantizedWeight`), for a logical weight W[.., K, N] (K = in, N = out, as in the
parameter tree):
  `packed` int32 [.., 4, K/32, N]: packed[.., r, g, n] is the checkpoint word 4g + r of row n, so its
      nibble k holds q[32g + 8r + k, n]. It is the HF tensor transposed, with the 4 words of each
      32-element group moved to a leading axis.
  `scales` [.., K/32, N] (bf16 as stored): the HF scales transposed.

Why this layout: N (out) is the minor (lane) axis, so weight tiles are [.., tk/32, tn] slabs that DMA and
vectorise without padding, and the scale row g lines up with packed row g for every r. Unpacking nibble k
of a [4, tk/32, tn] tile yields q for rows 32g + 8r + k; multiplying by scales[None] broadcasts over a
major axis only (no sublane repeat or interleave), and merging (r, g) is a tile-aligned reshape. The
kernels consume the activations with their K columns permuted to the same order inside each K tile
(`planar_columns`), which is a cheap copy of the activations instead of a shuffle of the weights.
Bytes: 4 bits per weight + 16 bits per 32 weights (4.5 bits per weight with bf16 scales).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

GROUP = 32  # quantisation group along the input dim
PER_WORD = 8  # int4 values per int32 word
WORDS_PER_GROUP = GROUP // PER_WORD  # 4
MODES = ("clamp7", "full8")
_SHIFTS = np.arange(PER_WORD, dtype=np.uint32) * 4


def _xp(x):
  return np if isinstance(x, np.ndarray) else jnp


# ---------------------------------------------------------------- bit packing (HF orientation)


def pack_int4(q: Any, axis: int = -1):
  """int8 values in [-8, 7] -> int32 words, 8 per word along `axis` (element 8j+k in bits [4k, 4k+4)).

  numpy in -> numpy out, otherwise jnp. `pack_int4(q_oi)` gives the HF `weight_packed` [out, in/8].
  """
  xp = _xp(q)
  q = xp.moveaxis(q, axis, -1)
  if q.shape[-1] % PER_WORD:
    raise ValueError(f"packed axis length {q.shape[-1]} is not a multiple of {PER_WORD}")
  nib = (q.astype(xp.int32) + 8).astype(xp.uint32)  # offset binary
  nib = nib.reshape(*q.shape[:-1], q.shape[-1] // PER_WORD, PER_WORD)
  words = (nib << xp.asarray(_SHIFTS)).sum(axis=-1, dtype=xp.uint32)  # disjoint bits: sum == or
  words = words.view(np.int32) if xp is np else jax.lax.bitcast_convert_type(words, jnp.int32)
  return xp.moveaxis(words, -1, axis)


def unpack_int4(packed: Any, axis: int = -1):
  """Inverse of `pack_int4`: int32 words -> int8 values in [-8, 7], 8 per word along `axis`."""
  xp = _xp(packed)
  p = xp.moveaxis(packed, axis, -1)
  u = p.view(np.uint32) if xp is np else jax.lax.bitcast_convert_type(p, jnp.uint32)
  nib = (u[..., None] >> xp.asarray(_SHIFTS)) & 0xF
  q = (nib.astype(xp.int32) - 8).astype(xp.int8)
  q = q.reshape(*p.shape[:-1], p.shape[-1] * PER_WORD)
  return xp.moveaxis(q, -1, axis)


# ---------------------------------------------------------------- group quantisation


def quantize(w: Any, mode: str = "clamp7", *, axis: int = -2, group: int = GROUP,
             scale_dtype: Any = jnp.bfloat16):
  """Symmetric group quantisation along `axis` (the input dim: -2 for [.., K, N], -1 for HF [out, in]).

  Returns (q int8 same shape as w, scales [.., K/group, ..] in `scale_dtype`). numpy in -> numpy out.
    "clamp7": scale = max|w| / 7, q = clip(round(w / scale), -7, 7); the grid is symmetric, -8 unused.
    "full8":  scale = max|w| / 7.5, q = clip(round(w / scale), -8, 7); compressed-tensors' symmetric
              int4 rule (scale = amax / ((qmax - qmin) / 2)). The group's most negative extreme maps to
              -8 exactly; its positive extreme (7.5 before clipping) is clipped to 7.
  round is half-to-even. The scale is rounded to `scale_dtype` first and q is computed with the rounded
  scale, so q * scale is exactly what inference will see. An all-zero group gets scale 0 and q 0
  (compressed-tensors stores a tiny eps there instead; both dequantise to 0).
  Ties: numpy divides exactly (as compressed-tensors does); XLA may multiply by a reciprocal instead,
  so a quotient within an ulp of k + 0.5 can round differently across backends. With bf16 scales that
  is rare (about 1e-7 of weights); with fp32 scales and "full8" every group's extreme is such a tie.
  Quantise with the same code path as training when q must match `fake_quant` bit for bit.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  xp = _xp(w)
  axis = axis % w.ndim
  n = w.shape[axis]
  if n % group:
    raise ValueError(f"quantised axis length {n} is not a multiple of group {group}")
  wg = w.astype(xp.float32).reshape(*w.shape[:axis], n // group, group, *w.shape[axis + 1:])
  amax = xp.max(xp.abs(wg), axis=axis + 1, keepdims=True)
  denom = 7.0 if mode == "clamp7" else 7.5
  qmin = -7 if mode == "clamp7" else -8
  scale = (amax / xp.float32(denom)).astype(scale_dtype)
  s32 = scale.astype(xp.float32)
  safe = xp.where(s32 > 0, s32, xp.float32(1))
  q = xp.clip(xp.round(wg / safe), qmin, 7)
  q = xp.where(s32 > 0, q, 0).astype(xp.int8).reshape(w.shape)
  return q, xp.squeeze(scale, axis=axis + 1)


def dequantize_values(q: Any, scales: Any, *, axis: int = -2, group: int = GROUP, dtype: Any = None):
  """w = q * scale (product in fp32, then cast to `dtype`, default the scales' dtype)."""
  xp = _xp(q)
  axis = axis % q.ndim
  dtype = scales.dtype if dtype is None else dtype
  n = q.shape[axis]
  qg = q.astype(xp.float32).reshape(*q.shape[:axis], n // group, group, *q.shape[axis + 1:])
  w = qg * xp.expand_dims(scales.astype(xp.float32), axis + 1)
  return w.reshape(q.shape).astype(dtype)


# ---------------------------------------------------------------- in-memory layout


def _words_to_packed(words_kn):
  """HF words transposed [.., K/8, N] -> [.., 4, K/32, N]."""
  xp = _xp(words_kn)
  *lead, kw, n = words_kn.shape
  w = words_kn.reshape(*lead, kw // WORDS_PER_GROUP, WORDS_PER_GROUP, n)
  return xp.swapaxes(w, -3, -2)


def _packed_to_words(packed):
  """[.., 4, K/32, N] -> HF words transposed [.., K/8, N]."""
  xp = _xp(packed)
  *lead, r, g, n = packed.shape
  return xp.swapaxes(packed, -3, -2).reshape(*lead, g * r, n)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
  """INT4 weight W[.., K, N] (K = in, N = out), group-32 symmetric scales along K.

  packed int32 [.., 4, K/32, N], scales [.., K/32, N]; see the module docstring for the bit layout.
  A pytree: jit, scan over a leading layer axis and tree_map slicing work on it directly.
  """

  packed: Any
  scales: Any

  @property
  def shape(self) -> tuple[int, ...]:
    *lead, _, g, n = self.packed.shape
    return (*lead, g * GROUP, n)

  @property
  def dtype(self):
    """dtype of the dequantised weight (that of the scales)."""
    return self.scales.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    return int(self.packed.size * 4 + self.scales.size * np.dtype(self.scales.dtype).itemsize)

  def __getitem__(self, idx) -> "QuantizedWeight":
    """Index leading (layer / expert) axes only."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if len(idx) > self.ndim - 2:
      raise IndexError("QuantizedWeight indexes leading axes only, not K or N")
    return QuantizedWeight(self.packed[idx], self.scales[idx])

  def int_values(self):
    """q int8 [.., K, N] in [-8, 7]."""
    return unpack_int4(_packed_to_words(self.packed), axis=-2)

  def dequantize(self, dtype: Any = None):
    """Dense W[.., K, N] = q * scale (fp32 product cast to `dtype`, default the scales' dtype)."""
    return dequantize_values(self.int_values(), self.scales, axis=-2, dtype=dtype)

  @classmethod
  def quantize(cls, w_kn: Any, mode: str = "clamp7", scale_dtype: Any = jnp.bfloat16) -> "QuantizedWeight":
    """Quantise a dense W[.., K, N] (numpy or jnp) with `quantize` along K."""
    q, scales = quantize(w_kn, mode, axis=-2, scale_dtype=scale_dtype)
    return cls(_words_to_packed(pack_int4(q, axis=-2)), scales)

  def partition_specs(self, spec_kn) -> "QuantizedWeight":
    """PartitionSpecs for the leaves, given the PartitionSpec of the logical [.., K, N] weight."""
    from jax.sharding import PartitionSpec as P

    *lead, k, n = tuple(spec_kn) + (None,) * (self.ndim - len(spec_kn))
    return QuantizedWeight(P(*lead, None, k, n), P(*lead, k, n))


# ---------------------------------------------------------------- checkpoint (HF) conversion


def _np(x) -> np.ndarray:
  """numpy view of a numpy / jax / torch array (torch bf16 goes through an int16 view)."""
  if type(x).__module__.startswith("torch"):
    import torch

    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:
      return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()
  return np.asarray(x)


def from_hf(weight_packed, weight_scale, weight_shape=None, copy: bool = True) -> QuantizedWeight:
  """One checkpoint linear (`weight_packed` int32 [out, in/8], `weight_scale` [out, in/32]) -> numpy
  QuantizedWeight for W[in, out]. Integer shuffles only; nothing is dequantised. `copy=False` returns
  strided views (for a caller that copies them into place anyway)."""
  words_oi, scale_oi = _np(weight_packed), _np(weight_scale)
  if words_oi.dtype != np.int32:
    raise ValueError(f"weight_packed must be int32, got {words_oi.dtype}")
  out, in_words = words_oi.shape
  if weight_shape is not None and tuple(int(v) for v in _np(weight_shape)) != (out, in_words * PER_WORD):
    raise ValueError(f"weight_shape {_np(weight_shape)} does not match packed {words_oi.shape}")
  if scale_oi.shape != (out, in_words // WORDS_PER_GROUP):
    raise ValueError(f"weight_scale shape {scale_oi.shape} does not match packed {words_oi.shape}")
  packed, scales = _words_to_packed(words_oi.T), scale_oi.T
  if copy:
    packed, scales = np.ascontiguousarray(packed), np.ascontiguousarray(scales)
  return QuantizedWeight(packed, scales)


def to_hf(w: QuantizedWeight) -> dict[str, np.ndarray]:
  """A 2-D QuantizedWeight W[in, out] -> the checkpoint tensors (numpy)."""
  if w.ndim != 2:
    raise ValueError("to_hf converts one linear at a time; index leading axes first")
  words = np.ascontiguousarray(_packed_to_words(np.asarray(w.packed)).T)
  k, n = w.shape
  return {
      "weight_packed": words,
      "weight_scale": np.ascontiguousarray(np.asarray(w.scales).T),
      "weight_shape": np.array([n, k], dtype=np.int64),
  }


HF_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")


# Storage dtypes compressed-tensors uses (safetensors names).
HF_DTYPES = {"weight_packed": ("I32",), "weight_scale": ("BF16", "F16", "F32"), "weight_shape": ("I32", "I64")}


def check_hf_tensors(ckpt, base: str, out_in: tuple[int, int], error=ValueError) -> list[str]:
  """Check `{base}.weight_packed/_scale/_shape` shapes and dtypes in a checkpoint (`in`, `.shape(name)`,
  `.dtype_name(name)`) without reading data; returns the names present. `weight_shape` is optional."""
  out_f, in_f = out_in
  if in_f % GROUP:
    raise error(f"{base}: input dim {in_f} is not a multiple of the group size {GROUP}")
  want = {"weight_packed": (out_f, in_f // PER_WORD), "weight_scale": (out_f, in_f // GROUP), "weight_shape": (2,)}
  where = getattr(ckpt, "file_of", lambda name: "checkpoint")
  names = []
  for suffix in HF_SUFFIXES:
    name = f"{base}.{suffix}"
    if name not in ckpt:
      if suffix == "weight_shape":
        continue
      raise error(f"{getattr(ckpt, 'folder', 'checkpoint')}: missing tensor {name}")
    if tuple(ckpt.shape(name)) != want[suffix]:
      raise error(f"{where(name)}: tensor {name} has shape {list(ckpt.shape(name))}, expected {list(want[suffix])}")
    if hasattr(ckpt, "dtype_name") and ckpt.dtype_name(name) not in HF_DTYPES[suffix]:
      raise error(f"{where(name)}: tensor {name} has dtype {ckpt.dtype_name(name)}, expected one of "
                  f"{list(HF_DTYPES[suffix])}")
    names.append(name)
  return names


def read_hf(ckpt, base: str, copy: bool = True) -> QuantizedWeight:
  """One INT4 linear from a checkpoint (`in`, `.get(name)`) as a numpy QuantizedWeight W[in, out]
  (strided views of the read buffers with `copy=False`)."""
  shape_name = f"{base}.weight_shape"
  tensors = (ckpt.get(f"{base}.weight_packed"), ckpt.get(f"{base}.weight_scale"),
             ckpt.get(shape_name) if shape_name in ckpt else None)
  try:
    return from_hf(*tensors, copy=copy)
  except ValueError as e:
    where = ckpt.file_of(f"{base}.weight_packed") if hasattr(ckpt, "file_of") else "checkpoint"
    raise ValueError(f"{where}: {base}: {e}") from None


def read_hf_dequantized(ckpt, base: str) -> np.ndarray:
  """One INT4 linear dequantised to float32 in the HF orientation [out, in] (one tensor at a time)."""
  return np.ascontiguousarray(read_hf(ckpt, base).dequantize(np.float32).T)


def stack(ws: list[QuantizedWeight]) -> QuantizedWeight:
  """Stack per-expert (or per-layer) weights along a new leading axis (numpy)."""
  return QuantizedWeight(np.stack([np.asarray(w.packed) for w in ws]),
                         np.stack([np.asarray(w.scales) for w in ws]))


# ---------------------------------------------------------------- QAT


def fake_quant(w: jax.Array, group: int = GROUP, mode: str = "clamp7",
               scale_dtype: Any = jnp.bfloat16) -> jax.Array:
  """dequant(quant(w)) along K of w[.., K, N] in w's dtype, with a straight-through gradient.

  Uses the same quantiser as `QuantizedWeight.quantize`, so a bf16 cast of the result equals the
  inference-side `dequantize(jnp.bfloat16)` bit for bit.
  """
  return _fake_quant(group, mode, scale_dtype, w)


def _fake_quant_fwd(group, mode, scale_dtype, w):
  q, s = quantize(w, mode, axis=-2, group=group, scale_dtype=scale_dtype)
  return dequantize_values(q, s, axis=-2, group=group, dtype=w.dtype)


_fake_quant = jax.custom_vjp(_fake_quant_fwd, nondiff_argnums=(0, 1, 2))
# Straight-through estimator: the gradient passes through the quantiser unchanged.
_fake_quant.defvjp(lambda group, mode, scale_dtype, w: (_fake_quant_fwd(group, mode, scale_dtype, w), None),
                   lambda group, mode, scale_dtype, _, g: (g,))
