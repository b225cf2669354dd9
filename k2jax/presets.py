"""Named model configurations: the real K2 models and tiny ones for tests and demos."""
from __future__ import annotations

import dataclasses

from k2jax.config import ConfigError, K2Config, RopeConfig

# The released K2 Thinking: 1.03 T parameters, routed experts INT4, 256k context (YaRN factor 64).
# rms_norm_eps is unconfirmed for Thinking; `from_hf` reads the checkpoint's own value.
K2_THINKING = K2Config(
    name="k2_thinking", max_position_embeddings=262144, eos_token_id=163586, expert_quant="int4",
    rope=RopeConfig(theta=50000.0, kind="yarn", factor=64.0, original_max_position_embeddings=4096,
                    beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))

# K2 Instruct: same architecture, 128k context (factor 32), FP8 checkpoint dequantised on load.
K2_INSTRUCT = K2_THINKING.replace(
    name="k2_instruct", max_position_embeddings=131072, eos_token_id=163585, expert_quant=None,
    rope=RopeConfig(theta=50000.0, kind="yarn", factor=32.0, original_max_position_embeddings=4096,
                    beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))

# Tiny K2: the same shape of model (MLA with q-LoRA, 1 dense + MoE layers, YaRN) at toy width.
TINY = K2Config(
    name="tiny", vocab_size=2256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, n_group=1, topk_group=1, routed_scaling_factor=2.827, max_position_embeddings=4096,
    rope=RopeConfig(theta=50000.0, kind="yarn", factor=4.0, original_max_position_embeddings=1024,
                    beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    bos_token_id=2000, eos_token_id=2002, pad_token_id=2255)  # ids of the shipped tiny tokenizer

# Smaller still, for fast unit tests: no q-LoRA, grouped routing.
TINY_NO_QLORA = TINY.replace(name="tiny_no_qlora", q_lora_rank=None, n_routed_experts=8, n_group=4, topk_group=2)

PRESETS: dict[str, K2Config] = {c.name: c for c in (K2_THINKING, K2_INSTRUCT, TINY, TINY_NO_QLORA)}


def get(name: str) -> K2Config:
  try:
    return PRESETS[name]
  except KeyError:
    raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None


_SCALARS = {"int": int, "float": float, "bool": bool, "str": str}


def _placeholders(cls) -> dict:
  """Every scalar field of a config dataclass as an unset, typed placeholder (`Optional` fields too)."""
  from ml_collections import config_dict  # noqa: PLC0415
  out = {}
  for f in dataclasses.fields(cls):
    kind = _SCALARS.get(str(f.type).split("|")[0].strip())
    if kind is not None and f.name != "name":
      out[f.name] = config_dict.placeholder(kind)
  return out


def model_config_section(preset: str):
  """A run config's `model` section: `preset` plus every K2Config field (and `rope.*`) as an unset
  placeholder, so `--config.model.hidden_size=32` changes one field and everything left unset comes
  from the preset (`--config.model.preset=...` changes them all). None (unset) cannot override an
  Optional field to None: pick a preset that has it (e.g. `tiny_no_qlora` for no q-LoRA)."""
  import ml_collections  # noqa: PLC0415
  get(preset)  # a typo fails here, not at the first step
  return ml_collections.ConfigDict({"preset": preset, **_placeholders(K2Config), "rope": _placeholders(RopeConfig)})


def config_overrides(model_cfg) -> dict:
  """The fields a run config's `model` section sets (unset placeholders left out; `rope` as a dict)."""
  fields = {k: v for k, v in dict(model_cfg).items() if v is not None and k != "preset"}
  if "rope" in fields:
    fields["rope"] = {k: v for k, v in dict(fields["rope"]).items() if v is not None}
    if not fields["rope"]:
      del fields["rope"]
  return fields


def from_config_dict(model_cfg) -> K2Config:
  """A K2Config from a run config's `model` section: `preset` plus the fields it sets (`rope` as a dict)."""
  name = dict(model_cfg).get("preset")
  if name is None:
    raise ConfigError("the model config needs a 'preset' field (one of " + ", ".join(sorted(PRESETS)) + ")")
  base = get(name)
  fields = config_overrides(model_cfg)
  rope = fields.pop("rope", None)
  if rope:
    try:
      fields["rope"] = dataclasses.replace(base.rope, **rope)
    except TypeError as e:
      raise ConfigError(f"bad rope override {rope}: {e}") from None
  return base.replace(**fields) if fields else base
