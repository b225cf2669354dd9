"""Running untrusted Python in a child process isolated by the operating system (bubblewrap).

Each call starts a fresh interpreter under `bwrap` in new user, PID, network, mount, IPC, UTS and
cgroup namespaces. What the sandbox guarantees, on Linux x86-64 and arm64 with user namespaces:

- No network: a new network namespace with no interface up (not even loopback to the host).
- Its own PID namespace, with the program as PID 1: it sees no other process, cannot signal one, and
  everything in it is killed when the call ends.
- One process: a seccomp filter refuses fork, vfork and clone without CLONE_THREAD (threads work;
  subprocess, os.system, multiprocessing fail with PermissionError), and ptrace, process_vm_*,
  pidfd_getfd, unshare, setns, io_uring, bpf, perf_event_open and userfaultfd. No further user
  namespaces can be made inside.
- Files: a read-only view of the interpreter, its standard library and site-packages, and the system
  libraries it links (/usr/lib, /lib*); no /etc, /home, /root, project tree or host /proc, /sys.
  The only writable place is a private tmpfs at /tmp (the working directory), `tmpfs_mb` in size,
  discarded after the call.
- An environment of a few fixed variables (PATH, HOME, LANG, thread counts); the host's is not passed.
- A non-root user (uid 65534) with no capabilities and no_new_privs. When the caller is root,
  bubblewrap maps that user to the caller, so the kernel accounts it as root (RLIMIT_NPROC does not
  apply to root; the seccomp filter bounds processes instead).
- rlimits: CPU seconds, address space, open files, threads, file size; no core dumps. A wall-clock
  timeout and a cap on the total bytes written to stdout and stderr stop the program (SIGKILL).
Not guaranteed: protection against kernel bugs reachable through the allowed system calls; secrecy of
what the read-only view shows (installed packages, system libraries); memory beyond the address-space
limit and the tmpfs (page cache, kernel memory) is not metered.

Where bubblewrap or user namespaces are missing, `run_python` refuses (SandboxUnavailable) unless the
caller asks for `isolation="unsafe"`: a plain child process with the same rlimits, timeout and output
cap, and no isolation at all.
"""

from __future__ import annotations

import functools
import os
import platform
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

SANDBOX_UID = 65534  # "nobody" inside the sandbox
ISOLATIONS = ("bwrap", "unsafe")

# Runs first in the child: set the limits, then run the user's program from `path` as __main__.
_RUNNER = r'''
import resource, sys, traceback
path, cpu, address_space, files, threads, file_size = sys.argv[1], *map(int, sys.argv[2:7])
# Started with -S: site-packages are added here without running their .pth hooks (slow, and not ours).
sys.path += [folder for folder in sys.argv[7].split(":") if folder]
for kind, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, address_space), (resource.RLIMIT_NOFILE, files),
                    (resource.RLIMIT_NPROC, threads), (resource.RLIMIT_FSIZE, file_size), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(kind, (value, value))
with open(path, encoding="utf-8") as source:
    code = compile(source.read(), "main.py", "exec")
sys.argv = ["main.py"]
del resource, path, cpu, address_space, files, threads, file_size, kind, value, source
try:
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit:
    raise
except BaseException as error:
    # The traceback from the user's code only, not from this runner.
    traceback.print_exception(type(error), error, error.__traceback__.tb_next)
    sys.exit(1)
'''

_SANDBOX_ENV = {
  "PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
  "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
}


class SandboxUnavailable(RuntimeError):
  """OS isolation cannot be set up here; the message says why and how to proceed."""


@dataclass(frozen=True)
class Limits:
  timeout_s: float = 10.0
  memory_mb: int = 1024  # address space of the process
  max_output_bytes: int = 1 << 20  # stdout + stderr together; the program is stopped past this
  tmpfs_mb: int = 64  # the only writable place
  max_open_files: int = 64
  max_threads: int = 32
  max_code_bytes: int = 1 << 20


