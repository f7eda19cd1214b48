"""Sandbox launcher: runs as root inside fresh mount, network and PID namespaces.

Started by ``envs.sandbox`` as ``unshare --mount --net --pid --fork --kill-child
python -I -S sandbox_launcher.py`` with a connected Unix socket as stdin (the
*control socket*). Standard library only (it runs before any isolation is in
place and must not import the project).

1. It reads one JSON line from the control socket: the configuration and the
   input files (nothing is written to the host file system).
2. It resolves every tree to expose (``/usr``, ``/etc``, the Python
   installation and venv) to an ``O_PATH`` descriptor *before* mounting
   anything, so no later mount can hide a source (a venv under ``/tmp`` stays
   reachable), and creates the sandbox's cgroups (memory and process limits
   for the whole sandbox) when the caller asks for them.
3. It builds the new root on a tmpfs mounted over ``/tmp`` of its private mount
   namespace: ``/tmp`` and ``/sandbox`` (size-limited tmpfs, owned by the
   sandbox uid), then read-only, nosuid binds of the trees at their own paths
   (on top of the private ``/tmp`` where they live under it), ``/bin``,
   ``/lib``... as the same symlinks, ``/dev/{null,zero,random,urandom}``, a
   fresh ``/proc`` (this PID namespace only), the input files in ``/sandbox``.
   Then it chroots.
4. It forks the program: the child joins the cgroups, sets the resource limits,
   closes every descriptor above 2, drops every privilege (a fresh uid/gid, no
   supplementary groups, ``no_new_privs``) and execs Python on ``main.py``.
5. As PID 1 of the namespace it reaps orphans and watches two things: the
   program, and the control socket, which reads end-of-file when the caller
   closes its end or dies, however it dies. Either way it kills every process
   of the namespace (``kill(-1, SIGKILL)`` until none is left), removes the
   cgroups, writes one JSON line of statistics back on the control socket
   (``exit_code``, peak memory, OOM kills, peak processes) and exits with the
   program's status (``128 + signal`` for a signal death).

The network namespace has only a loopback device, which is down.
"""

import ctypes
import json
import os
import resource
import select
import signal
import socket
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38
STAGE = "/tmp"  # the new root is built on a tmpfs mounted here (private mount namespace)
HIDDEN = ("/", "/tmp", "/sandbox", "/proc", "/dev")  # never exposed from the host

libc = ctypes.CDLL(None, use_errno=True)


def mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} -> {target}: {os.strerror(err)}")


def read_config(ctrl):
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = ctrl.recv(1 << 16)
        if not chunk:
            raise SystemExit("sandbox launcher: control socket closed before the configuration arrived")
        buf += chunk
    return json.loads(buf)


def open_sources(paths):
    """[(path, ("link", target) | ("dir"|"file", O_PATH fd))], parents first, opened before any mount."""
    out = []
    for path in sorted(paths, key=lambda p: p.rstrip("/").count("/")):
        if os.path.normpath(path) in HIDDEN:
            raise ValueError(f"cannot expose {path!r} inside the sandbox (the Python installation must live below it)")
        if os.path.islink(path):
            out.append((path, ("link", os.readlink(path))))
        elif os.path.exists(path):
            kind = "dir" if os.path.isdir(path) else "file"
            out.append((path, (kind, os.open(path, os.O_PATH | os.O_CLOEXEC))))
    return out


def bind(root, path, source, flags=MS_RDONLY | MS_NOSUID | MS_NODEV):
    target = root + path
    kind, ref = source
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if kind == "link":
        if not os.path.lexists(target):
            os.symlink(ref, target)
        return
    if kind == "dir":
        os.makedirs(target, exist_ok=True)
    elif not os.path.exists(target):
        open(target, "a").close()
    mount(f"/proc/self/fd/{ref}", target, None, MS_BIND | MS_REC)
    mount(None, target, None, MS_BIND | MS_REMOUNT | flags)
    os.close(ref)


