"""Two CPU processes on localhost form one 4-device mesh; their sharded forward equals one process's."""
import os
import socket
import subprocess
import sys

import numpy as np

from conftest import xla_flags
from host_params import host_params

C_NAME, BATCH, SEQ, MESH = "tiny", 4, 12, "fsdp:2,expert:2"
IMPLS = ("ep", "ep_a2a")


def _tokens():
  return np.random.default_rng(0).integers(0, 2000, (BATCH, SEQ)).astype(np.int32)


def _worker(out_dir: str) -> None:
  """One process: join the others, build the global mesh, run the sharded forward, save the logits."""
  from k2jax import sharding  # noqa: PLC0415

  assert sharding.maybe_initialize_distributed()
  import jax  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415
  from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

  from k2jax import model as model_lib, presets  # noqa: PLC0415

  c = presets.get(C_NAME)
  assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
  mesh = sharding.make_mesh(MESH)
  p = sharding.place_params(host_params(c), c, mesh)  # each process fills its own shards
  host = _tokens()
  tokens = jax.make_array_from_callback(host.shape, NamedSharding(mesh, P()), lambda idx: host[idx])
  for impl in IMPLS:
    with sharding.use_mesh(mesh):
      logits = jax.jit(lambda p, t: model_lib.forward(p, c, t, moe_impl=impl).logits)(p, tokens)
    assert not logits.is_fully_addressable  # really spread over both processes
    full = multihost_utils.process_allgather(logits, tiled=True)
    np.save(os.path.join(out_dir, f"logits_{impl}_{jax.process_index()}.npy"), full)
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2),
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen([sys.executable, __file__, str(tmp_path)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  try:
    logs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]

  import jax  # noqa: PLC0415

  from k2jax import model as model_lib, presets  # noqa: PLC0415
  from hf_reference import rel_err  # noqa: PLC0415

  c = presets.get(C_NAME)
  ref = jax.jit(lambda p, t: model_lib.forward(p, c, t).logits)(host_params(c), _tokens())
  for impl in IMPLS:
    for pid in range(2):
      got = np.load(tmp_path / f"logits_{impl}_{pid}.npy")
      assert got.shape == ref.shape
      assert rel_err(got, ref) <= 1e-5, (impl, pid)


if __name__ == "__main__":
  _worker(sys.argv[1])
