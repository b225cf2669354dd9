"""Per-call cost of the python tool: the bubblewrap sandbox against a plain child process (no isolation).

  python -m benchmarks.sandbox --calls=30

Both sides run interleaved in the same process, so machine load hits them alike; medians and their ratio
are printed. "numpy" is a program that imports numpy and multiplies two 64x64 matrices.
"""

import statistics
import time
import warnings

from absl import app, flags

from k2jax.infer import sandbox

_CALLS = flags.DEFINE_integer("calls", 30, "calls per side and program")

PROGRAMS = {
  "print": "print(6 * 7)",
  "numpy": "import numpy as np\nprint((np.ones((64, 64)) @ np.ones((64, 64))).sum())",
}


def main(_):
  sandbox.require_sandbox()
  warnings.simplefilter("ignore")  # the unsafe side warns once by design
  print(f"{'program':<10}{'bwrap ms':>10}{'unsafe ms':>11}{'ratio':>8}   (medians of {_CALLS.value} calls)")
  for name, code in PROGRAMS.items():
    times = {"bwrap": [], "unsafe": []}
    for _ in range(_CALLS.value):
      for isolation in times:
        start = time.perf_counter()
        result = sandbox.run_python(code, isolation=isolation)
        times[isolation].append(time.perf_counter() - start)
        assert result.returncode == 0, result.as_text()
    bwrap, unsafe = (statistics.median(times[side]) * 1e3 for side in ("bwrap", "unsafe"))
    print(f"{name:<10}{bwrap:>10.1f}{unsafe:>11.1f}{bwrap / unsafe:>8.2f}")


if __name__ == "__main__":
  app.run(main)
