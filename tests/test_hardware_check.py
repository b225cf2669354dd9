"""benchmarks/hardware_check.py in its reduced CPU form (the kernels' part is covered by test_kernels)."""
import jax
import pytest

hardware_check = pytest.importorskip("benchmarks.hardware_check")

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices; see conftest.py")


def test_expert_parallel_checks_pass_on_cpu():
  rows = hardware_check.expert_parallel_checks(reduced=True, reps=1)
  assert [r.check for r in rows] == ["expert-parallel routed (allgather)", "expert-parallel routed (all_to_all)",
                                     "model forward (moe_impl=ep)"]
  assert all(r.ok and r.ms > 0 for r in rows), hardware_check.format_rows(rows, "")
