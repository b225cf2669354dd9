"""host_memory.keep_scratch_mapped: a program's scratch block is reused from call to call, not mapped
fresh each time (page faults counted; the results unchanged)."""
import json
import os
import subprocess
import sys

import pytest

# One program with 256 MB of scratch ([n, n] fp32, the product's operand): compiled, then called 16 times.
PROBE = """
import json, resource, sys
from k2jax import host_memory
applied = host_memory.keep_scratch_mapped() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp, numpy as np
n = 8192
f = jax.jit(lambda a, b, v: jnp.exp(jnp.outer(a, b)) @ v)
a, b, v = (jnp.asarray(np.random.default_rng(i).standard_normal(n, np.float32) * 0.1) for i in range(3))
out = f(a, b, v).block_until_ready()
faults = []
for _ in range(16):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  out = f(a, b, v).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults, "out": np.asarray(out).tolist(),
                  "async": jax.config.values["jax_cpu_enable_async_dispatch"]}))
"""


GLIBC_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="keep_scratch_mapped tunes glibc's malloc, on Linux only")


def _probe(mode: str, code: str = PROBE, **env) -> dict:
  """The last stdout line of `code` run in a fresh process (its own malloc), as JSON."""
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **env}  # one CPU device, as the CLIs
  res = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=300, env=env)
  assert res.returncode == 0, res.stderr[-2000:]
  return json.loads(res.stdout.strip().splitlines()[-1])


def _huge_pages_always() -> bool:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[always]" in f.read()
  except OSError:
    return False


@GLIBC_ONLY
def test_scratch_is_reused_across_calls_with_the_same_results():
  kept, plain = _probe("keep"), _probe("default")
  assert kept["applied"] and not kept["async"] and plain["async"]
  pages = 8192 * 8192 * 4 // 4096
  # Fresh scratch faults every page on every call; kept, a call faults only when the heap's free block was
  # split meanwhile (the heap then grows once more: seen on 1-4 of the first calls, then none).
  if not _huge_pages_always():  # 2 MB pages would fault 512x less either way
    assert sorted(plain["faults"])[8] > pages // 2, plain["faults"]
  assert sorted(kept["faults"])[8] < pages // 20, kept["faults"]
  assert kept["out"] == plain["out"]  # the same program, bit for bit


def test_opt_out_leaves_malloc_and_dispatch_alone():
  probe = _probe("keep", K2JAX_DEFAULT_MALLOC="1")
  assert not probe["applied"] and probe["async"]


# A block past 2 GiB (the medium-width train step's scratch is larger) freed at the heap's top: the heap
# keeps it for the next call. Address space only: no page of it is touched.
TRIM_PROBE = """
import ctypes, json
from k2jax import host_memory
applied = host_memory.keep_scratch_mapped()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes, libc.sbrk.argtypes = [ctypes.c_size_t], [ctypes.c_void_p], [ctypes.c_ssize_t]
before = libc.sbrk(0)
block = libc.malloc(3 << 30)
grown = libc.sbrk(0)
libc.free(block)
print(json.dumps({"applied": applied, "grown": grown - before, "kept": libc.sbrk(0) - before}))
"""


@GLIBC_ONLY
def test_a_freed_block_past_two_gib_stays_in_the_heap():
  probe = _probe("keep", TRIM_PROBE)
  assert probe["applied"]
  if probe["grown"] < 5 << 29:
    pytest.skip("the heap could not grow by 2.5 GiB here (malloc mapped the block instead)")
  assert probe["kept"] >= probe["grown"], probe  # a 2 GiB threshold gave ~3 GiB back
