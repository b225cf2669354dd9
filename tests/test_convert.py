"""k2-convert / k2-export: HF -> k2jax -> HF bit for bit, generation equal to transformers, validation
before commit, atomic output, dry runs from shapes alone (the 1T config too)."""
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from k2jax import hf, int4, params, presets
from k2jax.config import K2Config
from k2jax.convert import convert, export, layout, orbax_to_hf, plan_convert, plan_export
from k2jax.safetensors_io import Checkpoint, SafetensorsError, save_file, save_sharded
from k2jax.train import checkpointing
from host_params import host_params

C = presets.TINY
TOKENIZER = os.path.join(os.path.dirname(hf.__file__), "assets", "tiny_tokenizer")


def _k2_thinking_dir(folder, seed=0, max_shard_bytes=400_000, c=C):
  """A K2-Thinking-format checkpoint in several shards: bf16 weights, fp32 router bias, INT4 experts, the
  config.json fields a real release carries, and tokenizer files."""
  p = params.quantize_experts(params.cast(host_params(c, seed), jnp.bfloat16))
  p["moe_layers"]["moe"]["router_bias_e"] = np.random.default_rng(seed).normal(
      size=p["moe_layers"]["moe"]["router_bias_e"].shape).astype(np.float32)
  hf.save_hf(p, c, folder, max_shard_bytes=max_shard_bytes)
  cfg = json.load(open(os.path.join(folder, "config.json")))
  cfg.update({"model_type": "kimi_k2", "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
              "torch_dtype": "bfloat16", "transformers_version": "4.57.1", "num_nextn_predict_layers": 0})
  json.dump(cfg, open(os.path.join(folder, "config.json"), "w"), indent=1)
  for f in os.listdir(TOKENIZER):
    shutil.copy(os.path.join(TOKENIZER, f), folder)
  assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) >= 3
  return folder


@pytest.fixture(scope="module")
def k2t(tmp_path_factory):
  return _k2_thinking_dir(str(tmp_path_factory.mktemp("k2t") / "hf"))


@pytest.fixture(scope="module")
def k2t_deep(tmp_path_factory):
  """8 MoE layers: more than a stream lets its reader run ahead of its writer."""
  return _k2_thinking_dir(str(tmp_path_factory.mktemp("k2t_deep") / "hf"), c=C.replace(num_hidden_layers=9))


@pytest.fixture(scope="module")
def converted(k2t, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("conv") / "k2jax")
  summary = convert(k2t, out, progress=False)
  assert summary["expert_format"] == "int4"
  return out


def _assert_same_tensors(a_dir, b_dir):
  a, b = Checkpoint(a_dir), Checkpoint(b_dir)
  assert sorted(a.keys()) == sorted(b.keys())
  for k in a.keys():
    x, y = a.get(k), b.get(k)
    assert (x.dtype, x.shape) == (y.dtype, y.shape), k
    np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8), err_msg=k)


@pytest.mark.parametrize("dtype,to", [(ml_dtypes.bfloat16, None), (np.int32, None), (np.float32, ml_dtypes.bfloat16),
                                      (ml_dtypes.bfloat16, np.float32)])
def test_tiled_copy_into_place_equals_numpy(dtype, to):
  """The converter's and exporter's transposed copies (tiles over rows and columns, bf16 copied as uint16
  or in groups of 4 as uint64, casts on the way) against numpy's plain copy, on shapes that leave partial
  tiles and blocks in every tiled axis."""
  from k2jax import host_copy  # noqa: PLC0415
  rng = np.random.default_rng(0)
  to = to or dtype
  int4_cols = host_copy.tile((4, 12, 1))[1]
  for shape, perm in [((host_copy.TILE_COLS * 3 + 5, host_copy.TILE_ROWS + 7), (1, 0)),  # HF [out, in] -> [in, out]
                      ((3 * int4_cols + 1, 12, 4), (2, 1, 0)),                      # INT4 words -> [4, K/32, N]
                      ((4, 12, 3 * int4_cols + 1), (2, 1, 0)),                      # [4, K/32, N] -> HF words
                      ((host_copy.GROUP_ROWS + 5, 4 * host_copy.GROUP_COLS + 12), (1, 0)),  # bf16 in groups of 4
                      ((5, 9), (1, 0)), ((2, 3, 70), (0, 1, 2))]:                   # small; already in order
    src = rng.standard_normal(shape).astype(np.float32)
    src = (src * 2**20).astype(dtype) if dtype == np.int32 else src.astype(dtype)
    view = src.transpose(perm)
    dst = np.empty(view.shape, to)
    host_copy.copy_into(dst, view)
    np.testing.assert_array_equal(dst.view(np.uint8), np.ascontiguousarray(view).astype(to).view(np.uint8))
  # Attention weights, copied as the 2-D transposes they are, with no copy of the source on the way:
  # HF [H * hd, in] -> [in, H, hd] (q_b, kv_b) and HF [out, H * hd] -> [H, hd, out] (o).
  src = rng.standard_normal((8 * 12, host_copy.GROUP_ROWS + 4)).astype(np.float32)
  src = (src * 2**20).astype(dtype) if dtype == np.int32 else src.astype(dtype)
  for view in (src.T.reshape(-1, 8, 12), np.ascontiguousarray(src.T).T.reshape(8, 12, -1)):
    dst = np.empty(view.shape, to)
    tracemalloc.start()
    host_copy.copy_into(dst, view)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < src.nbytes // 4, (view.shape, peak)
    np.testing.assert_array_equal(dst.view(np.uint8), np.ascontiguousarray(view).astype(to).view(np.uint8))
  with pytest.raises(ValueError, match="copy of a"):
    host_copy.copy_into(np.empty((2, 3), dtype), np.empty((3, 2), dtype))


def test_int4_words_copied_between_hf_and_packed_layouts():
  """HF words [out, in/8] <-> packed [4, in/32, out], a group's 4 words moved as one 16-byte float item,
  against int4's own reshapes, on shapes that leave partial blocks both ways and with words whose pairs
  and quadruples are NaN bit patterns (quiet and signalling, with payloads), which must go through
  unchanged; a packed view that is not of HF words takes the plain copy."""
  from k2jax import host_copy
  rng = np.random.default_rng(3)
  nan_words = np.array([0x7FF00001, 0x7FF80000, -1, 0x7FF00000, 1, -0x000FFFFF, 0x7FC00001, 0x7F800001],
                       np.int64).astype(np.int32)
  for n_out, groups in [(host_copy.WORD_ROWS + 3, 5), (40, 3 * host_copy.WORD_GROUPS + 2)]:
    words = rng.integers(-2**31, 2**31 - 1, (n_out, 4 * groups), dtype=np.int32)
    words[::7, :8] = nan_words
    packed = int4.from_hf(words, np.zeros((n_out, groups), ml_dtypes.bfloat16), copy=False).packed
    dst = np.empty(packed.shape, np.int32)
    host_copy.copy_words_to_packed(dst, packed)
    np.testing.assert_array_equal(dst, np.ascontiguousarray(packed))
    back = np.empty_like(words)
    host_copy.copy_packed_to_words(back, dst)
    np.testing.assert_array_equal(back, words)
    other = rng.integers(0, 9, (4, n_out, groups), dtype=np.int32).transpose(0, 2, 1)  # no HF words behind it
    host_copy.copy_words_to_packed(dst, other)
    np.testing.assert_array_equal(dst, other)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
