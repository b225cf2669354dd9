"""Running absl entry points installed as console scripts, with a `--help` that lists their flags."""
from __future__ import annotations

import logging
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


def run(main: Callable, modules: Sequence[str], argv: Sequence[str] | None = None) -> None:
  """`app.run(main)`, with the flags of `modules` shown by `--help`.

  absl's `--help` lists the flags of the module named by argv[0]; for a console script that is the
  wrapper file, which defines none, so the entry point's own flags are registered under it.
  """
  quiet_backend_probing()
  argv = list(argv or sys.argv)
  for module in modules:
    for flag in flags.FLAGS.get_flags_for_module(module):
      flags.FLAGS.register_key_flag_for_module(argv[0], flag)
  app.run(main, argv=argv)
