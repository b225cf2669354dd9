"""Random tiny HF DeepseekV3 reference models, saved with the reference's own `save_pretrained`."""
from __future__ import annotations

import numpy as np


def installed_kernels_package() -> None:
  """Imports the installed PyPI package `kernels` (transformers >= 5 imports it, for its kernel hub, when it
  is installed) ahead of this checkout's kernels/ folder. That folder is installed as `k2jax.kernels`, but
  from the checkout's root, which `python -m` puts first on sys.path, it would be found under the bare
  name too, and transformers' import of it would fail. Nothing in k2jax imports the bare name."""
  import importlib.util  # noqa: PLC0415
  import sys  # noqa: PLC0415
  from pathlib import Path  # noqa: PLC0415
  root = Path(__file__).resolve().parents[1]
  ours = lambda m: Path(getattr(m, "__file__", None) or "/").resolve().is_relative_to(root)
  if "kernels" in sys.modules and not ours(sys.modules["kernels"]):
    return
  sys.modules.pop("kernels", None)
  saved = sys.path[:]
  sys.path[:] = [p for p in saved if Path(p or ".").resolve() != root]
  try:
    if importlib.util.find_spec("kernels") is not None:
      importlib.import_module("kernels")
  finally:
    sys.path[:] = saved


BASE = dict(
    vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
    n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=20, kv_lora_rank=12, qk_rope_head_dim=8,
    qk_nope_head_dim=12, v_head_dim=10, routed_scaling_factor=2.827, norm_topk_prob=True,
    max_position_embeddings=512, rms_norm_eps=1e-6, num_mtp_layers=0, tie_word_embeddings=False,
    rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.7, "rope_theta": 10000.0},
)


def make_reference(folder: str, seed: int = 0, **overrides):
  """Builds a DeepseekV3ForCausalLM with every weight random (norms and router bias too) and saves it."""
  import torch  # noqa: PLC0415
  from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: PLC0415

  kw = {**BASE, **overrides}
  torch.manual_seed(seed)
  model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw)).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
      if "inv_freq" in name:
        continue
      if name.endswith("norm.weight") or "layernorm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif "e_score_correction_bias" in name:
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.08 * torch.randn(p.shape, generator=gen))
  model.save_pretrained(folder)
  return model


def reference_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None,
                     position_ids: np.ndarray | None = None) -> np.ndarray:
  import torch  # noqa: PLC0415
  kw = {}
  if attention_mask is not None:
    kw["attention_mask"] = torch.tensor(attention_mask, dtype=torch.long)
  if position_ids is not None:
    kw["position_ids"] = torch.tensor(position_ids, dtype=torch.long)
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long), **kw).logits.double().numpy()


def rel_err(a, b, mask=None) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if mask is not None:
    a, b = a[mask], b[mask]
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))
