"""Supervised fine-tuning of the tiny K2 on chat data: loss on assistant replies only."""
from k2jax.configs import train_tiny


def get_config():
  cfg = train_tiny.get_config()
  cfg.data.train = "synthetic_chat"  # or a .jsonl of {"messages": [...]}
  cfg.num_steps = 200
  cfg.optimizer.peak_lr = 1e-3
  cfg.optimizer.end_lr = 1e-4
  cfg.optimizer.warmup_steps = 10
  return cfg
