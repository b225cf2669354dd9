"""A large stacked leaf written while it is read: the reader fills its arrays layer by layer, the writer
(Orbax's save of the leaf, started before the first layer is read) writes each group of stored chunks as
soon as its layers are filled and gives their pages back, and the reader stays at most a few layers ahead.
Host memory for the leaf is then a few layers, not the leaf (the 1T model's expert stacks: 177 GiB each).

Arrays are found by their data address: Orbax hands the writer the arrays it was given (no copies:
`deepcopy_host_arrays` is off), and `layout`'s chunk-group writer asks `stream_of(value)`."""
from __future__ import annotations

import math
import mmap
import threading

import numpy as np

_PAGE = mmap.PAGESIZE
_streams: dict[int, "RowStream"] = {}  # data address of a streamed array -> its stream
_lock = threading.Lock()


def rows_ahead(gated_row_bytes, window: int, ahead_bytes: int = 0) -> int:
  """Rows the reader may fill past the last one written: a whole group of chunks (up to `window` bytes)
  must be filled before it is written, one row more keeps the reader busy meanwhile, and up to
  `ahead_bytes` of rows let reading and writing run at their own pace."""
  return max([2] + [max(2 + -(-window // max(b, 1)), ahead_bytes // max(b, 1)) for b in gated_row_bytes])


def _address(a: np.ndarray) -> int:
  return a.__array_interface__["data"][0]


def stream_of(value) -> "RowStream | None":
  """The stream `value` (an array Orbax is about to write) belongs to, if any."""
  if not isinstance(value, np.ndarray) or value.ndim == 0:
    return None
  with _lock:
    return _streams.get(_address(value))


class StreamError(RuntimeError):
  """The other side of a streamed leaf failed (its reading, or its write): this side gives up with it."""


class RowStream:
  """Rows (indices of the leading, layer axis) of a leaf's arrays, filled by a reader and written by a
  writer. `gated` arrays (those stored in several chunks) hold the reader back: it may fill row r only
  once every gated array has been written up to r - ahead; an array in one chunk is written once every
  row is filled, and never holds the reader."""

  def __init__(self, rows: int, slices_per_row: int, window: int, ahead_bytes: int = 0):
    self.rows = rows
    self.window = window
    self.ahead_bytes = ahead_bytes
    self.cond = threading.Condition()
    self.left = [slices_per_row] * rows  # slices of each row still being read
    self.ready = 0  # rows [0, ready) are filled
    self.error: BaseException | None = None
    self.maps: dict[int, mmap.mmap] = {}
    self.arrays: list[np.ndarray] = []
    self.written: dict[int, int] = {}  # gated array address -> rows written
    self.released: dict[int, int] = {}  # array address -> bytes given back
    self.ahead = 2
    self.most_resident = 0  # the most rows filled and not yet written at once (for tests)

  def empty(self, shape, dtype, gated: bool) -> np.ndarray:
    """A zero-backed array of `shape` whose pages exist only once filled (and go once written)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    m = mmap.mmap(-1, max(1, nbytes), flags=flags)
    a = np.frombuffer(m, np.uint8)[:nbytes].view(dtype).reshape(shape)
    address = _address(a)
    self.maps[address] = m
    self.arrays.append(a)
    self.released[address] = 0
    if gated:
      self.written[address] = 0
      self.ahead = max(self.ahead, rows_ahead([a.nbytes // self.rows], self.window, self.ahead_bytes))
    return a

  def __enter__(self) -> "RowStream":
    with _lock:
      for a in self.arrays:
        _streams[_address(a)] = self
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc is not None:
      self.fail(exc)
    with _lock:
      for a in self.arrays:
        _streams.pop(_address(a), None)

  # The reader's side.
  def admit(self, row: int) -> None:
    """Blocks until row `row` may be filled (the writer is at most `ahead` rows behind)."""
    with self.cond:
      self.cond.wait_for(lambda: self.error is not None or
                         all(w >= row + 1 - self.ahead for w in self.written.values()))
      self._raise()

  def slice_done(self, row: int) -> None:
    with self.cond:
      self.left[row] -= 1
      while self.ready < self.rows and self.left[self.ready] == 0:
        self.ready += 1
      lowest = min(self.written.values(), default=0)
      self.most_resident = max(self.most_resident, self.ready - lowest)
      self.cond.notify_all()

  def fail(self, error: BaseException) -> None:
    with self.cond:
      if self.error is None:
        self.error = error
      self.cond.notify_all()

  # The writer's side.
  def wait_ready(self, rows: int) -> None:
    """Blocks until rows [0, rows) are filled."""
    with self.cond:
      self.cond.wait_for(lambda: self.error is not None or self.ready >= rows)
      self._raise()

  def wrote(self, value: np.ndarray, rows: int) -> None:
    """Rows [0, rows) of `value` are written: their pages go back, and the reader may go on."""
    address = _address(value)
    row_bytes = value.nbytes // self.rows
    end = rows * row_bytes if rows < self.rows else len(self.maps[address])
    end -= end % _PAGE if rows < self.rows else 0
    start = self.released[address]
    if end > start:
      self.maps[address].madvise(mmap.MADV_DONTNEED, start, end - start)
      self.released[address] = end
    with self.cond:
      if address in self.written:
        self.written[address] = max(self.written[address], rows)
      self.cond.notify_all()

  def _raise(self) -> None:
    if self.error is not None:
      raise StreamError(str(self.error) or type(self.error).__name__) from self.error
