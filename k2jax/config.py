"""The model configuration: one frozen dataclass, with presets and HF `config.json` conversion."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping


class ConfigError(ValueError):
  """A configuration field is unknown, missing or inconsistent."""


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_types(obj, numbers: dict[str, str], ints: dict[str, str], bools: tuple[str, ...] = ()) -> None:
  """Field types of a config dataclass; `numbers` / `ints` map a field to its rule: "pos", "nonneg", "any",
  with a trailing "?" allowing None."""
  def ok(v, rule, is_type):
    if rule.endswith("?") and v is None:
      return True
    rule = rule.rstrip("?")
    return is_type(v) and (rule == "any" or v > 0 or (rule == "nonneg" and v == 0))
  for f, rule in numbers.items():
    v = getattr(obj, f)
    if not ok(v, rule, _is_number):
      raise ConfigError(f"{f} must be a {'positive ' if rule.startswith('pos') else ''}number"
                        f"{' or null' if rule.endswith('?') else ''}, got {v!r}")
  for f, rule in ints.items():
    v = getattr(obj, f)
    if not ok(v, rule, lambda x: isinstance(x, int) and not isinstance(x, bool)):
      kind = {"pos": "positive ", "nonneg": "non-negative "}.get(rule.rstrip("?"), "")
      raise ConfigError(f"{f} must be a {kind}integer{' or null' if rule.endswith('?') else ''}, got {v!r}")
  for f in bools:
    if not isinstance(getattr(obj, f), bool):
      raise ConfigError(f"{f} must be true or false, got {getattr(obj, f)!r}")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding on the q_pe / k_pe dims: plain (`factor=1`) or YaRN."""
  theta: float = 50000.0
  kind: str = "yarn"  # "default" or "yarn"
  factor: float = 1.0
  original_max_position_embeddings: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float | None = 1.0
  mscale_all_dim: float | None = 1.0
  attention_factor: float | None = None  # cos/sin multiplier; derived from the fields above when None
  truncate: bool = True

  def __post_init__(self):
    _check_types(self, {"theta": "pos", "factor": "pos", "beta_fast": "any", "beta_slow": "any",
                        "mscale": "any?", "mscale_all_dim": "any?", "attention_factor": "any?"},
                 {"original_max_position_embeddings": "pos"}, ("truncate",))
    if self.kind not in ("default", "yarn"):
      raise ConfigError(f"rope type {self.kind!r} is not supported (use 'default' or 'yarn')")
    if self.kind == "yarn" and self.factor <= 0:
      raise ConfigError(f"rope factor must be > 0, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class K2Config:
  """Architecture of a DeepSeek-V3-family model (K2 is one); field names follow HF `config.json`."""
  vocab_size: int = 163840
  hidden_size: int = 7168
  intermediate_size: int = 18432
  moe_intermediate_size: int = 2048
  num_hidden_layers: int = 61
  first_k_dense_replace: int = 1
  num_attention_heads: int = 64
  q_lora_rank: int | None = 1536
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  n_routed_experts: int = 384
  num_experts_per_tok: int = 8
  n_shared_experts: int = 1
  n_group: int = 1
  topk_group: int = 1
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 2.827
  rms_norm_eps: float = 1e-6
  # The reference builds q_a_layernorm / kv_a_layernorm with its default eps, whatever the config says.
  latent_norm_eps: float = 1e-6
  max_position_embeddings: int = 262144
  rope: RopeConfig = RopeConfig(factor=64.0)
  bos_token_id: int = 163584
  eos_token_id: int = 163586
  pad_token_id: int | None = 163839
  initializer_range: float = 0.02
  # Quantisation of routed experts: None (dense) or "int4" (compressed-tensors pack-quantized, group 32).
  expert_quant: str | None = None
  name: str = "custom"

  def __post_init__(self):
    pos = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
           "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
           "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group")
    _check_types(self, {"routed_scaling_factor": "pos", "rms_norm_eps": "pos", "latent_norm_eps": "pos",
                        "initializer_range": "nonneg"},
                 {**{f: "pos" for f in pos}, "q_lora_rank": "pos?", "first_k_dense_replace": "nonneg",
                  "n_shared_experts": "pos", "max_position_embeddings": "pos", "bos_token_id": "nonneg?",
                  "eos_token_id": "nonneg", "pad_token_id": "nonneg?"}, ("norm_topk_prob",))
    if not isinstance(self.rope, RopeConfig):
      raise ConfigError(f"rope must be a RopeConfig, got {type(self.rope).__name__}")
    if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
      raise ConfigError(f"first_k_dense_replace={self.first_k_dense_replace} must lie in "
                        f"[0, num_hidden_layers={self.num_hidden_layers}]")
    if self.qk_rope_head_dim % 2:
      raise ConfigError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
    if self.num_experts_per_tok > self.n_routed_experts:
      raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds "
                        f"n_routed_experts={self.n_routed_experts}")
    if self.n_routed_experts % self.n_group:
      raise ConfigError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
    if self.topk_group > self.n_group:
      raise ConfigError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
    per_group = self.n_routed_experts // self.n_group
    if self.n_group > 1 and per_group < 2:
      raise ConfigError("group-limited routing scores each group by its top-2 experts: "
                        f"n_routed_experts/n_group={per_group} must be >= 2")
    if self.num_experts_per_tok > self.topk_group * per_group:
      raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts left by group "
                        f"limiting (topk_group * n_routed_experts / n_group = {self.topk_group * per_group})")
    if self.expert_quant not in (None, "int4"):
      raise ConfigError(f"expert_quant must be None or 'int4', got {self.expert_quant!r}")

  # Derived sizes.
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def num_dense_layers(self) -> int:
    return self.first_k_dense_replace

  @property
  def num_moe_layers(self) -> int:
    return self.num_hidden_layers - self.first_k_dense_replace

  @property
  def shared_intermediate_size(self) -> int:
    return self.moe_intermediate_size * self.n_shared_experts

  @property
  def softmax_scale(self) -> float:
    """`qk_head_dim^-0.5`, times mscale(factor, mscale_all_dim)^2 under YaRN (as the reference does)."""
    scale = self.qk_head_dim ** -0.5
    r = self.rope
    if r.kind == "yarn" and r.mscale_all_dim:
      m = yarn_mscale(r.factor, r.mscale_all_dim)
      scale = scale * m * m
    return scale

  @property
  def latent_cache_dim(self) -> int:
    """Values cached per token per layer by absorbed MLA decoding: normed latent + roped k_pe."""
    return self.kv_lora_rank + self.qk_rope_head_dim

  def replace(self, **kw) -> "K2Config":
    unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise ConfigError(f"unknown K2Config field(s): {sorted(unknown)}")
    return dataclasses.replace(self, **kw)

  # HF conversion.
  @classmethod
  def from_hf(cls, source: str | os.PathLike | Mapping[str, Any], *, strict: bool = True) -> "K2Config":
    """Reads an HF `config.json` (a path to it, its folder, or the parsed dict)."""
    if isinstance(source, Mapping):
      return _from_hf(cls, dict(source), strict=strict)
    path, hf = _read_json(source)
    try:
      return _from_hf(cls, hf, strict=strict)
    except ConfigError as e:
      raise ConfigError(f"{path}: {e}") from None

  def to_hf(self) -> dict[str, Any]:
    """An HF `config.json` dict (DeepseekV3ForCausalLM) that round-trips through `from_hf`."""
    return _to_hf(self)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  if scale <= 1:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0


