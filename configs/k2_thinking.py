"""Fine-tuning the real K2 Thinking (1.03 T parameters) with MuonClip: a multi-host run on a mesh.

  k2-convert --hf_dir=K2_THINKING --output_dir=k2t               # once: the released weights, INT4 kept
  k2-train --config=configs/k2_thinking.py --workdir=runs/k2t --mesh=data:-1,fsdp:8,expert:16 \
      --config.init_from=k2t --config.data.train=chats.jsonl

`k2-plan --preset=k2_thinking --mode=train` sizes the mesh first. Experts are trained dense (bf16 compute
over fp32 masters) with INT4 fake quantisation, the QAT recipe K2 Thinking was released with.
"""
import ml_collections

from k2jax import presets
from k2jax.configs import train_tiny


def get_config() -> ml_collections.ConfigDict:
  cfg = train_tiny.get_config()
  cfg.model = presets.model_config_section("k2_thinking")
  cfg.param_dtype = "float32"     # masters; the step computes in compute_dtype
  cfg.compute_dtype = "bfloat16"
  cfg.remat = "full"
  cfg.qat = True
  cfg.data.train = "synthetic_chat"  # a .jsonl of {"messages": [...]} for a real run
  cfg.data.batch_size = 64
  cfg.data.seq_len = 4096
  cfg.num_steps = 1000
  cfg.optimizer.peak_lr = 2e-5
  cfg.optimizer.end_lr = 2e-6
  cfg.optimizer.warmup_steps = 50
  cfg.optimizer.ns_dtype = "bfloat16"  # the library default (the tiny base keeps fp32 for its recorded runs)
  cfg.log_every = 1
  cfg.eval_every = 200
  cfg.checkpoint_every = 200
  return cfg
