"""k2-convert (or k2-export) variants A/B in one process: alternating rounds, medians of wall and CPU.

  python -m benchmarks.convert_ab --variants=my_variants.py --rounds=9
  python -m benchmarks.convert_ab --variants=my_variants.py --mode=export --rounds=9

`--variants` is a Python file defining VARIANTS = {name: factory}, each factory returning a context
manager inside which a conversion runs that variant (e.g. the previous code patched back in; an
identity for the current code). The first name is the baseline. Every round runs each variant once,
the order alternating, `--settle_s` after the previous output was deleted (benchmarks/convert.py's
flags apply); CPU is this process's user + sys over all threads (`getrusage`). The source is the synthetic
K2-Thinking-format checkpoint of benchmarks/convert.py (2.69 GB by default), written once and read
warm; with --mode=export, its conversion (read into the page cache) is the source.
"""
from __future__ import annotations

import filecmp
import importlib.util
import os
import resource
import shutil
import statistics
import tempfile
import time

from absl import app, flags

from benchmarks import convert as bench

_VARIANTS = flags.DEFINE_string("variants", None, "Python file defining VARIANTS.", required=True)
_ROUNDS = flags.DEFINE_integer("rounds", 9, "Rounds (each runs every variant once).")
_MODE = flags.DEFINE_enum("mode", "convert", ["convert", "export"], "What is timed.")


def _same_output(a: str, b: str, mode: str) -> bool:
  """Bit-identical results: every HF file of two exports, or every leaf of two conversions (Orbax's
  file names and b-tree nodes differ from run to run, so those are restored and compared)."""
  if mode == "export":
    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False)
                                                   for n in names)
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from k2jax.convert import orbax_to_hf  # noqa: PLC0415
  for (pa, va), (pb, vb) in zip(orbax_to_hf.read_leaves(a), orbax_to_hf.read_leaves(b), strict=True):
    same = pa == pb and all(
        x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x.view(np.uint8), y.view(np.uint8))
        for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb), strict=True))
    if not same:
      return False
  return True


def main(argv):
  del argv
  from k2jax.convert import convert, export  # noqa: PLC0415
  spec = importlib.util.spec_from_file_location("convert_ab_variants", _VARIANTS.value)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  variants = module.VARIANTS
  names = list(variants)
  root = tempfile.mkdtemp(prefix="k2jax-convert-ab-", dir=flags.FLAGS.workdir)
  try:
    src = os.path.join(root, "hf")
    bench.write_checkpoint(bench.config_from_flags(), src)
    run = convert
    if _MODE.value == "export":
      converted = os.path.join(root, "converted")
      convert(src, converted, progress=False)
      bench.read_into_page_cache(converted)
      src, run = converted, export
    results: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    first: dict[str, str] = {}  # each variant's first output, kept to compare
    for r in range(_ROUNDS.value):
      for name in names if r % 2 == 0 else names[::-1]:
        out = os.path.join(root, f"out-{name}")
        time.sleep(flags.FLAGS.settle_s)
        with variants[name]():
          before = resource.getrusage(resource.RUSAGE_SELF)
          t = time.perf_counter()
          run(src, out, progress=False)
          wall = time.perf_counter() - t
          after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        results[name].append((wall, cpu))
        print(f"round {r} {name}: wall {wall:.2f} s, CPU {cpu:.2f} s; load {os.getloadavg()[0]:.1f}", flush=True)
        if name in first:
          shutil.rmtree(out)
        else:
          first[name] = os.path.join(root, f"first-{name}")
          os.rename(out, first[name])
    same = all(_same_output(first[names[0]], first[n], _MODE.value) for n in names[1:])
    print("outputs bit-identical" if same else "outputs DIFFER")
    base = names[0]
    for name in names:
      wall = statistics.median(w for w, _ in results[name])
      cpu = statistics.median(c for _, c in results[name])
      line = f"{name}: median wall {wall:.2f} s, CPU {cpu:.2f} s"
      if name != base:
        won = [sum(a[i] < b[i] for a, b in zip(results[name], results[base])) for i in (0, 1)]
        line += f"; against {base}: wall won {won[0]}/{_ROUNDS.value}, CPU won {won[1]}/{_ROUNDS.value}"
      print(line)
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