def test_finite_check_by_bits_finds_every_nan_and_inf_and_passes_the_largest_values(dtype):
  from k2jax import safetensors_io
  n = 2 * safetensors_io._CHUNK + 7  # a partial last chunk
  a = (np.random.default_rng(0).standard_normal(n) * 4).astype(dtype)
  big = float(ml_dtypes.finfo(dtype).max)
  a[[3, n - 2]] = [big, -big]
  assert safetensors_io._all_finite(a)
  specials = [np.nan, -np.nan] + ([np.inf, -np.inf] if dtype != ml_dtypes.float8_e4m3fn else [])
  for at in (0, safetensors_io._CHUNK, n - 1):
    for v in specials:
      b = a.copy()
      b[at] = v
      assert not safetensors_io._all_finite(b), (at, v)


def test_params_writer_batches_in_two_slabs_write_every_leaf(tmp_path, monkeypatch):
  """Leaves carved from the two slabs, many batches (some a single leaf over the batch size): each
  leaf's memory is reused only after its batch is written, so what Orbax restores equals the inputs."""
  import orbax.checkpoint as ocp
  rng = np.random.default_rng(1)
  sizes = [(3, 40), (700,), (5, 9, 11), (2, 600), (17,), (64, 33), (1,), (900,), (4, 4), (300, 2)]
  want = {f"l{i}": rng.standard_normal(s).astype(np.float32 if i % 2 else ml_dtypes.bfloat16)
          for i, s in enumerate(sizes)}
  biggest = max(layout.Slabs.span(a.nbytes) for a in want.values())
  synced = []  # sizes of the files the writer synced in the background
  real_fsync_all = layout._fsync_all
  monkeypatch.setattr(layout, "_fsync_all", lambda paths: (
      synced.extend(os.path.getsize(p) for p in paths if os.path.exists(p)), real_fsync_all(paths)))
  _write_leaves(tmp_path, want, biggest)
  # Every batch's files went to disk in the background, before the finalize moved them: the commit's
  # own sync then finds nothing left to write.
  assert sum(synced) >= sum(a.nbytes for a in want.values())
  got = ocp.PyTreeCheckpointer().restore(str(tmp_path / "params"))["group"]
  assert sorted(got) == sorted(want)
  for k, a in want.items():
    np.testing.assert_array_equal(np.asarray(got[k]).view(np.uint8), a.view(np.uint8), err_msg=k)


def _write_leaves(tmp_path, want, biggest):
  with layout.ParamsWriter(str(tmp_path), largest_leaf=biggest, batch_bytes=2048) as w:
    for k, a in want.items():
      w.make_room(layout.Slabs.span(a.nbytes))
      buf = w.empty(a.shape, a.dtype)
      assert buf.base is not None  # carved from a slab, not fresh memory
      buf[...] = a
      w.write(f"group/{k}", buf)
    w.finalize(str(tmp_path / "params"))
  assert all(b is not None for b in w.slabs.bufs)  # both slabs served


def _record_drops(monkeypatch) -> list[tuple[str, int]]:
  """(path, bytes synced) of every sync that also drops the file from the page cache, from now on."""
  dropped = []
  real = layout.fsync_path

  def fsync(path, drop=False):
    n = real(path, drop)
    if drop:
      dropped.append((path, n))
    return n
  monkeypatch.setattr(layout, "fsync_path", fsync)
  return dropped


def test_recycler_syncs_and_drops_a_file_while_another_thread_writes_it(tmp_path, monkeypatch):
  """Each time a file being written has grown by `step`, its bytes so far are synced and dropped from the
  page cache while the write goes on (Orbax's threads write a batch's files; the writer cannot see
  them); files handed to the batch-end fsync, and folders of finished saves, are left alone."""
  dropped = _record_drops(monkeypatch)
  folder = tmp_path / "batch"
  (folder / "d").mkdir(parents=True)
  skipped = str(folder / "d" / "done")
  with open(skipped, "wb") as f:
    f.write(b"x" * 50_000)
  finished = folder / "finished"
  finished.mkdir()
  (finished / "big").write_bytes(b"y" * 50_000)
  # One page a write, at page-aligned offsets: the kernel grows a file a page at a time, so a chunk of one
  # page is never seen half-written (a longer one, or a buffered file split at its buffer's edge, can be).
  page = mmap.PAGESIZE
  step, chunk = page // 4, np.random.default_rng(0).bytes(page)
  recycler = layout.Recycler(lambda: [str(folder)], skip={skipped}, skip_dirs={str(finished)}, step=step,
                             interval_s=0.001)
  path = str(folder / "d" / "data")
  recycler.start()
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
      for i in range(4):
        os.write(fd, chunk)
        deadline = time.monotonic() + 10
        while recycler.dropped.get(path, 0) < (i + 1) * page and time.monotonic() < deadline:
          time.sleep(0.001)  # the next chunk waits for the recycler to catch up with this one
        assert recycler.dropped.get(path, 0) == (i + 1) * page, (i, dropped)
    finally:
      os.close(fd)
  finally:
    recycler.close()
  assert [n for p, n in dropped if p == path] == [page, 2 * page, 3 * page, 4 * page], dropped
  assert {p for p, _ in dropped} == {path}  # neither the skipped file nor the finished folder's
  assert open(path, "rb").read() == chunk * 4  # dropping clean pages loses nothing


def test_a_finished_writer_frees_its_slabs_without_a_garbage_collection(tmp_path):
  """Nothing the writer starts refers back to it (a cycle would hold its slabs, GBs at full scale, after
  a conversion until the next full collection: in a notebook, or in a benchmark's later rounds)."""
  import gc
  import weakref
  gc.disable()
  try:
    with layout.ParamsWriter(str(tmp_path), largest_leaf=1 << 20) as writer:
      a = writer.empty((1000,), np.float32)
      a[:] = np.arange(1000)
      writer.write("w", a)
      writer.finalize(str(tmp_path / "params"))
    slab = weakref.ref(writer.slabs)
    del writer, a
    assert slab() is None
  finally:
    gc.enable()


