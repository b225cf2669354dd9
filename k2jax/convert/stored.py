"""Rows of the arrays in an Orbax checkpoint item, read by byte range.

Orbax (and the tensorstore under it) reads an array a whole chunk at a time, into a buffer that is then
copied into the array it returns, and `k2-convert` stores a leaf as one chunk (or a few of ~2 GiB, or a
chunk per shard under `--mesh`), each spanning every layer: restoring a stacked leaf holds it twice
(2 x 1.36 GB for a 1.36 GB leaf; at full scale a routed-expert stack is 190 GB). Where chunks are stored
uncompressed (as `k2-convert` writes them: zarr3, each chunk one little-endian inner chunk in a sharded
layout, in OCDBT), a chunk's bytes are its elements in C order, so a run of leading-axis rows of a chunk
is one byte range of its stored value, and a run of the array's rows is one such range per chunk. Anything
else (Orbax's compressed checkpoints from `k2-train`, another layout, a chunk left unwritten) is left to
Orbax: `raw` returns None.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import struct

import numpy as np

_LITTLE = {"name": "bytes", "configuration": {"endian": "little"}}
_INDEX = [_LITTLE, {"name": "crc32c"}]
_INDEX_BYTES = 16 + 4  # one inner chunk's (offset, nbytes) as little-endian uint64, then its crc32c


class StoredArrayError(ValueError):
  """A stored array's bytes are not where its metadata says."""


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity (it holds a dict)
class RawArray:
  """Where an array's chunks lie: each chunk's C-order bytes (a full `chunk_shape`, edge chunks padded)
  at `offsets[grid index]` in the value of `key(grid index)`."""
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  chunk_shape: tuple[int, ...]
  offsets: dict[tuple[int, ...], int]

  def key(self, g: tuple[int, ...]) -> str:
    return f"{self.name}/c/" + "/".join(map(str, g))

  @property
  def chunk_row_bytes(self) -> int:
    return math.prod(self.chunk_shape[1:]) * self.dtype.itemsize


class StoredArrays:
  """The arrays of one Orbax item folder (e.g. a step's `params`), by their dotted tree path."""

  def __init__(self, item_dir: str):
    self._kv = None
    try:
      with open(os.path.join(item_dir, "_METADATA")) as f:
        meta = json.load(f)
    except (OSError, ValueError):
      return
    if not (meta.get("use_ocdbt") and meta.get("use_zarr3")):
      return
    import tensorstore as ts  # noqa: PLC0415
    self._kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{os.path.abspath(item_dir)}"},
                               context=ts.Context({"cache_pool": {"total_bytes_limit": 0}})).result()

  def _read_async(self, key: str, start: int | None = None, stop: int | None = None):
    return self._kv.read(key, byte_range=slice(start, stop))

  @staticmethod
  def _value(future) -> bytes | None:
    """A read's bytes; None if there is no such key or range."""
    try:
      r = future.result()
    except ValueError as e:
      if "OUT_OF_RANGE" in str(e):
        return None
      raise
    return r.value if r.state == "value" else None

  def raw(self, name: str, shape, dtype) -> RawArray | None:
    """`name`'s chunks if it is `shape` and `dtype`, stored in uncompressed little-endian chunks; else
    None."""
    if self._kv is None:
      return None
    shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    try:
      meta = json.loads(self._value(self._read_async(f"{name}/zarr.json")) or b"null")
    except ValueError:
      return None
    if not isinstance(meta, dict) or not shape:
      return None
    grid, keys = meta.get("chunk_grid", {}), meta.get("chunk_key_encoding", {})
    chunk = tuple(grid.get("configuration", {}).get("chunk_shape", ()))
    if (meta.get("zarr_format") != 3 or tuple(meta.get("shape", ())) != shape or meta.get("data_type") != dtype.name
        or grid.get("name") != "regular" or len(chunk) != len(shape) or min(chunk) < 1
        or keys.get("name") != "default" or keys.get("configuration", {}).get("separator", "/") != "/"):
      return None
    codecs = meta.get("codecs")
    sharded = isinstance(codecs, list) and len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed"
    if sharded:
      cfg = codecs[0].get("configuration", {})
      if (tuple(cfg.get("chunk_shape", ())) != chunk or cfg.get("codecs") != [_LITTLE]
          or cfg.get("index_codecs") != _INDEX or cfg.get("index_location", "end") != "end"):
        return None
    elif codecs != [_LITTLE]:
      return None
    grid_shape = [-(-n // c) for n, c in zip(shape, chunk)]
    raw = RawArray(name, shape, dtype, chunk, {})
    cells = list(itertools.product(*map(range, grid_shape)))
    nbytes = math.prod(chunk) * dtype.itemsize
    # A missing chunk (left unwritten as equal to the fill value) is Orbax's to fill in.
    if not sharded:  # each value is the chunk's bytes
      ends = [self._value(f) for f in [self._read_async(raw.key(g), nbytes - 1) for g in cells]]
      if any(end is None or len(end) != 1 for end in ends):
        return None
      raw.offsets.update((g, 0) for g in cells)
      return raw
    # Each chunk's index is its value's last bytes, and its one inner chunk lies just before it.
    indices = [self._read_async(raw.key(g), -_INDEX_BYTES) for g in cells]
    for g, f in zip(cells, indices):
      index = self._value(f)
      if index is None or len(index) != _INDEX_BYTES:
        return None
      offset, n = struct.unpack("<QQ", index[:16])
      if n != nbytes or self._value(self._read_async(raw.key(g), offset + n, offset + n + _INDEX_BYTES)) != index:
        return None
      raw.offsets[g] = offset
    return raw

  def rows(self, raw: RawArray, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the leading axis (read-only where one chunk holds them all)."""
    c0, row = raw.chunk_shape[0], raw.chunk_row_bytes
    reads = []
    for g, offset in raw.offsets.items():
      lo, hi = max(start, g[0] * c0), min(stop, (g[0] + 1) * c0)
      if lo < hi:
        a, b = lo - g[0] * c0, hi - g[0] * c0
        reads.append((g, lo, hi, self._read_async(raw.key(g), offset + a * row, offset + b * row)))
    whole = raw.chunk_shape == raw.shape  # one chunk: its rows are the answer, no copy
    out = None if whole else np.empty((stop - start,) + raw.shape[1:], raw.dtype)
    for g, lo, hi, future in reads:
      data, want = self._value(future), (hi - lo) * row
      if data is None or len(data) != want:
        raise StoredArrayError(f"{raw.key(g)}: rows {lo}:{hi} should be {want} bytes, read "
                               f"{'none' if data is None else len(data)}")
      block = np.frombuffer(data, raw.dtype).reshape((hi - lo,) + raw.chunk_shape[1:])
      if whole:
        return block
      at = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(g[1:], raw.chunk_shape[1:], raw.shape[1:]))
      out[(slice(lo - start, hi - start),) + at] = block[(slice(None),) + tuple(slice(0, s.stop - s.start) for s in at)]
    return out
