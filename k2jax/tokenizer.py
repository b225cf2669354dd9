"""The K2 tokenizer: tiktoken-format byte-level BPE ranks plus a block of 256 special ids.

Files (as shipped with the checkpoint):
- `tiktoken.model`: one line per base token, `base64(bytes) rank`; the rank is the token id.
- `tokenizer_config.json`: `added_tokens_decoder` maps special ids to `{"content": name, ...}`.

Base ids are [0, num_base); ids [num_base, num_base + 256) are specials, and the unnamed ones are
`<|reserved_token_{id}|>`. BPE itself runs in tiktoken's Rust engine.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import regex
import tiktoken

# Pre-tokenisation pattern of K2 (spec §3). `&&` is class intersection: Han is split off every letter run.
_LETTERS_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_LETTERS_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
K2_PAT_STR = "|".join(
  [
    r"[\p{Han}]+",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}*{_LETTERS_LOWER}+{_CONTRACTIONS}",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}+{_LETTERS_LOWER}*{_CONTRACTIONS}",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
  ]
)

NUM_SPECIAL_IDS = 256
TIKTOKEN_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"
BOS_TOKEN = "[BOS]"
# The chat model ends every turn, and so generation, with <|im_end|>.
EOS_TOKEN = "<|im_end|>"
DOC_EOS_TOKEN = "[EOS]"
PAD_TOKEN = "[PAD]"

# Very long inputs are cut before the engine sees them: its regex backtracks badly on huge runs
# of one character class. Cuts only move token boundaries; decode(encode(x)) == x still holds.
_MAX_ENGINE_CHARS = 400_000
_MAX_SAME_CLASS_RUN = 25_000

# The same pattern for Python's `regex` module; VERSION1 enables `&&` there too.
_PRETOKEN_RE = regex.compile(K2_PAT_STR, flags=regex.VERSION1)


class TokenizerFileError(ValueError):
  """A tokenizer file is missing or malformed; the message names the file (and line)."""


def pretokenize(text: str) -> list[str]:
  """Split text into the pieces BPE works on, as tiktoken's engine does with K2_PAT_STR."""
  return _PRETOKEN_RE.findall(text)


def reserved_token_name(token_id: int) -> str:
  return f"<|reserved_token_{token_id}|>"


def load_mergeable_ranks(path: str | Path) -> dict[bytes, int]:
  """Read a `tiktoken.model` file; ranks must be 0..n-1, each once."""
  path = Path(path)
  if not path.is_file():
    raise TokenizerFileError(f"{path}: tokenizer file not found")
  ranks: dict[bytes, int] = {}
  seen_ranks: set[int] = set()
  with path.open("rb") as lines:
    for line_no, raw_line in enumerate(lines, start=1):
      line = raw_line.decode("utf-8", errors="replace").strip()
      if not line:
        continue
      fields = line.split()
      where = f"{path}:{line_no}"
      if len(fields) != 2:
        raise TokenizerFileError(f"{where}: expected 'base64 rank', got {line[:80]!r}")
      try:
        token = base64.b64decode(fields[0], validate=True)
      except (binascii.Error, ValueError) as err:  # ValueError: non-ASCII text
        raise TokenizerFileError(f"{where}: bad base64 token {fields[0][:80]!r}: {err}") from None
      try:
        rank = int(fields[1])
      except ValueError:
        raise TokenizerFileError(f"{where}: rank {fields[1][:40]!r} is not an integer") from None
      if not token:
        raise TokenizerFileError(f"{where}: empty token")
      if token in ranks:
        raise TokenizerFileError(f"{where}: token {token!r} already has rank {ranks[token]}")
      if rank < 0 or rank in seen_ranks:
        raise TokenizerFileError(f"{where}: rank {rank} is negative or repeated")
      ranks[token] = rank
      seen_ranks.add(rank)
  if not ranks:
    raise TokenizerFileError(f"{path}: no tokens")
  if max(seen_ranks) != len(ranks) - 1:
    missing = min(set(range(len(ranks))) - seen_ranks)
    raise TokenizerFileError(f"{path}: ranks are not contiguous (rank {missing} is missing)")
  return ranks


def load_special_tokens(path: str | Path, num_base: int) -> dict[str, int]:
  """Read special names from `added_tokens_decoder`; fill unnamed reserved ids."""
  path = Path(path)
  if not path.is_file():
    raise TokenizerFileError(f"{path}: tokenizer config not found")
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as err:
    raise TokenizerFileError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
  decoder = config.get("added_tokens_decoder") if isinstance(config, dict) else None
  if not isinstance(decoder, dict):
    raise TokenizerFileError(f"{path}: missing 'added_tokens_decoder' object")
  specials: dict[str, int] = {}
  for key, entry in decoder.items():
    where = f"{path}: added_tokens_decoder[{key!r}]"
    try:
      token_id = int(key)
    except ValueError:
      raise TokenizerFileError(f"{where}: id is not an integer") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or not entry["content"]:
      raise TokenizerFileError(f"{where}: expected an object with a non-empty 'content' string")
    if token_id < num_base:
      raise TokenizerFileError(f"{where}: id {token_id} collides with base tokens [0, {num_base})")
    name = entry["content"]
    if name in specials:
      raise TokenizerFileError(f"{where}: {name!r} already has id {specials[name]}")
    specials[name] = token_id
  named_ids = set(specials.values())
  for token_id in range(num_base, num_base + NUM_SPECIAL_IDS):
    if token_id not in named_ids:
      specials[reserved_token_name(token_id)] = token_id
  return specials