def test_mapped_reads_equal_file_reads_and_a_shard_cut_short_later_is_named(k2t, tmp_path):
  src = str(tmp_path / "src")
  shutil.copytree(k2t, src)
  ck = Checkpoint(src)
  mapped = ck.mapped()
  for k in ck.keys():
    a, b = ck.get(k), mapped.get(k)
    assert (a.dtype, a.shape) == (b.dtype, b.shape), k
    np.testing.assert_array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8), err_msg=k)
  last = max(ck.keys(), key=lambda k: (ck.file_of(k), ck.files()[os.path.basename(ck.file_of(k))].entries[k]
                                       ["data_offsets"]))
  with open(ck.file_of(last), "r+b") as f:  # after the header was checked: a map would crash on it
    f.truncate(os.path.getsize(ck.file_of(last)) - 10)
  with pytest.raises(SafetensorsError, match=f"{os.path.basename(ck.file_of(last))}.*{last}.*truncated"):
    mapped.get(last)


def _mapped_rss_kb(path: str) -> int:
  """Resident kB of this process's maps of the file at `path` (/proc/self/smaps)."""
  total, inside = 0, False
  with open("/proc/self/smaps") as f:
    for line in f:
      head = line.split()
      if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's first line
        inside = line.rstrip("\n").endswith(" " + os.path.realpath(path))
      elif inside and head[0] == "Rss:":
        total += int(head[1])
  return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps")
def test_a_mapped_file_is_mapped_once_and_released_tensors_leave_the_resident_set(k2t):
  ck = Checkpoint(k2t).mapped()
  shard = max(ck.files().values(), key=lambda sf: os.path.getsize(sf.path))
  names = shard.keys()
  total = sum(float(np.abs(ck.get(n).astype(np.float32)).sum()) for n in names)  # every page touched
  assert np.isfinite(total)
  with open("/proc/self/maps") as f:
    maps = sum(1 for line in f if line.rstrip("\n").endswith(os.path.realpath(shard.path)))
  assert maps == 1  # one map of the whole file, not one per tensor
  data = sum(shard.nbytes(n) for n in names)
  assert _mapped_rss_kb(shard.path) * 1024 >= 0.9 * data
  ck.release(names)
  assert _mapped_rss_kb(shard.path) <= 64  # at most the header's pages, mapped around a first fault
  again = ck.get(names[0])  # a view read after its release faults back in from the page cache
  np.testing.assert_array_equal(again.reshape(-1).view(np.uint8),
                                Checkpoint(k2t).get(names[0]).reshape(-1).view(np.uint8))


def test_write_order_starts_and_ends_with_small_batches():
  sizes = {"a": 5, "b": 700, "c": 30, "d": 1, "e": 300, "f": 20, "g": 64}
  order = layout.write_order(sizes, batch_bytes=256)
  assert sorted(order) == sorted(sizes)
  assert order == ["d", "a", "f", "c", "b", "e", "g"]  # 1 + 5 + 20 + 30 <= 256 / 4; then largest first


def test_round_trip_reproduces_every_tensor_and_config_field(k2t, converted, tmp_path):
  back = str(tmp_path / "back")
  export(converted, back, progress=False)
  _assert_same_tensors(k2t, back)
  assert json.load(open(os.path.join(back, "config.json"))) == json.load(open(os.path.join(k2t, "config.json")))
  for f in os.listdir(TOKENIZER):
    assert open(os.path.join(back, f), "rb").read() == open(os.path.join(TOKENIZER, f), "rb").read()
  assert os.path.exists(os.path.join(back, "model.safetensors.index.json"))
  # The tokenizer travels beside the converted checkpoint, where --checkpoint finds it.
  from k2jax.infer import cli_common
  assert layout.hf_files_dir(os.path.join(converted, "checkpoints", "0")) == os.path.join(converted, "hf")
  from k2jax.tokenizer import Tokenizer
  step = os.path.join(converted, "checkpoints", "0")
  assert cli_common.load_tokenizer(None, C, step).encode("Hello world") == Tokenizer.from_dir(TOKENIZER).encode(
      "Hello world")


