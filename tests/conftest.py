"""Eight fake CPU devices for the sharding tests, and cheap CPU code generation; set before JAX creates its
backends (subprocesses and notebook kernels the tests start inherit both)."""
import os
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the shipped run configs, for the tests that load them

# The tests compile hundreds of tiny programs and run each a few times: compiling dominates, and LLVM's
# optimisation passes are much of it. Level 0 keeps IEEE semantics (no fast math at either level; a long sum
# may be accumulated in another order) and cuts the suite's CPU time by about a third; benchmarks and users
# keep XLA's default.
CHEAP_CODEGEN = "--xla_backend_optimization_level=0"


def xla_flags(device_count: int = 8) -> str:
  """The tests' XLA_FLAGS with `device_count` fake CPU devices (a subprocess may want fewer)."""
  return f"--xla_force_host_platform_device_count={device_count} {CHEAP_CODEGEN}"


_given = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_given] * bool(_given) + [
    f for f in xla_flags().split() if f.split("=")[0] not in _given])


# Before any test imports transformers (see `hf_reference.installed_kernels_package`).
from hf_reference import installed_kernels_package  # noqa: E402

installed_kernels_package()