@dataclass(frozen=True)
class SandboxResult:
  stdout: str
  stderr: str
  returncode: int | None
  timed_out: bool
  seconds: float
  output_limited: bool = False  # stopped for writing more than max_output_bytes

  def as_text(self) -> str:
    """The tool message the model sees."""
    parts = []
    if self.timed_out:
      parts.append(f"[timed out after {self.seconds:.1f} s]")
    elif self.output_limited:
      parts.append("[stopped: the program wrote more output than allowed]")
    elif self.returncode not in (0, None):
      parts.append(f"[exit code {self.returncode}]")
    if self.stdout:
      parts.append(self.stdout)
    if self.stderr:
      parts.append(f"[stderr]\n{self.stderr}")
    return "\n".join(parts) if parts else "[no output]"


# ---------------------------------------------------------------------------------------------
# seccomp: a classic BPF program, assembled here so no library is needed.

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_CLONE, _CLONE3 = {"x86_64": 56, "aarch64": 220}, 435
_DENIED_SYSCALLS = {  # refused with EPERM
  # fork vfork ptrace process_vm_readv/writev pidfd_getfd unshare setns io_uring_setup bpf userfaultfd perf_event_open
  "x86_64": (57, 58, 101, 310, 311, 438, 272, 308, 425, 321, 323, 298),
  "aarch64": (117, 270, 271, 438, 97, 268, 425, 280, 282, 241),
}
_CLONE_THREAD = 0x00010000
_RET_ALLOW, _RET_KILL = 0x7FFF0000, 0x80000000
_EPERM, _ENOSYS = 1, 38


def _seccomp_program(machine: str) -> bytes:
  """The filter: allow everything except new processes and the calls above; kill on a foreign ABI."""
  ld, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06
  errno = lambda e: 0x00050000 | e  # SECCOMP_RET_ERRNO
  # (code, k, jump-if-true label, jump-if-false label); labels resolve to instruction indices.
  program: list[tuple[int, int, str | None, str | None]] = [
    (ld, 4, None, None),  # seccomp_data.arch
    (jeq, _AUDIT_ARCH[machine], None, "kill"),
    (ld, 0, None, None),  # seccomp_data.nr
  ]
  if machine == "x86_64":
    program.append((jge, 0x40000000, "kill", None))  # the x32 ABI
  program += [(jeq, nr, "deny", None) for nr in _DENIED_SYSCALLS[machine]]
  program += [(jeq, _CLONE3, "nosys", None), (jeq, _CLONE[machine], "clone", None), (ret, _RET_ALLOW, None, None)]
  labels = {"clone": len(program)}
  program += [(ld, 16, None, None), (jset, _CLONE_THREAD, "allow", "deny")]  # low half of args[0]: the flags
  for name, value in (("allow", _RET_ALLOW), ("deny", errno(_EPERM)), ("nosys", errno(_ENOSYS)), ("kill", _RET_KILL)):
    labels[name] = len(program)
    program.append((ret, value, None, None))
  out = b""
  for index, (code, k, true, false) in enumerate(program):
    offset = lambda label: 0 if label is None else labels[label] - index - 1
    out += struct.pack("=HBBI", code, offset(true), offset(false), k)
  return out


# ---------------------------------------------------------------------------------------------
# The read-only view


def _python_paths() -> list[str]:
  """What the interpreter needs: itself, its prefixes' lib folders, a venv's config, system libraries."""
  paths = ["/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32", "/usr/local/lib",
           "/etc/ld.so.cache", "/etc/localtime", *_interpreter_chain()]
  for prefix in dict.fromkeys((sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix)):
    paths += [os.path.join(prefix, "lib"), os.path.join(prefix, "lib64")]
  if sys.prefix != sys.base_prefix:
    paths.append(os.path.join(sys.prefix, "pyvenv.cfg"))
  prefixes = tuple(p.rstrip("/") + "/" for p in (sys.base_prefix, sys.prefix))
  paths += [p for p in sys.path if p.startswith(prefixes)]
  return sorted({os.path.abspath(p) for p in paths if os.path.lexists(p)}, key=lambda p: (p.count("/"), p))


def _interpreter_chain() -> list[str]:
  """`sys.executable` and every link it goes through to the real file. A venv's python is a link to the
  base interpreter (`/usr/bin/python3`, a pyenv build); when a folder holding a link is bound whole (a
  console script's own folder, `venv/bin`, is `sys.path[0]`), the sandbox still needs the link's target."""
  chain, path = [sys.executable], sys.executable
  while os.path.islink(path) and len(chain) < 40:  # 40: the kernel's own limit on nested links
    path = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
    chain.append(path)
  return chain