def test_export_streams_into_planned_shards_the_reference_reader_loads(k2t, converted, tmp_path, monkeypatch):
  """Small shards: each tensor goes straight to its planned place; the safetensors reference reader (which
  checks that offsets tile the data exactly) reads every shard, and the tensors are the source's."""
  from safetensors.numpy import load_file
  back = str(tmp_path / "back")
  export(converted, back, max_shard_bytes=300_000, progress=False)
  shards = sorted(f for f in os.listdir(back) if f.endswith(".safetensors"))
  assert len(shards) >= 3 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
  index = json.load(open(os.path.join(back, "model.safetensors.index.json")))["weight_map"]
  ref = Checkpoint(k2t)
  for f in shards:
    for k, v in load_file(os.path.join(back, f)).items():
      assert index[k] == f
      np.testing.assert_array_equal(v.reshape(-1).view(np.uint8), ref.get(k).reshape(-1).view(np.uint8), err_msg=k)
  _assert_same_tensors(k2t, back)
  # Every shard was synced and dropped from the page cache as it was written (`layout.RECYCLE_BYTES`).
  dropped = _record_drops(monkeypatch)
  again = str(tmp_path / "again")
  export(converted, again, max_shard_bytes=300_000, progress=False)
  shard_files = {f: os.path.getsize(os.path.join(again, f)) for f in os.listdir(again)
                 if f.endswith(".safetensors")}
  last_drop = {os.path.basename(p): n for p, n in dropped}  # the size at each shard's last sync and drop
  assert {f: n for f, n in last_drop.items() if f.endswith(".safetensors")} == shard_files
  monkeypatch.undo()
  from k2jax.safetensors_io import ShardWriter
  w = ShardWriter(str(tmp_path), [("a", (2, 3), "BF16")])
  with pytest.raises(SafetensorsError, match=r"'b' .* does not match the plan: 'a'"):
    w.write("b", np.zeros((2, 3), ml_dtypes.bfloat16))
  w.abort()
  real, calls = ShardWriter.write, []

  def failing(self, name, a):  # a write failing mid-way on the writer thread (a full disk)
    calls.append(name)
    if len(calls) == 40:
      raise OSError(28, "No space left on device")
    return real(self, name, a)
  monkeypatch.setattr(ShardWriter, "write", failing)
  out = str(tmp_path / "failed")
  with pytest.raises(OSError, match="No space left"):
    export(converted, out, max_shard_bytes=300_000, progress=False)
  assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_export_reads_large_stacked_leaves_a_run_of_layers_at_a_time(k2t, converted, tmp_path, monkeypatch):
  """A stacked leaf over the restore size never comes through Orbax whole: its stored bytes are read a
  few layers at a time (from one chunk, or from every shard's chunk of a conversion under a mesh), and
  the export is still the source bit for bit."""
  import dataclasses
  from k2jax import sharding
  from k2jax.convert import stored as stored_lib
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets 8 CPU devices)")
  limit = 3_000
  monkeypatch.setattr(orbax_to_hf, "RESTORE_BYTES", limit)
  like = checkpointing.abstract_params_of(checkpointing.read_meta(converted), C)
  is_qw = lambda x: isinstance(x, int4.QuantizedWeight)
  flat = dict(orbax_to_hf._flat(like, is_qw))
  big = {p for p, x in flat.items() if p.startswith(("dense_layers", "moe_layers")) and layout.nbytes(x) > limit}
  assert len(big) > 10
  meshed = str(tmp_path / "meshed")
  convert(k2t, meshed, mesh=sharding.make_mesh("fsdp:2,expert:4"), progress=False)
  real_restore, real_rows = orbax_to_hf._restore, stored_lib.StoredArrays.rows
  for source, chunks in ((converted, 1), (meshed, 8)):
    whole, rows = [], []
    monkeypatch.setattr(orbax_to_hf, "_restore", lambda m, s, likes: whole.extend(likes) or real_restore(m, s, likes))
    monkeypatch.setattr(stored_lib.StoredArrays, "rows",
                        lambda self, raw, a, b: rows.append((raw, a, b)) or real_rows(self, raw, a, b))
    back = str(tmp_path / f"back{chunks}")
    export(source, back, progress=False)
    _assert_same_tensors(k2t, back)
    assert not big & set(whole)
    assert max(len(raw.offsets) for raw, _, _ in rows) == chunks
    for path in big:  # every layer read, in order, as runs that cover the stack once
      leaf = flat[path]
      for a in (["packed", "scales"] if is_qw(leaf) else [None]):
        name = path.replace("/", ".") + (f".{a}" if a else "")
        runs = [(r0, r1) for raw, r0, r1 in rows if raw.name == name]
        assert [r for run in runs for r in range(*run)] == list(range(jax.tree.leaves(leaf)[0].shape[0])), name
  # A layout it does not know is Orbax's to read; a value shorter than its metadata is named.
  stored = stored_lib.StoredArrays(os.path.join(converted, "checkpoints", "0", "params"))
  name = "moe_layers.moe.experts.down_efd.packed"
  raw = stored.raw(name, flat["moe_layers/moe/experts/down_efd"].packed.shape, np.int32)
  assert raw is not None and raw.offsets == {(0,) * 5: 0}
  assert stored.raw(name, raw.shape, np.float32) is None and stored.raw(name, raw.shape[1:], np.int32) is None
  assert stored.raw("no.such.array", raw.shape, np.int32) is None
  short = dataclasses.replace(raw, offsets={g: o + raw.chunk_row_bytes for g, o in raw.offsets.items()})
  with pytest.raises(stored_lib.StoredArrayError, match=f"{raw.key((0,) * 5)}: rows 0:{raw.shape[0]} should be"):
    stored.rows(short, 0, raw.shape[0])


@pytest.mark.parametrize("sharded", [True, False])
def test_stored_rows_of_chunks_with_padded_edges_equal_tensorstore_reads(tmp_path, sharded):
  """Rows read by byte range across a grid of chunks (edge chunks padded, written by tensorstore itself)
  equal what tensorstore reads; a compressed array is not read this way."""
  import tensorstore as ts
  from k2jax.convert import stored as stored_lib
  item = tmp_path / "item"
  item.mkdir()
  (item / "_METADATA").write_text(json.dumps({"use_ocdbt": True, "use_zarr3": True}))
  x = np.random.default_rng(0).normal(size=(7, 5, 11)).astype(ml_dtypes.bfloat16)
  chunk = [3, 2, 4]
  inner = [{"name": "bytes", "configuration": {"endian": "little"}}]
  codecs = ([{"name": "sharding_indexed", "configuration": {"chunk_shape": chunk, "codecs": inner,
                                                           "index_codecs": inner + [{"name": "crc32c"}]}}]
            if sharded else inner)
  kv = {"driver": "ocdbt", "base": f"file://{item}"}
  for name, cs in (("a.b", codecs), ("zipped", inner + [{"name": "zstd", "configuration": {"level": 1}}])):
    t = ts.open({"driver": "zarr3", "kvstore": dict(kv, path=name), "metadata": {
        "shape": list(x.shape), "data_type": "bfloat16", "chunk_grid": {"name": "regular", "configuration": {
            "chunk_shape": chunk}}, "codecs": cs}}, create=True).result()
    t.write(x).result()
  stored = stored_lib.StoredArrays(str(item))
  raw = stored.raw("a.b", x.shape, x.dtype)
  assert raw is not None and len(raw.offsets) == 3 * 3 * 3
  for a, b in ((0, 7), (2, 5), (6, 7), (3, 4)):
    np.testing.assert_array_equal(stored.rows(raw, a, b).view(np.uint16), x[a:b].view(np.uint16))
  assert stored.raw("zipped", x.shape, x.dtype) is None


def test_converted_checkpoint_keeps_int4_and_loads_like_the_hf_folder(k2t, converted):
  got, c = checkpointing.load_params_for_inference(converted, jnp.bfloat16)
  want = hf.load_params(k2t, K2Config.from_hf(k2t), jnp.bfloat16)
  experts = got["moe_layers"]["moe"]["experts"]
  assert all(isinstance(w, int4.QuantizedWeight) and w.packed.dtype == jnp.int32 for w in experts.values())
  assert got["moe_layers"]["moe"]["router_bias_e"].dtype == jnp.float32
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
  assert c == K2Config.from_hf(k2t)
  meta = checkpointing.read_meta(converted)
  assert meta["expert_format"] == "int4" and meta["int4_scale_dtype"] == "BF16"
  # Leaf by leaf, as stored: the same values, INT4 words as int32.
  flat = dict(jax.tree_util.tree_flatten_with_path(got, is_leaf=lambda x: isinstance(x, int4.QuantizedWeight))[0])
  stored = dict(orbax_to_hf.read_leaves(converted))
  assert len(stored) == len(flat)
  for path, value in flat.items():
    leaf = stored[params.path_str(path)]
    for x, y in zip(jax.tree.leaves(leaf), jax.tree.leaves(value), strict=True):
      assert isinstance(x, np.ndarray) and x.dtype == y.dtype
      np.testing.assert_array_equal(x, np.asarray(y))


