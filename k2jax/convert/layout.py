"""The converted-checkpoint layout, written all or nothing: a staging folder renamed into place.

OUT/checkpoints/0/{params, meta} is what `k2-train` writes for a step (see `train/checkpointing.py`),
so `--checkpoint` / `init_from` load it; OUT/hf/ keeps the source's small files (config.json, tokenizer).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from k2jax import int4
from k2jax.convert import streaming
from k2jax.hf import set_path

STEP = 0
HF_FILES = "hf"
FORMAT_VERSION = 1
# Files of an HF folder that are weights (converted) rather than side files (copied).
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


class ConvertError(ValueError):
  """Conversion cannot proceed: bad input, or an output that would be overwritten."""


def side_files(hf_dir: str) -> list[str]:
  """Names of the small top-level files of an HF folder that travel with the weights."""
  return sorted(f for f in os.listdir(hf_dir) if os.path.isfile(os.path.join(hf_dir, f))
                and not f.endswith(_WEIGHT_SUFFIXES) and not f.startswith("."))


def hf_files_dir(checkpoint: str) -> str | None:
  """The `hf/` side-file folder of a converted checkpoint given as its folder, `checkpoints/` or a step."""
  p = Path(checkpoint).absolute()
  for root in (p, p.parent, p.parent.parent):
    if (root / HF_FILES).is_dir():
      return str(root / HF_FILES)
  return None


def process_index() -> int:
  return jax.process_index()


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(name)


def check_output(output_dir: str, source: str | None = None) -> None:
  """An output folder may be created: it does not exist, or is an empty folder (never overwritten), and
  it is neither inside `source` nor holds it (an export into a checkpoint's own `checkpoints/N` would
  become that checkpoint's latest, unreadable step)."""
  if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
    raise ConvertError(f"{os.path.abspath(output_dir)} exists and is not empty; refusing to overwrite it")
  if source is not None:
    out, src = os.path.realpath(output_dir), os.path.realpath(source)
    if os.path.commonpath([out, src]) in (out, src):
      raise ConvertError(f"output {os.path.abspath(output_dir)} overlaps the source {os.path.abspath(source)}; "
                         "give an output folder outside it")


class Staging:
  """Writes go to `<output>.partial`; `commit` renames it to `<output>`; any failure removes it.

  A leftover `.partial` of an interrupted run is removed first, so a re-run starts cleanly; an existing
  non-empty output is never touched.
  """

  def __init__(self, output_dir: str):
    self.output = os.path.abspath(output_dir)
    self.tmp = self.output.rstrip("/") + ".partial"

  def __enter__(self) -> "Staging":
    check_output(self.output)
    if process_index() == 0:
      if os.path.exists(self.tmp):
        shutil.rmtree(self.tmp)
      os.makedirs(self.tmp)
    _barrier("k2jax-convert-staging")
    return self

  def path(self, *parts: str) -> str:
    return os.path.join(self.tmp, *parts)

  def commit(self) -> None:
    """Makes everything written durable (each host its own writes), then renames it into place."""
    sync_tree(self.tmp)
    _barrier("k2jax-convert-commit")
    if process_index() == 0:
      if os.path.isdir(self.output):
        os.rmdir(self.output)  # empty, checked on entry
      os.replace(self.tmp, self.output)
      fsync_path(os.path.dirname(self.output))  # the rename itself
    _barrier("k2jax-convert-committed")

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None and process_index() == 0:
      shutil.rmtree(self.tmp, ignore_errors=True)


def fsync_path(path: str, drop: bool = False) -> int:
  """fsync a file or folder by path; with `drop`, the file's pages then leave the page cache. Returns
  the size synced (another thread may still be writing the file).

  A streaming writer drops what it has synced: its page cache stays about a batch in size instead of
  growing with the output, and the next writes reuse the pages just freed. Fresh pages are what a
  buffered write costs most on a VM whose host takes back idle memory (a durable 2.7 GB write: 4.2
  CPU-s into fresh pages, 0.9 s dropping every 256 MB; benchmarks/NOTES.md)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    size = os.fstat(fd).st_size
    os.fsync(fd)
    if drop and hasattr(os, "posix_fadvise"):
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return size
  finally:
    os.close(fd)


def _fsync_all(paths: list[str]) -> None:
  """fsync (and drop from the page cache) each path that still exists (Orbax's temporary files may have
  gone meanwhile)."""
  for path in paths:
    try:
      fsync_path(path, drop=True)
    except FileNotFoundError:
      continue


RECYCLE_BYTES = 64 << 20  # a file being written is synced and dropped each time it grows by this much


def walk(folders: list[str], skip_dirs=frozenset()) -> tuple[list[str], list[str]]:
  """(files, folders) below `folders`, not descending into `skip_dirs`."""
  files, dirs = [], []
  for folder in folders:
    for root, subdirs, names in os.walk(folder):
      subdirs[:] = [d for d in subdirs if os.path.join(root, d) not in skip_dirs]
      dirs.extend(os.path.join(root, d) for d in subdirs)
      files.extend(os.path.join(root, f) for f in names)
  return files, dirs


class Recycler:
  """While a batch is being written (by Orbax's threads, which the writer does not see): every file under
  `folders()` is synced and dropped from the page cache each time it has grown by `step` bytes, so the
  writes keep reusing the pages just freed and the page cache stays about `step` per file in size.

  On a VM whose host takes back idle memory, a page new to the page cache is what a buffered write costs
  most: a first 680 MB batch took 6.8-9.9 s into new pages, later ones ~1 s into pages freed just before
  (benchmarks/NOTES.md). Files in `skip` (handed to the batch-end fsync) and folders in `skip_dirs`
  (finished saves: at full scale thousands, which a poll would otherwise list 50 times a second) are left
  alone. Best effort: a file it cannot sync is left to the batch-end fsync, which reports the error."""

  def __init__(self, folders, skip: set[str], skip_dirs: set[str] = frozenset(), step: int = RECYCLE_BYTES,
               interval_s: float = 0.02):
    self.folders, self.skip, self.skip_dirs = folders, skip, skip_dirs
    self.step, self.interval_s = step, interval_s
    self.dropped: dict[str, int] = {}  # path -> bytes synced and dropped so far
    self._stop = None
    self._threads: list = []

  def _poll(self) -> None:
    try:
      files, _ = walk(self.folders(), self.skip_dirs)
    except OSError:
      return
    for path in files:
      if path in self.skip:
        continue
      try:
        if os.stat(path).st_size - self.dropped.get(path, 0) >= self.step:
          self.dropped[path] = fsync_path(path, drop=True)
      except OSError:  # Orbax's temporary files come and go; errors are the batch-end fsync's to report
        continue

  def _run(self, stop) -> None:
    while not stop.wait(self.interval_s):
      self._poll()

  def start(self) -> None:
    self._stop = threading.Event()
    thread = threading.Thread(target=self._run, args=(self._stop,), name="k2-convert-recycle", daemon=True)
    thread.start()
    self._threads = [t for t in self._threads if t.is_alive()] + [thread]

  def stop(self) -> None:
    """Ends the polling without waiting for a sync in progress (the writer must not wait on the disk)."""
    if self._stop is not None:
      self._stop.set()
      self._stop = None

  def close(self) -> None:
    """Stops, and waits for every sync started."""
    self.stop()
    for thread in self._threads:
      thread.join()
    self._threads = []


def sync_tree(root: str) -> None:
  """fsync of every file and folder under `root`, and `root`: written data is on disk, not only in the
  page cache, before the rename that commits it (a crash can then never leave a committed checkpoint
  with files missing their data)."""
  with concurrent.futures.ThreadPoolExecutor(8) as pool:  # fsyncs of different files overlap
    for folder, _, files in os.walk(root):
      list(pool.map(fsync_path, [os.path.join(folder, f) for f in files] + [folder]))


class Slabs:
  """Leaf memory: two host slabs of `size` bytes, leaves carved from one in order (a bump pointer) while
  the batch carved from the other is written; then they swap. The same pages serve every leaf, so a
  conversion touches fresh memory (a page fault and a kernel zeroing per page, slow on a VM) only for
  the two slabs, not for every leaf; pages are touched only as far as they are used."""

  ALIGN = 64

  def __init__(self, size: int):
    self.size = size
    self.bufs: list[np.ndarray | None] = [None, None]
    self.current = 0
    self.used = 0

  @staticmethod
  def span(nbytes: int) -> int:
    """Bytes an array of `nbytes` takes in a slab."""
    return -(-nbytes // Slabs.ALIGN) * Slabs.ALIGN

  @staticmethod
  def span_of(arrays) -> int:
    """Bytes that arrays given as (shape, dtype) take in a slab."""
    return sum(Slabs.span(int(np.prod(shape)) * np.dtype(dt).itemsize) for shape, dt in arrays)

  def fits(self, nbytes: int) -> bool:
    return self.used + nbytes <= self.size

  def empty(self, shape, dtype) -> np.ndarray:
    """An uninitialised array from the current slab (fresh memory if the slab is full)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    if not self.fits(self.span(n)):
      return np.empty(shape, dtype)
    if self.bufs[self.current] is None:
      self.bufs[self.current] = _small_page_empty(self.size)
    out = self.bufs[self.current][self.used:self.used + n].view(dtype).reshape(shape)
    self.used += self.span(n)
    return out

  def swap(self) -> None:
    """Leaves now come from the other slab (whose batch the caller has seen written)."""
    self.current, self.used = 1 - self.current, 0


def _small_page_empty(n: int) -> np.ndarray:
  """n bytes in ordinary 4 KB pages. numpy's own large arrays ask for transparent huge pages, whose
  first touch costs far more on a VM whose host takes back idle memory (a 2 MB block is what the guest
  hands back): 680 MB touched in 0.4-1.2 s with huge pages against 0.22 s without, and a conversion
  1.56x the CPU (benchmarks/NOTES.md)."""
  import mmap  # noqa: PLC0415
  try:
    return np.frombuffer(mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8)
  except (OSError, ValueError):
    return np.empty(n, np.uint8)


def import_orbax() -> None:
  from orbax.checkpoint import v1  # noqa: F401, PLC0415
  from orbax.checkpoint.experimental.v1 import partial  # noqa: F401, PLC0415


BATCH_BYTES = 256 << 20  # leaves gathered into one Orbax save (each save has a fixed cost, ~40 ms)
# Stored chunks of a host leaf over CHUNK_BYTES: whole slices along its leading axes (layer, then expert),
# not Orbax's own (its largest axes split first: a 1T INT4 expert stack's 2 GiB chunks would each span all
# 60 layers and 128 of the 384 experts). A host that loads only its layers or experts then reads only
# their chunks (8 experts of a layer: 67 MB read for 8.4 MB, against 604 MB; benchmarks/NOTES.md).
# Slices under MIN_CHUNK_BYTES (an embedding's rows) would cost more per chunk than they save: one axis
# fewer, or Orbax's way. Leaves converted under a mesh keep Orbax's chunk per shard.
CHUNK_BYTES = 256 << 20
MIN_CHUNK_BYTES = 1 << 20
# Orbax's target size of a data file, which also caps a stored chunk (None: Orbax's own, 2 GiB on a local
# disk). A leaf over it is stored in several chunks.
DATA_FILE_BYTES: int | None = None
# A leaf in several chunks is written this many bytes of chunks at a time (small chunks one by one would
# wait on each write in turn).
WRITE_WINDOW_BYTES = 64 << 20
# How far the reader of a leaf written while it is read may run ahead of its writer (`streaming`).
STREAM_AHEAD_BYTES = 256 << 20


def write_order(sizes: dict[str, int], batch_bytes: int) -> list[str]:
  """Leaf paths in the order to convert them. Writing a batch overlaps reading the next one, except
  for the first batch's read and the last one's write; so a small first batch (the smallest leaves, up
  to a quarter batch) starts the writes early, and the rest go largest first, so that the last write
  is of the smallest leaves."""
  ascending = sorted(sizes, key=lambda p: sizes[p])
  first, total = [], 0
  for p in ascending:
    if total + sizes[p] > batch_bytes // 4:
      break
    first.append(p)
    total += sizes[p]
  return first + sorted(ascending[len(first):], key=lambda p: -sizes[p])


@contextlib.contextmanager
def _deferred_file_sync():
  """Orbax's tensorstore writes without an fsync per file, which held each batch (and so the next) until
  its data was on disk; `ParamsWriter` syncs a batch's files in the background instead, overlapping
  the next batch, and `Staging.commit` syncs the whole tree before its rename, so the output is as
  durable as before. Orbax takes no tensorstore context, so its factory is swapped while a save is set
  up (when the save's arrays get their context)."""
  try:
    from orbax.checkpoint._src.serialization import tensorstore_utils  # noqa: PLC0415
    import tensorstore as ts  # noqa: PLC0415
    real = tensorstore_utils.get_ts_context
  except (ImportError, AttributeError):  # another Orbax: its per-file fsyncs stay (slower, as durable)
    yield
    return
  tensorstore_utils.get_ts_context = lambda **kw: ts.Context(dict(real(**kw).spec.to_json(), file_io_sync=False))
  try:
    yield
  finally:
    tensorstore_utils.get_ts_context = real


def chunk_axes(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...] | None:
  """Leading axes to store one index of per chunk (`StorageOptions.shard_axes`), or None for Orbax's own
  chunking (a leaf within CHUNK_BYTES is one chunk)."""
  size = math.prod(shape) * itemsize
  if size <= CHUNK_BYTES:
    return None
  for k in range(1, len(shape)):
    chunk = size // math.prod(shape[:k])
    if chunk <= CHUNK_BYTES:
      k = k if chunk >= MIN_CHUNK_BYTES else k - 1
      return tuple(range(k)) or None
  return tuple(range(len(shape) - 1)) or None


def sliced(arrays) -> list[bool]:
  """For each host array, given as (shape, itemsize), whether it is stored in slices along its leading
  axes (`chunk_axes`), so in several chunks: a stacked leaf with one is written while it is read."""
  return [chunk_axes(tuple(shape), itemsize) is not None for shape, itemsize in arrays]


def _storage_options(keypath, value):
  """Orbax's per-leaf storage options: host leaves chunked by `chunk_axes` (None: the context's defaults;
  a jax.Array, written shard by shard under a mesh, is stored a chunk per shard)."""
  if not isinstance(value, np.ndarray):
    return None
  axes = chunk_axes(tuple(value.shape), value.dtype.itemsize)
  if axes is None:
    return None
  from orbax.checkpoint import v1 as ocp  # noqa: PLC0415
  return ocp.options.ArrayOptions.Saving.StorageOptions(shard_axes=axes)


def chunk_regions(shape, chunk) -> list[tuple[slice, ...]]:
  """The regions of an array of `shape` stored in chunks of `chunk` (edge chunks cut short), in C order."""
  starts = itertools.product(*(range(0, n, c) for n, c in zip(shape, chunk)))
  return [tuple(slice(s, min(s + c, n)) for s, c, n in zip(st, chunk, shape)) for st in starts]


def _groups(items: list, item_bytes: int, window: int) -> list[list]:
  """`items` in consecutive groups of at most `window` bytes (one item at least)."""
  n = max(1, window // max(item_bytes, 1))
  return [items[i:i + n] for i in range(0, len(items), n)]


@contextlib.contextmanager
def _host_leaves_written_by_chunk():
  """Orbax writes a host (numpy) leaf with one tensorstore write. Where the leaf is stored in several
  chunks (over `DATA_FILE_BYTES`: the 1T model's expert stacks, 177 GiB in 2 GiB chunks), tensorstore
  then copies all of it into its chunk cache before writing any (peak RSS 1.5x the leaf over the slabs,
  benchmarks/NOTES.md); written a group of chunks of up to WRITE_WINDOW_BYTES at a time (one chunk at
  least), the copy is of that group. A leaf in one chunk is written as before. Installed while a
  `ParamsWriter` is open (its saves run in the background)."""
  try:
    import tensorstore as ts  # noqa: PLC0415
    from orbax.checkpoint._src.serialization import type_handlers  # noqa: PLC0415
    real = type_handlers.NumpyHandler._open_and_write
  except (ImportError, AttributeError):  # another Orbax: whole-leaf writes (more memory, same result)
    yield False
    return

  async def open_and_write(self, value, tspec, ts_context):
    stream = streaming.stream_of(value)  # a leaf being read while it is written: wait for its rows
    try:
      await write(value, tspec, ts_context, stream)
    except BaseException as error:
      if stream is not None:  # its reader, held back by this write, must not wait for it
        stream.fail(error)
      raise

  async def write(value, tspec, ts_context, stream):
    t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
    chunk = tuple(t.chunk_layout.write_chunk.shape)
    if chunk == tuple(t.shape):
      if stream is not None:
        await asyncio.to_thread(stream.wait_ready, stream.rows)
      await t.write(value, can_reference_source_data_indefinitely=True)
      if stream is not None:
        stream.wrote(value, stream.rows)
      return
    groups = _groups(chunk_regions(t.shape, chunk), value.dtype.itemsize * math.prod(chunk), WRITE_WINDOW_BYTES)
    for i, group in enumerate(groups):
      if stream is not None:
        await asyncio.to_thread(stream.wait_ready, max(r[0].stop for r in group))
      await asyncio.gather(*(t[r].write(value[r], can_reference_source_data_indefinitely=True) for r in group))
      if stream is not None:  # rows before the next group's first are written
        stream.wrote(value, groups[i + 1][0][0].start if i + 1 < len(groups) else stream.rows)

  type_handlers.NumpyHandler._open_and_write = open_and_write
  try:
    yield True
  finally:
    type_handlers.NumpyHandler._open_and_write = real


def save_folders(path: str) -> list[str]:
  """The folders Orbax's partial saves to `path` write into (`<path>.partial_save/pending_*` until
  finalized)."""
  parent, name = os.path.split(path)
  return [os.path.join(parent, d) for d in os.listdir(parent) if d.startswith(name)]


class ParamsWriter:
  """An Orbax parameter tree written a few leaves at a time (Orbax partial saves), so the model is never
  in memory at once. Leaves are numpy arrays (one host; best from `empty`, after `make_room`) or sharded
  jax.Arrays (each host writes its shards). Small leaves are gathered into one save of up to
  `batch_bytes` (each save has a fixed cost); one batch is written while the next is assembled, each in
  its own slab of `max(batch_bytes, largest leaf)` bytes, so host memory holds two slabs at most."""

  def __init__(self, staging_path: str, largest_leaf: int = 0, batch_bytes: int = BATCH_BYTES):
    self.path = os.path.join(staging_path, "params.building")
    self.batch_bytes = batch_bytes
    self.slabs = Slabs(max(batch_bytes, largest_leaf))
    self.pending: dict = {}
    self.pending_bytes = 0
    self.in_flight = None  # the Orbax response of the batch being written
    # fsyncs of each written batch's files, one batch after another, while the next batches are written.
    self.syncer = concurrent.futures.ThreadPoolExecutor(1, "k2-convert-fsync")
    self.syncs: list[concurrent.futures.Future] = []
    self.synced: set[str] = set()
    self.finished_dirs: set[str] = set()  # folders of finished saves: never written again before finalize
    # A function of the path, not a bound method: a cycle through the writer would keep its slabs
    # (GBs) alive after the conversion until the next full garbage collection.
    self.recycler = Recycler(functools.partial(save_folders, self.path), skip=self.synced,
                             skip_dirs=self.finished_dirs)
    self._ctx = None
    self._streams = False
    self._patches = contextlib.ExitStack()
    # Orbax's import (~0.4 s, Python) runs while the first leaves are read (numpy, without the GIL).
    self._orbax = self.syncer.submit(import_orbax)

  @property
  def ctx(self):
    if self._ctx is None:
      self._orbax.result()
      from orbax.checkpoint import v1 as ocp  # noqa: PLC0415
      self._ctx = ocp.Context()
      # Weights (INT4 words above all) barely compress; zstd would cost more time than it saves.
      self._ctx.array.saving.use_compression = False
      # Leaves are never modified after they are handed over, so Orbax need not copy them first.
      self._ctx.memory_options.deepcopy_host_arrays = False
      if DATA_FILE_BYTES is not None:
        self._ctx.array.saving.ocdbt_target_data_file_size = DATA_FILE_BYTES
      self._ctx.array.saving.scoped_storage_options_creator = _storage_options
      self._streams = self._patches.enter_context(_host_leaves_written_by_chunk())
    return self._ctx

  def make_room(self, nbytes: int) -> None:
    """Before a leaf of `nbytes` (in `Slabs.span`s) is assembled: starts writing the pending leaves if
    it would not fit beside them, in the batch or in the slab."""
    if self.pending and (self.pending_bytes + nbytes > self.batch_bytes or not self.slabs.fits(nbytes)):
      self.flush()

  def empty(self, shape, dtype) -> np.ndarray:
    return self.slabs.empty(shape, dtype)

  def write(self, leaf_path: str, value: Any) -> None:
    """Adds a leaf to the pending batch (`make_room` came first: a leaf in the current slab must go out
    with the batch of that slab)."""
    if isinstance(value, int4.QuantizedWeight):
      value = {"packed": value.packed, "scales": value.scales}
    set_path(self.pending, leaf_path, value)
    self.pending_bytes += nbytes(value)
    if self.pending_bytes >= self.batch_bytes:
      self.flush()

  def streams(self) -> bool:
    """Whether a leaf can be written while it is read (`write_streamed`): this Orbax's host-array write
    is the one replaced by the chunk-group writer, which waits on a stream's rows."""
    return self.ctx is not None and self._streams

  def write_streamed(self, leaf_path: str, value: Any) -> None:
    """Starts writing a leaf that is still being read (its arrays from a `streaming.RowStream`, which
    the writer waits on row by row): the pending batch goes first, then this leaf alone."""
    self.flush()
    self.write(leaf_path, value)
    if self.pending:  # `write` flushed it already if it was over a batch
      self.flush()

  def flush(self) -> None:
    """Starts writing the pending leaves (their slab) once the batch in flight is written (the other
    slab, which the next leaves then fill)."""
    self.wait()
    if self.pending:
      self._sync_finished()
      ctx = self.ctx
      from orbax.checkpoint.experimental.v1 import partial  # noqa: PLC0415
      with ctx, _deferred_file_sync():
        self.in_flight = partial.save_async(self.path, self.pending)
      self.recycler.start()
      self.slabs.swap()
    self.pending, self.pending_bytes = {}, 0

  def _sync_finished(self) -> None:
    """Queues an fsync of the files the batches written so far made (none is being written now, so no
    file is synced half-written and then skipped); the next batch is written meanwhile."""
    files, dirs = walk(save_folders(self.path), self.finished_dirs)
    # Nothing is in flight, so every folder below the save folders holds a finished save (Orbax writes
    # each save into a fresh folder): later walks need not descend into them. The commit's `sync_tree`
    # syncs the whole tree whatever happens here.
    self.finished_dirs.update(dirs)
    new = [f for f in files if f not in self.synced]
    if new:
      self.synced.update(new)
      self.syncs.append(self.syncer.submit(_fsync_all, new))

  def wait(self) -> None:
    if self.in_flight is not None:
      response, self.in_flight = self.in_flight, None
      try:
        response.result()
      finally:
        self.recycler.stop()

  def __enter__(self) -> "ParamsWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:  # let a background write end before the staging folder is removed
      try:
        self.wait()
      except Exception:  # noqa: BLE001  (the first error is the one to report)
        pass
    self.recycler.close()
    self.syncer.shutdown(wait=True)
    self._patches.close()

  def finalize(self, dest: str) -> None:
    """Moves the finished tree to `dest` (a step's `params` folder)."""
    from orbax.checkpoint.experimental.v1 import partial  # noqa: PLC0415
    self.flush()
    self.wait()
    self._sync_finished()
    self.recycler.close()
    for f in self.syncs:
      f.result()
    with self.ctx:
      partial.finalize(self.path)
    _barrier("k2jax-convert-params")
    if process_index() == 0:
      # The finalized checkpoint holds one pytree folder (with its _METADATA): the params item.
      inner = [d for d in os.listdir(self.path) if os.path.isfile(os.path.join(self.path, d, "_METADATA"))]
      if len(inner) != 1:
        raise ConvertError(f"unexpected Orbax partial-save layout in {self.path}: {sorted(os.listdir(self.path))}")
      os.replace(os.path.join(self.path, inner[0]), dest)
      shutil.rmtree(self.path)


def write_meta(root: str, meta: dict[str, Any]) -> str:
  """WORKDIR-style `checkpoints/<STEP>/meta` under `root`; returns the step folder."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  directory = Path(root) / "checkpoints"
  manager = ocp.CheckpointManager(directory, item_names=("params", "meta"),
                                  options=ocp.CheckpointManagerOptions(create=True,
                                                                       enable_async_checkpointing=False))
  try:
    manager.save(STEP, args=ocp.args.Composite(meta=ocp.args.JsonSave({**meta, "step": STEP})))
    manager.wait_until_finished()
  finally:
    manager.close()
  return str(directory / str(STEP))


class ByteBar:
  """A tqdm bar in bytes (rate and ETA) with the current leaf as its postfix; quiet when disabled."""

  def __init__(self, total: int, desc: str, enabled: bool = True):
    self.bar = None
    self.done = 0
    self.start = time.perf_counter()
    if enabled and process_index() == 0:
      from tqdm.auto import tqdm  # noqa: PLC0415
      self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)

  def leaf(self, path: str) -> None:
    if self.bar is not None:
      self.bar.set_postfix_str(path, refresh=False)

  def update(self, n: int) -> None:
    self.done += n
    if self.bar is not None:
      self.bar.update(n)

  def close(self) -> float:
    if self.bar is not None:
      self.bar.close()
    return time.perf_counter() - self.start


def nbytes(x: Any) -> int:
  return int(sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in jax.tree.leaves(x)))