class Cgroup:
    """One cgroup directory the launcher creates, fills with the program and removes."""

    def __init__(self, spec):
        self.path = spec["path"]
        parent, self.name = os.path.split(self.path)
        self.parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.mkdir(self.name, dir_fd=self.parent_fd)
        except FileExistsError:  # left by a launcher that was killed outright; its uid lock is free, so it is unused
            os.rmdir(self.name, dir_fd=self.parent_fd)
            os.mkdir(self.name, dir_fd=self.parent_fd)
        self.fd = os.open(self.name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.parent_fd)
        for name, value, required in spec["settings"]:
            try:
                self.write(name, value)
            except OSError:
                if required:
                    raise
        self.stats = spec["stats"]

    def write(self, name, value):
        fd = os.open(name, os.O_WRONLY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)

    def read_stats(self):
        out = {}
        for key, name, field in self.stats:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.fd)
                try:
                    text = os.read(fd, 1 << 16).decode()
                finally:
                    os.close(fd)
            except OSError:
                continue
            if field is None:
                out[key] = int(text.split()[0])
            else:
                for line in text.splitlines():
                    parts = line.split()
                    if len(parts) == 2 and parts[0] == field:
                        out[key] = int(parts[1])
        return out

    def remove(self):
        os.close(self.fd)
        try:
            os.rmdir(self.name, dir_fd=self.parent_fd)
        except FileNotFoundError:
            pass
        os.close(self.parent_fd)


def main():
    ctrl = socket.socket(fileno=os.dup(0))
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    cfg = read_config(ctrl)
    os.set_inheritable(cfg["lock_fd"], False)  # the uid lock stays with the launcher, never the program
    uid = cfg["uid"]

    mount(None, "/", None, MS_REC | MS_PRIVATE)
    sources = open_sources(cfg["ro_paths"])
    devices = open_sources(["/dev/" + d for d in ("null", "zero", "random", "urandom")])
    cgroups = [Cgroup(spec) for spec in cfg["cgroups"]]

    root = STAGE
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for path, size in (("/tmp", cfg["tmp_bytes"]), ("/sandbox", cfg["workdir_bytes"])):
        os.makedirs(root + path)
        mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=700,uid={uid},gid={uid}")
    for path, source in sources:
        bind(root, path, source)
    for path, source in devices:
        bind(root, path, source, flags=MS_RDONLY | MS_NOSUID)  # device nodes need dev
    os.makedirs(root + "/proc")
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV)
    for name, content in cfg["files"].items():
        dst = root + "/sandbox/" + name
        with open(dst, "w") as f:
            f.write(content)
        os.chown(dst, uid, uid)
    mount(None, root, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(root)
    os.chdir("/sandbox")

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    pid = os.fork()
    if pid == 0:
        run_program(cfg, uid, cgroups)
    status = supervise(pid, ctrl, wake_r)
    kill_everything()
    stats = {"exit_code": status}
    for cg in cgroups:
        stats.update(cg.read_stats())
        cg.remove()
    try:
        ctrl.sendall(json.dumps(stats).encode() + b"\n")
    except OSError:
        pass  # the caller is gone
    sys.exit(128 - status if status is not None and status < 0 else (status if status is not None else 128 + 9))


def supervise(pid, ctrl, wake_r):
    """Reap children until the program exits (its exit code; ``-signal`` for a signal death) or
    the control socket reads end-of-file (``None``: the caller closed it or died)."""
    poller = select.poll()
    poller.register(ctrl, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        while True:
            try:
                done, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return None  # cannot happen while the program lives; be safe
            if done == 0:
                break
            if done == pid:
                return -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
        for fd, _ in poller.poll():
            if fd == wake_r:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                continue
            try:
                data = ctrl.recv(4096)
            except OSError:
                data = b""
            if not data:
                return None


def kill_everything():
    """SIGKILL every other process of the namespace and reap them all (a fork in flight may
    escape one round, so repeat until none is left)."""
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            while os.waitpid(-1, 0):
                pass
        except ChildProcessError:
            return


def run_program(cfg, uid, cgroups):
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for cg in cgroups:
            cg.write("cgroup.procs", 0)  # 0 = this process; its children inherit the cgroup
        for name, (soft, hard) in cfg["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
        os.closerange(3, 1 << 16)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/sandbox",
            "TMPDIR": "/tmp",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        python = cfg["python"]
        os.execve(python, [python, "-s", "main.py"], env)
    except BaseException as e:  # noqa: BLE001  report why, then the status below
        try:
            os.write(2, f"sandbox launcher: cannot start the program: {type(e).__name__}: {e}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(127)  # only reached when something above failed


if __name__ == "__main__":
    main()
