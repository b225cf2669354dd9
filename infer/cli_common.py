"""What the inference CLIs share: loading a model and its tokenizer from flags."""
from __future__ import annotations

import os
import sys

from k2jax import params as params_lib


def sampling_params(temperature: float, top_k: int, top_p: float):
  """`SamplingParams` of the flags; a bad value is a usage error. Call before `mesh_and_model`: then it
  is the only thing said."""
  from absl import app  # noqa: PLC0415

  from k2jax.infer.sampling import SamplingParams  # noqa: PLC0415
  try:
    return SamplingParams(temperature, top_k, top_p)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def mesh_and_model(hf_dir: str | None, checkpoint: str | None, dtype: str):
  """(mesh, moe_impl, params, config): the `--mesh` (built before any other JAX work), then the model from
  `load_model`, whose missing or wrong source is a usage error."""
  from absl import app  # noqa: PLC0415

  from k2jax import sharding  # noqa: PLC0415
  mesh = sharding.mesh_from_flags()
  moe_impl = sharding.moe_impl_from_flags(mesh)
  try:
    params, config = load_model(hf_dir, checkpoint, dtype, mesh)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  return mesh, moe_impl, params, config


def load_model(hf_dir: str | None, checkpoint: str | None, dtype: str, mesh=None):
  """(params, config) from an HF folder or a k2-train workdir/checkpoint. With `mesh`, each leaf is read
  straight into the shards the engine places it in (`sharding.place_for_inference`): no process reads,
  and no device holds, more than its part of the model."""
  from k2jax import sharding  # noqa: PLC0415
  dt = params_lib.dtype_from_name(dtype)
  if bool(hf_dir) == bool(checkpoint):
    raise ValueError("give exactly one of --hf_dir and --checkpoint")
  rules = sharding.inference_rules(mesh) if mesh is not None else None
  if hf_dir:
    import k2jax  # noqa: PLC0415
    m = k2jax.from_hf(hf_dir, dtype=dt, mesh=mesh, rules=rules)
    return m.param_tree(), m.config
  from k2jax.train import checkpointing  # noqa: PLC0415
  return checkpointing.load_params_for_inference(checkpoint, dt, mesh=mesh, rules=rules)


def load_tokenizer(hf_dir: str | None, config, checkpoint: str | None = None):
  """The checkpoint's own tokenizer: tiktoken.model in `hf_dir`, or in `checkpoint`/hf (where k2-convert
  keeps the source's files). The project's tiny one only for a model with the tiny vocabulary (the tiny
  presets, k2-train runs of them). Anything else is an error: the wrong vocabulary decodes to garbage."""
  from k2jax import tokenizer, tokenizer_build  # noqa: PLC0415
  from k2jax.convert import layout  # noqa: PLC0415  (a workdir, its checkpoints/ or one step folder)
  folder = hf_dir or ((layout.hf_files_dir(checkpoint) or os.path.join(checkpoint, "hf")) if checkpoint else None)
  if folder and os.path.exists(os.path.join(folder, tokenizer.TIKTOKEN_FILE)):
    return tokenizer.Tokenizer.from_dir(folder)
  tiny = tokenizer_build.tiny_tokenizer()
  if config.vocab_size == tiny.vocab_size:
    return tiny
  where = f"{folder} has no {tokenizer.TIKTOKEN_FILE}" if folder else "no tokenizer folder was given"
  raise ValueError(f"{where}, and the model's vocabulary ({config.vocab_size} ids) is not the tiny one "
                   f"({tiny.vocab_size}); put the checkpoint's {tokenizer.TIKTOKEN_FILE} and "
                   f"{tokenizer.CONFIG_FILE} next to its config.json, or use --prompt_ids with --output=ids")


def warn_greedy_heavy(prog: str, heavy: int, temperature: float) -> None:
  """Heavy mode's attempts are independent samples; decoded greedily they are one attempt n times over."""
  if heavy > 1 and temperature == 0:
    print(f"{prog}: note: --heavy={heavy} with --temperature=0 decodes {heavy} identical attempts; heavy mode "
          "samples them (K2 Thinking is evaluated at --temperature=1)", file=sys.stderr)
