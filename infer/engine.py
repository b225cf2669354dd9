"""The inference engine: jit-compiled prefill and decode over the absorbed MLA latent cache.

It runs `k2jax.model.forward` itself (the same function training uses) with a `Cache`; batched prompts of
different lengths are right-padded and each row keeps its own length. Prompts go through in chunks of
`prefill_chunk` tokens (bounded activation memory), identical prompts are prefilled once, and with a
`PrefixCache` a prompt that extends an earlier sequence reuses that sequence's latent cache up to the first
differing token, so only the new suffix is computed (agent steps, heavy mode's shared prompt).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from k2jax import expert_parallel, model as model_lib, moe, sharding
from k2jax.config import K2Config
from k2jax.kernels import dispatch
from k2jax.infer.sampling import SamplingParams, sample_with_logprob


@dataclasses.dataclass
class Generation:
  tokens: list[list[int]]          # generated ids per sequence (stop token included when hit)
  finish_reasons: list[str]        # "stop", "length"
  prompt_lengths: list[int]
  think_tokens: list[int]          # tokens spent inside <think> ... </think>
  # log-prob of each generated token under the distribution it was sampled from (temperature, top-k,
  # top-p; greedy: temperature 1); a `</think>` forced by the thinking budget gets 0.
  logprobs: list[list[float]] = dataclasses.field(default_factory=list)


def _bucket(n: int, max_len: int, minimum: int = 16) -> int:
  """Rounds prompt lengths up to a power of two so a handful of shapes cover all prompts; never past
  the cache (`max_len`), so every prompt that fits is accepted."""
  return min(max_len, max(minimum, 1 << (max(n, 1) - 1).bit_length()))


@dataclasses.dataclass
class PrefixCache:
  """Latent caches of earlier sequences, kept for reuse: row b of `cache` holds the latents of `tokens[b]`.

  `Engine.generate(..., prefix=...)` reads it (each prompt starts from the row sharing its longest prefix)
  and replaces it with the sequences just generated (prompt + the tokens fed back while decoding).
  """
  cache: model_lib.Cache | None = None
  tokens: list[list[int]] = dataclasses.field(default_factory=list)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
  n = min(len(a), len(b))
  diff = np.flatnonzero(a[:n] != b[:n])
  return int(diff[0]) if diff.size else n


def _take_rows(cache: model_lib.Cache, rows: np.ndarray, lengths: np.ndarray) -> model_lib.Cache:
  rows = jnp.asarray(rows, jnp.int32)
  take = lambda stacks: {k: jnp.take(a, rows, axis=1) for k, a in stacks.items()}
  return model_lib.Cache(take(cache.c_kv), take(cache.k_pe), jnp.asarray(lengths, jnp.int32))


def _open_think(prompt: Sequence[int], think_ids: tuple[int, int]) -> bool:
  starts = [i for i, t in enumerate(prompt) if t == think_ids[0]]
  ends = [i for i, t in enumerate(prompt) if t == think_ids[1]]
  return bool(starts) and (not ends or starts[-1] > ends[-1])


class Engine:
  """Generation for one model; `params` is the same tree training uses."""

  def __init__(self, params: dict, config: K2Config, *, max_len: int = 4096, cache_dtype=None,
               moe_impl: str = "ragged", prefill_chunk: int = 2048):
    if prefill_chunk < 1:
      raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    self.params, self.config, self.max_len = params, config, max_len
    self.cache_dtype = cache_dtype or params["embed_vd"].dtype
    self.moe_impl = moe_impl
    self.prefill_chunk = prefill_chunk
    # (params, expert mesh, the same per layer), see `_decode_params`
    self._per_layer: tuple[dict, object, dict] | None = None
    self._first_device: tuple[dict, dict] | None = None  # (params, prefill's on a CPU expert mesh)
    # Tokens run through prefill (after prefix reuse and de-duplication), for benchmarks and logs.
    self.stats = {"prefill_tokens": 0}

  @functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(4,))
  def _prefill(self, params, tokens_bt, segment_ids_bt, cache, logits_bv, moe_impl: str):
    """One chunk appended to the cache; rows whose prompt ends in this chunk take its last logits."""
    n_b = segment_ids_bt.sum(1)
    out = model_lib.forward(params, self.config, tokens_bt, segment_ids_bt=segment_ids_bt, cache=cache,
                            moe_impl=moe_impl, logits_at_b=jnp.maximum(n_b - 1, 0))
    return jnp.where((n_b > 0)[:, None], out.logits[:, 0], logits_bv), out.cache

  @functools.partial(jax.jit, static_argnums=(0, 5, 6), donate_argnums=(3,))
  def _decode_chunk(self, params, state: "_State", cache, rules: "_Rules", sp: SamplingParams, chunk: int,
                    n_steps: jax.Array):
    """`n_steps` (<= `chunk`, traced: one program for every chunk length) decode steps in one call: feed the
    last token, sample, apply the rules; tokens [chunk, B], rows past `n_steps` unused."""

    def step(i, carry):
      state, cache, tokens_nb, logprobs_nb, valid_nb = carry
      out = model_lib.forward(params, self.config, state.token_b[:, None], cache=cache, moe_impl=self.moe_impl)
      key, sub = jax.random.split(state.key)
      state = _emit(*sample_with_logprob(out.logits[:, 0], sub, sp), dataclasses.replace(state, key=key), rules)
      return (state, out.cache, tokens_nb.at[i].set(state.token_b), logprobs_nb.at[i].set(state.logprob_b),
              valid_nb.at[i].set(state.valid_b))

    # Over per-layer weights the cache goes per layer too (`model.unstack_cache`): one copy per chunk
    # instead of a copy of each layer's keys per token.
    per_layer = any(isinstance(params.get(k), tuple) for k in ("dense_layers", "moe_layers"))
    if per_layer:
      cache = model_lib.unstack_cache(cache)
    shape = (chunk, state.token_b.shape[0])
    init = (state, cache, jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, bool))
    state, cache, *outs = jax.lax.fori_loop(0, n_steps, step, init)
    return state, model_lib.stack_cache(cache) if per_layer else cache, *outs

  def _decode_params(self) -> dict:
    """The weights decoding runs on: per layer on CPU, where a stacked layer scan would copy every layer's
    weights on every token, the head and other few-row products' weights output-major
    (`model.output_major_layers`, `model.DECODE_OUTPUT_MAJOR`), and with the routed experts per expert
    (`moe.split_experts`), where each token would copy its chosen experts' matrices out of the stacks;
    expert-parallel on a CPU mesh, per expert as laid out for the mesh
    (`expert_parallel.split_experts`: each device reads its own experts in place). Split once per
    parameter tree (`params` may be replaced, as RL does each step) and mesh, not once per `generate`
    call: an agent run calls `generate` at every step."""
    if not dispatch.unstack_layers_for_decode():
      return self.params
    mesh = self._expert_mesh()
    if self._per_layer is None or self._per_layer[0] is not self.params or self._per_layer[1] != mesh:
      split = (self.moe_impl == "ragged" or mesh is not None) and _splits_experts(self.params)
      # Decided here, not while tracing: the jitted split is cached by shapes.
      join = split and dispatch.join_gate_up_for_decode(
          self.params["moe_layers"]["moe"]["experts"]["gate_edf"],
          1 if mesh is None else mesh.shape[expert_parallel.EXPERT_AXIS])
      self._per_layer = (self.params, mesh, _per_layer_params(self.params, split, mesh, join,
                                                                model_lib.DECODE_OUTPUT_MAJOR))
    return self._per_layer[2]

  def _expert_mesh(self):
    """The mesh of the enclosing `sharding.use_mesh` when the routed experts run expert-parallel over a
    CPU mesh's `expert` axis (`moe_impl` "ep"/"ep_a2a"), else None."""
    ctx = sharding.current()
    if self.moe_impl not in ("ep", "ep_a2a") or ctx is None:
      return None
    mesh = ctx[0]
    ok = sharding.mesh_platform(mesh) == "cpu" and mesh.shape.get(expert_parallel.EXPERT_AXIS, 1) > 1
    return mesh if ok else None

  def _prefill_params(self) -> dict:
    """The weights prefill runs on: decoding's (`_decode_params`) where they hold the routed experts per
    expert, so that each expert's products read its matrices in place instead of copies out of the stacks
    (prefill of 8 x 128 tokens at the small benchmark width: ~1.1x faster); else the stacked layers, whose
    scan compiles one layer."""
    params = self._decode_params()
    moe_layers = params.get("moe_layers")
    split = isinstance(moe_layers, tuple) and isinstance(moe_layers[0]["moe"]["experts"]["down_efd"], tuple)
    return params if split else self.params

  def _first_device_params(self, mesh) -> dict:
    """On a CPU expert mesh, the weights prefill runs on: one device's copy in the one-device decode
    layout (per layer, experts per expert). A prefill's dense products already use every core on one
    device; on the mesh they would add collectives and a second thread pool on the same cores (8 x 128
    tokens at the small width: 0.79x), while decoding gains from the mesh. Made once per parameter tree."""
    if self._first_device is None or self._first_device[0] is not self.params:
      one = jax.device_put(self.params, mesh.devices.flat[0])
      self._first_device = (self.params, _per_layer_params(one, _splits_experts(self.params), None, True,
                                                            model_lib.DECODE_OUTPUT_MAJOR))
    return self._first_device[1]

  def prefill(self, prompts: Sequence[Sequence[int]], prefix: PrefixCache | None = None
              ) -> tuple[jax.Array, model_lib.Cache]:
    """Logits after each prompt [B, V] and the filled cache (`prefix` is read, never changed)."""
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
      raise ValueError("every prompt needs at least one token")
    if max(lengths) > self.max_len:
      raise ValueError(f"prompt of {max(lengths)} tokens does not fit the cache (max_len={self.max_len})")
    # With a prefix cache, identical prompts (heavy mode's first step) are prefilled once and their rows
    # copied; without one the batch keeps its shape (a varying number of unique rows would recompile).
    unique: dict[tuple[int, ...], int] = {}
    if prefix is None:
      src, uprompts = np.arange(len(prompts)), [np.asarray(p, np.int32) for p in prompts]
    else:
      src = np.array([unique.setdefault(tuple(int(t) for t in p), len(unique)) for p in prompts])
      uprompts = [np.asarray(p, np.int32) for p in unique]
    # Each prompt continues the cached row sharing its longest prefix; at least one token is recomputed
    # for the logits. Entries past a row's kept length are stale and never read (causal mask).
    rows, keep = np.zeros(len(uprompts), np.int32), np.zeros(len(uprompts), np.int32)
    if prefix is not None and prefix.cache is not None:
      cached = [np.asarray(t, np.int32) for t in prefix.tokens]
      for u, p in enumerate(uprompts):
        common = [_common_prefix(p, t) for t in cached]
        rows[u] = int(np.argmax(common))
        keep[u] = min(common[rows[u]], len(p) - 1)
      cache = _take_rows(prefix.cache, rows, keep)
    else:
      cache = model_lib.init_cache(self.config, len(uprompts), self.max_len, self.cache_dtype)
    suffixes = [p[k:] for p, k in zip(uprompts, keep)]
    self.stats["prefill_tokens"] += sum(len(x) for x in suffixes)
    logits = jnp.zeros((len(uprompts), self.config.vocab_size), jnp.float32)
    mesh = self._expert_mesh()
    if mesh is None:
      logits, cache = self._prefill_chunks(self._prefill_params(), suffixes, cache, logits, self.moe_impl)
    else:  # CPU expert mesh: prefill on its first device, decode on the mesh (`_first_device_params`)
      params, first = self._first_device_params(mesh), mesh.devices.flat[0]
      with sharding.use_mesh(sharding.make_mesh("fsdp:1", [first])):
        logits, cache = self._prefill_chunks(params, suffixes, jax.device_put(cache, first),
                                             jax.device_put(logits, first), "ragged")
      logits, cache = jax.device_put((logits, cache), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    if len(uprompts) < len(prompts):
      logits, cache = logits[src], _take_rows(cache, src, np.asarray(cache.lengths)[src])
    return logits, cache

  def _prefill_chunks(self, params, suffixes, cache, logits, moe_impl: str):
    longest = max(len(x) for x in suffixes)
    for c0 in range(0, longest, self.prefill_chunk):
      T = _bucket(min(self.prefill_chunk, longest - c0), self.max_len)
      tokens = np.zeros((len(suffixes), T), np.int32)
      seg = np.zeros((len(suffixes), T), np.int32)
      for u, x in enumerate(suffixes):
        piece = x[c0:c0 + self.prefill_chunk]
        tokens[u, :len(piece)] = piece
        seg[u, :len(piece)] = 1
      logits, cache = self._prefill(params, jnp.asarray(tokens), jnp.asarray(seg), cache, logits, moe_impl)
    return logits, cache

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
               sampling: SamplingParams = SamplingParams(), key: jax.Array | None = None,
               stop_ids: Sequence[int] = (), think_ids: tuple[int, int] | None = None,
               think_budget: int | None = None, on_token: Callable[[int, int], None] | None = None,
               chunk: int = 16, prefix: PrefixCache | None = None) -> Generation:
    """Generates up to `max_new_tokens` per prompt.

    `prefix`: each prompt reuses the cached latents of the earlier sequence it extends (see `PrefixCache`);
    afterwards `prefix` holds this call's sequences (prompt + fed-back generated tokens).

    `think_ids=(<think>, </think>)` with `think_budget`: once a sequence has spent the budget inside a
    think block, `</think>` is forced as its next token. `on_token(row, id)` streams tokens as they come.
    Decoding runs `chunk` steps per device call (stops and budgets are applied on the device); the host
    looks at the tokens between calls.
    """
    B = len(prompts)
    if max_new_tokens < 0:
      raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    need = max(len(p) for p in prompts) + max_new_tokens
    if need > self.max_len:
      raise ValueError(f"prompt + max_new_tokens = {need} exceeds the cache (max_len={self.max_len})")
    key = jax.random.key(0) if key is None else key
    rules = _Rules(jnp.asarray(sorted(set(int(i) for i in stop_ids)) or [-1], jnp.int32),
                   jnp.asarray(think_ids or (-1, -1), jnp.int32),
                   jnp.asarray(-1 if think_budget is None or not think_ids else think_budget, jnp.int32))
    logits_bv, cache = self.prefill(prompts, prefix)
    key, sub = jax.random.split(key)
    # A prompt that ends inside an open <think> block starts the budget at once.
    in_think = np.array([bool(think_ids) and _open_think(p, think_ids) for p in prompts])
    state = _State(token_b=jnp.zeros((B,), jnp.int32), logprob_b=jnp.zeros((B,), jnp.float32), key=key,
                   in_think_b=jnp.asarray(in_think), used_b=jnp.zeros((B,), jnp.int32),
                   done_b=jnp.zeros((B,), bool), valid_b=jnp.ones((B,), bool))
    state = _emit(*sample_with_logprob(logits_bv, sub, sampling), state, rules)
    out: list[list[int]] = [[] for _ in range(B)]
    out_logp: list[list[float]] = [[] for _ in range(B)]
    params = self._decode_params()
    blocks = [(np.asarray(state.token_b)[None], np.asarray(state.logprob_b)[None], np.asarray(state.valid_b)[None])]
    produced = 1
    while True:
      for tokens_nb, logprobs_nb, valid_nb in blocks:
        for toks, logps, valid in zip(tokens_nb, logprobs_nb, valid_nb):
          for b in np.flatnonzero(valid):
            if len(out[b]) < max_new_tokens:
              out[b].append(int(toks[b]))
              out_logp[b].append(float(logps[b]))
              if on_token:
                on_token(int(b), int(toks[b]))
      if produced >= max_new_tokens or bool(np.asarray(state.done_b).all()):
        break
      n = min(chunk, max_new_tokens - produced)
      state, cache, tokens_nb, logprobs_nb, valid_nb = self._decode_chunk(params, state, cache, rules, sampling,
                                                                          chunk, jnp.int32(n))
      blocks = [(np.asarray(tokens_nb)[:n], np.asarray(logprobs_nb)[:n], np.asarray(valid_nb)[:n])]
      produced += n
    if prefix is not None:
      # Decode step i fed out[b][i]; after a row stopped, what it fed is not part of its sequence.
      fed = [toks[:produced - 1] for toks in out]
      prefix.tokens = [list(map(int, p)) + f for p, f in zip(prompts, fed)]
      prefix.cache = dataclasses.replace(cache, lengths=jnp.asarray([len(t) for t in prefix.tokens], jnp.int32))
    stop = set(int(i) for i in stop_ids)
    reasons = ["stop" if toks and toks[-1] in stop else "length" for toks in out]
    return Generation(out, reasons, [len(p) for p in prompts], np.asarray(state.used_b).tolist(), out_logp)


