"""k2-convert and k2-export on a multi-GB synthetic K2-Thinking-format checkpoint: throughput against `cp`,
peak RSS.

  python -m benchmarks.convert                     # ~2.5 GB: 10 layers (9 MoE) x 64 experts, D=2048, F=1024
  python -m benchmarks.convert --experts=128 --layers=16 --repeats=3 --workdir=/big/disk

Writes the checkpoint (INT4 routed experts, bf16 elsewhere, one shard per layer like the release) under
--workdir, then alternates a plain `cp -r` of its folder (into the page cache), a durable `cp -r` + sync
(the converter's output is fsynced before it is committed) and a `k2-convert` of it (and, with
--baseline_code, another checkout's, the two in alternating order), then a `k2-export` of the result
back to HF (the baseline's once; the result is read into the page cache first, as the source of every
side is),
each in its own process after a pause (`--settle_s`), `--repeats` times; prints medians, the ratios,
and the peak RSS of the conversions and exports against the largest shard and the largest leaf.
Everything it wrote is removed at the end.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

_LAYERS = flags.DEFINE_integer("layers", 10, "Decoder layers (the first dense, the rest MoE).")
_EXPERTS = flags.DEFINE_integer("experts", 64, "Routed experts per MoE layer.")
_HIDDEN = flags.DEFINE_integer("hidden", 2048, "Model dim D.")
_FFN = flags.DEFINE_integer("ffn", 1024, "Expert hidden dim F (moe_intermediate_size).")
_VOCAB = flags.DEFINE_integer("vocab", 32768, "Vocabulary size.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "cp / convert pairs to run (medians are reported).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write (default: a temp folder under /tmp).")
_EXPORT = flags.DEFINE_bool("export", True, "Also time k2-export of the converted checkpoint back to HF.")
_BASELINE = flags.DEFINE_string(
    "baseline_code", None, "Another checkout's root (its k2jax/ put first on PYTHONPATH): its converter is "
    "timed too, alternating with this one, for before/after figures from the same run.")
_DATA_FILE_MB = flags.DEFINE_integer(
    "data_file_mb", 0, "This checkout's converter stores each leaf over this many MB in several chunks "
    "(layout.DATA_FILE_BYTES; 0: Orbax's own 2 GiB), as the 1T model's expert stacks are stored.")
_SETTLE = flags.DEFINE_float(
    "settle_s", 3.0, "Pause before each timed side, after the previous side's output is deleted. On a VM "
    "that returns freed memory to its host (free page reporting, ~2 s), memory touched anew is several "
    "times slower to write into; without the pause a side started at once (cp) writes into the pages "
    "the previous side just freed, while the converter, which starts after its imports, gets cold ones.")


def synthetic_config(layers: int, experts: int, hidden: int, ffn: int, vocab: int):
  from k2jax import presets  # noqa: PLC0415
  heads = hidden // 128
  return presets.K2_THINKING.replace(
      name="bench", vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, moe_intermediate_size=ffn,
      num_hidden_layers=layers, num_attention_heads=heads, q_lora_rank=hidden // 4, kv_lora_rank=hidden // 8,
      n_routed_experts=experts, num_experts_per_tok=min(8, experts), bos_token_id=1, eos_token_id=2, pad_token_id=3)


def config_from_flags():
  """The synthetic config the size flags (--layers, --experts, --hidden, --ffn, --vocab) describe."""
  return synthetic_config(_LAYERS.value, _EXPERTS.value, _HIDDEN.value, _FFN.value, _VOCAB.value)


def write_checkpoint(c, folder: str) -> None:
  """Random tensors of every expected name, shape and dtype; a shard per layer (plus one for the rest)."""
  from k2jax.convert.plan import hf_tensor_specs  # noqa: PLC0415
  from k2jax.safetensors_io import DTYPES, save_file  # noqa: PLC0415
  os.makedirs(folder)
  rng = np.random.default_rng(0)
  shards: dict[str, list] = {}
  for name, shape, dt in hf_tensor_specs(c, "int4"):
    key = name.split(".")[2] if name.startswith("model.layers.") else "top"
    shards.setdefault(key, []).append((name, shape, dt))
  weight_map = {}
  names = sorted(shards, key=lambda k: (k == "top", int(k) if k != "top" else 0))
  for i, key in enumerate(names):
    tensors = {}
    for name, shape, dt in shards[key]:
      if name.endswith("weight_shape"):
        out_in = next(s for n, s, _ in shards[key] if n == name.replace("weight_shape", "weight_packed"))
        tensors[name] = np.array([out_in[0], out_in[1] * 8], np.int64)
      elif dt == "I32":
        tensors[name] = rng.integers(-2**31, 2**31 - 1, shape, dtype=np.int32)
      else:
        tensors[name] = (rng.standard_normal(shape, np.float32) * 0.02).astype(DTYPES[dt])
    fname = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
    save_file(tensors, os.path.join(folder, fname))
    weight_map.update({n: fname for n in tensors})
    del tensors
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(c.to_hf(), f, indent=2)


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout


def _k2jax_child(code: str, tree: str = _ROOT) -> tuple[float, int, float | None]:
  """`_child` of `code` on `tree`, failing unless the k2jax it imports is that tree's."""
  check = (f"import os, k2jax; assert os.path.realpath(k2jax.__file__).startswith("
           f"os.path.realpath({tree!r}) + os.sep), k2jax.__file__; ")
  return _child(check + code, tree)


