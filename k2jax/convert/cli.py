"""`k2-convert` (HF -> k2jax checkpoint) and `k2-export` (k2jax checkpoint -> HF).

  k2-convert --hf_dir=Kimi-K2-Thinking --output_dir=k2t [--dtype=bfloat16] [--mesh=fsdp:-1]
  k2-convert --hf_dir=config.json --dry_run            # the plan, from shapes alone
  k2-export --checkpoint=k2t --output_dir=k2t-hf [--format=k2_thinking|bf16]

Expected failures (bad files, an existing output) print one line and exit 1; nothing that loads is left.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from k2jax import sharding

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "k2-convert: HF checkpoint folder (config.json + safetensors); with "
                    "--dry_run a config.json alone will do.")
flags.DEFINE_string("checkpoint", None, "k2-export: a converted checkpoint, a k2-train workdir or one step "
                    "folder; with --dry_run a config.json alone will do.")
flags.DEFINE_string("output_dir", None, "Folder to create (must not exist or be empty). Written as "
                    "OUTPUT_DIR.partial and renamed when complete.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "k2-convert: dtype of the non-INT4 weights "
                  "(the router bias stays float32).")
flags.DEFINE_enum("format", "k2_thinking", ["k2_thinking", "bf16"], "k2-export: 'k2_thinking' (INT4 routed "
                  "experts, compressed-tensors pack-quantized, bf16 elsewhere) or 'bf16' (all dense).")
flags.DEFINE_bool("dry_run", False, "Print the plan (tensors, bytes per dtype, layout, peak memory, time at "
                  "the measured disk speed) and write nothing.")
flags.DEFINE_bool("allow_nonfinite", False, "k2-convert: accept NaN/Inf weights instead of failing.")
flags.DEFINE_float("max_shard_gb", 4.0, "k2-export: largest safetensors shard, in GiB.")
flags.register_validator("max_shard_gb", lambda gb: gb > 0, "--max_shard_gb must be > 0")
flags.DEFINE_bool("progress", True, "Show a progress bar (bytes, rate, ETA).")
flags.DEFINE_bool("json", False, "Print the summary (or the plan) as JSON.")
sharding.define_mesh_flag()


def _print(result: dict, text: str | None = None) -> None:
  print(json.dumps(result, indent=2) if FLAGS.json or text is None else text)


def _expected_errors():
  from k2jax.config import ConfigError  # noqa: PLC0415
  from k2jax.train.checkpointing import CheckpointError as TrainCheckpointError  # noqa: PLC0415
  return (ValueError, ConfigError, TrainCheckpointError, FileNotFoundError, NotADirectoryError,
          PermissionError, IsADirectoryError)


def _fail(e: BaseException):
  print(f"{os.path.basename(sys.argv[0])}: error: {' '.join(str(e).split())}", file=sys.stderr)
  sys.exit(1)


def convert_main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.hf_dir:
    raise app.UsageError("--hf_dir is required")
  from k2jax.convert import hf_to_orbax, plan  # noqa: PLC0415
  try:
    if FLAGS.dry_run:
      p = plan.plan_convert(FLAGS.hf_dir, FLAGS.output_dir, FLAGS.dtype)
      return _print(p, plan.render(p))
    if not FLAGS.output_dir:
      raise app.UsageError("--output_dir is required")
    mesh = sharding.mesh_from_flags() if FLAGS.mesh else None
    summary = hf_to_orbax.convert(FLAGS.hf_dir, FLAGS.output_dir, dtype=FLAGS.dtype, mesh=mesh,
                                  check_finite=not FLAGS.allow_nonfinite, progress=FLAGS.progress)
  except _expected_errors() as e:
    _fail(e)
  gb = summary["bytes_read"] / 1e9
  _print(summary, f"converted {summary['tensors']} tensors ({gb:.2f} GB, {summary['expert_format']} experts) "
                  f"into {summary['output_dir']} in {summary['seconds']:.1f} s "
                  f"({gb / max(summary['seconds'], 1e-9):.2f} GB/s)")


def export_main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.checkpoint:
    raise app.UsageError("--checkpoint is required")
  from k2jax.convert import orbax_to_hf, plan  # noqa: PLC0415
  max_shard = int(FLAGS.max_shard_gb * 2**30)
  try:
    if FLAGS.dry_run:
      p = plan.plan_export(FLAGS.checkpoint, FLAGS.output_dir, FLAGS.format, max_shard)
      return _print(p, plan.render(p))
    if not FLAGS.output_dir:
      raise app.UsageError("--output_dir is required")
    summary = orbax_to_hf.export(FLAGS.checkpoint, FLAGS.output_dir, fmt=FLAGS.format, max_shard_bytes=max_shard,
                            progress=FLAGS.progress)
  except _expected_errors() as e:
    _fail(e)
  gb = summary["bytes_written"] / 1e9
  _print(summary, f"exported {summary['tensors']} tensors ({gb:.2f} GB, format {summary['format']}) into "
                  f"{summary['output_dir']} in {summary['seconds']:.1f} s")


def run_convert():
  from k2jax import cli  # noqa: PLC0415
  cli.run(convert_main, [__name__, "k2jax.sharding"])


def run_export():
  from k2jax import cli  # noqa: PLC0415
  cli.run(export_main, [__name__])
