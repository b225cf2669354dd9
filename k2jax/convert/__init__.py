"""Checkpoint conversion between HF safetensors and k2jax's own Orbax layout, streamed leaf by leaf.

  k2-convert --hf_dir=HF --output_dir=OUT      HF (bf16/fp32, FP8 block-scaled, INT4 pack-quantized) -> OUT
  k2-export --checkpoint=OUT --output_dir=HF2  OUT (or a k2-train workdir) -> HF (K2 Thinking format or bf16)

A converted checkpoint is laid out as a `k2-train` workdir, so everything that loads one loads it:
  OUT/checkpoints/0/params   the parameter tree (Orbax; INT4 experts as {packed, scales})
  OUT/checkpoints/0/meta     JSON: model config, param dtype, expert format, source
  OUT/hf/                    the source's config.json, tokenizer and other small files, verbatim
"""
from k2jax.convert.orbax_to_hf import export
from k2jax.convert.hf_to_orbax import convert
from k2jax.convert.plan import plan_convert, plan_export

__all__ = ["convert", "export", "plan_convert", "plan_export"]
