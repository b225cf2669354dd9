"""The python tool's OS sandbox: escape attempts fail inside it, ordinary programs work."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from k2jax.infer import sandbox
from k2jax.infer.tools import ToolError, python_tool

if sandbox.sandbox_problem() and not os.environ.get("CI"):  # CI installs bubblewrap (.ci/run) and must run these
  pytest.skip(f"no OS sandbox here: {sandbox.sandbox_problem()}", allow_module_level=True)


def run(code: str, **kwargs) -> sandbox.SandboxResult:
  return sandbox.run_python(code, **kwargs)


def outcomes(result: sandbox.SandboxResult) -> dict[str, str]:
  """Lines 'NAME: outcome' printed by an attempt script, as a dict."""
  assert result.returncode == 0, result.as_text()
  return dict(line.split(": ", 1) for line in result.stdout.splitlines())


ATTEMPT = '''
import ctypes, os, sys
def attempt(name, action):
    try:
        print(f"{name}: ALLOWED {action()!r}"[:200], flush=True)
    except BaseException as error:
        print(f"{name}: blocked {type(error).__name__}", flush=True)
libc = ctypes.CDLL(None, use_errno=True)
def checked(value):
    if value == -1:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return value
'''


def test_ordinary_programs_work():
  code = """
import fractions, json, math, re, statistics, threading, numpy as np
print(sum(i * i for i in range(10)), math.factorial(20), fractions.Fraction(3, 4) + fractions.Fraction(1, 6))
print(json.dumps({"a": [1, 2]}), re.sub(r"o+", "0", "foo boo"), statistics.median([3, 1, 2]))
rng = np.random.default_rng(0)
a = rng.standard_normal((64, 64))
print(np.allclose(np.linalg.inv(a) @ a, np.eye(64)))
open("notes.txt", "w").write("kept for this call")
print(open("notes.txt").read(), os.getcwd() if (os := __import__("os")) else "")
results = []
threads = [threading.Thread(target=results.append, args=(i,)) for i in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
print(sorted(results), "ünïcödé".upper())
"""
  result = run(code)
  assert result.returncode == 0, result.as_text()
  assert result.stdout.splitlines() == [
    "285 2432902008176640000 11/12", '{"a": [1, 2]} f0 b0 2', "True", "kept for this call /tmp", "[0, 1, 2, 3] ÜNÏCÖDÉ"]
  assert "notes.txt" not in run("import os; print(os.listdir('.'))").stdout  # each call starts fresh



def test_works_from_a_console_script(monkeypatch):
  # A console script (k2-chat) has its own folder first on sys.path: in a venv that is venv/bin, whose
  # python is a link to the base interpreter outside every folder bound; the link must still lead somewhere.
  monkeypatch.syspath_prepend(os.path.dirname(sys.executable))
  result = run("import sys; print(sys.version_info[:2])")
  assert result.returncode == 0, result.as_text()
  assert result.stdout.strip() == str(tuple(sys.version_info[:2]))

def test_no_network_even_to_a_host_listener_or_through_ctypes():
  listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  listener.bind(("127.0.0.1", 0))
  listener.listen(4)
  listener.settimeout(0.2)
  port = listener.getsockname()[1]
  code = ATTEMPT + f"""
import socket, struct
attempt("connect", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2))
attempt("dns", lambda: socket.getaddrinfo("example.com", 80))
def raw_connect():
    fd = checked(libc.socket(2, 1, 0))  # AF_INET, SOCK_STREAM through the C library
    address = struct.pack("!HH4s8x", 2, {port}, bytes([127, 0, 0, 1]))
    address = struct.pack("=H", 2) + address[2:]
    return checked(libc.connect(fd, address, len(address)))
attempt("ctypes_connect", raw_connect)
attempt("interfaces", lambda: [name for _, name in socket.if_nameindex() if name != "lo"] or 1 / 0)
a, b = socket.socketpair(); a.sendall(b"x"); print("pair: works", b.recv(1))
"""
  found = outcomes(run(code))
  try:
    with pytest.raises(socket.timeout):
      listener.accept()
  finally:
    listener.close()
  assert all(found[name].startswith("blocked") for name in ("connect", "dns", "ctypes_connect", "interfaces")), found
  assert found["pair"] == "works b'x'"


def test_no_new_processes_by_any_route():
  code = ATTEMPT + """