def _split_same_class_runs(text: str, max_run: int) -> Iterator[str]:
  """Cut text so no run of only-whitespace or only-non-whitespace exceeds max_run chars."""
  start = 0
  run_len = 0
  prev_is_space: bool | None = None
  for i, char in enumerate(text):
    is_space = char.isspace()
    run_len = run_len + 1 if is_space == prev_is_space else 1
    prev_is_space = is_space
    if run_len > max_run:
      yield text[start:i]
      start = i
      run_len = 1
  yield text[start:]


def _engine_chunks(text: str) -> Iterator[str]:
  for begin in range(0, len(text), _MAX_ENGINE_CHARS):
    yield from _split_same_class_runs(text[begin : begin + _MAX_ENGINE_CHARS], _MAX_SAME_CLASS_RUN)


class StreamDecoder:
  """Turns ids into text as they arrive, holding back incomplete UTF-8 sequences."""

  def __init__(self, tokenizer: Tokenizer):
    self._tokenizer = tokenizer
    self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

  def push(self, token_id: int) -> str:
    return self._utf8.decode(self._tokenizer.decode_bytes([token_id]), final=False)

  def push_many(self, token_ids: Iterable[int]) -> str:
    return "".join(self.push(token_id) for token_id in token_ids)

  def flush(self) -> str:
    """Emit whatever is held back (as U+FFFD if it never became valid UTF-8)."""
    return self._utf8.decode(b"", final=True)


class Tokenizer:
  """K2 tokenizer over tiktoken's BPE engine."""

  def __init__(self, mergeable_ranks: Mapping[bytes, int], special_tokens: Mapping[str, int], name: str = "k2"):
    self.num_base_tokens = len(mergeable_ranks)
    self._specials = dict(special_tokens)
    self._special_by_id = {token_id: name for name, token_id in self._specials.items()}
    self.vocab_size = max(self.num_base_tokens + NUM_SPECIAL_IDS, max(self._special_by_id, default=-1) + 1)
    self._engine = tiktoken.Encoding(
      name, pat_str=K2_PAT_STR, mergeable_ranks=dict(mergeable_ranks), special_tokens=self._specials
    )

  @classmethod
  def from_dir(cls, path: str | Path) -> Tokenizer:
    path = Path(path)
    ranks = load_mergeable_ranks(path / TIKTOKEN_FILE)
    specials = load_special_tokens(path / CONFIG_FILE, num_base=len(ranks))
    return cls(ranks, specials, name=path.name or "k2")

  def encode(self, text: str, allow_special: bool = True) -> list[int]:
    """Token ids of text. With allow_special=False, special names in text are plain text;
        use that for untrusted text so it cannot forge chat structure."""
    allowed = "all" if allow_special else set()
    ids: list[int] = []
    for chunk in _engine_chunks(text):
      ids.extend(self._engine.encode(chunk, allowed_special=allowed, disallowed_special=()))
    return ids

  def decode_bytes(self, token_ids: Iterable[int]) -> bytes:
    token_ids = list(token_ids)
    for token_id in token_ids:
      if not 0 <= token_id < self.vocab_size or (
        token_id >= self.num_base_tokens and token_id not in self._special_by_id
      ):
        raise ValueError(f"token id {token_id} is not in this vocabulary (size {self.vocab_size})")
    return self._engine.decode_bytes(token_ids)

  def decode(self, token_ids: Iterable[int]) -> str:
    """Text of ids; bytes that are not valid UTF-8 become U+FFFD."""
    return self.decode_bytes(token_ids).decode("utf-8", errors="replace")

  def id_of(self, special_name: str) -> int:
    try:
      return self._specials[special_name]
    except KeyError:
      raise KeyError(f"{special_name!r} is not a special token of this tokenizer") from None

  def is_special(self, token_id: int) -> bool:
    return token_id in self._special_by_id

  @property
  def special_tokens(self) -> dict[str, int]:
    """Special name -> id, reserved names included."""
    return dict(self._specials)

  @property
  def special_ids(self) -> frozenset[int]:
    return frozenset(self._special_by_id)

  @property
  def bos_id(self) -> int:
    return self.id_of(BOS_TOKEN)

  @property
  def eos_id(self) -> int:
    return self.id_of(EOS_TOKEN)

  @property
  def doc_eos_id(self) -> int:
    """[EOS]: the end of a plain-text document."""
    return self.id_of(DOC_EOS_TOKEN)

  @property
  def pad_id(self) -> int:
    return self.id_of(PAD_TOKEN)

  @property
  def stop_ids(self) -> frozenset[int]:
    """Ids that end generation: the end of a chat turn, and the end of a document."""
    return frozenset({self.eos_id, self.doc_eos_id})

  def stream_decoder(self) -> StreamDecoder:
    return StreamDecoder(self)

  def decode_stream(self, token_ids: Iterable[int]) -> Iterator[str]:
    """Yield text pieces as ids arrive; never splits a UTF-8 sequence; skips empty pieces."""
    decoder = self.stream_decoder()
    for token_id in token_ids:
      text = decoder.push(token_id)
      if text:
        yield text
    tail = decoder.flush()
    if tail:
      yield tail