def _splits_experts(params: dict) -> bool:
  """Whether the per-layer tree holds the routed experts per expert (`dispatch.split_experts_for_decode`)."""
  moe_layers = params.get("moe_layers", {})
  return (not isinstance(moe_layers, tuple) and "moe" in moe_layers
          and dispatch.split_experts_for_decode(moe_layers["moe"]["experts"]["gate_edf"]))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _per_layer_params(params: dict, split_experts: bool, expert_mesh, join: bool, output_major: tuple[str, ...]
                      ) -> dict:
  out = model_lib.output_major_layers(model_lib.unstack_layers(params), output_major)
  if split_experts and "moe_layers" in out:
    split = (functools.partial(moe.split_experts, join=join) if expert_mesh is None
             else functools.partial(expert_parallel.split_experts, mesh=expert_mesh, join=join))
    out["moe_layers"] = tuple({**p, "moe": {**p["moe"], "experts": split(p["moe"]["experts"])}}
                              for p in out["moe_layers"])
  return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _State:
  """Per-sequence decoding state carried across device steps."""
  token_b: jax.Array     # the token just emitted (fed next)
  logprob_b: jax.Array   # its log-prob under the sampling distribution (0 when forced)
  key: jax.Array
  in_think_b: jax.Array  # inside an open <think> block
  used_b: jax.Array      # thinking tokens spent
  done_b: jax.Array      # a stop token has been emitted
  valid_b: jax.Array     # token_b belongs to the output (the row was not done before it)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Rules:
  stop_ids: jax.Array    # [S] (-1: none)
  think_ids: jax.Array   # [2] (<think>, </think>) or (-1, -1)
  budget: jax.Array      # thinking-token budget, -1: none


def _emit(raw_b: jax.Array, logp_b: jax.Array, state: _State, rules: _Rules) -> _State:
  """Applies the thinking budget to a sampled token and updates the per-sequence state."""
  start, end = rules.think_ids[0], rules.think_ids[1]
  force = (rules.budget >= 0) & state.in_think_b & (state.used_b >= rules.budget)
  tok = jnp.where(force, end, raw_b).astype(jnp.int32)
  opens, closes = tok == start, tok == end
  used = state.used_b + (state.in_think_b & ~opens & ~closes).astype(jnp.int32)
  in_think = jnp.where(opens, True, jnp.where(closes, False, state.in_think_b))
  valid = ~state.done_b
  done = state.done_b | jnp.isin(tok, rules.stop_ids)
  return _State(tok, jnp.where(force, 0.0, logp_b), state.key, in_think, jnp.where(valid, used, state.used_b), done,
                valid)
