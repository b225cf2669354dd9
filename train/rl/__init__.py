"""Reinforcement learning on the shared model: K2's objective (and GRPO), engine rollouts, `k2-rl`."""
