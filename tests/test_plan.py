"""k2-plan: the 1T K2 Thinking budgeted per device on abstract 16- and 256-device meshes."""
import subprocess
import sys

from k2jax import plan, presets, report, sharding

K2 = presets.K2_THINKING
N_PARAMS = 1_026_408_232_448
N_ROUTER_BIAS = 60 * 384  # the only fp32 parameters


def _items(budget):
  return {i.name.split(" (")[0]: i for i in budget.items}


def test_serving_int4_on_16_devices_fits():
  b = plan.serving_plan(K2, sharding.abstract_mesh("expert:16"), batch=16, context=131072, device_memory_gib=95)
  items = _items(b)
  params = items["parameters"]
  serving_total = sum(r.bytes_serving for r in report.param_report(K2))
  assert params.total_bytes == serving_total  # 4 bits + a bf16 scale per 32 for the routed experts
  assert params.total_bytes / 16 <= params.device_bytes <= params.total_bytes / 16 * 1.001
  cache = items["MLA latent cache"]
  assert cache.total_bytes == 61 * 16 * 131072 * 576 * 2 + 16 * 4  # plus the int32 lengths
  assert cache.device_bytes == cache.total_bytes // 16
  assert b.fits and 40 * plan.GIB < b.device_bytes < 50 * plan.GIB


def test_training_on_16_devices_does_not_fit_and_on_256_does():
  small = plan.training_plan(K2, sharding.abstract_mesh("fsdp:16"), 16, 4096, 95)
  items = _items(small)
  assert items["parameters"].total_bytes == 2 * N_PARAMS + 2 * N_ROUTER_BIAS
  assert items["fp32 master copy"].total_bytes == 4 * (N_PARAMS - N_ROUTER_BIAS)
  # Muon keeps one fp32 buffer, AdamW two: embeddings and lm_head (2 x 163840 x 7168) and norm gains.
  adamw = 2 * 163840 * 7168 + 7168 * (1 + 2 * 61) + 61 * (1536 + 512)
  assert items["optimizer state"].total_bytes == 4 * (N_PARAMS - N_ROUTER_BIAS) + 4 * adamw
  assert not small.fits and small.device_bytes > 7 * 95 * plan.GIB  # 12 bytes per parameter in all
  # FSDP splits the experts too: without expert parallelism each device gathers a whole layer's.
  assert _items(small)["routed experts of one layer, gathered"].device_bytes == 3 * 384 * 7168 * 2048 * 2
  replicated = plan.training_plan(K2, sharding.abstract_mesh("data:16"), 16, 4096, 95)  # experts whole already
  assert not any(i.name.startswith("routed experts of one layer") for i in replicated.items)
  mesh = sharding.abstract_mesh("fsdp:16,expert:16")
  big = plan.training_plan(K2, mesh, 256, 4096, 95)  # expert-parallel, chosen from the mesh
  params = _items(big)["parameters"]
  assert params.device_bytes <= params.total_bytes / 256 * 1.001  # every large weight split 256 ways
  assert big.fits
  # Without expert parallelism each device gathers a whole layer's experts (3 x 384 x 7168 x 2048 bf16).
  ragged = plan.training_plan(K2, mesh, 256, 4096, 95, moe_impl="ragged")
  assert _items(ragged)["routed experts of one layer, gathered"].device_bytes == 3 * 384 * 7168 * 2048 * 2
  assert not ragged.fits


def test_expert_parallel_buffers_hold_the_whole_expert_group():
  # Dropless dispatch sizes each shard's rows for every token of its `expert` group: on expert:128
  # that is 128x the rows of a token shard, and the plan says so.
  mesh = sharding.abstract_mesh("fsdp:2,expert:128")
  act = {impl: plan.activation_bytes(K2, mesh, sharding.DEFAULT_RULES, 256, 4096, "full", impl)[1]
         for impl in ("ragged", "ep")}
  assert act["ep"] > 4 * act["ragged"]


def test_uneven_split_is_reported():
  # 7168 / 32 = 224 INT4 groups do not split over 256 devices: those weights stay whole on each.
  b = plan.serving_plan(K2, sharding.abstract_mesh("fsdp:256"), 16, 4096, 95)
  assert not b.fits and any("does not divide" in n for n in b.notes)


def test_cli_prints_total_and_both_tables():
  out = subprocess.run([sys.executable, "-m", "k2jax.plan", "--mesh=expert:16", "--mode=both", "--batch=16",
                        "--context=8192"], capture_output=True, text=True, check=True).stdout
  assert f"{N_PARAMS:,} parameters" in out
  assert "serving: 16 sequences" in out and "training: 16 sequences" in out
  assert "fits," in out and "does NOT fit" in out
  assert "moe_impl: ep_a2a (expert-parallel over expert:16" in out


def test_cli_rejects_a_bad_mesh():
  res = subprocess.run([sys.executable, "-m", "k2jax.plan", "--mesh=model:16"], capture_output=True, text=True)
  assert res.returncode != 0 and "unknown mesh axis 'model'" in res.stderr


def test_cli_default_mesh_is_this_machines_devices_on_fsdp():
  # tests/conftest.py gives this process tree 8 CPU devices.
  res = subprocess.run([sys.executable, "-m", "k2jax.plan", "--preset=k2_thinking", "--mode=serve"],
                       capture_output=True, text=True)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "mesh data:1,fsdp:8,expert:1,tensor:1 = 8 devices (this machine's 8 cpu device(s)" in res.stdout
  assert "553.40" in res.stdout  # one copy of the INT4 serving weights, in GiB like k2-params
  res = subprocess.run([sys.executable, "-m", "k2jax.plan", "--mesh=expert:3,fsdp:-1", "--devices=16"],
                       capture_output=True, text=True)
  assert res.returncode != 0 and "set --mesh, and --devices" in res.stderr and "Traceback" not in res.stderr