def test_k2_train_init_from_a_converted_checkpoint(converted):
  from k2jax.configs import train_tiny
  from k2jax.train import trainer
  cfg = train_tiny.get_config()
  cfg.init_from = converted
  p = trainer._init_params(cfg, presets.from_config_dict(cfg.model), None)  # what a run starts from
  want, _ = checkpointing.load_params_for_inference(converted, jnp.float32)
  w = p["moe_layers"]["moe"]["experts"]["gate_edf"]
  assert not isinstance(w, int4.QuantizedWeight) and w.dtype == jnp.float32
  np.testing.assert_array_equal(w, want["moe_layers"]["moe"]["experts"]["gate_edf"].dequantize(jnp.float32))
  cfg.model.hidden_size = 32  # a different model is refused by name
  with pytest.raises(checkpointing.CheckpointError, match="hidden_size"):
    trainer._init_params(cfg, presets.from_config_dict(cfg.model), None)


def test_k2_rl_init_checkpoint_from_a_converted_checkpoint(converted, tmp_path):
  """k2-rl starts from a converted K2 Thinking checkpoint: its INT4 experts dequantised (the run's config
  has dense experts; the quantisation and the name are not architecture), and one RL step runs on them."""
  from k2jax.train.rl import runner
  from test_rl import _tiny_cfg
  cfg = _tiny_cfg(num_steps=1, eval_every=0, init_checkpoint=converted)
  c = presets.from_config_dict(cfg.model)
  assert checkpointing.model_config_of(converted).expert_quant == "int4" and c.expert_quant is None
  p = checkpointing.load_params_for_training(converted, c, jnp.float32)  # what train_rl starts from
  want, _ = checkpointing.load_params_for_inference(converted, jnp.float32)
  w = p["moe_layers"]["moe"]["experts"]["down_efd"]
  assert not isinstance(w, int4.QuantizedWeight) and w.dtype == jnp.float32
  np.testing.assert_array_equal(w, want["moe_layers"]["moe"]["experts"]["down_efd"].dequantize(jnp.float32))
  rows = runner.train_rl(cfg, tmp_path / "rl")
  step = [r for r in rows if "loss" in r]
  assert [r["step"] for r in step] == [1] and np.isfinite(step[0]["loss"])
  params_after, _ = checkpointing.load_params_for_inference(tmp_path / "rl", jnp.float32)
  assert not isinstance(params_after["moe_layers"]["moe"]["experts"]["down_efd"], int4.QuantizedWeight)


def test_sharded_conversion_writes_the_same_checkpoint(k2t, converted, tmp_path):
  from k2jax import sharding
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets 8 CPU devices)")
  out = str(tmp_path / "sharded")
  convert(k2t, out, mesh=sharding.make_mesh("fsdp:2,expert:4"), progress=False)
  a, _ = checkpointing.load_params_for_inference(out, jnp.bfloat16)
  b, _ = checkpointing.load_params_for_inference(converted, jnp.bfloat16)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_host_leaves_are_stored_in_whole_slices_along_their_leading_axes(k2t, tmp_path, monkeypatch):
  """Leaves over the chunk size are stored in chunks of whole layers (or layer x expert slices where a
  layer is too large, never slivers under the minimum); the result round-trips bit for bit. On the 1T
  shapes: an INT4 expert stack [60, 384, 4, 224, 2048] one (layer, expert) a chunk (7 MiB), its scales
  one layer (the expert's 0.9 MiB is under the minimum), the embedding left to Orbax (rows are tiny)."""
  import orbax.checkpoint as ocp
  assert layout.chunk_axes((60, 384, 4, 224, 2048), 4) == (0, 1)
  assert layout.chunk_axes((60, 384, 224, 2048), 2) == (0,)
  assert layout.chunk_axes((163840, 7168), 2) is None
  assert layout.chunk_axes((9, 64, 32, 2048), 2) is None  # within one chunk
  _small_chunks(monkeypatch)
  out = str(tmp_path / "chunked")
  convert(k2t, out, progress=False)
  meta = ocp.PyTreeCheckpointer().metadata(os.path.join(out, "checkpoints", "0", "params"))
  meta = getattr(meta, "item_metadata", meta)
  seen = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(meta)[0]:
    axes = layout.chunk_axes(leaf.shape, np.dtype(leaf.dtype).itemsize)
    if axes is None:
      continue
    seen += 1
    chunk = leaf.storage.chunk_shape
    assert all(chunk[a] == 1 for a in axes), (path, leaf.shape, chunk)
    assert chunk[len(axes):] == leaf.shape[len(axes):], (path, leaf.shape, chunk)
  assert seen >= 8  # every expert stack's words, the head, the attention outputs, ...
  back = str(tmp_path / "back")
  export(out, back, progress=False)
  _assert_same_tensors(k2t, back)


def _small_chunks(monkeypatch):
  """Chunk sizes at which the tiny model's stacked leaves are large: stored in layers, streamed."""
  monkeypatch.setattr(layout, "CHUNK_BYTES", 12 << 10)
  monkeypatch.setattr(layout, "MIN_CHUNK_BYTES", 1 << 10)
  monkeypatch.setattr(layout, "WRITE_WINDOW_BYTES", 8 << 10)
  monkeypatch.setattr(layout, "STREAM_AHEAD_BYTES", 0)


def test_large_leaves_are_written_while_read_a_few_layers_in_memory(k2t_deep, tmp_path, monkeypatch):
  from k2jax.convert import streaming
  deep = k2t_deep
  converted = str(tmp_path / "whole")
  convert(deep, converted, progress=False)  # at the real sizes nothing here streams
  _small_chunks(monkeypatch)
  made = []

  class Recorded(streaming.RowStream):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      made.append(self)
  monkeypatch.setattr(streaming, "RowStream", Recorded)
  out = str(tmp_path / "streamed")
  convert(deep, out, progress=False)
  assert len(made) >= 6  # the expert stacks, the attention projections, ...
  for stream in made:
    assert stream.ready == stream.rows and all(w == stream.rows for w in stream.written.values())
    assert 1 <= stream.most_resident <= stream.ahead  # never the whole leaf filled and unwritten
    assert all(r >= a.nbytes - a.nbytes % 4096 for r, a in zip(stream.released.values(), stream.arrays))
  assert any(stream.ahead < stream.rows for stream in made)  # held back: not the whole leaf ahead
  assert not streaming._streams  # every stream let go of its arrays
  a, _ = checkpointing.load_params_for_inference(out, jnp.bfloat16)
  b, _ = checkpointing.load_params_for_inference(converted, jnp.bfloat16)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


def test_without_the_chunk_writer_large_leaves_are_read_whole_then_written(k2t, converted, tmp_path, monkeypatch):
  # Another Orbax, whose host-array write is not the one replaced: nothing would wait on a stream's rows.
  from k2jax.convert import streaming
  _small_chunks(monkeypatch)
  monkeypatch.setattr(layout.ParamsWriter, "streams", lambda self: False)
  monkeypatch.setattr(streaming, "RowStream", lambda *a, **k: pytest.fail("streamed without the writer"))
  out = str(tmp_path / "whole")
  convert(k2t, out, progress=False)
  a, _ = checkpointing.load_params_for_inference(out, jnp.bfloat16)
  b, _ = checkpointing.load_params_for_inference(converted, jnp.bfloat16)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


