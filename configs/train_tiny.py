"""Pre-training run on the tiny K2 and the embedded synthetic tasks: a few hundred MuonClip steps (WSD).

The base of the other k2-train configs: every field the trainer reads is here.
"""
import ml_collections

from k2jax import presets


def get_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  # Fields left unset come from the preset: --config.model.preset=tiny_no_qlora, --config.model.hidden_size=32.
  cfg.model = presets.model_config_section("tiny")
  cfg.param_dtype = "float32"    # master weights
  cfg.compute_dtype = "float32"  # "bfloat16": params cast inside the step, fp32 masters kept
  cfg.seed = 0
  cfg.init_from = ""             # a k2-train workdir / step folder or a k2-convert output ('' = random init)

  cfg.data = ml_collections.ConfigDict()
  cfg.data.train = "synthetic"   # 'synthetic', 'synthetic_chat', or a .npy / .jsonl / .txt path
  cfg.data.eval = ""             # '' holds out a slice of the train source
  cfg.data.eval_fraction = 0.05
  cfg.data.batch_size = 8
  cfg.data.seq_len = 128
  cfg.data.seed = 0
  cfg.data.chat_targets = "last"  # chat data: train the turns after the last user message, or "all"

  cfg.num_steps = 300
  cfg.stop_after_steps = 0       # > 0: stop early (the schedule still spans num_steps)
  cfg.micro_batches = 1          # gradient accumulation: batch_size is split into this many
  cfg.remat = "none"             # none | full | dots
  cfg.layer_loop = "auto"        # auto (unrolled on CPU, up to 16 layers a stack) | scan | unroll
  cfg.moe_impl = "auto"          # auto (expert-parallel on a mesh with expert > 1) | ragged | ep | ep_a2a
  cfg.qat = False                # INT4 fake quantisation of routed experts inside the loss
  cfg.qk_clip_tau = 100.0        # 0 disables QK-Clip
  cfg.router_bias_u = 1e-3       # aux-loss-free balancing step; 0 disables
  cfg.aux_loss_alpha = 0.0       # sequence-wise balance loss weight (DeepSeek-V3 uses ~1e-4); 0 disables

  cfg.optimizer = ml_collections.ConfigDict()
  cfg.optimizer.peak_lr = 2e-3
  cfg.optimizer.end_lr = 2e-4
  cfg.optimizer.warmup_steps = 20
  cfg.optimizer.decay_fraction = 0.2
  cfg.optimizer.decay = "cosine"
  cfg.optimizer.weight_decay = 0.1
  cfg.optimizer.momentum = 0.95
  cfg.optimizer.rms_scale = 0.2
  cfg.optimizer.adam_b1 = 0.9
  cfg.optimizer.adam_b2 = 0.95
  cfg.optimizer.grad_clip = 0.0
  # Newton-Schulz in fp32 (the library default is bf16): the recorded tiny runs used it, and at this width
  # (matrices of 64 x 32) bf16 is no faster.
  cfg.optimizer.ns_dtype = "float32"

  cfg.log_every = 10
  cfg.eval_every = 100
  cfg.eval_batches = 4
  cfg.checkpoint_every = 100
  cfg.keep_checkpoints = 3
  cfg.async_checkpoints = True
  cfg.progress_bar = True
  return cfg
