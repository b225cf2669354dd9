"""Loading a converted checkpoint for the engine: on one device, and on a mesh read whole then placed (how
every entry point loaded before) against read straight into the shards (`load_model(..., mesh)`).

  python -m benchmarks.load_checkpoint --checkpoint=DIR --mesh=expert:2 --repeats=3
  python -m benchmarks.load_checkpoint --layers=19   # converts a synthetic checkpoint first (benchmarks.convert's)

Each side runs in its own process after a pause (`--settle_s`), the checkpoint read into the page cache
first; prints the median time to parameters the engine can run (loaded and placed) and the peak RSS,
against the checkpoint's bytes. Anything it wrote is removed at the end.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile

from absl import app, flags

from benchmarks import convert as bc  # its size flags, checkpoint writer and child runner

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A converted checkpoint (default: convert a synthetic one "
                                  "of the size flags' shape into --workdir).")
_MESH = flags.DEFINE_string("mesh", "expert:2", "The mesh of the two sharded sides (CPU devices are made to fit).")

_SIDES = {
    "one device": "",
    "mesh: read whole, then placed": "whole",
    "mesh: read into its shards": "shards",
}


def _code(checkpoint: str, mesh: str, mode: str) -> str:
  return f"""
import json, time
from k2jax import sharding
if {mode!r}:
  sharding.set_cpu_devices({mesh!r})
import jax
from k2jax.infer import cli_common
mesh = sharding.make_mesh({mesh!r}) if {mode!r} else None
t = time.perf_counter()
p, c = cli_common.load_model(None, {checkpoint!r}, "bfloat16", mesh if {mode!r} == "shards" else None)
if mesh is not None:
  p = sharding.place_for_inference(p, c, mesh)
jax.block_until_ready(p)
print(json.dumps({{"seconds": time.perf_counter() - t}}))
"""


def main(argv):
  del argv
  work = tempfile.mkdtemp(prefix="k2_load_", dir=bc._WORKDIR.value)
  try:
    checkpoint = _CHECKPOINT.value
    if checkpoint is None:
      from k2jax.convert import convert  # noqa: PLC0415
      hf_dir, checkpoint = os.path.join(work, "hf"), os.path.join(work, "converted")
      bc.write_checkpoint(bc.config_from_flags(), hf_dir)
      convert(hf_dir, checkpoint, progress=False)
      shutil.rmtree(hf_dir)
    size = bc._folder_bytes(checkpoint)
    print(f"checkpoint {checkpoint}: {size / 1e9:.2f} GB; mesh {_MESH.value}", flush=True)
    runs: dict[str, list[tuple[float, float, int]]] = {k: [] for k in _SIDES}
    for i in range(bc._REPEATS.value):
      order = list(_SIDES) if i % 2 == 0 else list(_SIDES)[::-1]
      for side in order:
        bc.read_into_page_cache(checkpoint)
        wall, rss, inner = bc._k2jax_child(_code(checkpoint, _MESH.value, _SIDES[side]))
        runs[side].append((wall, inner, rss))
        print(f"  {side}: {inner:.2f} s loading ({wall:.2f} s whole process), peak RSS {rss / 1e9:.2f} GB",
              flush=True)
    print(f"\n| ({size / 1e9:.2f} GB, mesh {_MESH.value}) | loaded and placed, median (runs) | whole process "
          "| peak RSS | x checkpoint |\n|---|---:|---:|---:|---:|")
    for side, rows in runs.items():
      inner = statistics.median(r[1] for r in rows)
      peak = max(r[2] for r in rows)
      print(f"| {side} | {inner:.2f} s ({', '.join(f'{r[1]:.2f}' for r in rows)}) "
            f"| {statistics.median(r[0] for r in rows):.2f} s | {peak / 1e9:.2f} GB | {peak / size:.2f} |")
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