def _baseline(code: str, out: str, label: str) -> tuple[float, float | None]:
  """(wall s, s after start-up) of `code` run on the --baseline_code tree; its output folder removed."""
  s, _, inner = _k2jax_child(code, _BASELINE.value)
  print(f"  {label} {s:.1f} s ({inner:.1f} s after start-up)", flush=True)
  shutil.rmtree(out)
  return s, inner


def _child(code: str, tree: str = _ROOT) -> tuple[float, int, float | None]:
  """(seconds, peak RSS bytes, the work's own seconds if it printed them) of `python -c code` run on the
  checkout `tree`. Run in that folder: `-c` puts the working folder first on sys.path, ahead of
  PYTHONPATH (a child started elsewhere with only PYTHONPATH set imported the working folder's k2jax)."""
  env = dict(os.environ, PYTHONPATH=tree)
  time.sleep(_SETTLE.value)
  t = time.perf_counter()
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=tree)
  out = proc.stdout.read()
  _, status, usage = os.wait4(proc.pid, 0)
  seconds = time.perf_counter() - t
  if status != 0:
    raise RuntimeError(f"child failed ({status}): {code}")
  inner = json.loads(out.strip().splitlines()[-1])["seconds"] if out.strip() else None
  return seconds, usage.ru_maxrss * 1024, inner


def read_into_page_cache(folder: str) -> None:
  """Reads every file of `folder`: the converter leaves its output out of the page cache (it drops what
  it has synced), and every side reads its source from the page cache."""
  for r, _, fs in os.walk(folder):
    for f in fs:
      with open(os.path.join(r, f), "rb", buffering=0) as fh:
        while fh.read(64 << 20):
          pass


def _folder_bytes(folder: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)


