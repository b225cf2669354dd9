"""How near `k2-convert` is to the floor of a durable conversion: the conversion against its parts, one
process, alternating rounds.

  python -m benchmarks.convert_floor --rounds=5          # flags of benchmarks/convert.py apply

Sides, on the synthetic K2-Thinking-format checkpoint of benchmarks/convert.py (read warm):
- `cp -r` and `cp -r` + sync of the folder (each a child process);
- `k2-convert` (in process: no start-up);
- read + transpose: the conversion's reading of every leaf into its slabs, nothing written;
- O_DIRECT write alone: the bytes the conversion writes, leaf by leaf from one buffer, straight to disk
  (no page cache) and fsynced: what persisting the output costs with no conversion work at all;
- read + transpose + O_DIRECT writer: the first with each leaf handed to a thread that writes it so: a
  writer of our own with nothing but the data (not a checkpoint Orbax can read), the most such a writer
  could give.
Prints each side's median wall and CPU (this process's, over all threads; a child's for `cp`).
"""
from __future__ import annotations

import concurrent.futures
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time

import numpy as np
from absl import app, flags

from benchmarks import convert as bench

_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds (each runs every side once, the order alternating).")

PAGE = 4096  # O_DIRECT's alignment of offsets, lengths and buffers


def _leaves(src: str):
  """(checkpoint mapped, [(leaf, keep INT4, span)], dtype) of the conversion of `src`."""
  from k2jax import hf  # noqa: PLC0415
  from k2jax import params as params_lib  # noqa: PLC0415
  from k2jax.config import K2Config  # noqa: PLC0415
  from k2jax.convert import layout, reading  # noqa: PLC0415
  from k2jax.safetensors_io import Checkpoint  # noqa: PLC0415
  c = K2Config.from_hf(src)
  ckpt = Checkpoint(src, check_finite=True)
  hf.validate(ckpt, c)
  dt = params_lib.dtype_from_name("bfloat16")
  out = []
  for leaf in hf.leaves(c):
    keep = hf.is_int4_leaf(leaf, ckpt)
    out.append((leaf, keep, layout.Slabs.span_of(reading.leaf_arrays(leaf, ckpt, dt, keep))))
  return ckpt.mapped(), out, dt


def _write_direct(path: str, arrays) -> None:
  """`arrays` one after another into a new file, bypassing the page cache, then fsynced."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
  off = 0
  try:
    for a in arrays:
      b = memoryview(a.reshape(-1).view(np.uint8))
      whole = len(b) - len(b) % PAGE
      p = 0
      while p < whole:
        p += os.pwrite(fd, b[p:min(whole, p + (64 << 20))], off + p)
      if whole < len(b):  # the unaligned tail, through the page cache
        with open(path, "r+b") as f:
          f.seek(off + whole)
          f.write(b[whole:])
          f.flush()
      off += len(b)
    os.fsync(fd)
  finally:
    os.close(fd)


def _read(src: str, out: str | None) -> None:
  """Every leaf read into two alternating slabs; with `out`, each written there by a writer thread."""
  from k2jax.convert import layout, reading  # noqa: PLC0415
  ckpt, leaves, dt = _leaves(src)
  slabs = layout.Slabs(max(layout.BATCH_BYTES, max(s for *_, s in leaves)) + PAGE * len(leaves))
  align, layout.Slabs.ALIGN = layout.Slabs.ALIGN, PAGE  # every leaf page-aligned for O_DIRECT
  pending: list[list[concurrent.futures.Future]] = [[], []]
  try:
    with (concurrent.futures.ThreadPoolExecutor(reading.workers()) as pool,
          concurrent.futures.ThreadPoolExecutor(2) as writers):
      for i, (leaf, keep, span) in enumerate(leaves):
        if not slabs.fits(span + 2 * PAGE):  # (packed, scales) each page-aligned
          slabs.swap()
          for f in pending[slabs.current]:  # the other slab's writes are done before it is reused
            f.result()
          pending[slabs.current] = []
        value = reading.read_leaf(leaf, ckpt, dt, keep, slabs.empty, pool)
        if out is not None:
          arrays = [value.packed, value.scales] if keep else [value]
          pending[slabs.current].append(writers.submit(_write_direct, os.path.join(out, f"leaf{i}"), arrays))
        del value
      for f in pending[0] + pending[1]:
        f.result()
  finally:
    layout.Slabs.ALIGN = align


def _write_only(src: str, out: str) -> None:
  """The bytes each leaf is, written from one page-aligned buffer of the largest leaf."""
  _, leaves, _ = _leaves(src)
  import mmap  # noqa: PLC0415
  buf = np.frombuffer(mmap.mmap(-1, max(s for *_, s in leaves)), np.uint8)
  buf.fill(0x5A)  # touched once, before any timing of a write from it
  with concurrent.futures.ThreadPoolExecutor(2) as writers:
    list(writers.map(lambda i: _write_direct(os.path.join(out, f"leaf{i}"), [buf[:leaves[i][2]]]),
                     range(len(leaves))))


def main(argv):
  del argv
  from k2jax import cli  # noqa: PLC0415
  from k2jax.convert import convert  # noqa: PLC0415
  cli.quiet_info_logs()  # Orbax's INFO line per save would bury the table
  root = tempfile.mkdtemp(prefix="k2jax-convert-floor-", dir=flags.FLAGS.workdir)
  try:
    src = os.path.join(root, "hf")
    bench.write_checkpoint(bench.config_from_flags(), src)
    size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    bench.read_into_page_cache(src)

    def in_dir(fn):
      def side(out):
        os.makedirs(out)
        fn(out)
      return side

    sides = {
        "cp -r": lambda out: subprocess.run(["cp", "-r", src, out], check=True),
        "cp -r + sync": lambda out: subprocess.run(["sh", "-c", f"cp -r '{src}' '{out}' && sync"], check=True),
        "k2-convert": lambda out: convert(src, out, progress=False),
        "read + transpose": lambda out: _read(src, None),
        "O_DIRECT write alone": in_dir(lambda out: _write_only(src, out)),
        "read + transpose + O_DIRECT writer": in_dir(lambda out: _read(src, out)),
    }
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in sides}
    for r in range(_ROUNDS.value):
      for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
        out = os.path.join(root, "out")
        time.sleep(flags.FLAGS.settle_s)
        before = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        t = time.perf_counter()
        sides[name](out)
        wall = time.perf_counter() - t
        after = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before))
        times[name].append((wall, cpu))
        print(f"round {r} {name}: wall {wall:.2f} s, CPU {cpu:.2f} s", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    cp = statistics.median(w for w, _ in times["cp -r"])
    print(f"\n{size / 1e9:.2f} GB, {_ROUNDS.value} rounds; load at the end {os.getloadavg()[0]:.1f}")
    print(f"{'side':<38}{'wall':>8}{'CPU':>8}{'GB/s':>7}{'cp / side':>11}")
    for name, v in times.items():
      wall = statistics.median(w for w, _ in v)
      cpu = statistics.median(c for _, c in v)
      print(f"{name:<38}{wall:>7.2f}s{cpu:>7.2f}s{size / 1e9 / wall:>7.2f}{cp / wall:>10.0%}")
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
