"""Sharding in one place: logical axis names -> mesh axes, applied to params and activations.

The mesh always has the four axes `data, fsdp, expert, tensor` (size 1 where unused):
  data    pure data parallelism (params replicated),
  fsdp    data parallelism with params, gradients and optimizer state sharded along `embed`,
  expert  routed experts split across devices (tokens also split along it outside the experts),
  tensor  heads / MLP hidden / vocab split across devices.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None). Axes absent from the mesh are dropped.
# Outside the routed experts the `expert` axis acts as one more fsdp axis: it splits the batch and,
# for weights without an expert dim, the `embed` dim (expert weights spend it on their expert dim).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "seq": None,
    "vocab": "tensor",
    "embed": ("fsdp", "expert"),
    "heads": "tensor",
    "mlp": "tensor",
    "moe_mlp": "tensor",
    "expert": "expert",
    "layers": None,
    "norm": None,
    "router": None,
    "q_lora": ("fsdp", "expert"),   # so q_b / kv_b, which have no embed dim, are split too
    "kv_lora": ("fsdp", "expert"),
    "kv_a": None,
    "qk_head": None,
    "kv_b": None,
    "v_head": None,
}


# Inference on a CPU mesh with `expert` > 1: the devices share one host's memory and cores. The routed
# experts are split over `expert` (each device runs its own experts' loops on its own core: XLA:CPU runs a
# program's loops on one thread), and the dense parts are split tensor-parallel over the same devices
# (heads, MLP hidden, vocab), so that each device reads its share of every weight once per decode step. A
# batch split instead would have each device stream all the dense weights for its rows (decoding is bound
# by those reads: twice the CPU time of one device in all), and a batch of one could not split at all.
CPU_INFERENCE_RULES: dict[str, str | tuple[str, ...] | None] = {
    **{name: None for name in DEFAULT_RULES}, "batch": ("data", "fsdp"), "expert": "expert",
    "heads": ("tensor", "expert"), "mlp": ("tensor", "expert"), "vocab": ("tensor", "expert")}


def inference_rules(mesh) -> dict:
  """The rules the engine runs under on `mesh`: `CPU_INFERENCE_RULES` on a CPU mesh with `expert` > 1
  (the expert-parallel CPU path), else `DEFAULT_RULES`."""
  cpu_ep = mesh is not None and mesh_platform(mesh) == "cpu" and dict(mesh.shape).get("expert", 1) > 1
  return dict(CPU_INFERENCE_RULES if cpu_ep else DEFAULT_RULES)


class MeshError(ValueError):
  """A mesh spec is malformed or does not fit the devices."""


_state = threading.local()


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Mapping[str, object] | None = None) -> Iterator[Mesh]:
  """Makes `constrain` and `partition_spec` act on `mesh` inside the block.

  `constrain` reads the mesh while tracing: jit a fresh function inside the block (a function traced
  outside it, or under another mesh, keeps the constraints it was traced with).
  """
  prev = getattr(_state, "ctx", None)
  _state.ctx = (mesh, dict(DEFAULT_RULES if rules is None else rules))
  try:
    with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else contextlib.nullcontext():
      yield mesh
  finally:
    _state.ctx = prev


def on_mesh(mesh: Mesh | None, rules: Mapping[str, object] | None = None):
  """`use_mesh(mesh, rules)`, or no context at all for `mesh=None` (one device)."""
  return use_mesh(mesh, rules) if mesh is not None else contextlib.nullcontext()


def current() -> tuple[Mesh, dict] | None:
  return getattr(_state, "ctx", None)


def partition_spec(axes: Sequence[str | None], mesh: Mesh | AbstractMesh, rules: Mapping[str, object],
                   shape: Sequence[int] | None = None) -> PartitionSpec:
  """Logical axes -> PartitionSpec. With `shape`, a mesh axis that would split a dim unevenly is left out."""
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    target = rules.get(name) if name is not None else None
    names = (target,) if isinstance(target, str) else tuple(target or ())
    # A mesh axis may shard one dim only, and only when present and larger than 1.
    names = tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1 and n not in used)
    if shape is not None:
      names = _dividing(names, shape[i], mesh)
    used.update(names)
    out.append(names[0] if len(names) == 1 else (names or None))
  return PartitionSpec(*out)


def _dividing(names: Sequence[str], dim: int, mesh) -> tuple[str, ...]:
  """The mesh axes, in order, whose running product still divides `dim`."""
  kept, prod = [], 1
  for n in names:
    if dim % (prod * mesh.shape[n]) == 0:
      kept.append(n)
      prod *= mesh.shape[n]
  return tuple(kept)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh) -> PartitionSpec:
  """`spec` with the mesh axes that do not divide their dim left out (padded to len(shape))."""
  entries = tuple(spec) + (None,) * (len(shape) - len(spec))
  out = []
  for entry, dim in zip(entries, shape):
    names = _dividing((entry,) if isinstance(entry, str) else tuple(entry or ()), dim, mesh)
    out.append(names[0] if len(names) == 1 else (names or None))
  return PartitionSpec(*out)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical axes; a no-op outside `use_mesh`."""
  ctx = current()
  if ctx is None:
    return x
  mesh, rules = ctx
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, partition_spec(axes, mesh, rules, x.shape)))