def _bwrap_command(bwrap: str, code_fd: int, seccomp_fd: int, limits: Limits) -> list[str]:
  command = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID),
             "--gid", str(SANDBOX_UID), "--hostname", "sandbox", "--die-with-parent", "--new-session",
             "--as-pid-1", "--cap-drop", "ALL"]
  covered: list[str] = []
  for path in _python_paths():
    if any(path.startswith(parent + "/") for parent in covered):
      continue  # inside a folder already bound
    if os.path.islink(path) and path != sys.executable:  # the interpreter is bound as the file it points to
      command += ["--symlink", os.readlink(path), path]  # (the files the link leads to are bound too)
    else:
      command += ["--ro-bind", path, path]
      covered.append(path)
  command += ["--proc", "/proc", "--dev", "/dev", "--size", str(limits.tmpfs_mb << 20), "--tmpfs", "/tmp",
              "--chdir", "/tmp", "--ro-bind-data", str(code_fd), "/sandbox/main.py", "--seccomp", str(seccomp_fd),
              "--remount-ro", "/dev", "--remount-ro", "/", "--clearenv"]  # the root and /dev are tmpfs: no size limit
  for name, value in _SANDBOX_ENV.items():
    command += ["--setenv", name, value]
  return command + ["--"]


def _memfd(name: str, data: bytes) -> int:
  fd = os.memfd_create(name, 0)  # no CLOEXEC: passed to the child through pass_fds
  os.write(fd, data)
  os.lseek(fd, 0, os.SEEK_SET)
  return fd


def _runner_arguments(path: str, limits: Limits) -> list[str]:
  cpu = int(limits.timeout_s) + 1
  site_folders = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
  return ["-I", "-S", "-B", "-X", "utf8", "-c", _RUNNER, path, str(cpu), str(limits.memory_mb << 20),
          str(limits.max_open_files), str(limits.max_threads), str(limits.tmpfs_mb << 20), ":".join(site_folders)]


# ---------------------------------------------------------------------------------------------
# Running


def _collect(process: subprocess.Popen, limits: Limits) -> tuple[bytes, bytes, bool, bool]:
  """Read stdout and stderr until both close, the deadline passes, or the output cap is hit."""
  kept = {process.stdout.fileno(): bytearray(), process.stderr.fileno(): bytearray()}
  total, timed_out, limited = 0, False, False
  deadline = time.monotonic() + limits.timeout_s
  with selectors.DefaultSelector() as selector:
    for fd in kept:
      selector.register(fd, selectors.EVENT_READ)
    while selector.get_map() and not (timed_out or limited):
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        timed_out = True
        break
      for key, _ in selector.select(remaining):
        chunk = os.read(key.fd, 1 << 16)
        if not chunk:
          selector.unregister(key.fd)
          continue
        kept[key.fd] += chunk[: max(0, limits.max_output_bytes - total)]
        total += len(chunk)
        limited = total > limits.max_output_bytes
  if not (timed_out or limited):
    try:  # the pipes closed; the process exits at once unless it closed them itself
      process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      timed_out = True
  return bytes(kept[process.stdout.fileno()]), bytes(kept[process.stderr.fileno()]), timed_out, limited


