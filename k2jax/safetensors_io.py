"""Minimal safetensors reader/writer over numpy (memory-mapped; bf16 and fp8 via ml_dtypes).

Only the safetensors format is read: a JSON header of names, dtypes, shapes and byte ranges, then raw
little-endian data. No pickle is ever loaded.
"""
from __future__ import annotations

import copy
import json
import math
import mmap
import os
import struct
import tempfile
import threading
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
  pass


# The safetensors reference implementation refuses headers over 100 MB; real ones are a few MB.
MAX_HEADER_BYTES = 100 << 20
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
INT_DTYPES = ("I64", "I32", "I16", "I8", "U8", "BOOL")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def current_umask() -> int:
  """The process umask, read without changing it where Linux allows."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def apply_umask(path: str, folder: bool = False) -> None:
  """Gives a file made by `tempfile` (0600 / 0700) the mode an ordinary `open` would have given it."""
  os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


class SafetensorsFile:
  """Lazy access to the tensors of one `.safetensors` file.

  The header is validated in full on open (names, dtypes, shapes, byte ranges in bounds, of the size
  shape x dtype, not overlapping), so a truncated or forged file fails here, naming the file and tensor.
  Tensors are read with plain file reads into fresh buffers (a streaming reader's memory stays bounded),
  or with `mapped` as views of one memory map of the whole file (the page cache): no read copy and no new
  memory to fault in, for a reader that copies each tensor into place at once and then `release`s it
  (its pages leave this process's resident set; they stay in the page cache).
  """

  def __init__(self, path: str, mapped: bool = False):
    self.path = path
    self.mapped = mapped
    self._map_lock = threading.Lock()
    self._file_map: mmap.mmap | None = None  # the whole file, mapped at the first mapped read
    if not os.path.isfile(path):
      raise SafetensorsError(f"{path}: not a file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) != 8:
        raise SafetensorsError(f"{path}: too short to be a safetensors file")
      (n,) = struct.unpack("<Q", head)
      if n > min(size - 8, MAX_HEADER_BYTES):
        raise SafetensorsError(f"{path}: header length {n} exceeds the file ({size} bytes) or the "
                               f"{MAX_HEADER_BYTES >> 20} MB limit; truncated or not a safetensors file")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
      raise SafetensorsError(f"{path}: header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
      raise SafetensorsError(f"{path}: __metadata__ must map names to strings")
    self.metadata = meta
    self._data_start = 8 + n
    self.entries: dict = {name: self._entry(name, e, size - self._data_start) for name, e in header.items()}
    spans = sorted((e["data_offsets"], name) for name, e in self.entries.items())
    for ((_, end), a), ((start, _), b) in zip(spans, spans[1:]):
      if start < end:
        raise SafetensorsError(f"{path}: tensors {a!r} and {b!r} overlap (byte ranges "
                               f"{self.entries[a]['data_offsets']} and {self.entries[b]['data_offsets']})")

  def _entry(self, name, e, data_bytes: int) -> dict:
    where = f"{self.path}: tensor {name!r}"
    if not isinstance(e, dict):
      raise SafetensorsError(f"{where}: header entry is not an object")
    missing = {"dtype", "shape", "data_offsets"} - set(e)
    if missing:
      raise SafetensorsError(f"{where}: header entry lacks {sorted(missing)}")
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if dtype not in DTYPES:
      raise SafetensorsError(f"{where} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
      raise SafetensorsError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]):
      raise SafetensorsError(f"{where}: data_offsets {offsets!r} must be two integers 0 <= begin <= end")
    if offsets[1] > data_bytes:
      raise SafetensorsError(f"{where}: data_offsets {offsets} run past the end of the file's data "
                             f"({data_bytes} bytes); the file is truncated")
    want = DTYPES[dtype].itemsize * math.prod(shape)
    if offsets[1] - offsets[0] != want:
      raise SafetensorsError(f"{where}: byte range {offsets} holds {offsets[1] - offsets[0]} bytes, but "
                             f"shape {shape} of {dtype} needs {want}")
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}

  def keys(self) -> list[str]:
    return list(self.entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.entries[name]["shape"])

  def dtype_name(self, name: str) -> str:
    return self.entries[name]["dtype"]

  def nbytes(self, name: str) -> int:
    start, end = self.entries[name]["data_offsets"]
    return end - start

  def get(self, name: str) -> np.ndarray:
    e = self.entries[name]
    start, end = e["data_offsets"]
    if self.mapped and end > start:
      return self._map(name, self._data_start + start, end - start)
    buf = np.empty(end - start, np.uint8)
    with open(self.path, "rb", buffering=0) as f:
      f.seek(self._data_start + start)
      got = f.readinto(memoryview(buf))
      while got < buf.size:  # readinto may return short on large reads
        more = f.readinto(memoryview(buf)[got:])
        if not more:
          raise SafetensorsError(f"{self.path}: tensor {name!r}: file ended while reading (truncated)")
        got += more
    return buf.view(DTYPES[e["dtype"]]).reshape(e["shape"])

  def _whole_map(self) -> mmap.mmap:
    with self._map_lock:
      if self._file_map is None:
        with open(self.path, "rb") as f:
          self._file_map = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
      return self._file_map

  def _map(self, name: str, offset: int, nbytes: int) -> np.ndarray:
    """A view of the tensor in the file's map. One map per file, not one per tensor: a map per tensor
    cost an open, an mmap and a munmap (with its TLB flush on every core) per slice, ~15 % of a
    conversion's CPU (benchmarks/NOTES.md)."""
    e = self.entries[name]
    dtype = DTYPES[e["dtype"]]
    m = self._whole_map()
    # A file cut short after its header was checked would crash a reader of the map (SIGBUS).
    if m.size() < offset + nbytes:
      raise SafetensorsError(f"{self.path}: tensor {name!r}: file ended while reading (truncated)")
    return np.frombuffer(m, dtype, nbytes // dtype.itemsize, offset).reshape(e["shape"])

  def release(self, names: Iterable[str]) -> None:
    """Mapped tensors' pages leave this process's resident set (their views stay valid: read again, they
    fault back in from the page cache), so a reader's memory stays bounded by what it holds. Adjacent
    tensors (a slice's INT4 words, scales and shape) go in one call."""
    if self._file_map is None or not hasattr(mmap, "MADV_DONTNEED"):
      return
    runs: list[list[int]] = []
    for start, end in sorted(self.entries[n]["data_offsets"] for n in names):
      first = (self._data_start + start) // mmap.PAGESIZE * mmap.PAGESIZE
      if runs and first <= runs[-1][1]:
        runs[-1][1] = max(runs[-1][1], self._data_start + end)
      elif end > start:
        runs.append([first, self._data_start + end])
    for first, end in runs:
      self._file_map.madvise(mmap.MADV_DONTNEED, first, end - first)


# Inf / NaN are exactly the values whose bits without the sign are at least these (the exponent all ones;
# e4m3fn has no Inf, its NaN is S.1111.111), for the formats whose ml_dtypes isfinite is slow.
_SPECIAL_BITS = {"BF16": (np.uint16, 0x7FFF, 0x7F80), "F8_E4M3": (np.uint8, 0x7F, 0x7F),
                 "F8_E5M2": (np.uint8, 0x7F, 0x7C)}


_CHUNK = 1 << 18
_scratch = threading.local()


def _all_finite(a: np.ndarray) -> bool:
  """No NaN / Inf in a float array (a bit test for bf16 / fp8, where ml_dtypes' isfinite is slow)."""
  name = _NAMES.get(a.dtype)
  if name in _SPECIAL_BITS:
    view, magnitude, special = _SPECIAL_BITS[name]
    bits = a.reshape(-1).view(view)
    # In cache-sized chunks through one kept buffer: |bits| into it, then its max (one pass each).
    buf = getattr(_scratch, "buf", None)
    if buf is None:
      buf = _scratch.buf = np.empty(_CHUNK, np.uint16)
    for i in range(0, bits.size, _CHUNK):
      chunk = bits[i:i + _CHUNK]
      m = buf.view(view)[:chunk.size]
      np.bitwise_and(chunk, magnitude, out=m)
      if m.max() >= special:
        return False
    return True
  flat = a.reshape(-1)
  return all(np.isfinite(flat[i:i + _CHUNK]).all() for i in range(0, flat.size, _CHUNK))


class Checkpoint:
  """All tensors of a checkpoint folder: `model.safetensors.index.json` shards or loose files."""

  def __init__(self, folder: str, check_finite: bool = True):
    self.folder = folder
    self.check_finite = check_finite
    if not os.path.isdir(folder):
      what = "a file" if os.path.exists(folder) else "missing"
      raise SafetensorsError(f"{folder} is {what}; give the checkpoint folder (config.json + safetensors)")
    index = os.path.join(folder, "model.safetensors.index.json")
    self._files: dict[str, SafetensorsFile] = {}
    self.where: dict[str, str] = {}
    if os.path.exists(index):
      weight_map = _read_index(index)
      self.where.update(weight_map)
      for fname in sorted(set(weight_map.values())):
        path = os.path.join(folder, fname)
        if not os.path.exists(path):
          raise SafetensorsError(f"{index} lists {fname}, which is missing")
        self._files[fname] = SafetensorsFile(path)
      for name, fname in weight_map.items():
        if name not in self._files[fname].entries:
          raise SafetensorsError(f"{index} puts {name!r} in {fname}, which does not hold it")
      for fname, sf in self._files.items():
        stray = [n for n in sf.keys() if weight_map.get(n) != fname]
        if stray:
          raise SafetensorsError(f"{os.path.join(folder, fname)} holds {stray[:3]}, which {index} does not "
                                 "place there")
    else:
      names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
      if not names:
        raise SafetensorsError(f"no .safetensors files in {folder} (only safetensors checkpoints are read)")
      for fname in names:
        sf = SafetensorsFile(os.path.join(folder, fname))
        self._files[fname] = sf
        for name in sf.keys():
          if name in self.where:
            raise SafetensorsError(f"tensor {name!r} is in both {self.where[name]} and {fname}")
          self.where[name] = fname

  def __contains__(self, name: str) -> bool:
    return name in self.where

  def keys(self) -> list[str]:
    return list(self.where)

  def files(self) -> dict[str, SafetensorsFile]:
    return dict(self._files)

  def mapped(self) -> "Checkpoint":
    """This checkpoint (headers already validated) with its tensors read as memory maps of the page cache
    (`SafetensorsFile`'s `mapped`)."""
    out = copy.copy(self)
    out._files = {}
    for f, sf in self._files.items():
      out._files[f] = m = copy.copy(sf)
      m.mapped, m._map_lock, m._file_map = True, threading.Lock(), None  # a map of its own
    return out

  def file_of(self, name: str) -> str:
    """The path of the shard holding `name` (for error messages)."""
    return self._files[self.where[name]].path

  def shape(self, name: str) -> tuple[int, ...]:
    return self._files[self.where[name]].shape(name)

  def dtype_name(self, name: str) -> str:
    return self._files[self.where[name]].dtype_name(name)

  def nbytes(self, name: str) -> int:
    return self._files[self.where[name]].nbytes(name)

  def release(self, names: Iterable[str]) -> None:
    """Mapped tensors read and copied: their pages leave the resident set (`SafetensorsFile.release`)."""
    by_file: dict[str, list[str]] = {}
    for name in names:
      by_file.setdefault(self.where[name], []).append(name)
    for f, group in by_file.items():
      self._files[f].release(group)

  def get(self, name: str) -> np.ndarray:
    """The tensor's data; with `check_finite`, a float tensor holding NaN or Inf is an error."""
    a = self._files[self.where[name]].get(name)
    if self.check_finite and self.dtype_name(name) not in INT_DTYPES and not _all_finite(a):
      bad = ~np.isfinite(a)
      if bad.any():
        first = np.unravel_index(int(np.argmax(bad)), a.shape) if a.ndim else ()
        raise SafetensorsError(f"{self.file_of(name)}: tensor {name!r} has {int(bad.sum())} NaN/Inf value(s) "
                               f"(first at index {list(map(int, first))}); pass check_finite=False "
                               "(--allow_nonfinite) to load it anyway")
    return a


def _read_index(index: str) -> dict[str, str]:
  """`weight_map` of a `model.safetensors.index.json`, checked: tensor name -> shard file in the folder."""
  try:
    with open(index) as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SafetensorsError(f"{index} is not valid JSON ({e})") from None
  weight_map = data.get("weight_map") if isinstance(data, dict) else None
  if not isinstance(weight_map, dict):
    raise SafetensorsError(f"{index} has no 'weight_map' object")
  for name, fname in weight_map.items():
    if (not isinstance(fname, str) or os.path.basename(fname) != fname or fname in ("", ".", "..")
        or not fname.endswith(".safetensors")):
      raise SafetensorsError(f"{index}: tensor {name!r} maps to {fname!r}, not a .safetensors file name "
                             "in the checkpoint folder")
  return weight_map


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
  """Writes a safetensors file atomically (a temp file renamed into place: never half-written)."""
  header: dict = {}
  offset = 0
  arrays = []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in _NAMES:
      raise SafetensorsError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      for a in arrays:
        f.write(a.reshape(-1).view(np.uint8).data)
    apply_umask(tmp)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


class ShardWriter:
  """Writes a planned stream of tensors as `model-0000k-of-0000n.safetensors` shards plus
  `model.safetensors.index.json`, each tensor straight to its file as it comes (host memory holds none
  of them): `specs` (name, shape, dtype name) in the order `write` will be called, so every shard's
  header is known before its first byte. Shards split where the next tensor would pass `max_shard_bytes`
  (as `save_sharded`). Meant for a staging folder: a failure leaves partial files for the caller to
  remove. `on_file(path)` is called after every `on_file_bytes` written to a shard and as each shard
  is complete (to fsync it in the background: its data goes to disk while the rest is written)."""

  def __init__(self, folder: str, specs: list[tuple[str, tuple[int, ...], str]], max_shard_bytes: int = 4 << 30,
               on_file=None, on_file_bytes: int = 256 << 20):
    self.folder = folder
    self.on_file = on_file
    self.on_file_bytes = on_file_bytes
    self.unreported = 0
    groups: list[list] = [[]]
    size = 0
    for name, shape, dt in specs:
      if dt not in DTYPES:
        raise SafetensorsError(f"tensor {name!r}: dtype {dt!r} cannot be stored in safetensors")
      n = DTYPES[dt].itemsize * math.prod(shape)
      if size and size + n > max_shard_bytes:
        groups.append([])
        size = 0
      groups[-1].append((name, tuple(shape), dt, n))
      size += n
    self.groups = [g for g in groups if g]
    self.names = [f"model-{i + 1:05d}-of-{len(self.groups):05d}.safetensors" for i in range(len(self.groups))]
    self.shard, self.index, self.fd = -1, 0, None

  def _open_next(self) -> None:
    self._close_current()
    self.shard += 1
    self.index = 0
    header, offset = {}, 0
    for name, shape, dt, n in self.groups[self.shard]:
      header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + n]}
      offset += n
    blob = json.dumps(dict(sorted(header.items())), separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    self.fd = os.open(os.path.join(self.folder, self.names[self.shard]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                      0o666)
    _write_all(self.fd, struct.pack("<Q", len(blob)) + blob)

  def _close_current(self) -> None:
    if self.fd is not None:
      os.close(self.fd)
      self.fd = None
      self.unreported = 0
      if self.on_file is not None:
        self.on_file(os.path.join(self.folder, self.names[self.shard]))

  def write(self, name: str, a: np.ndarray) -> None:
    """The next planned tensor: C-contiguous, of its planned dtype and element count (`a` may be shaped
    otherwise, e.g. INT4 words as [out, in/32, 4])."""
    if self.fd is None or self.index == len(self.groups[self.shard]):
      if self.shard + 1 == len(self.groups):
        raise SafetensorsError(f"tensor {name!r} was not planned (all planned tensors are written)")
      self._open_next()
    want, shape, dt, n = self.groups[self.shard][self.index]
    if name != want or a.dtype != DTYPES[dt] or a.nbytes != n or not a.flags.c_contiguous:
      raise SafetensorsError(f"tensor {name!r} ({a.dtype}, {a.shape}) does not match the plan: {want!r} "
                             f"({dt}, {shape})")
    _write_all(self.fd, a.reshape(-1).view(np.uint8))
    self.index += 1
    self.unreported += a.nbytes
    if self.on_file is not None and self.unreported >= self.on_file_bytes:
      self.unreported = 0
      self.on_file(os.path.join(self.folder, self.names[self.shard]))

  def close(self) -> None:
    """Ends the last shard and writes the index; every planned tensor must have been written."""
    if self.shard + 1 != len(self.groups) or (self.groups and self.index != len(self.groups[-1])):
      raise SafetensorsError("the stream ended before every planned tensor was written")
    self._close_current()
    weight_map = {name: f for f, g in zip(self.names, self.groups) for name, *_ in g}
    path = os.path.join(self.folder, "model.safetensors.index.json")
    with open(path, "w") as f:
      json.dump({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    if self.on_file is not None:
      self.on_file(path)

  def abort(self) -> None:
    if self.fd is not None:
      os.close(self.fd)
      self.fd = None


def _write_all(fd: int, data) -> None:
  view = memoryview(data).cast("B")
  while view:
    view = view[os.write(fd, view):]


def save_sharded(tensors: Iterable[tuple[str, np.ndarray]], folder: str, max_shard_bytes: int = 4 << 30) -> None:
  """Writes `model-0000k-of-0000n.safetensors` shards plus `model.safetensors.index.json` from a stream."""
  os.makedirs(folder, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  written: list[tuple[str, list[str]]] = []

  def flush(final: bool):
    nonlocal shards, size
    if shards[-1]:
      tmp_name = f"shard-{len(written):05d}.partial.safetensors"
      save_file(shards[-1], os.path.join(folder, tmp_name))
      written.append((tmp_name, list(shards[-1])))
    shards = [{}]
    size = 0

  for name, a in tensors:
    if size and size + a.nbytes > max_shard_bytes:
      flush(False)
    shards[-1][name] = np.asarray(a)
    size += a.nbytes
  flush(True)
  n = len(written)
  weight_map = {}
  for i, (tmp_name, names) in enumerate(written):
    final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    os.replace(os.path.join(folder, tmp_name), os.path.join(folder, final))
    weight_map.update({k: final for k in names})
  index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
  tmp = os.path.join(folder, "model.safetensors.index.json.tmp")
  with open(tmp, "w") as f:
    json.dump(index, f, indent=2)
  os.replace(tmp, os.path.join(folder, "model.safetensors.index.json"))
