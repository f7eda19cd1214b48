"""Run untrusted Python in a subprocess sandbox.

``await run_python(code, limits)`` runs ``code`` as ``main.py`` in a throw-away
working directory and returns a ``SandboxResult``; it never raises for what the
code does. Which isolation is in force depends on the machine; ``isolation()``
says, and is probed once per process:

``"namespaces"`` (root with working ``unshare``; the case on our machines):
    ``envs/sandbox_launcher.py`` runs inside new mount, network and PID
    namespaces, builds a new root on a tmpfs and chroots into it, then drops
    to a fresh unprivileged uid (no groups, ``no_new_privs``). Its inputs
    travel over a socket: nothing is written to the host file system.

    * Files: the root is a read-only tmpfs holding only ``/usr``, ``/etc``
      and the Python trees (``sys.base_prefix``, ``sys.prefix`` and their
      resolved paths: the installation and the venv) bound read-only,
      nosuid, at their own paths; ``/bin``, ``/sbin``, ``/lib*`` as the
      host's symlinks (or binds where they are directories);
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
    * Memory and processes of the WHOLE sandbox: a cgroup per run (see
      ``resource_control()``): cgroup v2 (``memory.max``, ``memory.swap.max=0``,
      ``pids.max``) where the caller's cgroup, or the directory named by
      ``$RELAY_SANDBOX_CGROUP``, has the memory and pids controllers enabled
      for its children; else cgroup v1 (``memory.limit_in_bytes`` and
      ``memory.memsw.limit_in_bytes``, ``pids.max``) under the caller's own
      v1 cgroups; each controller independently. Where no cgroup can be made
      (not root, read-only ``/sys/fs/cgroup``), only the per-process limits
      below hold: ``RLIMIT_AS`` bounds each process, ``RLIMIT_NPROC`` their
      number, so the worst case is ``memory_bytes * max_processes``. Going over
      the memory limit gets a process of the sandbox OOM-killed; the result
      says so (``oom_kills``) and gives the peak (``peak_memory_bytes``).
    * Lifetime: the launcher is PID 1 of the sandbox and holds a socket to the
      caller; when the caller closes it, or dies however it dies (SIGKILL
      included), PID 1 kills every process of the sandbox, removes the
      cgroups and exits, which ends the PID namespace. A caller that forks
      (without exec) while a sandbox runs hands that socket to the child too,
      and the sandbox then lives until both are gone or its wall time ends.
    * Uids: each run holds a uid of its own, ``UID_BASE`` up, locked with an
      abstract Unix socket named after it (released by the kernel when the
      holders die; the launcher holds it until its processes are gone), so
      two live sandboxes on a host never share a uid or ``RLIMIT_NPROC``.

``"uid"`` (root, no usable ``unshare``): the child drops to a fresh (locked)
    uid in ``preexec_fn``, so the Python installation and venv must be
    readable by other users (a pyenv under a mode-700 ``/root`` is not:
    every run then fails with ``PermissionError``); files are protected by
    Unix permissions only (world-readable files, including the repository,
    ARE readable); network is
    blocked by an in-process guard (``socket.socket`` replaced before
    ``main.py`` runs), which code can undo with ``ctypes``; resource limits
    per process only, as below; inputs in a ``/tmp`` directory the caller
    removes. The program gets ``PR_SET_PDEATHSIG`` (SIGKILL when the calling
    thread dies), but a caller killed by SIGKILL leaves any children the
    program forked behind, and the directory until the next process that runs
    a sandbox in these modes sweeps it (``sweep_stale_workdirs``).

``"rlimits"`` (not root): resource limits per process, the in-process
    network guard and ``PR_SET_PDEATHSIG`` only, with the same leftovers as
    ``"uid"``; the code runs as our user and can read what we can.

In every mode: ``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_NPROC``, ``RLIMIT_FSIZE``,
``RLIMIT_NOFILE``, no core dumps; a wall-clock limit after which every process
of the run is killed; stdout and stderr are read merged, in chunks, and the
run is killed once more than ``max_output_bytes`` arrive (nothing beyond the
cap is buffered).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")

UID_BASE = 200_000
"""Sandbox uids are ``UID_BASE .. UID_BASE + UID_COUNT - 1``."""
UID_COUNT = 1_000_000

STOP_GRACE_S = 10.0
"""After the caller closes the control socket, how long the launcher gets to kill, reap and
report before its whole process group is SIGKILLed."""

CGROUP_ENV = "RELAY_SANDBOX_CGROUP"
"""Environment variable: a delegated cgroup v2 directory to create the sandboxes' cgroups in."""

