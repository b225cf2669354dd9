"""Text-in, text-out policies backed by the engine, for the agent loop and heavy mode."""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from k2jax.infer.engine import Engine, PrefixCache
from k2jax.infer.sampling import SamplingParams


@dataclasses.dataclass
class EnginePolicy:
  """Renders nothing itself: takes rendered prompts, generates until `<|im_end|>`, returns the text.

  With `prefix_cache` (the default) the latent caches of the last call's sequences are kept: an agent step
  whose prompt extends the previous one (the re-rendered conversation) computes only the new suffix, and
  identical prompts (heavy mode's first step) are prefilled once. The rendered text stays the source of
  truth: reuse goes up to the first token where the new prompt's tokens differ from the cached ones.
  """
  engine: Engine
  tokenizer: object
  max_new_tokens: int = 256
  sampling: SamplingParams = SamplingParams()
  think_budget: int | None = None
  seed: int = 0
  on_token: Callable[[int, int], None] | None = None
  prefix_cache: bool = True

  def __post_init__(self):
    self.prefix = PrefixCache() if self.prefix_cache else None
    self._key = jax.random.key(self.seed)
    tok = self.tokenizer
    self._stop = sorted(set(tok.stop_ids) | {self.engine.config.eos_token_id})
    self._think = (tok.id_of("<think>"), tok.id_of("</think>"))

  def batch(self, prompts: list[str]) -> list[str]:
    self._key, key = jax.random.split(self._key)
    ids = [self.tokenizer.encode(p, allow_special=True) for p in prompts]
    gen = self.engine.generate(ids, self.max_new_tokens, sampling=self.sampling, key=key, stop_ids=self._stop,
                               think_ids=self._think, think_budget=self.think_budget, on_token=self.on_token,
                               prefix=self.prefix)
    return [self.tokenizer.decode([t for t in toks if t not in self._stop]) for toks in gen.tokens]

  def count_tokens(self, text: str) -> int:
    """Prompt length in this model's tokens (for the agent loop's context budget)."""
    return len(self.tokenizer.encode(text, allow_special=True))

  def __call__(self, prompt: str) -> str:
    return self.batch([prompt])[0]
