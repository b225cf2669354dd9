"""Loaders refuse every malformed checkpoint with one message naming the file and the tensor."""
import json
import os
import shutil
import stat
import struct

import ml_dtypes
import numpy as np
import pytest

import k2jax
from k2jax import hf, params, presets
from k2jax.config import ConfigError, K2Config
from k2jax.safetensors_io import Checkpoint, SafetensorsError, SafetensorsFile, save_file
from host_params import host_params

C = presets.TINY.replace(num_hidden_layers=2, vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=3)
NORM = "model.layers.1.post_attention_layernorm.weight"
ATTN = "model.layers.0.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("good") / "ckpt")
  hf.save_hf(host_params(C, seed=3), C, folder, dtype=ml_dtypes.bfloat16, max_shard_bytes=200_000)
  return folder


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _shard_of(folder, name):
  return os.path.join(folder, Checkpoint(folder).where[name])


def _read_raw(path):
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(n)), f.read()


def _write_raw(path, header, data, header_bytes=None):
  blob = header_bytes if header_bytes is not None else json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + data)


def _edit_header(folder, name, edit):
  path = _shard_of(folder, name)
  header, data = _read_raw(path)
  edit(header)
  _write_raw(path, header, data)
  return path


def _load(folder, **kw):
  return k2jax.from_hf(folder, progress=False, **kw)


def test_good_checkpoint_loads(good):
  assert _load(good).config.hidden_size == C.hidden_size


@pytest.mark.parametrize("case,match", [
    ("negative_offsets", r"data_offsets \[-\d+, \d+\] must be two integers"),
    ("overlap", r"tensors .* overlap"),
    ("past_end", r"run past the end"),
    ("size_mismatch", r"needs \d+"),
    ("no_offsets", r"lacks \['data_offsets'\]"),
    ("bad_dtype", r"unsupported dtype 'Q4'"),
    ("bad_shape", r"shape \[-3, 4\] is not a list of non-negative integers"),
])
def test_forged_header_is_named(good, tmp_path, case, match):
  folder = _copy(good, str(tmp_path / case))

  def edit(h):
    e = h[NORM]
    a, b = e["data_offsets"]
    if case == "negative_offsets":
      e["data_offsets"] = [-(b - a), 0]
    elif case == "overlap":
      size = lambda k: h[k]["data_offsets"][1] - h[k]["data_offsets"][0]
      other = next(k for k in h if k not in (NORM, "__metadata__") and 0 < size(k) <= b - a)
      h[other]["data_offsets"] = [a, a + h[other]["data_offsets"][1] - h[other]["data_offsets"][0]]
    elif case == "past_end":
      e["data_offsets"] = [a + 10 ** 9, b + 10 ** 9]
    elif case == "size_mismatch":
      e["shape"] = [e["shape"][0] * 2]
    elif case == "no_offsets":
      del e["data_offsets"]
    elif case == "bad_dtype":
      e["dtype"] = "Q4"
    elif case == "bad_shape":
      e["shape"] = [-3, 4]

  path = _edit_header(folder, NORM, edit)
  with pytest.raises(SafetensorsError, match=match) as err:
    _load(folder)
  assert os.path.basename(path) in str(err.value)


@pytest.mark.parametrize("dtype,shape_scale", [("I16", 1), ("BOOL", 2), ("U8", 2)])
def test_float_tensor_relabelled_as_integer_is_refused(good, tmp_path, dtype, shape_scale):
  folder = _copy(good, str(tmp_path / dtype))

  def edit(h):  # the same bytes, reinterpreted: sizes still agree
    h[NORM]["dtype"] = dtype
    h[NORM]["shape"] = [h[NORM]["shape"][0] * shape_scale] if shape_scale == 1 else [h[NORM]["shape"][0], 2]

  path = _edit_header(folder, NORM, edit)
  with pytest.raises(k2jax.CheckpointError, match=rf"{NORM}.*(dtype {dtype}|shape)") as err:
    _load(folder)
  assert os.path.basename(path) in str(err.value)


