"""Pick an expert-matmul implementation per backend.

  impl="auto":   TPU -> Mosaic Pallas kernels, GPU -> Triton Pallas kernels, CPU (and others) -> "xla".
  impl="pallas": the Pallas kernel for `backend` ("tpu" or "gpu"); on a CPU host pass `interpret`
                 (True, or `pltpu.InterpretParams()` for the TPU kernels) to run it interpreted.
  impl="xla":    plain XLA: grouped matmuls by `gmm_xla` (row blocks per expert, cost ~ useful FLOPs;
                 INT4 experts dequantised one at a time, only those with rows), or lax.ragged_dot when
                 even E times the work is tiny (it compiles faster); jnp.dot for `matmul`.
  impl="ragged": the backend's own lax.ragged_dot (INT4 weights dequantised first). XLA:CPU lowers it
                 to a dense product per group (~E times the work), so "auto" never picks it on CPU.
Tile sizes (tm, tk, tn) default per backend and kernel; pass `tiling` to override.

Flash attention (`flash_attention_impl`): TPU -> Mosaic Pallas kernels while one head's keys and values
fit in VMEM, GPU -> Triton Pallas kernels, CPU (and longer TPU sequences) -> XLA's blockwise loop.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from k2jax.int4 import QuantizedWeight
from k2jax.kernels import flash_attention as flash_kernel
from k2jax.kernels import gmm as gmm_mod
from k2jax.kernels import gmm_xla
from k2jax.kernels import int4_matmul as int4_mm_mod
from k2jax.kernels.gmm import Tiling, gmm, gmm_ref, precision
from k2jax.kernels.int4_gmm import int4_gmm, int4_gmm_ref
from k2jax.kernels.int4_matmul import int4_matmul, int4_matmul_ref

IMPLS = ("auto", "pallas", "xla", "ragged")
# Below this many multiply-adds for all E experts on all M rows, ragged_dot's E-fold work costs less
# than gmm_xla's loops (per-iteration overhead, and compile time).
RAGGED_MAX_MACS = 1 << 22
DEFAULT_TILING: dict[tuple[str, str], Tiling] = {
    ("tpu", "dense"): gmm_mod.TPU_TILING,
    ("gpu", "dense"): gmm_mod.GPU_TILING,
    ("tpu", "int4"): int4_mm_mod.TPU_TILING,
    ("gpu", "int4"): int4_mm_mod.GPU_TILING,
}


def _platform(backend: str | None) -> str:
  backend = backend or jax.default_backend()
  return {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend)


def _resolve(backend, impl, interpret) -> tuple[str, str]:
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  platform = _platform(backend)
  if impl == "auto":
    impl = "pallas" if platform in ("tpu", "gpu") else "xla"
  if impl == "pallas":
    if platform not in ("tpu", "gpu"):
      raise ValueError(f"Pallas kernels target tpu or gpu, not {platform!r}")
    if _platform(None) != platform and not interpret:
      raise ValueError(f"running {platform} kernels on {jax.default_backend()} needs interpret=...")
  return platform, impl


def _tiling(platform, kind, tiling):
  return tuple(tiling) if tiling is not None else DEFAULT_TILING[(platform, kind)]


def grouped_matmul(lhs_mk, w, group_sizes, *, backend: str | None = None, impl: str = "auto",
                   tiling: Tiling | None = None, out_dtype=None, interpret: Any = False):
  """out[M, N]: rows [start_e, start_e + group_sizes[e]) of lhs_mk times w[e]; rows past the groups are 0.

  w: dense [E, K, N] (differentiable in lhs and w on every path) or a QuantizedWeight [E, K, N]
  (inference only).
  """
  platform, impl = _resolve(backend, impl, interpret)
  group_sizes = group_sizes.astype(jnp.int32)
  if impl == "xla":
    if _macs(lhs_mk, w) > RAGGED_MAX_MACS:
      return gmm_xla.gmm(lhs_mk, w, group_sizes, out_dtype=out_dtype)
    impl = "ragged"
  if isinstance(w, QuantizedWeight):
    if impl == "ragged":
      return int4_gmm_ref(lhs_mk, w, group_sizes, out_dtype=out_dtype)
    return int4_gmm(lhs_mk, w, group_sizes, tiling=_tiling(platform, "int4", tiling), out_dtype=out_dtype,
                    platform=platform, interpret=interpret)
  if impl == "ragged":
    return gmm_ref(lhs_mk, w, group_sizes, out_dtype=out_dtype)
  return gmm(lhs_mk, w, group_sizes, tiling=_tiling(platform, "dense", tiling), out_dtype=out_dtype,
             platform=platform, interpret=interpret)


def partitionable_grouped_matmul(backend: str | None = None) -> bool:
  """Whether XLA can partition the grouped matmuls "auto" runs on `backend` (plain XLA), or must be handed
  them whole: a Pallas kernel is an opaque custom call, which XLA's partitioner runs on gathered,
  replicated operands, every device doing the whole batch's work. Under a mesh the latter run in
  shard_map (`expert_parallel.opaque_kernels`)."""
  return _resolve(backend, "auto", False)[1] != "pallas"


def grouped_swiglu(x_md, w_gate, w_up, w_down, group_sizes, *, backend: str | None = None, impl: str = "auto",
                   out_dtype=None, interpret: Any = False):
  """down_e(silu(x @ gate_e) * (x @ up_e)) for the rows of group e (sorted by expert); rows past the groups
  are 0. On the plain-XLA path the three grouped matmuls run as one loop over experts (`gmm_xla.swiglu`:
  one pass over each row block, each expert's matrices taken once); elsewhere as three `grouped_matmul`s.
  Weights as for `grouped_matmul`, or (XLA path only) tuples of per-expert [K, N] arrays (`split_experts`;
  `w_up` None: `w_gate` holds [gate | up] per expert) or `gmm_xla.LayerSlice` views of a layer stack (the
  unrolled training layers).
  """
  platform, impl = _resolve(backend, impl, interpret)
  if isinstance(w_gate, (tuple, gmm_xla.LayerSlice)) or (impl == "xla" and _macs(x_md, w_gate) > RAGGED_MAX_MACS):
    return gmm_xla.swiglu(x_md, w_gate, w_up, w_down, group_sizes, out_dtype=out_dtype)
  mm = lambda x, w, dt=None: grouped_matmul(x, w, group_sizes, backend=backend, impl=impl, out_dtype=dt,
                                            interpret=interpret)
  return mm(jax.nn.silu(mm(x_md, w_gate)) * mm(x_md, w_up), w_down, out_dtype)


def _macs(x_mk, w) -> int:
  e, k, n = w.shape
  return e * x_mk.shape[0] * k * n


# One expert matrix from this many elements up is worth its own buffer for decoding on CPU (see below).
SPLIT_EXPERT_MIN_ELEMENTS = 1 << 14
# ... and up to this many experts x layers: the decode program picks an expert by a switch with one branch
# per expert, product and layer, so its compile time grows with E x layers (the medium benchmark width's
# 64 experts x 11 layers: ~7 s more per decode program; K2's 384 x 60 would take minutes).
SPLIT_EXPERT_MAX_BRANCHES = 1024
# Per expert, gate and up are joined as one [K, 2N] matrix (one product per row) while it fits a core's
# L2 (2 MB on the benchmark machine); past that, on an expert mesh, they stay apart and an expert's rows go
# through each matrix in turn, so its later rows find it in L2 instead of streaming it again
# (`gmm_xla.swiglu`). On one device the joined product stays: XLA:CPU runs that matrix-vector product on
# every core, which beat the L2 reuse on a quiet machine (medium width, 4 layers, b8: apart 0.88x).
JOIN_GATE_UP_MAX_BYTES = 2 << 20


def split_experts_for_decode(w, backend: str | None = None) -> bool:
  """Whether decoding keeps routed-expert stacks like `w` ([..., E, K, N], layers leading) as tuples of
  per-expert arrays (`moe.split_experts`).

  XLA:CPU copies w[e] out of the [E, K, N] stack before each product; at decode sizes the copy costs as
  much as the product (the product reads the matrix once). Tiny experts stay stacked (ragged_dot's path),
  and so do many experts x layers (the switch over them compiles one branch per expert and layer).
  """
  if _platform(backend) != "cpu" or isinstance(w, (QuantizedWeight, tuple)):
    return False
  return (w.shape[-2] * w.shape[-1] >= SPLIT_EXPERT_MIN_ELEMENTS
          and math.prod(w.shape[:-2]) <= SPLIT_EXPERT_MAX_BRANCHES)


# The TPU flash kernels keep one head's whole keys and values (forward, dQ) in VMEM, double-buffered.
TPU_ATTENTION_KV_BYTES = 8 << 20


def join_gate_up_for_decode(w_gate, shards: int = 1) -> bool:
  """Whether per-expert decode weights (`moe.split_experts`) over `shards` expert devices hold gate and up
  as one matrix [K, 2N]."""
  return shards == 1 or 2 * w_gate.shape[-2] * w_gate.shape[-1] * w_gate.dtype.itemsize <= JOIN_GATE_UP_MAX_BYTES


def flash_attention_impl(seq_len: int = 0, qk_dim: int = 0, v_dim: int = 0, itemsize: int = 4, *,
                         backend: str | None = None, impl: str = "auto", interpret: Any = False
                         ) -> tuple[str, str, Any]:
  """(platform, "pallas" | "xla", interpret) for flash attention over `seq_len` keys (and queries) per head.

  impl="pallas" forces the kernels; on a host without TPU or GPU they run interpreted (the GPU family
  with `interpret=True` unless `interpret` says otherwise), which is for tests.
  """
  if impl not in ("auto", "pallas", "xla"):
    raise ValueError(f"attention impl must be auto, pallas or xla, got {impl!r}")
  platform = _platform(backend)
  if impl == "pallas" and platform not in ("tpu", "gpu"):
    return "gpu", "pallas", interpret or True
  if impl == "auto":
    if platform == "tpu":  # head dims as the kernels pad them (lanes of 128)
      kv_bytes = 2 * seq_len * (flash_kernel.head_dim(qk_dim, "tpu") + flash_kernel.head_dim(v_dim, "tpu"))
      impl = "pallas" if kv_bytes * itemsize <= TPU_ATTENTION_KV_BYTES else "xla"
    else:
      impl = "pallas" if platform == "gpu" else "xla"
  return platform, impl, interpret


def unstack_layers_for_decode(backend: str | None = None) -> bool:
  """Whether the engine decodes over per-layer weights (`model.unstack_layers`) instead of [L, ...] stacks.

  XLA:CPU copies each layer's weights out of a stack on every decode step; elsewhere the stacked scan
  stays (it compiles one layer, not 61, and TPU/GPU slice without the copy cost mattering as much).
  """
  return _platform(backend) == "cpu"


# Stacks up to this many layers train unrolled on CPU (compile time grows with the layer count).
UNROLL_TRAIN_MAX_LAYERS = 16


def unroll_layers_for_train(num_layers: int, backend: str | None = None) -> bool:
  """Whether the training forward + backward unrolls the layer scan (`forward(unroll_layers=True)`).

  On XLA:CPU the scanned backward zero-fills an [L, ...] buffer for each stacked residual and gradient
  and copies every layer's weights out of the stacks, ~20% of the small benchmark width's step; the
  unrolled layers read their weights in place. Elsewhere, and for deep stacks (K2's 60 MoE layers), the
  scan stays: it compiles one layer.
  """
  return _platform(backend) == "cpu" and num_layers <= UNROLL_TRAIN_MAX_LAYERS


def matmul(x, w, *, backend: str | None = None, impl: str = "auto", tiling: Tiling | None = None,
           out_dtype=None, interpret: Any = False):
  """x[.., K] @ w[K, N] for a dense array or a 2-D QuantizedWeight (leading axes of x are flattened)."""
  platform, impl = _resolve(backend, impl, interpret)
  out_dtype = out_dtype or x.dtype
  impl = "xla" if impl == "ragged" else impl
  if not isinstance(w, QuantizedWeight):
    return jnp.dot(x, w.astype(x.dtype), precision=precision(x.dtype),
                   preferred_element_type=jnp.float32).astype(out_dtype)
  x_mk = x.reshape(-1, x.shape[-1])
  if impl == "xla":
    out = int4_matmul_ref(x_mk, w, out_dtype=out_dtype)
  else:
    out = int4_matmul(x_mk, w, tiling=_tiling(platform, "int4", tiling), out_dtype=out_dtype,
                      platform=platform, interpret=interpret)
  return out.reshape(*x.shape[:-1], w.shape[-1])