import _posixsubprocess, subprocess, multiprocessing
attempt("subprocess", lambda: subprocess.run([sys.executable, "-c", "pass"]))
attempt("os_fork", os.fork)
attempt("system", lambda: os.system("id"))
captured = []
def capture(*arguments):  # the arguments subprocess passes on this Python version
    captured.append(arguments)
    raise OSError("captured")
real_fork_exec = _posixsubprocess.fork_exec
_posixsubprocess.fork_exec = subprocess._fork_exec = capture
attempt("capture", lambda: subprocess.Popen(["/usr/lib/os-release"]))
_posixsubprocess.fork_exec = real_fork_exec
attempt("fork_exec", lambda: real_fork_exec(*captured[0]))
attempt("libc_fork", lambda: checked(libc.fork()))
attempt("libc___fork", lambda: checked(libc.__fork()) if hasattr(libc, "__fork") else 1 / 0)
attempt("clone_syscall", lambda: checked(libc.syscall(56, 17, 0, 0, 0, 0)))  # SYS_clone with SIGCHLD only
attempt("execle_id", lambda: checked(libc.execle(b"/usr/bin/id", b"id", None, None)))
attempt("exec_shell", lambda: os.execv("/bin/sh", ["sh", "-c", "id"]))
attempt("pool", lambda: multiprocessing.Pool(2).map(abs, [1]))
def fifty_children():
    for i in range(50):
        if os.fork() == 0:
            os._exit(0)
attempt("fifty_children", fifty_children)
"""
  found = outcomes(run(code))
  assert found.pop("capture") == "blocked OSError"
  assert found.pop("exec_shell") == found.pop("execle_id") == "blocked FileNotFoundError"  # no programs to run
  assert found.pop("system") == "ALLOWED 32512"  # exit status 127: the shell could not be started
  assert found.pop("pool") in ("blocked OSError", "blocked PermissionError")  # no shared memory either
  assert len(found) == 7 and set(found.values()) == {"blocked PermissionError"}, sorted(found.items())


def test_nothing_outlives_the_call():
  marker = f"k2jax-sandbox-survivor-{os.getpid()}-{time.monotonic_ns()}"
  # Exec is allowed (of what the sandbox holds); the new program ignores signals and sleeps past the call.
  program = "import signal, time\\nfor s in (1, 2, 15): signal.signal(s, signal.SIG_IGN)\\nprint('waiting', flush=True)\\nwhile True: time.sleep(1)"
  code = f"""
import os, sys
os.execv(sys.executable, [sys.executable, "-c", "{program}", "{marker}"])
"""
  result = run(code, timeout_s=5.0)  # room for two interpreter starts on a loaded machine
  assert result.timed_out and result.stdout == "waiting\n"
  time.sleep(0.2)
  survivors = []
  for proc in Path("/proc").iterdir():
    try:
      if marker.encode() in (proc / "cmdline").read_bytes():
        survivors.append(proc.name)
    except OSError:
      continue
  assert survivors == []


def test_signals_and_pidfds_cannot_reach_host_processes():
  victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    code = ATTEMPT + f"""
import signal
attempt("kill", lambda: os.kill({victim.pid}, signal.SIGKILL))
attempt("pidfd", lambda: signal.pidfd_send_signal(os.pidfd_open({victim.pid}), signal.SIGKILL))
attempt("kill_all", lambda: os.kill(-1, signal.SIGKILL) or "survived")
print("others: " + " ".join(sorted(p for p in os.listdir("/proc") if p.isdigit())))
"""
    found = outcomes(run(code))
    assert victim.poll() is None  # still running
    assert found["kill"] == found["pidfd"] == "blocked ProcessLookupError"
    assert found["kill_all"] == "blocked ProcessLookupError"  # there is no one else to signal
    assert found["others"] == "1"  # the program is PID 1 of its own namespace, and alone
  finally:
    victim.kill()
    victim.wait()


def test_host_environment_and_files_are_out_of_reach(monkeypatch, tmp_path):
  monkeypatch.setenv("K2JAX_TEST_SECRET", "s3cr3t-value")
  secret_file = tmp_path / "secret.txt"
  secret_file.write_text("s3cr3t-value")
  project = Path(__file__).resolve().parent.parent
  code = ATTEMPT + f"""
