"""Running absl entry points installed as console scripts: a `--help` that lists their flags, and
expected errors as one line on stderr with a non-zero exit instead of a traceback."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
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
      _print_error(argv, " ".join(str(error).split()) or type(error).__name__, usage)
      sys.exit(error.exitcode if usage else 1)

  return wrapped


def _prog(argv: Sequence[str] | None) -> str:
  return os.path.basename(argv[0]) if argv else "k2jax"


def _print_error(argv: Sequence[str] | None, message: str, usage: bool) -> None:
  print(f"{_prog(argv)}: error: {message}" + (" (--help lists the flags)" if usage else ""), file=sys.stderr)


def exit_with_error(argv: Sequence[str] | None, error: BaseException) -> None:
  """`PROG: error: MESSAGE` on one line and exit status 1, for an entry point that sorts its own errors
  (those `fail_cleanly` would not take as expected, a bare ValueError say)."""
  _print_error(argv, " ".join(str(error).split()) or type(error).__name__, usage=False)
  sys.exit(1)


def _unknown_config_field(error: BaseException, argv: Sequence[str], name: str = "config") -> str | None:
  """The message for an override (`--config.a.b=...`) of a field the config does not have, which
  ml_collections reports as a bare AttributeError / KeyError of the key (with a "Did you mean" line when
  one is close); None when `error` names no key of the overrides in `argv` (then it is not a usage error)."""
  while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(...))
    error = error.args[0]
  text = str(error.args[0]) if error.args else ""  # args[0]: str(KeyError) would quote it once more
  first, _, hint = text.partition("\n")
  key, hint = first.strip("'\""), hint.strip()
  for arg in argv:
    match = re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
    path = match.group(1).split(".") if match else []
    if key in path:
      missing = ".".join(path[:path.index(key) + 1])
      suggestion = f" ({hint[0].lower()}{hint[1:]})" if hint else ""
      return f"--{name}.{match.group(1)}: the {name} has no field {missing!r}{suggestion}"
  return None


@contextlib.contextmanager
def _config_overrides_checked(argv: Sequence[str]):
  """An override of a field the config lacks, raised while the config is loaded: a one-line usage error
  and exit status 1 instead of ml_collections' traceback."""
  try:
    yield
  except (AttributeError, KeyError) as error:
    message = _unknown_config_field(error, argv)
    if message is None:
      raise
    _print_error(argv, message, usage=True)
    sys.exit(1)


def define_config_file(default: str, help_text: str) -> None:
  """`config_flags.DEFINE_config_file("config", ...)`. Without `--config` on the command line the
  default file is loaded here, overrides included; with it, when `run` parses the flags. Either way an
  override of a missing field is a one-line error."""
  from ml_collections import config_flags  # noqa: PLC0415
  with _config_overrides_checked(sys.argv):
    config_flags.DEFINE_config_file("config", default, help_text)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (the `--config` file is loaded here when given)."""
  with _config_overrides_checked(argv):
    return app.parse_flags_with_usage(argv)


def quiet_info_logs() -> None:
  """absl turns its log level to INFO once flags are parsed, unless --verbosity was given; Orbax logs
  every checkpoint open, save and close at INFO (30-odd lines for one `k2-generate --checkpoint`), which
  would bury a tool's output and its one-line errors. WARNING unless the user asked (--verbosity=0)."""
  from absl import logging as absl_logging  # noqa: PLC0415
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)


def run(main: Callable, modules: Sequence[str], argv: Sequence[str] | None = None,
        keep_scratch_mapped: bool = False) -> None:
  """`app.run(fail_cleanly(main))`, with the flags of `modules` shown by `--help` and absl's INFO logs
  off unless asked for (`quiet_info_logs`).

  absl's `--help` lists the flags of the module named by argv[0]; for a console script that is the
  wrapper file, which defines none, so the entry point's own flags are registered under it.
  `keep_scratch_mapped`: for tools that run the same programs many times (training, RL); see
  `host_memory.keep_scratch_mapped`.
  """
  quiet_backend_probing()
  if keep_scratch_mapped:
    from k2jax import host_memory  # noqa: PLC0415
    host_memory.keep_scratch_mapped()
  argv = list(argv or sys.argv)
  for module in [*modules, __name__]:  # __name__: `define_config_file`'s --config
    for flag in flags.FLAGS.get_flags_for_module(module):
      flags.FLAGS.register_key_flag_for_module(argv[0], flag)

  def quiet_main(argv):
    quiet_info_logs()
    return main(argv)

  app.run(fail_cleanly(quiet_main), argv=argv, flags_parser=_parse_flags)