CGROUP_PREFIX = "relay-sandbox-"

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
    """Wall-clock limit; every process of the run is killed after it."""
    cpu_s: int = 5
    """``RLIMIT_CPU`` per process (SIGXCPU, then SIGKILL)."""
    memory_bytes: int = 1 << 30
    """Memory of the whole sandbox (cgroup, where one can be made; see ``resource_control()``) and
    ``RLIMIT_AS`` of each of its processes."""
    max_processes: int = 16
    """Processes of the whole sandbox (cgroup ``pids.max``, where one can be made) and ``RLIMIT_NPROC``
    of its uid (a uid of its own per run in the ``namespaces`` and ``uid`` modes)."""
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
    """Why the run failed (non-zero exit, signal, memory, wall time, output cap); ``None`` on success."""
    peak_memory_bytes: int | None = None
    """Most memory the whole sandbox used at once (its memory cgroup); ``None`` without one."""
    oom_kills: int | None = None
    """Processes of the sandbox killed for going over ``memory_bytes``; ``None`` without a memory cgroup."""
    peak_processes: int | None = None
    """Most processes the sandbox had at once (its pids cgroup, where the kernel reports it)."""

    @property
    def ok(self) -> bool:
        return self.error is None


# ----------------------------------------------------------------------------- uids


class UidLock:
    """A sandbox uid no other live sandbox on this host holds.

    The lock is an abstract Unix socket bound to ``relay-sandbox-uid-<uid>``: binding fails while
    anyone holds it, and the kernel releases it when the last process holding the socket exits
    (pass ``fileno()`` to a child to extend the hold to it). Abstract names are per network
    namespace: callers in other network namespaces (containers) are not seen.
    """

    def __init__(self, start: int | None = None, attempts: int = 10_000) -> None:
        offset = random.randrange(UID_COUNT) if start is None else (start - UID_BASE) % UID_COUNT
        for i in range(attempts):
            uid = UID_BASE + (offset + i) % UID_COUNT
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(f"\0relay-sandbox-uid-{uid}")
            except OSError:
                sock.close()
                continue
            self.uid, self._sock = uid, sock
            return
        raise RuntimeError(f"no free sandbox uid after {attempts} attempts from {UID_BASE + offset}")

    def fileno(self) -> int:
        return self._sock.fileno()

    def release(self) -> None:
        self._sock.close()

    def __enter__(self) -> UidLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ----------------------------------------------------------------------------- cgroups


def _unescape(field: str) -> str:
    """``/proc/self/mountinfo`` escapes space, tab, newline and backslash as octal."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def _own_cgroups() -> list[tuple[int, set[str], str]]:
    """(version, controllers, directory) of this process's cgroups, from mountinfo and /proc/self/cgroup."""
    mounts: list[tuple[str, set[str], str, str]] = []  # (fstype, controllers, root, mount point)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
                continue
            opts = set(tail[2].split(","))
            mounts.append((tail[0], opts, _unescape(fields[3]), _unescape(fields[4])))
    out = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            for fstype, opts, root, point in mounts:
                if hid == "0" and fstype == "cgroup2":
                    version, names = 2, set()
                elif hid != "0" and fstype == "cgroup" and set(controllers.split(",")) <= opts:
                    version, names = 1, set(controllers.split(","))
                else:
                    continue
                if root != "/" and not (path == root or path.startswith(root.rstrip("/") + "/")):
                    continue
                rel = path[len(root):] if root != "/" else path
                out.append((version, names, point.rstrip("/") + rel.rstrip("/")))
                break
    return out


