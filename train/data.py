"""Deterministic, resumable data: documents -> packed [B, T] batches with segment ids and loss weights.

A document is (ids, weights): token ids and a per-token 0/1 "learn this token" flag. It becomes
inputs ids[:-1], targets ids[1:], target weights weights[1:], so every row predicts within its own
document. Documents are packed greedily, in a per-epoch shuffled order, into rows of T tokens
(segment ids 1, 2, ... per row; 0 = padding); longer documents are cut into T-token pieces.

The whole position in the stream is `DataState` {epoch, cursor, seed}: the epoch fixes the order
(`seed + epoch`), the cursor counts rows already served in it. Saving it with a checkpoint is enough
for a resumed run to see exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from k2jax import chat

Document = tuple[np.ndarray, np.ndarray]  # ids [n] int32, weights [n] float32


class DataError(ValueError):
  """Training data that cannot be used: the message names the source (file and line where there is one)
  and the problem."""


# ------------------------------------------------------------------ sources


def _text_doc(tokenizer, text: str, add_bos: bool = True, add_eos: bool = True) -> Document:
  ids = ([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(text, allow_special=False)
  ids += [tokenizer.doc_eos_id] if add_eos else []  # [EOS] ends a document; <|im_end|> ends a chat turn
  ids = np.asarray(ids, np.int32)
  return ids, np.ones(ids.shape, np.float32)


CHAT_TARGETS = ("last", "all")


def target_start(messages: Sequence[dict], targets: str = "last") -> int:
  """Index of the first message whose assistant turns are trained.

  "last": the turns after the last user message (the final answer and the tool-call chain that led
  to it); earlier turns are history, rendered as the prompt that produced the final turn shows them
  (reasoning dropped up to the last finished answer) and not trained. "all": every assistant turn is
  trained and keeps its reasoning.
  """
  if targets not in CHAT_TARGETS:
    raise ValueError(f"chat targets must be one of {CHAT_TARGETS}, got {targets!r}")
  if targets == "all":
    return 0
  users = [i for i, m in enumerate(messages) if m["role"] == "user"]
  return users[-1] + 1 if users else 0


def chat_document(tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                  targets: str = "last") -> Document:
  """A conversation rendered by `chat.render`, weight 1 only on the target assistant replies (body +
  <|im_end|>, reasoning included); see `target_start` for which replies are targets.

  Tokenised piece by piece: every piece starts and ends at a special token, so the pieces' ids join
  to the ids of the whole text (checked).
  """
  start = target_start(messages, targets)
  if not any(m["role"] == "assistant" for m in messages[start:]):
    raise ValueError("the conversation has no assistant reply to train on"
                     + (" after its last user message" if targets == "last" else ""))
  full = chat.render(messages, tools=tools, add_generation_prompt=False, keep_reasoning_from=start)
  keep = chat.reasoning_kept(messages, start)
  pieces = [chat.render_message(m, keep_reasoning=k) for m, k in zip(messages, keep)]
  body = "".join(pieces)
  if not full.endswith(body):
    raise ValueError("chat.render output does not end with the rendered messages")
  ids, weights = [], []

  def add(text: str, w: float):
    piece_ids = tokenizer.encode(text, allow_special=True)
    ids.extend(piece_ids)
    weights.extend([w] * len(piece_ids))

  add(full[: len(full) - len(body)], 0.0)  # system prompt / tools declaration
  for index, (m, piece) in enumerate(zip(messages, pieces)):
    if m["role"] != "assistant" or index < start:
      add(piece, 0.0)
      continue
    cut = piece.index(chat.IM_MIDDLE) + len(chat.IM_MIDDLE)
    add(piece[:cut], 0.0)  # role header: given, not learned
    add(piece[cut:], 1.0)
  if ids != tokenizer.encode(full, allow_special=True):
    raise ValueError("piece-wise tokenisation of the conversation differs from the whole text's")
  return np.asarray(ids, np.int32), np.asarray(weights, np.float32)


def _jsonl_doc(tokenizer, row: dict, chat_targets: str = "last") -> Document:
  if "messages" in row:
    return chat_document(tokenizer, row["messages"], row.get("tools"), chat_targets)
  for key in ("ids", "tokens", "input_ids"):
    if key in row:
      ids = np.asarray(row[key], np.int32)
      return ids, np.asarray(row.get("loss_mask", np.ones(ids.shape)), np.float32)
  if "text" in row:
    return _text_doc(tokenizer, row["text"])
  raise ValueError(f"jsonl row has none of 'messages', 'ids', 'tokens', 'input_ids', 'text': {sorted(row)}")


def read_documents(path: str | Path, tokenizer=None, chat_targets: str = "last") -> list[Document]:
  """Documents from `.npy` (2-D: one per row; 1-D object array of id lists; 1-D ints: one stream),
  `.jsonl` (rows with ids / text / messages) or `.txt` (one document per blank-line-separated block)."""
  path = Path(path)
  if path.suffix == ".npy":
    try:
      arr = np.load(path, allow_pickle=False) if path.stat().st_size else np.zeros(0, np.int32)
    except ValueError as e:  # not an .npy file, or an object array
      raise DataError(f"{path}: {e}") from None
    if arr.dtype.kind not in "iu":  # a cast would turn floats into ids silently
      raise DataError(f"{path}: token ids must be integers, got an array of {arr.dtype}")
    rows = [arr] if arr.ndim == 1 else list(arr)
    return [(np.asarray(r, np.int32), np.ones(len(r), np.float32)) for r in rows]
  tokenizer = tokenizer or _default_tokenizer()
  if path.suffix in (".jsonl", ".json"):
    docs = []
    with path.open(encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        if line.strip():
          try:
            docs.append(_jsonl_doc(tokenizer, json.loads(line), chat_targets))
          except ValueError as e:  # json.JSONDecodeError included
            raise DataError(f"{path}:{number}: {e}") from None
    return docs
  text = path.read_text(encoding="utf-8")
  return [_text_doc(tokenizer, block.strip()) for block in text.split("\n\n") if block.strip()]


def _default_tokenizer():
  from k2jax import tokenizer_build  # noqa: PLC0415
  return tokenizer_build.tiny_tokenizer()


# ------------------------------------------------------------------ embedded synthetic tasks


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
  """Short, learnable lines: additions, copies, reversals and counting runs (deterministic)."""
  rng = random.Random(seed)
  words = "red blue green cat dog sun moon tree star fish bird rain snow".split()
  out = []
  for i in range(n):
    kind = i % 4
    if kind == 0:
      a, b = rng.randrange(50), rng.randrange(50)
      out.append(f"add {a} and {b} gives {a + b}.")
    elif kind == 1:
      w = " ".join(rng.choice(words) for _ in range(rng.randrange(3, 6)))
      out.append(f"copy: {w} -> {w}")
    elif kind == 2:
      w = [rng.choice(words) for _ in range(rng.randrange(3, 6))]
      out.append(f"reverse: {' '.join(w)} -> {' '.join(w[::-1])}")
    else:
      start = rng.randrange(20)
      out.append("count: " + " ".join(str(start + k) for k in range(rng.randrange(4, 9))))
  return out


def synthetic_chats(n: int, seed: int = 0) -> list[list[dict]]:
  """Chat versions of the synthetic tasks: a user asks, the assistant answers."""
  rng = random.Random(seed)
  chats = []
  for _ in range(n):
    a, b = rng.randrange(50), rng.randrange(50)
    chats.append([{"role": "user", "content": f"What is {a} plus {b}?"},
                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}])
  return chats


def synthetic_documents(kind: str = "text", n: int = 4000, seed: int = 0, tokenizer=None,
                        chat_targets: str = "last") -> list[Document]:
  tokenizer = tokenizer or _default_tokenizer()
  if kind == "chat":
    return [chat_document(tokenizer, m, targets=chat_targets) for m in synthetic_chats(n, seed)]
  return [_text_doc(tokenizer, t) for t in synthetic_texts(n, seed)]


def load_split(source: str, split: str, eval_fraction: float = 0.05, seed: int = 0,
               tokenizer=None, chat_targets: str = "last") -> list[Document]:
  """`source`: 'synthetic', 'synthetic_chat' or a file path; every round(1/eval_fraction)-th document
  is held out for eval. `chat_targets`: which assistant turns of chat data are trained (`target_start`)."""
  if source in ("synthetic", "synthetic_chat"):
    docs = synthetic_documents("chat" if source == "synthetic_chat" else "text", seed=seed, tokenizer=tokenizer,
                               chat_targets=chat_targets)
  else:
    docs = read_documents(source, tokenizer, chat_targets)
  if not docs:
    raise DataError(f"no documents in {source!r}")
  every = max(2, round(1 / eval_fraction)) if eval_fraction > 0 else 0
  held = [every and i % every == every - 1 for i in range(len(docs))]
  picked = [d for d, h in zip(docs, held) if h == (split == "eval")]
  return picked or docs


def check_token_ids(docs: Sequence[Document], vocab_size: int, source: str) -> None:
  """Every id in [0, vocab_size): an embedding lookup past the table does not fail, it trains on a clamped row."""
  for i, (ids, _) in enumerate(docs):
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
      raise DataError(f"{source}: document {i} has token id {int(bad[0])}, outside the model's vocabulary "
                      f"[0, {vocab_size})")


# ------------------------------------------------------------------ packing


def pack_rows(docs: Sequence[Document], seq_len: int) -> dict[str, np.ndarray]:
  """Greedy packing of documents, in order, into rows of `seq_len` (shifted inputs / targets)."""
  rows, row, fill = [], [], 0
  for ids, w in docs:
    if len(ids) < 2:
      continue
    # A document of n tokens gives n - 1 (input, target) pairs; cut it into row-sized pieces.
    for s in range(0, len(ids) - 1, seq_len):
      piece = (ids[s:s + seq_len + 1], w[s:s + seq_len + 1])
      n = len(piece[0]) - 1
      if fill + n > seq_len:
        rows.append(row)
        row, fill = [], 0
      row.append(piece)
      fill += n
  if row:
    rows.append(row)
  out = {k: np.zeros((len(rows), seq_len), dt) for k, dt in
         (("tokens", np.int32), ("targets", np.int32), ("segment_ids", np.int32), ("weights", np.float32))}
  for r, pieces in enumerate(rows):
    t = 0
    for seg, (ids, w) in enumerate(pieces, start=1):
      n = len(ids) - 1
      out["tokens"][r, t:t + n] = ids[:-1]
      out["targets"][r, t:t + n] = ids[1:]
      out["weights"][r, t:t + n] = w[1:]
      out["segment_ids"][r, t:t + n] = seg
      t += n
  return out


class PackedDataset:
  """Batches of packed rows, reproducible from a `state()` dict {epoch, cursor, seed}.

  Each batch is {'tokens', 'targets', 'segment_ids', 'weights'} of shape [B, T]; the incomplete
  last batch of an epoch is dropped.
  """

  def __init__(self, docs: Sequence[Document], batch_size: int, seq_len: int, seed: int = 0,
               shuffle: bool = True):
    self.docs, self.batch_size, self.seq_len, self.shuffle = list(docs), batch_size, seq_len, shuffle
    self.epoch, self.cursor, self.seed = 0, 0, seed
    self._rows_epoch, self._rows = None, None
    if len(self._epoch_rows()["tokens"]) < batch_size:
      raise DataError(f"one epoch packs into {len(self._rows['tokens'])} rows of {seq_len} tokens, fewer "
                      f"than batch_size={batch_size}")

  def _epoch_rows(self) -> dict[str, np.ndarray]:
    if self._rows_epoch != self.epoch:
      order = np.arange(len(self.docs))
      if self.shuffle:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.docs))
      self._rows = pack_rows([self.docs[i] for i in order], self.seq_len)
      self._rows_epoch = self.epoch
    return self._rows

  def state(self) -> dict[str, int]:
    return {"epoch": int(self.epoch), "cursor": int(self.cursor), "seed": int(self.seed)}

  def restore(self, state: dict[str, Any]) -> None:
    if int(state["seed"]) != self.seed:
      raise ValueError(f"data state was saved with seed {state['seed']}, this run uses {self.seed}")
    self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

  def next_batch(self) -> dict[str, np.ndarray]:
    rows = self._epoch_rows()
    if self.cursor + self.batch_size > len(rows["tokens"]):
      self.epoch, self.cursor = self.epoch + 1, 0
      rows = self._epoch_rows()
    sl = slice(self.cursor, self.cursor + self.batch_size)
    self.cursor += self.batch_size
    return {k: v[sl] for k, v in rows.items()}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    while True:
      yield self.next_batch()


def eval_batches(docs: Sequence[Document], batch_size: int, seq_len: int, max_batches: int) -> list[dict]:
  """A fixed list of held-out batches (no shuffling; the last partial batch is padded with empty rows)."""
  rows = pack_rows(docs, seq_len)
  n = min(len(rows["tokens"]), batch_size * max_batches)
  out = []
  for s in range(0, n, batch_size):
    b = {k: v[s:s + batch_size] for k, v in rows.items()}
    pad = batch_size - len(b["tokens"])
    out.append({k: np.pad(v, ((0, pad), (0, 0))) for k, v in b.items()})
  return out