@pytest.mark.parametrize("side", ["read", "write"])
def test_a_streamed_leaf_whose_read_or_write_fails_stops_both_and_leaves_nothing(k2t_deep, tmp_path, monkeypatch,
                                                                                  side):
  import threading

  from k2jax.convert import reading, streaming
  _small_chunks(monkeypatch)
  real_views, real_wrote = reading.slice_views, streaming.RowStream.wrote

  def failing_read(leaf, ckpt, layer, expert, keep):
    if leaf.experts and layer == 1:
      raise OSError(f"disk gone reading {leaf.path}")
    return real_views(leaf, ckpt, layer, expert, keep)

  def failing_write(self, value, rows):
    if rows < self.rows:
      raise OSError("disk full writing")
    real_wrote(self, value, rows)
  if side == "read":
    monkeypatch.setattr(reading, "slice_views", failing_read)
  else:
    monkeypatch.setattr(streaming.RowStream, "wrote", failing_write)
  out, errors = tmp_path / "out", []

  def run():
    try:
      convert(k2t_deep, str(out), progress=False)
    except Exception as e:  # noqa: BLE001
      errors.append(e)
  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(300)
  assert not thread.is_alive(), "the conversion hung"
  assert len(errors) == 1 and ("disk gone" if side == "read" else "disk full") in str(errors[0]), errors
  assert not out.exists() and not streaming._streams
  assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_chunk_regions_tile_an_array_once():
  shape, chunk = (5, 7, 3), (2, 3, 3)
  seen = np.zeros(shape, np.int32)
  regions = layout.chunk_regions(shape, chunk)
  for region in regions:
    seen[region] += 1
    assert all(s.stop - s.start <= c for s, c in zip(region, chunk))
  assert len(regions) == 3 * 3 * 1 and (seen == 1).all()


def test_leaves_over_a_data_file_are_stored_in_chunks_written_one_at_a_time(k2t, converted, tmp_path, monkeypatch):
  # As the 1T model's expert stacks are (177 GiB in Orbax's 2 GiB chunks): each stored in several chunks,
  # written a chunk at a time (one tensorstore write of the whole leaf would first copy all of it).
  import tensorstore as ts
  from orbax.checkpoint._src.serialization import type_handlers
  monkeypatch.setattr(layout, "DATA_FILE_BYTES", 8 << 10)
  opened, writes = [], []
  real_open = ts.open

  async def open_spy(*args, **kwargs):
    t = await real_open(*args, **kwargs)
    opened.append(t)
    return t
  monkeypatch.setattr(ts, "open", open_spy)
  real_chunked = layout.chunk_regions
  monkeypatch.setattr(layout, "chunk_regions", lambda shape, chunk: writes.append((shape, chunk)) or
                      real_chunked(shape, chunk))
  out = str(tmp_path / "chunked")
  convert(k2t, out, progress=False)
  assert type_handlers.NumpyHandler._open_and_write.__name__ == "_open_and_write"  # Orbax's, back in place
  multi = [t for t in opened if tuple(t.chunk_layout.write_chunk.shape) != tuple(t.shape)]
  assert len(multi) >= 4 and len(writes) == len(multi)  # every leaf in several chunks went chunk by chunk
  a, _ = checkpointing.load_params_for_inference(out, jnp.bfloat16)
  b, _ = checkpointing.load_params_for_inference(converted, jnp.bfloat16)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
  back = str(tmp_path / "back")  # the export's row reads span the chunks
  export(out, back, progress=False)
  _assert_same_tensors(k2t, back)


@pytest.mark.parametrize("source", ["checkpoint", "hf_dir"])
def test_a_model_loads_straight_into_the_engines_shards(k2t, converted, source):
  """Under a mesh, `--checkpoint` and `--hf_dir` read every leaf into the shards the engine runs it in: the
  values of the one-device load, no leaf whole on a device where its spec splits it, and placing it for the
  engine moves nothing."""
  from k2jax import sharding
  from k2jax.infer import cli_common
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets 8 CPU devices)")
  mesh = sharding.make_mesh("fsdp:2,expert:4")
  where = {"hf_dir": k2t, "checkpoint": None} if source == "hf_dir" else {"hf_dir": None, "checkpoint": converted}
  got, c = cli_common.load_model(where["hf_dir"], where["checkpoint"], "bfloat16", mesh)
  want, _ = cli_common.load_model(where["hf_dir"], where["checkpoint"], "bfloat16")
  is_qw = lambda x: isinstance(x, int4.QuantizedWeight)
  assert all(is_qw(w) for w in got["moe_layers"]["moe"]["experts"].values())
  wanted = sharding.param_shardings(c, mesh, sharding.inference_rules(mesh), params=got)
  placed = sharding.place_for_inference(got, c, mesh)
  split = 0
  for (path, x), y, s, z in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                                jax.tree.leaves(wanted), jax.tree.leaves(placed), strict=True):
    assert x.sharding == s, path
    assert z is x, path  # already where the engine wants it
    shard = x.addressable_shards[0].data
    if s.shard_shape(x.shape) != x.shape:
      split += 1
      assert shard.shape == s.shard_shape(x.shape) and shard.size < x.size, path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
  assert split >= 6  # the routed experts' words and scales at least


def test_k2_train_init_from_a_converted_checkpoint_under_a_mesh(converted):
  from k2jax import sharding
  from k2jax.configs import train_tiny
  from k2jax.train import trainer
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets 8 CPU devices)")
  cfg = train_tiny.get_config()
  cfg.init_from = converted
  c = presets.from_config_dict(cfg.model)
  mesh = sharding.make_mesh("fsdp:2,expert:4")
  got = trainer._init_params(cfg, c, mesh)
  want = trainer._init_params(cfg, c, None)
  for (path, x), y, s in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                             jax.tree.leaves(sharding.param_shardings(c, mesh)), strict=True):
    assert x.sharding == s, path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_dense_training_checkpoint_exports_with_the_qat_quantiser(tmp_path):
  """A training run's dense experts export INT4 with the quantiser serving and QAT use."""
  c = C.replace(expert_quant=None)
  p = params.cast(host_params(c, 4), jnp.float32)
  ck = checkpointing.Checkpointer(str(tmp_path / "run"), async_save=False)
  ck.save(3, p, {"count": np.zeros((), np.int32)}, {"model_config": checkpointing.config_to_dict(c), "param_dtype": "float32"})
  ck.close()
  out = str(tmp_path / "hf")
  export(str(tmp_path / "run"), out, progress=False)
  from k2jax.train.train_step import QAT_MODE
  served = params.quantize_experts(p, QAT_MODE)
  got = hf.load_params(out, K2Config.from_hf(out), jnp.float32)
  assert K2Config.from_hf(out).expert_quant == "int4"
  for k, w in served["moe_layers"]["moe"]["experts"].items():
    np.testing.assert_array_equal(got["moe_layers"]["moe"]["experts"][k].packed, w.packed)
    np.testing.assert_array_equal(got["moe_layers"]["moe"]["experts"][k].scales, w.scales)
  # Everything else went out in bf16.
  np.testing.assert_array_equal(got["embed_vd"], np.asarray(p["embed_vd"]).astype(ml_dtypes.bfloat16).astype(np.float32))