def _v2_parent(directory: str) -> set[str]:
    """The controllers (of memory, pids) children of ``directory`` get; enables them where allowed."""
    try:
        enabled = set(Path(directory, "cgroup.subtree_control").read_text().split())
        available = set(Path(directory, "cgroup.controllers").read_text().split())
    except OSError:
        return set()
    for name in ({"memory", "pids"} & available) - enabled:
        try:
            Path(directory, "cgroup.subtree_control").write_text(f"+{name}")
            enabled.add(name)
        except OSError:  # EBUSY: the cgroup has processes of its own (only the root may)
            pass
    return enabled & {"memory", "pids"}


def _try_child(directory: str, needed: list[str]) -> bool:
    probe = Path(directory, f"{CGROUP_PREFIX}probe-{os.getpid()}")
    try:
        probe.mkdir()
    except OSError:
        return False
    try:
        return all((probe / name).exists() for name in needed)
    finally:
        try:
            probe.rmdir()
        except OSError:
            pass


@functools.cache
def _cgroup_parents() -> dict[str, tuple[int, str]]:
    """{"memory" | "pids": (version, parent directory)} for the controllers a sandbox cgroup can use."""
    if os.geteuid() != 0 and not os.environ.get(CGROUP_ENV):
        return {}
    found: dict[str, tuple[int, str]] = {}
    candidates: list[tuple[int, set[str], str]] = []
    if os.environ.get(CGROUP_ENV):
        candidates.append((2, set(), os.environ[CGROUP_ENV]))
    try:
        candidates += sorted(_own_cgroups(), key=lambda c: -c[0])  # v2 first
    except OSError:
        pass
    needs = {"memory": {1: "memory.limit_in_bytes", 2: "memory.max"}, "pids": {1: "pids.max", 2: "pids.max"}}
    for version, controllers, directory in candidates:
        offered = _v2_parent(directory) if version == 2 else controllers & {"memory", "pids"}
        for name in sorted(offered - set(found)):
            if _try_child(directory, [needs[name][version]]):
                found[name] = (version, directory)
    for directory in {d for _, d in found.values()}:
        _sweep_stale(directory)
    return found


def _sweep_stale(directory: str) -> None:
    """Remove the empty cgroups of sandboxes whose launcher was killed outright (their uid is free)."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(CGROUP_PREFIX) and n[len(CGROUP_PREFIX):].isdigit()]
    except OSError:
        return
    for name in names:
        try:
            lock = UidLock(start=int(name[len(CGROUP_PREFIX):]), attempts=1)
        except RuntimeError:
            continue  # a live sandbox holds that uid
        with lock:
            if str(lock.uid) != name[len(CGROUP_PREFIX):]:
                continue  # not a uid of ours
            try:
                os.rmdir(os.path.join(directory, name))
            except OSError:
                pass


def resource_control() -> dict[str, str]:
    """How the whole sandbox is held (``namespaces`` mode): {"memory": ..., "processes": ...}, each
    ``"cgroup v1 <dir>"``, ``"cgroup v2 <dir>"`` or ``"rlimit per process"`` (see module doc)."""
    parents = _cgroup_parents() if isolation() == "namespaces" else {}
    out = {}
    for key, name in (("memory", "memory"), ("processes", "pids")):
        if name in parents:
            version, directory = parents[name]
            out[key] = f"cgroup v{version} {directory}"
        else:
            out[key] = "rlimit per process"
    return out


def _cgroup_specs(uid: int, limits: SandboxLimits) -> list[dict]:
    """What the launcher creates: per cgroup its path, [file, value, required] settings and
    [stat key, file, field or None] statistics."""
    parents = _cgroup_parents()
    name = f"{CGROUP_PREFIX}{uid}"
    by_dir: dict[str, dict] = {}
    for controller, (version, directory) in sorted(parents.items()):
        spec = by_dir.setdefault(directory, {"path": os.path.join(directory, name), "settings": [], "stats": []})
        mem, nproc = limits.memory_bytes, limits.max_processes
        if controller == "memory" and version == 2:
            spec["settings"] += [["memory.max", mem, True], ["memory.swap.max", 0, False]]
            spec["stats"] += [["peak_memory_bytes", "memory.peak", None], ["oom_kills", "memory.events", "oom_kill"]]
        elif controller == "memory":
            spec["settings"] += [["memory.limit_in_bytes", mem, True], ["memory.memsw.limit_in_bytes", mem, False]]
            spec["stats"] += [["peak_memory_bytes", "memory.max_usage_in_bytes", None],
                              ["oom_kills", "memory.oom_control", "oom_kill"]]
        else:
            spec["settings"] += [["pids.max", nproc, True]]
            spec["stats"] += [["peak_processes", "pids.peak", None]]
    return list(by_dir.values())


def _remove_cgroups(specs: list[dict]) -> None:
    """Backstop for a launcher that was killed outright: remove what it left (empty once its namespace is gone)."""
    for spec in specs:
        for attempt in range(20):
            try:
                os.rmdir(spec["path"])
            except FileNotFoundError:
                break
            except OSError:  # EBUSY: its last processes are still exiting
                time.sleep(0.05)
            else:
                break


# ----------------------------------------------------------------------------- modes


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


async def _finish(proc: asyncio.subprocess.Process, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``proc`` to exit, discarding the rest of its output (``wait()``
    returns only once its stdout reached end-of-file, and a full pipe would keep a writer alive)."""

    async def drain() -> None:
        assert proc.stdout is not None
        while await proc.stdout.read(65536):
            pass

    try:
        await asyncio.wait_for(asyncio.gather(drain(), proc.wait()), timeout_s)
        return True
    except asyncio.TimeoutError:
        return False


