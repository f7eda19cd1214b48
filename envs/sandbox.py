"""Run untrusted Python in a subprocess sandbox.

``await run_python(code, limits)`` runs ``code`` as ``main.py`` in a throw-away
working directory and returns a ``SandboxResult``; it never raises for what the
code does. Which isolation is in force depends on the machine; ``isolation()``
says, and is probed once per process:

``"namespaces"`` (root with working ``unshare``; the case on our machines):
    ``envs/sandbox_launcher.py`` runs inside new mount, network and PID
    namespaces, builds a new root on a tmpfs and chroots into it, then drops
    to a fresh unprivileged uid (no groups, ``no_new_privs``).

    * Files: the root is an empty read-only tmpfs holding only
      ``/usr``, ``/etc`` and the Python trees (``sys.base_prefix``,
      ``sys.prefix`` and their resolved paths: the installation and the venv)
      bound read-only, nosuid, at their own paths; ``/bin``, ``/sbin``,
      ``/lib*`` as the host's symlinks (or binds where they are directories);
      ``/dev/null``, ``/dev/zero``, ``/dev/random``, ``/dev/urandom``; a
      ``/proc`` of the sandbox's own PID namespace (its processes only; files
      such as ``/proc/meminfo`` still describe the host). The parents of the
      Python trees exist only as the path to them (with pyenv and the checkout
      in ``/work/main``: ``/root`` holds only ``.pyenv/versions/3.11.7``,
      ``/work/main`` only ``.venv``); the rest of the host (the checkout, other
      home directories, the host ``/tmp``) does not exist inside. Files in the
      visible trees that Unix permissions let "other" read are readable (e.g.
      ``/etc/passwd``); ``/etc/shadow`` (mode 640) is not. A Python or a
      checkout under ``/tmp`` works: its bind is made on top of the private
      ``/tmp``.
    * Working directory ``/sandbox`` and ``/tmp``: private size-limited tmpfs
      mounts, gone when the run ends.
    * Network: a fresh namespace with only loopback, down: every connect fails.
      The host's 127.0.0.1 is not reachable either.
    * Processes: ``RLIMIT_NPROC`` counts the fresh uid only, so a fork bomb
      stops at the limit; the PID namespace dies with its first process,
      which ``unshare --kill-child`` kills when we kill ``unshare``.

``"uid"`` (root, no usable ``unshare``): the child drops to a fresh uid in
    ``preexec_fn``; files are protected by Unix permissions only (world-readable
    files, including the repository, ARE readable); network is blocked by an
    in-process guard (``socket.socket`` replaced before ``main.py`` runs), which
    code can undo with ``ctypes``; resource limits as below.

``"rlimits"`` (not root): resource limits and the in-process network guard
    only; the code runs as our user and can read what we can.

In every mode: ``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_NPROC``, ``RLIMIT_FSIZE``,
``RLIMIT_NOFILE``, no core dumps; a wall-clock limit after which the whole
process group is killed; stdout and stderr are read merged, in chunks, and
the process is killed once more than ``max_output_bytes`` arrive (nothing
beyond the cap is buffered). ``RLIMIT_AS`` is per process, so the memory bound
of a run is ``memory_bytes * max_processes`` in the worst case.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")

_NET_GUARD = """\
import socket as _s
class _NoNet(_s.socket):
    def __init__(self, *a, **k):
        raise PermissionError("network access is disabled in the sandbox")
_s.socket = _NoNet
for _n in ("create_connection", "socketpair", "fromfd"):
    setattr(_s, _n, lambda *a, **k: (_ for _ in ()).throw(PermissionError("network access is disabled in the sandbox")))
