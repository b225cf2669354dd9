"""Host copies into place, fast: a transposed copy goes a tile at a time.

A linear weight is stored [out, in] in HF and [in, out] here, so every byte of a checkpoint is transposed
on conversion and on export. numpy copies a transposed view element by element along the destination's
rows, which for a large weight touches a new page of the source at every element; done in narrow column
tiles the source rows of a tile stay in cache and the copy runs several times faster. bf16 (an ml_dtypes
type) is copied as uint16, which numpy copies natively rather than through the type's per-element hook.
"""
from __future__ import annotations

import threading

import numpy as np

# Tile of a transposed copy: destination rows (axis 0) x destination columns (source rows kept in
# cache); a tile of about TILE_ROWS x TILE_COLS elements, made wider where rows are few or the middle
# axes many (INT4 words [4, K/32, N]), so numpy's per-call overhead is paid on enough elements.
TILE_COLS = 64
TILE_ROWS = 512


def tile(shape: tuple[int, ...]) -> tuple[int, int]:
  """(rows, columns) of the tiles a transposed copy into a `shape` array goes by."""
  rows = min(shape[0], TILE_ROWS)
  per_row = int(np.prod(shape[1:-1]))  # the middle axes go whole into every tile
  return rows, max(TILE_COLS, TILE_ROWS * TILE_COLS // max(1, rows * per_row))


def _bits(a: np.ndarray) -> np.ndarray:
  """`a` viewed as unsigned integers of its width (a bit-exact copy of those is a plain numpy copy)."""
  return a.view(f"u{a.dtype.itemsize}")


# 2-byte transposes (bf16) go as 8-byte groups, a block of GROUP_ROWS source rows x GROUP_COLS groups
# (256 KB) at a time through a per-thread scratch buffer (kept, so its pages are faulted in once).
GROUP_ROWS = 512
GROUP_COLS = 64
_scratch = threading.local()


def _grouped_transpose(dst: np.ndarray, a: np.ndarray) -> None:
  """dst[C, R] = a.T for a C-contiguous, 8-byte aligned a[R, C] of 2-byte items, C % 4 == 0.

  numpy's transposed copy moves one element per step whatever its size, so a bf16 transpose moves
  half the bytes per step of an int32 one. Here groups of 4 items are transposed as uint64 (a quarter
  of the steps), then each group's items are dealt to their 4 rows (strided, but within the block in
  cache): 1.2-1.3x the speed of the direct tiled copy on large weights (benchmarks/NOTES.md)."""
  rows, cols = a.shape
  k = 4
  a64 = a.view(np.uint64)  # [R, C/4]
  d3 = dst.reshape(cols // k, k, rows)
  buf = getattr(_scratch, "buf", None)
  if buf is None:
    buf = _scratch.buf = np.empty(GROUP_ROWS * GROUP_COLS, np.uint64)
  for i0 in range(0, rows, GROUP_ROWS):
    i1 = min(rows, i0 + GROUP_ROWS)
    for j0 in range(0, cols // k, GROUP_COLS):
      j1 = min(cols // k, j0 + GROUP_COLS)
      t = buf[:(j1 - j0) * (i1 - i0)].reshape(j1 - j0, i1 - i0)
      np.copyto(t, a64[i0:i1, j0:j1].T)
      np.copyto(d3[j0:j1, :, i0:i1], t.view(a.dtype).reshape(j1 - j0, i1 - i0, k).transpose(0, 2, 1))


def _tiled(dst: np.ndarray, src: np.ndarray) -> None:
  tr, tc = tile(dst.shape)
  for i in range(0, dst.shape[0], tr):
    for j in range(0, dst.shape[-1], tc):
      np.copyto(dst[i:i + tr, ..., j:j + tc], src[i:i + tr, ..., j:j + tc], casting="unsafe")


def _view_as(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
  """`a` reshaped as a view, or None where that would need a copy (assigning `.shape` instead copies
  the whole array before it refuses)."""
  try:
    return np.reshape(a, shape, copy=False)
  except ValueError:
    return None


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
  """dst[...] = src, cast to dst's dtype; `dst` is C-contiguous, `src` any view of the same shape (a
  transposed one is copied in tiles)."""
  if src.shape != dst.shape:
    raise ValueError(f"copy of a {src.shape} slice into a {dst.shape} place")
  if src.ndim > 2 and dst.flags.c_contiguous:
    # A transposed [out, in] seen as [in, *out] (kv_b, q_b) or [*in, out] (o_nhd: [H, hd, D] of HF's
    # [D, H*hd]) is copied as the 2-D transpose it is.
    for shape in ((src.shape[0], -1), (-1, src.shape[-1])):
      flat = _view_as(src, shape)
      if flat is not None:
        src, dst = flat, dst.reshape(flat.shape)
        break
  if src.dtype == dst.dtype:
    dst, src = _bits(dst), _bits(src)
    a = src.T
    if (src.ndim == 2 and src.itemsize == 2 and a.flags.c_contiguous and a.shape[1] % 4 == 0
        and a.ctypes.data % 8 == 0 and dst.flags.c_contiguous):
      _grouped_transpose(dst, a)
      return
  if src.ndim < 2 or src.flags.c_contiguous or src.strides[-1] == src.itemsize:
    np.copyto(dst, src, casting="unsafe")
    return
  _tiled(dst, src)


# INT4 words: HF stores them [out, in/8] (word w of a row = group w // 4, word w % 4 in it), k2jax as
# [4, in/32, out]. A group's 4 words are contiguous in HF's layout, so the words move as 16-byte items
# (complex128: a copy moves bytes, it never does arithmetic, so every bit pattern goes through): a 2-D
# transpose of [out, in/32] items a block at a time through a kept buffer, then each block's words dealt
# to their 4 rows. A quarter of numpy's per-element steps of an int32 transpose, and the deal reads the
# block in cache: 1.3-1.5x the previous transpose + row copy (benchmarks/NOTES.md).
WORD_ROWS = 512  # block: rows of `out` x groups, 512 KB of words
WORD_GROUPS = 64
_ITEM = np.dtype(np.complex128)


def _word_blocks(n: int, g: int, dtype):
  """(rows of `out`, groups, block as [groups, rows] items, the same as [groups, rows, 4] words) for
  every block, in a kept per-thread buffer."""
  buf = getattr(_scratch, "words", None)
  if buf is None:
    buf = _scratch.words = np.empty(WORD_ROWS * WORD_GROUPS, _ITEM)
  for i0 in range(0, n, WORD_ROWS):
    rows = slice(i0, min(n, i0 + WORD_ROWS))
    for j0 in range(0, g, WORD_GROUPS):
      groups = slice(j0, min(g, j0 + WORD_GROUPS))
      t = buf[:(groups.stop - j0) * (rows.stop - i0)].reshape(groups.stop - j0, rows.stop - i0)
      yield rows, groups, t, t.view(dtype).reshape(*t.shape, -1)


def _hf_words_of(packed: np.ndarray) -> np.ndarray | None:
  """The HF words [N, 4G] that `packed` [4, G, N] is a view of (`int4.from_hf(..., copy=False)`), or None."""
  r, g, n = packed.shape
  words = _view_as(packed.transpose(2, 1, 0), (n, g * r))
  if words is None or r != 4 or words.dtype.itemsize != 4 or words.strides[1] != 4:
    return None
  return words


def copy_words_to_packed(dst: np.ndarray, packed: np.ndarray) -> None:
  """dst[4, G, N] = packed, a view of HF words [N, 4G] as [4, G, N] (`int4.from_hf(..., copy=False)`)."""
  words = _hf_words_of(packed)
  if words is None or not dst.flags.c_contiguous:  # not such a view: the plain way
    copy_into(dst, packed)
    return
  r, g, n = dst.shape
  items = words.view(_ITEM)  # [N, G]: a group's 4 words each
  for rows, groups, t, t_words in _word_blocks(n, g, dst.dtype):
    np.copyto(t, items[rows, groups].T)
    for k in range(r):
      np.copyto(dst[k, groups, rows], t_words[:, :, k])


def copy_packed_to_words(dst: np.ndarray, packed: np.ndarray) -> None:
  """dst[N, 4G] (HF words) from packed [4, G, N]: the same blocks the other way."""
  r, g, n = packed.shape
  if r != 4 or dst.dtype.itemsize != 4 or not dst.flags.c_contiguous:  # not HF words: the plain way
    np.copyto(dst, np.ascontiguousarray(packed.transpose(2, 1, 0)).reshape(n, g * r))
    return
  items = dst.view(_ITEM)  # [N, G]
  for rows, groups, t, t_words in _word_blocks(n, g, dst.dtype):
    for k in range(r):
      np.copyto(t_words[:, :, k], packed[k, groups, rows])
    np.copyto(items[rows, groups], t.T)