def _close_transport(proc: asyncio.subprocess.Process) -> None:
    # the pipe transport goes now (left to the GC, it complains about a closed loop)
    transport = getattr(proc, "_transport", None)
    if transport is not None:
        transport.close()


PR_SET_PDEATHSIG = 1


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check_files(files: dict[str, str]) -> None:
    for name in files:
        if "/" in name or name.startswith(".") or not name:
            raise ValueError(f"sandbox file names must be plain names, got {name!r}")


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
    all_files = {**(files or {}), "main.py": code}
    _check_files(all_files)
    with UidLock() as lock:
        if mode == "namespaces":
            return await _run_in_namespaces(all_files, limits, lock)
        return await _run_plain(all_files, limits, lock.uid, mode)


async def _run_in_namespaces(files: dict[str, str], limits: SandboxLimits, lock: UidLock) -> SandboxResult:
    cgroups = _cgroup_specs(lock.uid, limits)
    config = {
        "ro_paths": _outermost(["/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", *_python_paths()]),
        "uid": lock.uid,
        "lock_fd": lock.fileno(),
        "rlimits": _rlimits(limits),
        "tmp_bytes": limits.workdir_bytes,
        "workdir_bytes": limits.workdir_bytes,
        "python": sys.executable,
        "cgroups": cgroups,
        "files": files,
    }
    argv = [shutil.which("unshare") or "unshare", "--mount", "--net", "--pid", "--fork", "--kill-child"]
    argv += [sys.executable, "-I", "-S", str(LAUNCHER)]
    ours, theirs = socket.socketpair()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=theirs,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
            pass_fds=(lock.fileno(),),
            start_new_session=True,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    loop = asyncio.get_running_loop()
    ours.setblocking(False)
    buf = bytearray()
    over = timed_out = False
    stats: dict = {}

    async def exchange() -> bool:
        try:
            await loop.sock_sendall(ours, json.dumps(config).encode() + b"\n")
        except OSError:
            pass  # the launcher died early; its output says why
        assert proc.stdout is not None
        return await _read_capped(proc.stdout, limits.max_output_bytes, buf)

    deadline = loop.time() + limits.wall_s
    try:
        try:
            over = await asyncio.wait_for(exchange(), limits.wall_s)
            if not over:
                await asyncio.wait_for(proc.wait(), max(0.1, deadline - loop.time()))
        except asyncio.TimeoutError:
            timed_out = True
        finally:
            # Always (done, over a limit, or our caller cancelling us): end-of-file on the control
            # socket makes the launcher kill the whole sandbox, remove its cgroups and report.
            try:
                ours.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            try:
                if not await _finish(proc, STOP_GRACE_S):
                    _kill_group(proc)
                    await _finish(proc, STOP_GRACE_S)
            finally:
                if proc.returncode is None:
                    _kill_group(proc)
                stats = _read_stats(ours)
                ours.close()
                _close_transport(proc)
                if "exit_code" not in stats:
                    _remove_cgroups(cgroups)
    finally:
        ours.close()
    exit_code = stats.get("exit_code", _launcher_status(proc.returncode))
    return SandboxResult(
        output=bytes(buf).decode("utf-8", errors="replace"),
        exit_code=exit_code,
        error=_error(limits, exit_code, over, timed_out, stats.get("oom_kills")),
        peak_memory_bytes=stats.get("peak_memory_bytes"),
        oom_kills=stats.get("oom_kills"),
        peak_processes=stats.get("peak_processes"),
    )


