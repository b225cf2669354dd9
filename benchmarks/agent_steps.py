"""A scripted long tool-call run on the tiny model with the real engine: prefix-cached vs re-prefilled steps.

  python benchmarks/agent_steps.py [--steps 300] [--max_new_tokens 4] [--modes cached,reprefill]

Each step the engine reads the re-rendered conversation and generates `max_new_tokens` tokens; the reply
is then replaced by a scripted calculator call (a random-weight model would not call tools), so the run
has exactly `steps` tool calls. One JSON line per mode, each mode in its own process: tokens run through
prefill, the final context's tokens, and the wall time of the whole run (compilation included).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def tool_call(i: int) -> str:
  args = json.dumps({"expression": f"{i}*7"})
  return (f"<think>step {i}</think><|tool_calls_section_begin|><|tool_call_begin|>functions.calculator:{i}"
          f"<|tool_call_argument_begin|>{args}<|tool_call_end|><|tool_calls_section_end|><|im_end|>")


def run_mode(mode: str, steps: int, max_new_tokens: int, max_len: int) -> dict:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from k2jax import params as params_lib, presets, tokenizer_build  # noqa: PLC0415
  from k2jax.infer.agent import run_agent  # noqa: PLC0415
  from k2jax.infer.engine import Engine  # noqa: PLC0415
  from k2jax.infer.policy import EnginePolicy  # noqa: PLC0415
  from k2jax.infer.tools import CALCULATOR  # noqa: PLC0415
  c = presets.TINY.replace(max_position_embeddings=max(max_len, presets.TINY.max_position_embeddings))
  engine = Engine(params_lib.init_params(c, jax.random.key(0), jnp.float32), c, max_len=max_len)
  tok = tokenizer_build.tiny_tokenizer()
  policy = EnginePolicy(engine, tok, max_new_tokens=max_new_tokens, prefix_cache=(mode == "cached"))
  calls = []

  def scripted(prompt: str) -> str:
    policy(prompt)
    calls.append(len(calls))
    return tool_call(len(calls))

  t0 = time.perf_counter()
  traj = run_agent(scripted, [{"role": "user", "content": "Multiply step by step."}], [CALCULATOR], steps,
                   max_len - max_new_tokens, policy.count_tokens)
  wall = time.perf_counter() - t0
  final = traj.steps[-1].prompt_tokens
  return {"mode": mode, "steps": len(traj.steps), "tool_calls": traj.num_tool_calls,
          "prefill_tokens": engine.stats["prefill_tokens"], "final_context_tokens": final,
          "prefill_over_final": round(engine.stats["prefill_tokens"] / final, 3), "wall_s": round(wall, 1),
          "compactions": traj.compactions}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--max_new_tokens", type=int, default=4)
  ap.add_argument("--max_len", type=int, default=16384, help="engine cache length (and context budget)")
  ap.add_argument("--modes", default="cached,reprefill")
  ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a._child:
    print(json.dumps(run_mode(a._child, a.steps, a.max_new_tokens, a.max_len)))
    return
  for mode in a.modes.split(","):
    cmd = [sys.executable, os.path.abspath(__file__), f"--steps={a.steps}", f"--max_new_tokens={a.max_new_tokens}",
           f"--max_len={a.max_len}", f"--_child={mode}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
      print(json.dumps({"mode": mode, "error": (res.stderr.strip().splitlines() or ["killed"])[-1]}), flush=True)
    else:
      print(res.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
  main()
