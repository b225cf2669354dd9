"""Stopping and restarting k2-train from its workdir gives the uninterrupted run's losses; bad
checkpoints fail with errors that say what is wrong."""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from test_train import small_config

from k2jax import params as params_lib, presets, sharding
from k2jax.train import checkpointing, trainer

STEPS, STOP = 6, 3


def _losses(workdir: Path) -> dict[int, float]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  cfg = small_config(num_steps=STEPS, checkpoint_every=2)
  straight = tmp_path_factory.mktemp("straight")
  trainer.train(cfg, straight)
  resumed = tmp_path_factory.mktemp("resumed")
  first = trainer.train(small_config(num_steps=STEPS, checkpoint_every=2, stop_after_steps=STOP), resumed)
  assert [r["step"] for r in first] == list(range(1, STOP + 1))
  second = trainer.train(cfg, resumed)
  assert [r["step"] for r in second] == list(range(STOP + 1, STEPS + 1))
  return cfg, straight, resumed


def test_resume_gives_identical_losses(runs):
  _, straight, resumed = runs
  a, b = _losses(straight), _losses(resumed)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]
  row = json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])
  for key in ("step", "loss", "grad_norm", "max_attn_logit", "tokens_per_sec", "expert_load_max_over_mean"):
    assert key in row


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (fake) devices; tests/conftest.py sets 8")
def test_resume_under_a_mesh_restores_onto_shapes_and_never_reads_init_from(runs, tmp_path):
  """A resumed run restores onto shapes and shardings alone: its `init_from` (here a k2-train workdir) is
  not read again, so a resume under a mesh holds one copy of the state, and the losses carry on exactly."""
  _, straight, _ = runs
  init = tmp_path / "init"
  shutil.copytree(straight, init)
  cfg = lambda **kw: small_config(num_steps=2, checkpoint_every=1, init_from=str(init), **kw)
  mesh = sharding.make_mesh("fsdp:2,expert:2", jax.devices()[:4])
  with sharding.use_mesh(mesh):
    whole = trainer.train(cfg(), tmp_path / "whole", mesh)
    trainer.train(cfg(stop_after_steps=1), tmp_path / "cut", mesh)
    shutil.rmtree(init)
    rest = trainer.train(cfg(), tmp_path / "cut", mesh)
  assert [r["step"] for r in rest] == [2]
  assert rest[-1]["loss"] == whole[-1]["loss"] and rest[-1]["grad_norm"] == whole[-1]["grad_norm"]


def test_load_params_for_inference(runs):
  cfg, straight, _ = runs
  params, c = checkpointing.load_params_for_inference(straight, np.float32)
  assert c == presets.from_config_dict(cfg.model)
  like = params_lib.abstract_params(c, np.float32)
  assert jax.tree.structure(params) == jax.tree.structure(like)
  step_dir = straight / checkpointing.CHECKPOINT_DIR / str(STEPS)
  params2, _ = checkpointing.load_params_for_inference(step_dir, np.float32)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2)))


def test_config_mismatch_names_fields(runs, tmp_path):
  cfg, straight, _ = runs
  other = small_config(num_steps=STEPS)
  other.model.hidden_size = 48
  with pytest.raises(checkpointing.CheckpointError, match="hidden_size: checkpoint 32 vs run 48"):
    trainer.train(other, straight)


def _copy(runs_dir: Path, tmp_path: Path) -> Path:
  import shutil  # noqa: PLC0415
  work = tmp_path / "work"
  shutil.copytree(runs_dir, work)
  return work


def _rows(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_corrupt_latest_checkpoint_falls_back_and_metrics_keep_each_step_once(runs, tmp_path, caplog):
  cfg, straight, _ = runs
  work = _copy(straight, tmp_path)
  step_dir = work / checkpointing.CHECKPOINT_DIR / str(STEPS)
  for f in (step_dir / "params").rglob("*"):
    if f.is_file():
      f.write_bytes(b"not a checkpoint")
  with (work / "metrics.jsonl").open("a") as f:
    f.write('{"step": 7, "lo')  # a row cut short by the kill
  rows = trainer.train(cfg, work)
  # Resumed from the previous checkpoint (STEPS - 2), with the uninterrupted run's losses.
  assert [r["step"] for r in rows] == [STEPS - 1, STEPS]
  assert "falling back to the previous checkpoint" in caplog.text and f"cannot restore checkpoint {step_dir}" in caplog.text
  assert (work / checkpointing.SET_ASIDE_DIR / str(STEPS)).is_dir() and (step_dir / "meta").is_dir()
  logged = _rows(work)
  marker = [r for r in logged if r.get("resumed")]
  assert marker == [{"step": STEPS - 2, "resumed": True, "dropped_rows": 3}]  # rows 5 and 6, and the cut one
  losses = [r["step"] for r in logged if "loss" in r]
  assert losses == list(range(1, STEPS + 1))
  assert _losses(work) == _losses(straight)


def test_no_readable_checkpoint_is_a_clear_error(runs, tmp_path):
  cfg, straight, _ = runs
  work = _copy(straight, tmp_path)
  for step_dir in (work / checkpointing.CHECKPOINT_DIR).iterdir():
    (step_dir / "meta" / "metadata").write_text("{ truncated")
  with pytest.raises(checkpointing.CheckpointError, match="no readable checkpoint .*has no readable metadata"):
    trainer.train(cfg, work)
  with pytest.raises(checkpointing.CheckpointError, match="does not exist"):
    checkpointing.load_params_for_inference(tmp_path / "missing")


def test_config_change_on_resume_is_refused_unless_allowed(runs, tmp_path):
  cfg, straight, _ = runs
  work = _copy(straight, tmp_path)
  saved_config = (work / "config.json").read_text()
  other = small_config(num_steps=STEPS, checkpoint_every=3, **{"data.batch_size": 8, "data.seq_len": 32})
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"data.batch_size: checkpoint 4 vs run 8, data.seq_len: checkpoint 64 vs run 32\); pass --allow_config_change"):
    trainer.train(other, work)
  assert (work / "config.json").read_text() == saved_config  # nothing rewritten by the refused run
  # Operational fields (checkpoint_every above) may change; an allowed change resumes.
  reseeded = small_config(num_steps=STEPS, checkpoint_every=2, seed=7)
  with pytest.raises(checkpointing.CheckpointError, match=r"\(seed: checkpoint 0 vs run 7\)"):
    trainer.train(reseeded, work)
  import shutil  # noqa: PLC0415
  shutil.rmtree(work / checkpointing.CHECKPOINT_DIR / str(STEPS))  # resume from STEPS - 2, as after a kill
  rows = trainer.train(reseeded, work, allow_config_change=True)
  assert [r["step"] for r in rows] == [STEPS - 1, STEPS]


def test_workdir_that_is_a_file_is_refused(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
    trainer.train(small_config(), tmp_path / "file")