def test_float_tensor_relabelled_i32_is_refused(tmp_path, good):
  folder = _copy(good, str(tmp_path / "i32"))
  path = _shard_of(folder, ATTN)
  header, data = _read_raw(path)
  header[ATTN]["dtype"] = "I32"
  header[ATTN]["shape"] = [header[ATTN]["shape"][0], header[ATTN]["shape"][1] // 2]
  _write_raw(path, header, data)
  with pytest.raises(k2jax.CheckpointError, match=rf"{os.path.basename(path)}: tensor {ATTN}"):
    _load(folder)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_weights_are_named_unless_allowed(good, tmp_path, bad):
  folder = _copy(good, str(tmp_path / "nan"))
  path = _shard_of(folder, ATTN)
  sf = SafetensorsFile(path)
  tensors = {k: np.array(sf.get(k)) for k in sf.keys()}
  tensors[ATTN][3, 5] = bad
  save_file(tensors, path)
  with pytest.raises(SafetensorsError, match=rf"{os.path.basename(path)}: tensor '{ATTN}' has 1 NaN/Inf value.*\[3, 5\]"):
    _load(folder)
  model = _load(folder, check_finite=False)  # the opt-out loads it
  o = np.asarray(model.param_tree()["dense_layers"]["attn"]["o_nhd"], np.float32)
  assert not np.isfinite(o).all()


@pytest.mark.parametrize("case,match", [
    ("huge_header", r"header length 4611686018427387904 exceeds the file"),
    ("list_header", r"header is a JSON list"),
    ("not_json", r"unreadable safetensors header"),
    ("truncated", r"run past the end of the file's data.*truncated"),
    ("empty", r"too short to be a safetensors file"),
])
def test_broken_shard_file_is_named(good, tmp_path, case, match):
  folder = _copy(good, str(tmp_path / case))
  path = _shard_of(folder, ATTN)
  header, data = _read_raw(path)
  if case == "huge_header":
    with open(path, "r+b") as f:
      f.write(struct.pack("<Q", 2 ** 62))
  elif case == "list_header":
    _write_raw(path, None, data, header_bytes=b"[1, 2, 3]")
  elif case == "not_json":
    _write_raw(path, None, data, header_bytes=b"{not json")
  elif case == "truncated":
    _write_raw(path, header, data[:len(data) // 2])
  elif case == "empty":
    open(path, "wb").close()
  with pytest.raises(SafetensorsError, match=match) as err:
    _load(folder)
  assert os.path.basename(path) in str(err.value)


@pytest.mark.parametrize("case,match", [
    ("not_json", r"model.safetensors.index.json is not valid JSON"),
    ("no_weight_map", r"has no 'weight_map' object"),
    ("list", r"has no 'weight_map' object"),
    ("escape", r"maps to '\.\./x\.safetensors', not a \.safetensors file name"),
    ("missing_shard", r"lists model-99999.safetensors, which is missing"),
])
def test_broken_index_is_named(good, tmp_path, case, match):
  folder = _copy(good, str(tmp_path / case))
  index = os.path.join(folder, "model.safetensors.index.json")
  data = json.load(open(index))
  text = {"not_json": "{oops", "no_weight_map": json.dumps({"metadata": {}}), "list": "[]",
          "escape": json.dumps({"weight_map": {**data["weight_map"], NORM: "../x.safetensors"}}),
          "missing_shard": json.dumps({"weight_map": {**data["weight_map"], NORM: "model-99999.safetensors"}}),
          }[case]
  open(index, "w").write(text)
  with pytest.raises(SafetensorsError, match=match):
    _load(folder)


def test_path_to_config_json_is_refused(good):
  with pytest.raises(k2jax.CheckpointError, match=r"config.json is a file; give the checkpoint folder"):
    _load(os.path.join(good, "config.json"))


@pytest.mark.parametrize("field,value,match", [
    ("rms_norm_eps", "tiny", r"rms_norm_eps must be a positive number, got 'tiny'"),
    ("rms_norm_eps", -1e-6, r"rms_norm_eps must be a positive number"),
    ("max_position_embeddings", -5, r"max_position_embeddings must be a positive integer, got -5"),
    ("routed_scaling_factor", None, r"routed_scaling_factor must be a positive number, got None"),
    ("norm_topk_prob", "yes", r"norm_topk_prob must be true or false"),
    ("hidden_size", 64.0, r"hidden_size must be a positive integer, got 64.0"),
    ("rope_theta", "big", r"rope_theta must be a number"),
    ("rope_scaling", [1], r"rope_scaling / rope_parameters must be an object"),
])
def test_bad_config_field_is_named_with_the_file(good, tmp_path, field, value, match):
  folder = _copy(good, str(tmp_path / "cfg"))
  path = os.path.join(folder, "config.json")
  cfg = json.load(open(path))
  cfg[field] = value
  json.dump(cfg, open(path, "w"))
  with pytest.raises(ConfigError, match=match) as err:
    _load(folder)
  assert str(err.value).startswith(path)


def test_config_json_that_is_not_an_object(tmp_path):
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(ConfigError, match=r"config.json holds a JSON list, not an object"):
    K2Config.from_hf(str(tmp_path))


def test_config_disagreeing_with_tensors_names_tensor_and_file(good, tmp_path):
  folder = _copy(good, str(tmp_path / "disagree"))
  path = os.path.join(folder, "config.json")
  cfg = json.load(open(path))
  cfg["kv_lora_rank"] = C.kv_lora_rank * 2
  json.dump(cfg, open(path, "w"))
  with pytest.raises(k2jax.CheckpointError, match=r"\.safetensors: tensor model\.layers\.0\.self_attn\.kv_a_proj_with_mqa"
                     r"\.weight has shape"):
    _load(folder)


def test_save_hf_files_follow_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    folder = str(tmp_path / "out")
    hf.save_hf(host_params(C, seed=1), C, folder, dtype=ml_dtypes.bfloat16)
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755
  for f in os.listdir(folder):
    assert stat.S_IMODE(os.stat(os.path.join(folder, f)).st_mode) == 0o644, f


def test_loaded_values_equal_saved(good):
  """Plain file reads (no memory map) give back exactly the saved bytes."""
  want = params.cast(host_params(C, seed=3), ml_dtypes.bfloat16)
  got = _load(good, dtype=ml_dtypes.bfloat16).param_tree()
  np.testing.assert_array_equal(np.asarray(got["embed_vd"]), np.asarray(want["embed_vd"]))


def test_k2_generate_refuses_nan_weights_in_one_line(good, tmp_path):
  """A NaN checkpoint used to generate 0,0,0,0 and exit 0."""
  import subprocess
  import sys
  folder = _copy(good, str(tmp_path / "nan_cli"))
  path = _shard_of(folder, ATTN)
  sf = SafetensorsFile(path)
  tensors = {k: np.array(sf.get(k)) for k in sf.keys()}
  tensors[ATTN][0, 0] = np.nan
  save_file(tensors, path)
  res = subprocess.run([sys.executable, "-m", "k2jax.infer.generate", f"--hf_dir={folder}", "--prompt_ids=5,6,7",
                        "--max_new_tokens=2", "--output=ids"], capture_output=True, text=True, timeout=300)
  assert res.returncode != 0 and "Traceback" not in res.stderr
  assert f"tensor '{ATTN}' has 1 NaN/Inf value" in res.stderr and os.path.basename(path) in res.stderr