def _kill(process: subprocess.Popen) -> None:
  try:  # bwrap's --die-with-parent then kills the sandbox, and with its PID 1 everything in it
    os.killpg(process.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  process.wait()


def _decode(data: bytes, limit: int) -> str:
  text = data.decode("utf-8", errors="replace")
  if len(text) <= limit:
    return text
  return text[:limit] + f"\n[... {len(text) - limit} more characters truncated]"


def _start(code: bytes, limits: Limits, isolation: str) -> tuple[subprocess.Popen, list[int], str | None]:
  """The child process, the fds to close once it runs, and a temporary folder to remove (unsafe only)."""
  common = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
  if isolation == "bwrap":
    bwrap = shutil.which("bwrap")
    if bwrap is None or platform.machine() not in _AUDIT_ARCH:
      raise SandboxUnavailable("bubblewrap is not available")
    code_fd, seccomp_fd = _memfd("code", code), _memfd("seccomp", _seccomp_program(platform.machine()))
    command = _bwrap_command(bwrap, code_fd, seccomp_fd, limits) + [sys.executable]
    command += _runner_arguments("/sandbox/main.py", limits)
    # bwrap's own environment is visible to the sandbox as /proc/1/environ's parent: pass none.
    process = subprocess.Popen(command, env={}, pass_fds=(code_fd, seccomp_fd), **common)
    return process, [code_fd, seccomp_fd], None
  workdir = tempfile.mkdtemp(prefix="k2jax-unsafe-")
  code_fd = _memfd("code", code)
  env = dict(_SANDBOX_ENV, HOME=workdir, TMPDIR=workdir)
  command = [sys.executable] + _runner_arguments(f"/proc/self/fd/{code_fd}", limits)
  process = subprocess.Popen(command, cwd=workdir, env=env, pass_fds=(code_fd,), **common)
  return process, [code_fd], workdir


def run_python(
  code: str,
  timeout_s: float = 10.0,
  memory_mb: int = 1024,
  max_output_chars: int = 8000,
  isolation: str = "bwrap",
  limits: Limits | None = None,
) -> SandboxResult:
  """Run `code` as a fresh program in the sandbox and collect its output (each stream cut to max_output_chars).

  Raises SandboxUnavailable when isolation="bwrap" cannot be set up here, ValueError on bad arguments.
  """
  if isolation not in ISOLATIONS:
    raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
  limits = limits or Limits(timeout_s=timeout_s, memory_mb=memory_mb)
  data = code.encode("utf-8", errors="surrogatepass")
  if len(data) > limits.max_code_bytes:
    raise ValueError(f"program too long ({len(data)} bytes, at most {limits.max_code_bytes})")
  if isolation == "unsafe":
    _warn_unsafe()
  else:
    require_sandbox()
  return _run(data, limits, isolation, max_output_chars)


def _run(data: bytes, limits: Limits, isolation: str, max_output_chars: int) -> SandboxResult:
  start = time.monotonic()
  process, fds, workdir = _start(data, limits, isolation)
  try:
    for fd in fds:
      os.close(fd)
    stdout, stderr, timed_out, limited = _collect(process, limits)
  finally:
    _kill(process)
    process.stdout.close()
    process.stderr.close()
    if workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  if isolation == "bwrap" and process.returncode == 1 and stderr.startswith(b"bwrap:"):
    raise SandboxUnavailable(f"the sandbox could not start: {stderr.decode(errors='replace').strip()}")
  return SandboxResult(
    stdout=_decode(stdout, max_output_chars),
    stderr=_decode(stderr, max_output_chars),
    returncode=None if timed_out or limited else process.returncode,
    timed_out=timed_out,
    seconds=time.monotonic() - start,
    output_limited=limited,
  )


@functools.lru_cache(maxsize=1)
def _warn_unsafe() -> None:
  warnings.warn("the python tool runs model-written code WITHOUT isolation (isolation='unsafe')", stacklevel=3)


@functools.lru_cache(maxsize=1)
def sandbox_problem() -> str | None:
  """Why OS isolation does not work here (None when it does); probed once per process."""
  if platform.system() != "Linux" or platform.machine() not in _AUDIT_ARCH:
    return f"the sandbox needs Linux on x86-64 or arm64, this is {platform.system()} {platform.machine()}"
  if shutil.which("bwrap") is None:
    return "bubblewrap (bwrap) is not installed; on Debian/Ubuntu: apt-get install bubblewrap"
  try:
    result = _run(b"print(6 * 7)", Limits(timeout_s=30), "bwrap", 1000)
  except SandboxUnavailable as err:
    return f"{err} (user namespaces may be disabled)"
  if result.stdout != "42\n":
    return f"the sandbox's probe failed: {result.as_text()[:300]}"
  return None


def require_sandbox() -> None:
  """Raise SandboxUnavailable, saying why and what to do, unless OS isolation works here."""
  problem = sandbox_problem()
  if problem:
    raise SandboxUnavailable(f"cannot isolate the python tool: {problem}. "
                             "Fix that, or choose isolation='unsafe' to run model-written code without isolation.")