def _break(folder, case):
  """Damages a copy of a K2-Thinking-format checkpoint in one way; returns the shard file it touched."""
  ck = Checkpoint(folder)
  target = {"missing": "model.layers.2.mlp.experts.5.down_proj.weight_packed",
            "nan": "model.layers.1.self_attn.o_proj.weight",
            "dtype": "model.layers.0.self_attn.kv_b_proj.weight",
            "shape": "model.layers.1.mlp.shared_experts.up_proj.weight"}.get(case, "model.norm.weight")
  path = ck.file_of(target)
  if case in ("missing", "nan", "dtype", "shape"):
    sf = ck.files()[os.path.basename(path)]
    tensors = {k: np.array(sf.get(k)) for k in sf.keys()}
    if case == "missing":
      tensors.pop(target)
    elif case == "nan":
      tensors[target][0, 1] = np.nan
    elif case == "dtype":
      tensors[target] = tensors[target].astype(np.float32).astype(np.int16)
    else:
      tensors[target] = tensors[target][:, :-32]
    save_file(tensors, path)
    if case == "missing":  # keep the index consistent, so the loader sees a checkpoint without it
      index = os.path.join(folder, "model.safetensors.index.json")
      data = json.load(open(index))
      del data["weight_map"][target]
      json.dump(data, open(index, "w"))
  elif case == "truncated":
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      f.truncate(size - 100)
  elif case == "overlap":
    import struct
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    a, b = names[0], names[1]
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    start = header[a]["data_offsets"][0]
    header[b]["data_offsets"] = [start, start + size]
    blob = json.dumps(header).encode()
    open(path, "wb").write(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
  elif case == "config":
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["moe_intermediate_size"] *= 2
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    return os.path.join(folder, "model-")
  return path


@pytest.mark.parametrize("case,match", [
    ("missing", r"missing tensor model\.layers\.2\.mlp\.experts\.5\.down_proj\.weight_packed"),
    ("nan", r"tensor 'model\.layers\.1\.self_attn\.o_proj\.weight' has 1 NaN/Inf"),
    ("dtype", r"tensor model\.layers\.0\.self_attn\.kv_b_proj\.weight has dtype I16"),
    ("shape", r"model\.layers\.1\.mlp\.shared_experts\.up_proj\.weight has shape"),
    ("truncated", r"run past the end of the file's data.*truncated"),
    ("overlap", r"overlap"),
    ("config", r"\.safetensors: tensor model\.layers\.1\.mlp\.experts\.0\.(down|gate|up)_proj\.weight_packed has "
               r"shape"),
])
def test_corrupted_input_fails_by_name_and_leaves_nothing(k2t, tmp_path, case, match):
  src = str(tmp_path / "src")
  shutil.copytree(k2t, src)
  touched = _break(src, case)
  out = str(tmp_path / "out")
  with pytest.raises(ValueError, match=match) as err:
    convert(src, out, progress=False)
  if case not in ("missing", "config"):
    assert os.path.basename(touched) in str(err.value)
  assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_an_output_inside_its_source_is_refused_before_anything_is_written(k2t, converted, tmp_path):
  # An export into the checkpoint's own checkpoints/N would become its latest, unreadable step.
  inside = os.path.join(converted, "checkpoints", "7")
  with pytest.raises(layout.ConvertError, match="overlaps the source"):
    export(converted, inside, progress=False)
  with pytest.raises(layout.ConvertError, match="overlaps the source"):
    convert(k2t, os.path.join(k2t, "k2jax"), progress=False)
  os.symlink(k2t, tmp_path / "link")  # the same folder under another name
  with pytest.raises(layout.ConvertError, match="overlaps the source"):
    convert(k2t, str(tmp_path / "link" / "k2jax"), progress=False)
  assert not os.path.exists(inside) and not os.path.exists(inside + ".partial")
  assert sorted(os.listdir(os.path.join(converted, "checkpoints"))) == ["0"]
  assert not os.path.exists(os.path.join(k2t, "k2jax"))


def test_allow_nonfinite_converts_nan_weights(k2t, tmp_path):
  src = str(tmp_path / "src")
  shutil.copytree(k2t, src)
  _break(src, "nan")
  convert(src, str(tmp_path / "out"), check_finite=False, progress=False)
  got, _ = checkpointing.load_params_for_inference(str(tmp_path / "out"), jnp.float32)
  assert np.isnan(np.asarray(got["moe_layers"]["attn"]["o_nhd"])).sum() == 1


def test_interrupted_conversion_leaves_nothing_and_a_rerun_starts_clean(k2t, tmp_path, monkeypatch):
  out = str(tmp_path / "out")
  calls = {"n": 0}
  real = layout.ParamsWriter.write

  def failing(self, path, value):
    calls["n"] += 1
    if calls["n"] == 5:
      raise KeyboardInterrupt  # as if the user pressed ^C mid-way
    return real(self, path, value)

  monkeypatch.setattr(layout.ParamsWriter, "write", failing)
  with pytest.raises(KeyboardInterrupt):
    convert(k2t, out, progress=False)
  assert not os.path.exists(out) and not os.path.exists(out + ".partial")
  monkeypatch.setattr(layout.ParamsWriter, "write", real)
  os.makedirs(out + ".partial/leftover")  # a killed run's staging folder
  convert(k2t, out, progress=False)
  assert checkpointing.read_meta(out)["expert_format"] == "int4"
  with pytest.raises(layout.ConvertError, match="exists and is not empty"):
    convert(k2t, out, progress=False)


def test_nothing_is_renamed_into_place_before_every_file_is_synced(k2t, tmp_path, monkeypatch):
  """Tensorstore writes without its per-file fsync (the writer syncs each batch in the background), so
  the commit must find every file of the staging tree synced before it renames it into place; the
  batches' files leave the page cache once synced (nearly all the bytes written)."""
  out = str(tmp_path / "out")
  synced, committed, dropped = set(), [], {}
  real_fsync, real_replace = layout.fsync_path, os.replace

  def fsync(path, drop=False):
    synced.add(os.path.realpath(path))
    if drop:
      dropped[os.path.realpath(path)] = os.path.getsize(path)
    return real_fsync(path, drop)

  def replace(src, dst, **kw):
    if os.path.abspath(dst) == os.path.abspath(out):
      files = [os.path.realpath(os.path.join(r, f)) for r, _, fs in os.walk(src) for f in fs]
      committed.append(len(files))
      assert files and not set(files) - synced, "renamed with unsynced files"
    return real_replace(src, dst, **kw)

  monkeypatch.setattr(layout, "fsync_path", fsync)
  monkeypatch.setattr(os, "replace", replace)
  summary = convert(k2t, out, progress=False)
  assert committed and committed[0] > 10
  assert sum(dropped.values()) >= 0.95 * summary["bytes_written"], (sum(dropped.values()), summary)
  from orbax.checkpoint._src.serialization import tensorstore_utils as tsu
  with layout._deferred_file_sync():  # tensorstore's own fsyncs are off only while a save is set up
    assert tsu.get_ts_context(use_ocdbt=True).spec.to_json()["file_io_sync"] is False
  assert "file_io_sync" not in tsu.get_ts_context(use_ocdbt=True).spec.to_json()


def test_dry_run_of_the_1t_model_from_config_json_alone(tmp_path):
  cfg = tmp_path / "config.json"
  cfg.write_text(json.dumps(presets.K2_THINKING.to_hf()))
  plan = plan_convert(str(cfg), str(tmp_path / "out"), measure=False)
  experts = 1_014_686_023_680
  assert plan["bytes_in"]["I32"] == experts // 2 == plan["bytes_out"]["I32"]
  # weight_scale (bf16, one per 32) + every non-expert weight in bf16 (the fp32 router bias apart).
  bias = 60 * 384
  total = 1_026_408_232_448
  assert plan["bytes_out"]["BF16"] == experts // 32 * 2 + (total - experts - bias) * 2
  assert plan["bytes_out"]["F32"] == bias * 4
  # Per MoE layer: 384 experts x 3 linears x 3 tensors, 7 attention tensors, 2 norms, router weight and bias,
  # 3 shared-expert linears; the dense layer: 7 + 2 + 3; embedding, final norm, lm_head.
  assert plan["tensors_in"] == 60 * (384 * 3 * 3 + 14) + 12 + 3
  assert plan["largest_leaf"][0].startswith("moe_layers/moe/experts/")
  # An expert stack is written while it is read, a few layers in memory: ~20 GiB, not 2 x the 177 GiB stack.
  layer = plan["largest_leaf"][1] // 60
  assert 3 * layer < plan["peak_host_bytes"] < 3 * layer + 16 * 2**30
  ex = plan_export(str(cfg), str(tmp_path / "hf"), measure=False)
  assert ex["bytes_out"]["I32"] == experts // 2 and ex["bytes_out"]["I64"] == 60 * 384 * 3 * 16
  # A stacked leaf is restored a layer (here) at a time, never whole: ~12 GB, not 2 x the 190 GB stack.
  layer = ex["largest_leaf"][1] // 60
  assert ex["largest_leaf"][1] > 150e9 and 3 * layer < ex["peak_host_bytes"] < 3 * layer + 4 * 2**30


def _cli(tool, *args):
  code = f"import sys; from k2jax.convert.cli import run_{tool}; sys.argv[0] = 'k2-{tool}'; run_{tool}()"
  return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_cli_dry_run_and_one_line_errors(k2t, tmp_path):
  res = _cli("convert", f"--hf_dir={k2t}", f"--output_dir={tmp_path / 'o'}", "--dry_run")
  assert res.returncode == 0, res.stderr[-2000:]
  assert "convert plan" in res.stdout and "peak host memory" in res.stdout and "estimated" in res.stdout
  assert not os.path.exists(tmp_path / "o")
  src = str(tmp_path / "src")
  shutil.copytree(k2t, src)
  _break(src, "truncated")
  res = _cli("convert", f"--hf_dir={src}", f"--output_dir={tmp_path / 'o'}", "--noprogress")
  assert res.returncode == 1 and "Traceback" not in res.stderr
  assert res.stderr.strip().startswith("k2-convert: error: ") and "truncated" in res.stderr
  assert len(res.stderr.strip().splitlines()) == 1
  res = _cli("export", f"--checkpoint={tmp_path / 'nowhere'}", f"--output_dir={tmp_path / 'e'}")
  assert res.returncode == 1 and "does not exist" in res.stderr and "Traceback" not in res.stderr
  assert res.stderr.strip().startswith("k2-export: error: ")


def test_k2_thinking_converts_and_generates_like_transformers(tmp_path):
  """The reference's INT4 K2-Thinking-format checkpoint, several shards: k2-generate on the converted
  checkpoint gives transformers' greedy ids on the dequantised reference; the bf16 export loads there."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("compressed_tensors")
  from test_int4_checkpoint import SHAPES, _write_k2_thinking_format
  from hf_reference import make_reference, reference_logits, rel_err
  ref = make_reference(str(tmp_path / "ref"), seed=31, **SHAPES)
  one = str(tmp_path / "one")
  _write_k2_thinking_format(ref, one)
  src = str(tmp_path / "k2t")
  os.makedirs(src)
  ck = Checkpoint(one)
  save_sharded(((k, np.array(ck.get(k))) for k in ck.keys()), src, max_shard_bytes=60_000)
  shutil.copy(os.path.join(one, "config.json"), src)
  assert len([f for f in os.listdir(src) if f.endswith(".safetensors")]) >= 3
  out = str(tmp_path / "conv")
  convert(src, out, dtype="float32", progress=False)
  prompt = [5, 17, 42, 8, 60]
  with torch.no_grad():
    want = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0, len(prompt):].tolist()
  code = "import sys; from k2jax.infer.generate import run; sys.argv[0] = 'k2-generate'; run()"
  eos = K2Config.from_hf(src).eos_token_id
  n = want.index(eos) + 1 if eos in want else len(want)
  for mesh in ([], ["--mesh=expert:2,fsdp:2"]):  # one device; the experts read into two devices' shards
    res = subprocess.run([sys.executable, "-c", code, f"--checkpoint={out}", "--prompt_ids=" + ",".join(map(str, prompt)),
                          "--max_new_tokens=8", "--temperature=0", "--output=ids", *mesh], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = [int(t) for t in res.stdout.strip().splitlines()[-1].split(",")]
    assert got == want[:n], mesh
  dense = str(tmp_path / "bf16")
  export(out, dense, fmt="bf16", progress=False)
  from transformers import DeepseekV3ForCausalLM
  loaded = DeepseekV3ForCausalLM.from_pretrained(dense, torch_dtype=torch.float32).eval()
  tokens = np.random.default_rng(1).integers(0, 97, (2, 9))
  assert rel_err(reference_logits(loaded, tokens), reference_logits(ref, tokens)) <= 2e-2
