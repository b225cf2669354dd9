"""Rows of the arrays in an Orbax checkpoint item, read by byte range.

Orbax (and the tensorstore under it) reads an array a whole chunk at a time, into a buffer that is then
copied into the array it returns, and `k2-convert` stores each leaf as one chunk: restoring a stacked
leaf holds it twice (2 x 1.36 GB for a 1.36 GB leaf; at full scale a routed-expert stack is 169 GB).
Where a chunk is stored uncompressed (as `k2-convert` writes it: zarr3, one little-endian inner chunk
in a sharded layout, in OCDBT), its bytes are the array's in C order, so a run of leading-axis rows is a
byte range of the stored value, and the ranges can be read one after another. Anything else (Orbax's
compressed checkpoints from `k2-train`, another layout) is left to Orbax: `raw` returns None.
"""
from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class RawArray:
  """Where an array's C-order bytes lie in a stored value."""
  key: str
  offset: int
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def row_bytes(self) -> int:
    return math.prod(self.shape[1:]) * self.dtype.itemsize


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

  def _read(self, key: str, start: int | None = None, stop: int | None = None) -> bytes | None:
    """The bytes [start, stop) of `key`'s value; None if there is no such key or range."""
    try:
      r = self._kv.read(key, byte_range=slice(start, stop)).result()
    except ValueError as e:
      if "OUT_OF_RANGE" in str(e):
        return None
      raise
    return r.value if r.state == "value" else None

  def raw(self, name: str, shape, dtype) -> RawArray | None:
    """`name`'s byte layout if it is `shape` and `dtype`, stored as one uncompressed little-endian
    chunk; else None."""
    if self._kv is None:
      return None
    shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    try:
      meta = json.loads(self._read(f"{name}/zarr.json") or b"null")
    except ValueError:
      return None
    if not isinstance(meta, dict) or not shape:
      return None
    grid = meta.get("chunk_grid", {})
    if (meta.get("zarr_format") != 3 or tuple(meta.get("shape", ())) != shape or meta.get("data_type") != dtype.name
        or grid.get("name") != "regular" or tuple(grid.get("configuration", {}).get("chunk_shape", ())) != shape
        or meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/") != "/"
        or meta.get("chunk_key_encoding", {}).get("name") != "default"):
      return None
    key = f"{name}/c/" + "/".join("0" * len(shape))
    nbytes = math.prod(shape) * dtype.itemsize
    codecs = meta.get("codecs")
    if codecs == [_LITTLE]:
      return RawArray(key, 0, shape, dtype)
    if not (isinstance(codecs, list) and len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed"):
      return None
    cfg = codecs[0].get("configuration", {})
    if (tuple(cfg.get("chunk_shape", ())) != shape or cfg.get("codecs") != [_LITTLE]
        or cfg.get("index_codecs") != _INDEX or cfg.get("index_location", "end") != "end"):
      return None
    index = self._read(key, -_INDEX_BYTES)
    if index is None or len(index) != _INDEX_BYTES:  # no chunk: an array equal to its fill value
      return None
    offset, n = struct.unpack("<QQ", index[:16])
    # The index is the value's last bytes; the one inner chunk lies before it.
    if n != nbytes or self._read(key, offset + n, offset + n + _INDEX_BYTES) != index:
      return None
    return RawArray(key, offset, shape, dtype)

  def rows(self, raw: RawArray, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the leading axis (a read-only array over the bytes read)."""
    want = (stop - start) * raw.row_bytes
    data = self._read(raw.key, raw.offset + start * raw.row_bytes, raw.offset + stop * raw.row_bytes)
    if data is None or len(data) != want:
      raise StoredArrayError(f"{raw.key}: rows {start}:{stop} should be {want} bytes, read "
                             f"{'none' if data is None else len(data)}")
    return np.frombuffer(data, raw.dtype).reshape((stop - start,) + raw.shape[1:])
