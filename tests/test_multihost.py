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


def _savable(arrays: dict) -> dict:
  """np.savez-able arrays: 2-byte floats (bf16, which .npz does not know) as their bytes."""
  return {k: a.view(np.uint8) if a.dtype.itemsize == 2 else a for k, a in arrays.items()}


def _convert_worker(out_dir: str, src: str) -> None:
  """One process of a two-host `k2-convert --mesh`, then a load of its output into the same mesh's shards;
  saves every loaded leaf, gathered, for the parent to compare."""
  from k2jax import sharding  # noqa: PLC0415

  assert sharding.maybe_initialize_distributed()
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  import k2jax  # noqa: PLC0415
  from k2jax.convert import convert  # noqa: PLC0415
  from k2jax.train import checkpointing  # noqa: PLC0415

  mesh = sharding.make_mesh(MESH)
  out = os.path.join(out_dir, "conv")
  convert(src, out, mesh=mesh, progress=False)
  params, _ = checkpointing.load_params_for_inference(out, jnp.bfloat16, mesh=mesh)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  assert any(not x.is_fully_addressable for _, x in flat)  # some leaves really split over both processes
  arrays = {jax.tree_util.keystr(path): np.asarray(multihost_utils.process_allgather(x, tiled=True))
            for path, x in flat}
  # The HF folder read straight into the same shards holds the same values.
  from_hf = k2jax.from_hf(src, jnp.bfloat16, mesh=mesh, progress=False).param_tree()
  for (path, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(from_hf)[0], flat, strict=True):
    assert x.sharding == y.sharding, path
    np.testing.assert_array_equal(np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                                  arrays[jax.tree_util.keystr(path)], err_msg=str(path))
  np.savez(os.path.join(out_dir, f"loaded_{jax.process_index()}.npz"), **_savable(arrays))
  jax.distributed.shutdown()


def _run_two(tmp_path, *args) -> None:
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2),
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen([sys.executable, __file__, str(tmp_path), *args], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  try:
    logs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  _run_two(tmp_path)

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


def test_two_hosts_convert_and_load_into_their_shards_as_one_does(tmp_path):
  """`k2-convert --mesh` over two processes (each writing its own shards), then loading the result into the
  same two-process mesh: every leaf equals one process's conversion and load, bit for bit, and the
  two-process checkpoint loads in one process too; the HF folder read into the mesh holds the same."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from k2jax.convert import convert  # noqa: PLC0415
  from k2jax.train import checkpointing  # noqa: PLC0415
  from test_convert import _k2_thinking_dir  # noqa: PLC0415

  src = _k2_thinking_dir(str(tmp_path / "hf"))
  _run_two(tmp_path, "convert", src)
  convert(src, str(tmp_path / "one"), progress=False)
  for where in ("one", "conv"):
    params, _ = checkpointing.load_params_for_inference(tmp_path / where, jnp.bfloat16)
    want = _savable({jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]})
    for pid in range(2):
      got = np.load(tmp_path / f"loaded_{pid}.npz")
      assert sorted(got.files) == sorted(want), (where, pid)
      for k, a in want.items():
        np.testing.assert_array_equal(got[k], a, err_msg=f"{where} {pid} {k}")


if __name__ == "__main__":
  if sys.argv[2:3] == ["convert"]:
    _convert_worker(sys.argv[1], sys.argv[3])
  else:
    _worker(sys.argv[1])