# --- HF config.json -------------------------------------------------------------------------------

# Fields read into K2Config (HF name -> our name).
_HF_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "moe_intermediate_size": "moe_intermediate_size", "num_hidden_layers": "num_hidden_layers",
    "first_k_dense_replace": "first_k_dense_replace", "num_attention_heads": "num_attention_heads",
    "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim", "n_routed_experts": "n_routed_experts",
    "num_experts_per_tok": "num_experts_per_tok", "n_shared_experts": "n_shared_experts", "n_group": "n_group",
    "topk_group": "topk_group", "norm_topk_prob": "norm_topk_prob",
    "routed_scaling_factor": "routed_scaling_factor", "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings", "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id", "initializer_range": "initializer_range",
}
# Fields whose value must be what this implementation computes; anything else is an error.
_HF_REQUIRED_VALUES = {
    "hidden_act": "silu", "scoring_func": "sigmoid", "topk_method": "noaux_tc", "attention_bias": False,
    "tie_word_embeddings": False, "moe_layer_freq": 1, "rope_interleave": True, "pretraining_tp": 1,
}
# Fields with no effect on the forward pass (bookkeeping, training-only or runtime switches).
_HF_IGNORED = {
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "attention_dropout", "aux_loss_alpha", "seq_aux", "ep_size", "output_router_logits",
    "num_nextn_predict_layers", "num_mtp_layers", "quantization_config", "head_dim", "qk_head_dim",
    "num_key_value_heads", "rope_scaling", "rope_parameters", "rope_theta", "_name_or_path", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "add_cross_attention", "tie_encoder_decoder", "id2label", "label2id", "problem_type",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "finetuning_task", "cross_attention_hidden_size", "pruned_heads", "use_bfloat16", "bad_words_ids",
    "_attn_implementation_autoset", "router_aux_loss_coef",
}


def _read_json(source) -> tuple[str, dict[str, Any]]:
  """(path, parsed object) of a config.json given as the file or its folder."""
  path = os.fspath(source)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.exists(path):
    raise ConfigError(f"no config.json at {path}")
  with open(path, "rb") as f:
    try:
      hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConfigError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(hf, dict):
    raise ConfigError(f"{path} holds a JSON {type(hf).__name__}, not an object")
  return path, hf


def _first_id(v):
  return v[0] if isinstance(v, list) and v else v


