"""Running absl entry points installed as console scripts: a `--help` that lists their flags, and
expected errors as one line on stderr with a non-zero exit instead of a traceback."""
from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable, Sequence

from absl import app, flags


class _ExpectedBackendProbe(logging.Filter):
  """Drops JAX's note that an optional backend (TPU, ...) is absent while it picks one: expected on
  every machine without that hardware. A backend the user asked for (JAX_PLATFORMS) still fails loudly:
  JAX raises for those instead of logging."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno <= logging.INFO and record.getMessage().startswith("Unable to initialize backend"))


def quiet_backend_probing() -> None:
  """Installs the filter on JAX's backend logger (idempotent); call before JAX initialises backends."""
  logger = logging.getLogger("jax._src.xla_bridge")
  if not any(isinstance(f, _ExpectedBackendProbe) for f in logger.filters):
    logger.addFilter(_ExpectedBackendProbe())


def is_expected(error: BaseException) -> bool:
  """Errors that say what the user must fix: the project's own error types (ConfigError, MeshError,
  CheckpointError, SafetensorsError, ... : any class defined in k2jax) and OS errors (a missing file, a
  workdir that is a file, a read-only folder). Anything else is a bug and keeps its traceback."""
  return isinstance(error, OSError) or type(error).__module__.split(".")[0] == "k2jax"


def fail_cleanly(main: Callable) -> Callable:
  """Wraps an absl `main`: an expected error (see `is_expected`) or `app.UsageError` becomes
  `PROG: error: MESSAGE` on one line and exit status 1; Ctrl-C exits 130. K2JAX_TRACEBACK=1 shows the
  traceback instead. Entry points raise these errors and let this report them."""

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except KeyboardInterrupt:
      print(f"{_prog(argv)}: interrupted", file=sys.stderr)
      sys.exit(130)
    except Exception as error:  # noqa: BLE001 (sorted by is_expected)
      usage = isinstance(error, app.UsageError)
      if not (usage or is_expected(error)) or os.environ.get("K2JAX_TRACEBACK"):
        raise
      message = " ".join(str(error).split()) or type(error).__name__
      print(f"{_prog(argv)}: error: {message}" + (" (--help lists the flags)" if usage else ""), file=sys.stderr)
      sys.exit(error.exitcode if usage else 1)

  return wrapped


def _prog(argv: Sequence[str] | None) -> str:
  return os.path.basename(argv[0]) if argv else "k2jax"


def run(main: Callable, modules: Sequence[str], argv: Sequence[str] | None = None) -> None:
  """`app.run(fail_cleanly(main))`, with the flags of `modules` shown by `--help`.

  absl's `--help` lists the flags of the module named by argv[0]; for a console script that is the
  wrapper file, which defines none, so the entry point's own flags are registered under it.
  """
  quiet_backend_probing()
  argv = list(argv or sys.argv)
  for module in modules:
    for flag in flags.FLAGS.get_flags_for_module(module):
      flags.FLAGS.register_key_flag_for_module(argv[0], flag)
  app.run(fail_cleanly(main), argv=argv)