# --- meshes ---------------------------------------------------------------------------------------

def parse_mesh_spec(spec: str | None, n_devices: int) -> dict[str, int]:
  """`"data:2,fsdp:-1,expert:2"` -> sizes of all four axes, multiplying to `n_devices`.

  Missing axes have size 1; one axis may be -1 (takes the remaining devices). No spec (None, "" or
  "auto"): every device on `fsdp`, which shards every large weight and needs no divisibility by
  heads or experts.
  """
  if n_devices < 1:
    raise MeshError(f"need at least one device, got {n_devices}")
  if spec is None or spec.strip() in ("", "auto"):
    return {a: (n_devices if a == "fsdp" else 1) for a in MESH_AXES}
  sizes: dict[str, int] = {}
  for part in spec.split(","):
    name, sep, value = (s.strip() for s in part.partition(":"))
    if not sep or not name or not value:
      raise MeshError(f"bad mesh spec {spec!r}: expected comma-separated 'axis:size', got {part.strip()!r}")
    if name not in MESH_AXES:
      raise MeshError(f"unknown mesh axis {name!r} in {spec!r}; known axes: {', '.join(MESH_AXES)}")
    if name in sizes:
      raise MeshError(f"mesh axis {name!r} given twice in {spec!r}")
    try:
      size = int(value)
    except ValueError:
      raise MeshError(f"bad size {value!r} for mesh axis {name!r} in {spec!r}") from None
    if size < 1 and size != -1:
      raise MeshError(f"mesh axis {name!r} has size {size}; sizes are >= 1 (or -1 for the rest)")
    sizes[name] = size
  wild = [a for a, s in sizes.items() if s == -1]
  if len(wild) > 1:
    raise MeshError(f"at most one mesh axis may be -1 in {spec!r}, got {wild}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if wild:
    if n_devices % fixed:
      raise MeshError(f"mesh spec {spec!r}: {n_devices} devices are not divisible by {fixed}")
    sizes[wild[0]] = n_devices // fixed
  elif fixed != n_devices:
    raise MeshError(f"mesh spec {spec!r} has {fixed} devices in all, but there are {n_devices}")
  return {a: sizes.get(a, 1) for a in MESH_AXES}


def format_mesh(mesh_or_sizes) -> str:
  sizes = dict(mesh_or_sizes.shape) if hasattr(mesh_or_sizes, "shape") else dict(mesh_or_sizes)
  return ",".join(f"{a}:{sizes[a]}" for a in MESH_AXES)


def make_mesh(spec: str | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over all devices (every process's, after `jax.distributed.initialize`) or `devices`."""
  n = len(jax.devices()) if devices is None else len(devices)
  sizes = parse_mesh_spec(spec, n)
  shape = tuple(sizes[a] for a in MESH_AXES)
  types = (AxisType.Auto,) * len(MESH_AXES)  # GSPMD propagation from the constraints the model sets
  if devices is None:
    return jax.make_mesh(shape, MESH_AXES, axis_types=types)
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=types)


def abstract_mesh(spec: str | None, n_devices: int | None = None) -> AbstractMesh:
  """A device-free mesh of the given shape, for planning sizes that no local machine has."""
  if n_devices is None:
    if spec is None or "-1" in spec or spec.strip() in ("", "auto"):
      raise MeshError("give the device count for a mesh spec that does not fix every axis")
    n_devices = _spec_product(spec)
  sizes = parse_mesh_spec(spec, n_devices)
  return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                      axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _spec_product(spec: str) -> int:
  prod = 1
  for part in spec.split(","):
    try:
      prod *= int(part.partition(":")[2])
    except ValueError:
      raise MeshError(f"bad mesh spec {spec!r}") from None
  return prod


# --- parameters -----------------------------------------------------------------------------------

def _leaf_sharding(spec, mesh, rules, node, fit: bool):
  """NamedSharding(s) for one parameter: an array, or a pytree (INT4 weight) with `partition_specs`."""
  pspec = partition_spec(spec.axes, mesh, rules, spec.shape if fit else None)
  if node is not None and hasattr(node, "partition_specs"):
    specs = node.partition_specs(pspec)
    return jax.tree.map(lambda s, leaf: NamedSharding(mesh, fit_spec(s, leaf.shape, mesh) if fit else s),
                        specs, node, is_leaf=lambda x: isinstance(x, PartitionSpec))
  return NamedSharding(mesh, pspec)


def param_shardings(config, mesh, rules: Mapping[str, object] | None = None, params: Any = None, *,
                    fit: bool = True):
  """Tree of NamedSharding for the parameter tree (from `params.logical_axes` and the rules).

  `params` (arrays or ShapeDtypeStructs) is needed only when some leaves are INT4 weight pytrees;
  their parts then get the layout the weight reports for the logical spec. A mesh axis that does not
  divide its dim is left out (that dim is held whole); `fit=False` keeps it, for reports only.
  """
  from k2jax import params as params_lib  # noqa: PLC0415  (params imports nothing from here)
  rules = DEFAULT_RULES if rules is None else rules
  specs = params_lib.param_specs(config)
  if params is None:
    return params_lib.map_specs(lambda s: _leaf_sharding(s, mesh, rules, None, fit), specs)
  return jax.tree.map(lambda s, node: _leaf_sharding(s, mesh, rules, node, fit), specs, params,
                      is_leaf=params_lib.is_spec)


def init_params_sharded(config, key: jax.Array, dtype=jnp.float32, mesh: Mesh | None = None,
                        rules: Mapping[str, object] | None = None):
  """`params.init_params`, each leaf created directly in its shards (no host or single-device copy).

  With partitionable threefry (JAX's default) the random bits equal those of the unsharded `init_params`.
  """
  from k2jax import params as params_lib  # noqa: PLC0415
  if mesh is None:
    ctx = current()
    if ctx is None:
      raise MeshError("init_params_sharded needs a mesh (argument or `use_mesh`)")
    mesh, rules = ctx[0], rules or ctx[1]
  out = param_shardings(config, mesh, rules)
  return jax.jit(lambda k: params_lib.init_params(config, k, dtype), out_shardings=out)(key)


def place_params(tree, config, mesh, rules: Mapping[str, object] | None = None):
  """Existing parameters placed with their shardings. Host (numpy) leaves, the same in every process,
  are cut per device with `make_array_from_callback`, so a process only transfers its own shards."""
  def put(x, s):
    if isinstance(x, np.ndarray):
      return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return jax.device_put(x, s)

  return jax.tree.map(put, tree, param_shardings(config, mesh, rules, params=tree))


# --- flags and multi-host start-up ----------------------------------------------------------------

def define_mesh_flag(default: str | None = None) -> None:
  """Defines `--mesh`, `--moe_impl` and `--distributed` once (safe to call from several entry points)."""
  from absl import flags  # noqa: PLC0415
  if "mesh" not in flags.FLAGS:
    flags.DEFINE_string("mesh", default, "Device mesh, e.g. 'data:2,fsdp:-1,expert:4,tensor:1' (axes "
                        f"{', '.join(MESH_AXES)}; -1 takes the rest). Default: every device on fsdp. On a CPU "
                        "host a spec without -1 makes that many CPU devices: 'expert:2' decodes with the routed "
                        "experts split over two cores.")
  if "moe_impl" not in flags.FLAGS:
    flags.DEFINE_enum("moe_impl", "auto", list(MOE_IMPLS),
                      "Routed-expert implementation. 'auto': expert-parallel when the mesh has expert > 1 "
                      "('ep_a2a' on TPU/GPU, 'ep' elsewhere), else 'ragged'.")
  if "distributed" not in flags.FLAGS:
    flags.DEFINE_enum("distributed", "env", ["env", "auto", "off"],
                      "Multi-host start-up: 'env' when JAX_NUM_PROCESSES > 1 (with JAX_COORDINATOR_ADDRESS "
                      "and JAX_PROCESS_ID), 'auto' lets JAX detect the cluster (TPU pods, SLURM, ...).")


# --- which MoE implementation a mesh gets -----------------------------------------------------------

# "ragged": every device runs every expert (single device, or experts gathered by GSPMD); "ep": experts
# split over `expert`, tokens brought by all-gather; "ep_a2a": the same with ragged all-to-all; "dense":
# the O(T*E) reference. "auto" picks from the mesh (see `choose_moe_impl`).
MOE_IMPLS = ("auto", "ragged", "ep", "ep_a2a", "dense")
# Backends whose XLA implements `ragged_all_to_all` (elsewhere "ep_a2a" runs an emulation of it).
RAGGED_ALL_TO_ALL_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")


def mesh_platform(mesh) -> str | None:
  """The platform of a concrete mesh's devices; None for an abstract mesh."""
  if isinstance(mesh, AbstractMesh):
    return None
  return mesh.devices.flat[0].platform


def choose_moe_impl(mesh, override: str | None = "auto", platform: str | None = None) -> str:
  """The MoE implementation for `mesh`: `override` unless "auto"/None; else expert parallelism when the
  mesh has `expert` > 1 ("ep_a2a" where the backend has ragged all-to-all, "ep" elsewhere), else "ragged".

  `platform` defaults to the mesh's devices'; an abstract mesh (planning) is taken to be an accelerator.
  """
  if override not in (None, *MOE_IMPLS):
    raise ValueError(f"moe_impl must be one of {', '.join(MOE_IMPLS)}, got {override!r}")
  if override not in (None, "auto"):
    return override
  if mesh is None or dict(mesh.shape).get("expert", 1) <= 1:
    return "ragged"
  platform = platform or mesh_platform(mesh) or "tpu"
  return "ep_a2a" if platform in RAGGED_ALL_TO_ALL_PLATFORMS else "ep"


def describe_moe_impl(impl: str, mesh) -> str:
  """One line saying how the routed experts run, for the entry points to print."""
  n = dict(mesh.shape).get("expert", 1) if mesh is not None else 1
  how = {"ragged": "experts not split: each device runs all of them",
         "ep": f"expert-parallel over expert:{n}, all-gather dispatch",
         "ep_a2a": f"expert-parallel over expert:{n}, ragged all-to-all dispatch",
         "dense": "dense reference (every expert on every token)"}[impl]
  return f"moe_impl: {impl} ({how})"


def mesh_from_flags() -> Mesh:
  """Joins the other hosts if asked to, then builds the `--mesh` (on one host, with as many CPU devices
  as it names: `set_cpu_devices`). Call before any other JAX work."""
  from absl import flags  # noqa: PLC0415
  define_mesh_flag()
  if not maybe_initialize_distributed(flags.FLAGS.distributed):
    set_cpu_devices(flags.FLAGS.mesh)
  return make_mesh(flags.FLAGS.mesh)


def set_cpu_devices(spec: str | None) -> bool:
  """Gives JAX's CPU backend the devices a mesh spec that fixes every axis names (`"expert:2"`: two).

  XLA:CPU runs a program's loops on one thread; with one CPU device per core and the routed experts
  split over them (`--mesh=expert:2`), each device runs its own experts' loops on its own core. The count
  must be set before JAX starts its backends: afterwards (or for a spec with -1, or none) this does
  nothing and `make_mesh` says whether the spec fits the devices there are. Accelerator backends are not
  affected. True if it set the count."""
  if spec is None or spec.strip() in ("", "auto") or "-1" in spec or jax.distributed.is_initialized():
    return False
  n = _spec_product(spec)
  parse_mesh_spec(spec, n)  # a malformed spec fails here, with its own message
  if n <= 1:
    return False
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # the backends are up already
    return False
  return True


def place_for_inference(tree, config, mesh):
  """Parameters placed for the engine on `mesh` (`inference_rules`), after `check_mesh_fits_model`."""
  check_mesh_fits_model(mesh, config)
  return place_params(tree, config, mesh, inference_rules(mesh))


def check_mesh_fits_model(mesh, config) -> None:
  """A one-line MeshError where the mesh's `expert` axis does not divide the model's routed experts."""
  n = dict(mesh.shape).get("expert", 1) if mesh is not None else 1
  experts = getattr(config, "n_routed_experts", 0)
  if n > 1 and experts % n:
    raise MeshError(f"mesh {format_mesh(mesh)}: the expert axis ({n}) does not divide the model's "
                    f"{experts} routed experts")


def moe_impl_from_flags(mesh, default: str | None = None) -> str:
  """`choose_moe_impl` for `--moe_impl` (an explicit flag wins over `default`, e.g. a run config's
  `moe_impl`); prints the choice to stderr so it shows beside the run's output."""
  import sys  # noqa: PLC0415
  from absl import flags  # noqa: PLC0415
  define_mesh_flag()
  flag = flags.FLAGS["moe_impl"]
  override = flag.value if flag.present or default is None else default
  impl = choose_moe_impl(mesh, override)
  print(describe_moe_impl(impl, mesh), file=sys.stderr)
  return impl


_ENV_ADDRESS, _ENV_COUNT, _ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def maybe_initialize_distributed(mode: str = "env", env: Mapping[str, str] | None = None) -> bool:
  """Calls `jax.distributed.initialize` on a multi-host run; a no-op on one host. True if it did.

  mode "env": initialise when JAX_NUM_PROCESSES > 1, from JAX_COORDINATOR_ADDRESS / JAX_PROCESS_ID;
  "auto": always, letting JAX detect the cluster; "off": never. Must run before JAX touches devices.
  """
  if mode not in ("env", "auto", "off"):
    raise ValueError(f"distributed mode must be 'env', 'auto' or 'off', got {mode!r}")
  if mode == "off" or jax.distributed.is_initialized():
    return False
  env = os.environ if env is None else env
  if mode == "auto":
    jax.distributed.initialize()
    return True
  count = int(env.get(_ENV_COUNT, "1") or 1)
  if count <= 1:
    return False
  missing = [k for k in (_ENV_ADDRESS, _ENV_ID) if not env.get(k)]
  if missing:
    raise MeshError(f"{_ENV_COUNT}={count} but {' and '.join(missing)} not set")
  # Cross-process collectives on CPU need an implementation; GPU/TPU ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=env[_ENV_ADDRESS], num_processes=count,
                             process_id=int(env[_ENV_ID]))
  return True