del _s, _NoNet, _n
import runpy as _r
_r.run_path("main.py", run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0
    """Wall-clock limit; the process group is killed after it."""
    cpu_s: int = 5
    """``RLIMIT_CPU`` per process (SIGXCPU, then SIGKILL)."""
    memory_bytes: int = 1 << 30
    """``RLIMIT_AS`` per process."""
    max_processes: int = 16
    """``RLIMIT_NPROC`` for the sandbox uid (fresh per run in the ``namespaces`` and ``uid`` modes)."""
    max_output_bytes: int = 64_000
    """Merged stdout+stderr cap; the run is killed past it."""
    max_file_bytes: int = 16 << 20
    """``RLIMIT_FSIZE``: the largest file the code may write."""
    workdir_bytes: int = 64 << 20
    """Size of the ``/sandbox`` and ``/tmp`` tmpfs mounts (``namespaces`` mode)."""


@dataclass
class SandboxResult:
    output: str
    """Merged stdout and stderr, at most ``max_output_bytes`` (decoded with replacement)."""
    exit_code: int | None
    """Exit status; negative: killed by that signal."""
    error: str | None
    """Why the run failed (non-zero exit, signal, wall time, output cap); ``None`` on success."""

    @property
    def ok(self) -> bool:
        return self.error is None


_uid_counter = itertools.count()


def _fresh_uid() -> int:
    """An unused-looking uid per run, so ``RLIMIT_NPROC`` counts only this run's processes."""
    return 200_000 + (os.getpid() * 1_000 + next(_uid_counter)) % 1_000_000


@functools.cache
def isolation() -> str:
    """The isolation mode in force here: ``namespaces``, ``uid`` or ``rlimits`` (see module doc)."""
    if os.geteuid() != 0:
        return "rlimits"
    unshare = shutil.which("unshare")
    if unshare is not None:
        probe = subprocess.run(
            [unshare, "--mount", "--net", "--pid", "--fork", "--kill-child", "true"],
            capture_output=True,
            timeout=30,
        )
        if probe.returncode == 0:
            return "namespaces"
    return "uid"


def _python_paths() -> list[str]:
    """The trees the interpreter needs: its installation and venv, as named and resolved."""
    named = [sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix]
    resolved = [os.path.realpath(p) for p in named] + [os.path.dirname(os.path.realpath(sys.executable))]
    return list(dict.fromkeys(named + resolved))


def _outermost(paths: list[str]) -> list[str]:
    """``paths`` without those inside another (non-symlink) entry, which its bind already shows."""
    dirs = [q for q in paths if not os.path.islink(q)]
    return [p for p in dict.fromkeys(paths) if not any(p.startswith(q.rstrip("/") + "/") for q in dirs)]


def _rlimits(limits: SandboxLimits) -> dict[str, tuple[int, int]]:
    """(soft, hard) per limit; the CPU hard limit is one second later so SIGXCPU comes first."""
    return {
        "RLIMIT_CPU": (limits.cpu_s, limits.cpu_s + 1),
        "RLIMIT_AS": (limits.memory_bytes,) * 2,
        "RLIMIT_NPROC": (limits.max_processes,) * 2,
        "RLIMIT_FSIZE": (limits.max_file_bytes,) * 2,
        "RLIMIT_NOFILE": (256, 256),
        "RLIMIT_CORE": (0, 0),
    }


def _command(mode: str, workdir: Path, limits: SandboxLimits, uid: int) -> tuple[list[str], dict | None, object]:
    """(argv, env, preexec_fn) for the chosen mode."""
    if mode == "namespaces":
        inputs = workdir / "inputs"
        root = workdir / "root"
        root.mkdir()
        ro_paths = ["/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", *_python_paths()]
        config = {
            "root": str(root),
            "inputs": str(inputs),
            "ro_paths": _outermost(ro_paths),
            "uid": uid,
            "rlimits": _rlimits(limits),
            "tmp_bytes": limits.workdir_bytes,
            "workdir_bytes": limits.workdir_bytes,
            "python": sys.executable,
        }
        argv = [shutil.which("unshare") or "unshare", "--mount", "--net", "--pid", "--fork", "--kill-child"]
        argv += [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(config)]
        return argv, {"PATH": "/usr/bin:/bin"}, None

    rl = _rlimits(limits)

    def preexec() -> None:
        for name, (soft, hard) in rl.items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if mode == "uid":
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir / "inputs"), "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
    return [sys.executable, "-s", "-c", _NET_GUARD], env, preexec


async def _read_capped(stream: asyncio.StreamReader, cap: int, buf: bytearray) -> bool:
    """Append to ``buf`` until EOF or until more than ``cap`` bytes arrived (keeps ``cap``); True if over."""
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return False
        if len(buf) + len(chunk) > cap:
            buf += chunk[: cap - len(buf)]
            return True
        buf += chunk


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def run_python(
    code: str,
    limits: SandboxLimits = SandboxLimits(),
    files: dict[str, str] | None = None,
    mode: str | None = None,
) -> SandboxResult:
    """Run ``code`` as ``main.py`` (with extra ``files`` beside it) under ``limits``.

    ``mode`` forces a weaker isolation than ``isolation()`` (for tests); never a stronger one.
    """
    mode = mode or isolation()
    uid = _fresh_uid()
    workdir = Path(tempfile.mkdtemp(prefix="relay-sandbox-"))
    try:
        inputs = workdir / "inputs"
        inputs.mkdir()
        for name, content in {**(files or {}), "main.py": code}.items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"sandbox file names must be plain names, got {name!r}")
            (inputs / name).write_text(content)
        if mode == "uid":
            for p in (workdir, inputs, *inputs.iterdir()):
                os.chown(p, uid, uid)
        argv, env, preexec = _command(mode, workdir, limits, uid)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=inputs,
            env=env,
            preexec_fn=preexec,
            start_new_session=True,
        )
        buf = bytearray()
        over = timed_out = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.wall_s
        try:
            assert proc.stdout is not None
            over = await asyncio.wait_for(_read_capped(proc.stdout, limits.max_output_bytes, buf), limits.wall_s)
            if over:
                _kill_group(proc)
            await asyncio.wait_for(proc.wait(), max(0.1, deadline - loop.time()))
        except asyncio.TimeoutError:
            timed_out = True
        finally:
            # Always: the group goes (stragglers, a timeout, or our caller cancelling us).
            _kill_group(proc)
            exit_code = await proc.wait()
            # and its pipe transport with it, now (left to the GC, it complains about a closed loop)
            transport = getattr(proc, "_transport", None)
            if transport is not None:
                transport.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    output = bytes(buf).decode("utf-8", errors="replace")
    if mode == "namespaces" and exit_code is not None and exit_code > 128:
        exit_code = 128 - exit_code  # the launcher reports a signal death as 128 + signal
    if over:  # the cap fired first (waiting for the kill to land may still run past the wall time)
        error = f"output exceeded {limits.max_output_bytes} bytes (killed)"
    elif timed_out:
        error = f"wall-time limit of {limits.wall_s:g} s exceeded (killed)"
    elif exit_code == -signal.SIGXCPU:
        error = f"CPU-time limit of {limits.cpu_s} s exceeded"
    elif exit_code and exit_code < 0:
        error = f"killed by signal {signal.Signals(-exit_code).name}"
    elif exit_code:
        error = f"exit status {exit_code}"
    else:
        error = None
    return SandboxResult(output=output, exit_code=exit_code, error=error)

