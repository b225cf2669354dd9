"""The sweep's figures: accuracy along each axis, and accuracy against mean generated tokens."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

LABELS = {
    "thinking_budget": "thinking budget (tokens)",
    "tool_steps": "tool-calling turns allowed",
    "parallel": "parallel trajectories (majority vote)",
    "heavy": "heavy mode trajectories (+ aggregation)",
    "rl_step": "RL steps",
}


def _pyplot():
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")  # files only; no display needed
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def by_axis(results: Sequence) -> dict[str, list]:
  out: dict[str, list] = {}
  for r in results:
    out.setdefault(r.axis, []).append(r)
  return out


def write_plots(workdir: str | Path, results: Sequence) -> list[Path]:
  """WORKDIR/<axis>.png for every axis and WORKDIR/overview.png; returns the paths written."""
  plt = _pyplot()
  workdir = Path(workdir)
  paths = []
  groups = by_axis(results)
  for axis, rows in groups.items():
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    xs = list(range(len(rows)))
    acc = [r.accuracy for r in rows]
    err = [[r.accuracy - r.ci_low for r in rows], [r.ci_high - r.accuracy for r in rows]]
    ax.errorbar(xs, acc, yerr=err, marker="o", capsize=3)
    ax.set_xticks(xs, [str(r.value) for r in rows])  # evenly spaced: the grids are roughly geometric
    ax.set_xlabel(LABELS.get(axis, axis))
    ax.set_ylabel("accuracy (95% interval)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{axis} ({rows[0].env}, {rows[0].n_problems} problems)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = workdir / f"{axis}.png"
    fig.savefig(path)
    plt.close(fig)
    paths.append(path)
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for axis, rows in groups.items():
    ax.plot([max(r.mean_tokens, 1e-1) for r in rows], [r.accuracy for r in rows], marker="o", label=axis)
  ax.set_xscale("log")
  ax.set_xlabel("mean generated tokens per problem (log)")
  ax.set_ylabel("accuracy")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title("accuracy against test-time compute", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = workdir / "overview.png"
  fig.savefig(path)
  plt.close(fig)
  paths.append(path)
  return paths