def _rope_from_hf(hf: Mapping[str, Any]) -> RopeConfig:
  # Old style: `rope_scaling` + top-level `rope_theta`; new style: `rope_parameters` holding both.
  params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if not isinstance(params, dict):
    raise ConfigError(f"rope_scaling / rope_parameters must be an object, got {params!r}")
  params = dict(params)
  theta = params.pop("rope_theta", None) or hf.get("rope_theta")
  if theta is None:
    raise ConfigError("config.json has no rope_theta (top level or in rope_parameters)")
  for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
    if params.get(k) is not None and not _is_number(params[k]):
      raise ConfigError(f"rope parameter {k} must be a number, got {params[k]!r}")
  if not _is_number(theta):
    raise ConfigError(f"rope_theta must be a number, got {theta!r}")
  kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
  params.pop("type", None)
  if kind == "default":
    return RopeConfig(theta=float(theta), kind="default")
  if kind != "yarn":
    raise ConfigError(f"rope type {kind!r} is not supported (use 'default' or 'yarn')")
  omax = params.pop("original_max_position_embeddings", None) or hf.get("max_position_embeddings")
  factor = params.pop("factor", None)
  if factor is None:
    if not (_is_number(hf.get("max_position_embeddings")) and _is_number(omax) and omax > 0):
      raise ConfigError("yarn rope without a factor needs numeric max_position_embeddings and "
                        "original_max_position_embeddings")
    factor = hf["max_position_embeddings"] / omax
  known = {"beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"}
  unknown = set(params) - known
  if unknown:
    raise ConfigError(f"unknown rope parameter(s) {sorted(unknown)}")
  return RopeConfig(
      theta=float(theta), kind="yarn", factor=float(factor), original_max_position_embeddings=(
          int(omax) if _is_number(omax) and float(omax).is_integer() else omax),
      beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
      mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
      attention_factor=params.get("attention_factor"), truncate=bool(params.get("truncate", True)))


def _from_hf(cls, hf: Mapping[str, Any], *, strict: bool) -> K2Config:
  unknown = set(hf) - set(_HF_FIELDS) - set(_HF_REQUIRED_VALUES) - _HF_IGNORED
  if unknown and strict:
    raise ConfigError(f"unknown config.json field(s) {sorted(unknown)}; pass strict=False to ignore them")
  for key, want in _HF_REQUIRED_VALUES.items():
    if key in hf and hf[key] != want and hf[key] is not None:
      raise ConfigError(f"config.json {key}={hf[key]!r} is not supported (this implementation needs {want!r})")
  n_heads = hf.get("num_attention_heads")
  kv_heads = hf.get("num_key_value_heads")
  if kv_heads is not None and kv_heads != n_heads:
    raise ConfigError(f"num_key_value_heads={kv_heads} must equal num_attention_heads={n_heads} in MLA")
  kw = {}
  for hf_name, ours in _HF_FIELDS.items():
    if hf_name in hf:
      kw[ours] = hf[hf_name]
  missing = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
             "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"} - set(kw)
  if missing:
    raise ConfigError(f"config.json lacks required field(s) {sorted(missing)}")
  if "q_lora_rank" not in hf:
    raise ConfigError("config.json lacks q_lora_rank (use null for a single q projection)")
  for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
    if k in kw:
      kw[k] = _first_id(kw[k])
  if "n_group" in kw and kw["n_group"] is None:
    kw["n_group"] = 1
  if "topk_group" in kw and kw["topk_group"] is None:
    kw["topk_group"] = 1
  kw["rope"] = _rope_from_hf(hf)
  qc = hf.get("quantization_config")
  if qc:
    from k2jax import quant_config  # noqa: PLC0415  (only needed for quantised checkpoints)
    kw["expert_quant"] = quant_config.expert_quant_from_hf(qc)
  kw["name"] = hf.get("_name_or_path") or hf.get("model_type") or "hf"
  try:
    return cls(**kw)
  except TypeError as e:
    raise ConfigError(f"bad config.json: {e}") from None


def _to_hf(c: K2Config) -> dict[str, Any]:
  out: dict[str, Any] = {
      "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
      "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False, "moe_layer_freq": 1,
      "scoring_func": "sigmoid", "topk_method": "noaux_tc", "num_key_value_heads": c.num_attention_heads,
      "num_nextn_predict_layers": 0, "rope_interleave": True,
  }
  for hf_name, ours in _HF_FIELDS.items():
    out[hf_name] = getattr(c, ours)
  r = c.rope
  out["rope_theta"] = r.theta
  if r.kind == "yarn":
    rs = {"type": "yarn", "factor": r.factor, "original_max_position_embeddings": r.original_max_position_embeddings,
          "beta_fast": r.beta_fast, "beta_slow": r.beta_slow, "mscale": r.mscale, "mscale_all_dim": r.mscale_all_dim}
    if r.attention_factor is not None:
      rs["attention_factor"] = r.attention_factor
    if not r.truncate:
      rs["truncate"] = False
    out["rope_scaling"] = rs
  else:
    out["rope_scaling"] = None
  if c.expert_quant == "int4":
    from k2jax import quant_config  # noqa: PLC0415
    out["quantization_config"] = quant_config.int4_quantization_config()
  return out