def _read_stats(sock: socket.socket) -> dict:
    """The launcher's last line on the control socket (written before it exited), or {}."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        data += chunk
    lines = bytes(data).strip().splitlines()
    try:
        stats = json.loads(lines[-1]) if lines else {}
    except ValueError:
        return {}
    return stats if isinstance(stats, dict) else {}


def _launcher_status(code: int | None) -> int | None:
    """The launcher reports a signal death of the program as 128 + signal."""
    return 128 - code if code is not None and code > 128 else code


def sweep_stale_workdirs(tmp: str | None = None) -> int:
    """Remove the ``uid``/``rlimits``-mode working directories of callers that died (SIGKILL) without
    removing them (named ``relay-sandbox-<caller pid>-*``); how many were removed."""
    tmp = tmp or tempfile.gettempdir()
    removed = 0
    try:
        names = os.listdir(tmp)
    except OSError:
        return 0
    for name in names:
        parts = name.split("-")
        if len(parts) < 4 or parts[:2] != ["relay", "sandbox"] or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
            continue  # its caller lives (or the pid was reused): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
        removed += 1
    return removed


_swept = False


async def _run_plain(files: dict[str, str], limits: SandboxLimits, uid: int, mode: str) -> SandboxResult:
    global _swept
    if not _swept:  # once per process: leftovers of callers killed before they could clean up
        _swept = True
        sweep_stale_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=f"relay-sandbox-{os.getpid()}-"))
    try:
        inputs = workdir / "inputs"
        inputs.mkdir()
        for name, content in files.items():
            (inputs / name).write_text(content)
        if mode == "uid":
            for p in (workdir, inputs, *inputs.iterdir()):
                os.chown(p, uid, uid)
        rl = _rlimits(limits)
        caller = os.getpid()

        def preexec() -> None:
            for name, (soft, hard) in rl.items():
                resource.setrlimit(getattr(resource, name), (soft, hard))
            if mode == "uid":
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            # after setuid, which clears it: the program (not its children) dies with our thread
            _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != caller:
                os._exit(137)

        env = {"PATH": "/usr/bin:/bin", "HOME": str(inputs), "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-s", "-c", _NET_GUARD,
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
            if not over:
                await asyncio.wait_for(proc.wait(), max(0.1, deadline - loop.time()))
        except asyncio.TimeoutError:
            timed_out = True
        finally:
            # Always: the group goes (stragglers, a timeout, or our caller cancelling us).
            _kill_group(proc)
            await _finish(proc, STOP_GRACE_S)
            exit_code = proc.returncode
            _close_transport(proc)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    output = bytes(buf).decode("utf-8", errors="replace")
    return SandboxResult(output=output, exit_code=exit_code, error=_error(limits, exit_code, over, timed_out, None))


def _error(limits: SandboxLimits, exit_code: int | None, over: bool, timed_out: bool, oom_kills: int | None) -> str | None:
    if over:  # the cap fired first (waiting for the kill to land may still run past the wall time)
        return f"output exceeded {limits.max_output_bytes} bytes (killed)"
    if timed_out:
        return f"wall-time limit of {limits.wall_s:g} s exceeded (killed)"
    if exit_code == -signal.SIGXCPU:
        return f"CPU-time limit of {limits.cpu_s} s exceeded"
    if exit_code and oom_kills:
        return (f"memory limit of {limits.memory_bytes} bytes for the whole sandbox exceeded "
                f"({oom_kills} process(es) killed; exit status {exit_code})")
    if exit_code and exit_code < 0:
        return f"killed by signal {signal.Signals(-exit_code).name}"
    if exit_code:
        return f"exit status {exit_code}"
    if exit_code is None:
        return "the sandbox ended without reporting the program's status"
    return None