attempt("passwd", lambda: open("/etc/passwd").read())
attempt("project", lambda: os.listdir({str(project)!r}))
attempt("this_test", lambda: open({__file__!r}).read())
attempt("parent_environ", lambda: open("/proc/{os.getpid()}/environ", "rb").read())
attempt("host_tmp", lambda: open({str(secret_file)!r}).read())
secrets = [p for p in os.listdir("/proc") if p.isdigit() and b"s3cr3t" in open(f"/proc/{{p}}/environ", "rb").read()]
print("secret_in_proc: " + repr(secrets))
print("environ: " + " ".join(sorted(os.environ)))
"""
  found = outcomes(run(code))
  for name in ("passwd", "project", "this_test", "parent_environ", "host_tmp"):
    assert found[name].startswith("blocked"), (name, found[name])
  assert found["secret_in_proc"] == "[]"
  assert "K2JAX_TEST_SECRET" not in found["environ"]


def test_writes_stay_in_a_small_private_tmpfs_and_files_are_limited(tmp_path):
  target = tmp_path / "escaped.txt"
  code = ATTEMPT + f"""
for path in ("/escaped.txt", "/usr/lib/escaped.txt", "/etc/escaped.txt", "/dev/shm/escaped.txt", {str(target)!r}):
    attempt(path, lambda: open(path, "w").write("x"))
def fill():
    chunk = b"y" * (8 << 20)
    for i in range(100):  # 800 MB in files of 8 MB: the tmpfs holds 64 MB
        with open(f"/tmp/fill{{i}}", "wb") as f:
            f.write(chunk)
attempt("fill", fill)
attempt("open_100_files", lambda: [open("/dev/null") for _ in range(100)])  # RLIMIT_NOFILE is 64
"""
  found = outcomes(run(code))
  assert all(outcome.startswith("blocked") for outcome in found.values()), found
  assert not target.exists()


def test_memory_cpu_and_output_limits():
  result = run("x = bytearray(20 << 30)\nprint('allocated')")
  assert result.returncode == 1 and "MemoryError" in result.stderr
  start = time.monotonic()
  result = run("import signal\nfor s in (1, 2, 15, 24): signal.signal(s, signal.SIG_IGN)\nwhile True: pass", timeout_s=1.0)
  assert result.timed_out and result.returncode is None and time.monotonic() - start < 10
  start = time.monotonic()
  result = run("import sys\nchunk = 'z' * (1 << 20)\nfor _ in range(100): sys.stdout.write(chunk)", timeout_s=30)
  assert result.output_limited and time.monotonic() - start < 10
  assert "more output than allowed" in result.as_text() and len(result.stdout) < 10_000


def test_python_tool_reports_its_problems_as_tool_errors(monkeypatch):
  tool = python_tool(timeout_s=5)
  assert tool({"code": "print(6 * 7)"}) == "42\n"
  assert tool({"code": "raise ValueError('bad')"}).startswith("[exit code 1]")
  with pytest.raises(ToolError, match="program too long"):
    tool({"code": "#" * (2 << 20)})
  # Without isolation the tool refuses and says what to do, unless unsafe mode was chosen.
  monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
  sandbox.sandbox_problem.cache_clear()
  try:
    with pytest.raises(ToolError, match="bubblewrap .*isolation='unsafe'"):
      tool({"code": "print(1)"})
    with pytest.raises(sandbox.SandboxUnavailable, match="bubblewrap"):
      sandbox.require_sandbox()
    with pytest.warns(UserWarning, match="WITHOUT isolation"):
      sandbox._warn_unsafe.cache_clear()
      assert python_tool(isolation="unsafe")({"code": "print(6 * 7)"}) == "42\n"
  finally:
    sandbox.sandbox_problem.cache_clear()
  with pytest.raises(ValueError, match="isolation"):
    python_tool(isolation="none")