def main(argv):
  del argv
  c = config_from_flags()
  root = tempfile.mkdtemp(prefix="k2jax-convert-bench-", dir=_WORKDIR.value)
  try:
    src = os.path.join(root, "hf")
    t = time.perf_counter()
    write_checkpoint(c, src)
    size = _folder_bytes(src)
    shards = [os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors")]
    from k2jax.convert.hf_to_orbax import leaf_bytes_estimate  # noqa: PLC0415
    leaf = max(leaf_bytes_estimate(c, "bfloat16", True).items(), key=lambda kv: kv[1])
    print(f"synthetic checkpoint: {size / 1e9:.2f} GB in {len(shards)} shards (largest {max(shards) / 1e9:.3f} GB), "
          f"largest leaf {leaf[0]} {leaf[1] / 1e9:.3f} GB; written in {time.perf_counter() - t:.0f} s", flush=True)
    baseline = _child("import jax, k2jax.convert, orbax.checkpoint; jax.numpy.zeros(1).block_until_ready()")[1]
    cp_s, cps_s, conv_s, inner_s, rss, export_s, base_s, base_inner = [], [], [], [], [], [], [], []
    export_inner, base_export = [], []
    for i in range(_REPEATS.value):
      dst = os.path.join(root, f"copy{i}")
      cp_s.append(_child(f"import subprocess; subprocess.run(['cp', '-r', {src!r}, {dst!r}], check=True)")[0])
      shutil.rmtree(dst)
      # A durable copy, like the converter's output (its files are fsynced before the commit).
      cps_s.append(_child(f"import os, subprocess; subprocess.run(['cp', '-r', {src!r}, {dst!r}], check=True); "
                          "os.sync()")[0])
      shutil.rmtree(dst)
      out = os.path.join(root, f"conv{i}")
      def convert_code(dst: str, data_file_mb: int = 0) -> str:
        chunks = f"layout.DATA_FILE_BYTES = {data_file_mb << 20}; " if data_file_mb else ""
        return (f"import json; from k2jax.convert import convert, layout; {chunks}"
                f"print(json.dumps(convert({src!r}, {dst!r}, progress=False)))")

      def baseline_side():
        s, inner = _baseline(convert_code(out + "-base"), out + "-base", f"run {i}: baseline convert")
        base_s.append(s)
        base_inner.append(inner)

      # Which side goes first alternates: a side's time depends on the state the previous one left the
      # memory in (the same code run first and then second: the first faster in 6 runs of 6).
      if _BASELINE.value and i % 2 == 0:
        baseline_side()
      s, r, inner = _k2jax_child(convert_code(out, _DATA_FILE_MB.value))
      if _BASELINE.value and i % 2 == 1:
        baseline_side()
      conv_s.append(s)
      inner_s.append(inner)
      rss.append(r)
      print(f"  run {i}: cp {cp_s[-1]:.1f} s, cp + sync {cps_s[-1]:.1f} s, convert {s:.1f} s ({inner:.1f} s "
            f"after start-up; peak RSS {r / 1e9:.2f} GB); load average {os.getloadavg()[0]:.1f}", flush=True)
      if _EXPORT.value:
        back = os.path.join(root, "back")
        read_into_page_cache(out)
        code = (f"import json; from k2jax.convert import export; "
                f"print(json.dumps(export({out!r}, {back!r}, progress=False)))")
        if _BASELINE.value and i == 0:  # the previous exporter once (it is slow)
          base_export.append(_baseline(code, back, f"run {i}: baseline export"))
        s, r, inner = _k2jax_child(code)
        export_s.append(s)
        export_inner.append(inner)
        rss.append(r)
        print(f"  run {i}: export {s:.1f} s ({inner:.1f} s after start-up; peak RSS {r / 1e9:.2f} GB)", flush=True)
        shutil.rmtree(back)
      shutil.rmtree(out)
    cp_m, cps_m = statistics.median(cp_s), statistics.median(cps_s)
    conv_m, inner_m = statistics.median(conv_s), statistics.median(inner_s)
    print(f"cp:        median {cp_m:.1f} s = {size / cp_m / 1e9:.2f} GB/s")
    print(f"cp + sync: median {cps_m:.1f} s = {size / cps_m / 1e9:.2f} GB/s")
    after = "after start-up and header validation (read, transpose, write, commit)"
    for what, m in (("whole process", conv_m), (after, inner_m)):
      print(f"convert:   median {m:.1f} s = {size / m / 1e9:.2f} GB/s = {cp_m / m:.0%} of cp, "
            f"{cps_m / m:.0%} of cp + sync; {what}")
    if base_s:
      for what, m in (("whole process", statistics.median(base_s)), ("after start-up", statistics.median(base_inner))):
        print(f"baseline:  median {m:.1f} s = {size / m / 1e9:.2f} GB/s = {cp_m / m:.0%} of cp, "
              f"{cps_m / m:.0%} of cp + sync; {what} ({_BASELINE.value})")
    if export_s:
      for what, m in (("whole process", statistics.median(export_s)),
                      ("after start-up (restore, transpose, write, commit)", statistics.median(export_inner))):
        print(f"export:    median {m:.1f} s = {size / m / 1e9:.2f} GB/s = {cp_m / m:.0%} of cp, "
              f"{cps_m / m:.0%} of cp + sync; {what}")
    for s, inner in base_export:
      print(f"baseline export: {s:.1f} s = {size / s / 1e9:.2f} GB/s = {cp_m / s:.0%} of cp (one run; "
            f"{inner:.1f} s after start-up)")
    peak = max(rss)
    print(f"peak RSS (convert, export) {peak / 1e9:.2f} GB (a process that only imports JAX + orbax: "
          f"{baseline / 1e9:.2f} GB); "
          f"largest shard {max(shards) / 1e9:.3f} GB, largest leaf {leaf[1] / 1e9:.3f} GB; "
          f"target 2 x leaf + 1 GB = {(2 * leaf[1] + 1e9) / 1e9:.2f} GB")
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"machine: {os.cpu_count()} cores; max RSS of this parent {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
