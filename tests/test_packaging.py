"""The main job's install carries only what it needs; the test references are an extra with floors, not pins."""
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def _names(requirements):
  return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-"): r for r in requirements}


def test_main_install_has_no_test_references_and_torch_is_a_floor():
  main = _names(PYPROJECT["project"]["dependencies"])
  test = _names(PYPROJECT["project"]["optional-dependencies"]["test"])
  for name in ("torch", "transformers", "compressed-tensors", "safetensors", "pytest"):
    assert name not in main and name in test, name
  assert "tiktoken" in main  # the tokenizer runs on it (k2-train data, k2-generate, k2-chat)
  assert re.fullmatch(r"torch>=2\.\d+", test["torch"].replace(" ", ""))
  assert not [r for r in test.values() if "==" in r]
