"""Sandbox launcher: runs as root inside fresh mount, network and PID namespaces.

Started by ``envs.sandbox`` as ``unshare --mount --net --pid --fork --kill-child
python -I -S sandbox_launcher.py CONFIG_JSON``. Standard library only (it runs
before any isolation is in place and must not import the project).

It builds a new root on a tmpfs: read-only, nosuid binds of ``/usr``, ``/etc``
and the Python installation (``sys.base_prefix``, ``sys.prefix``); ``/bin``,
``/lib``... as the same symlinks; ``/dev/{null,zero,random,urandom}``; a fresh
``/proc`` (this PID namespace only); a size-limited tmpfs ``/tmp``; the working
directory ``/sandbox`` on its own size-limited tmpfs, filled with the input
files. Then it chroots; the child sets the resource limits, drops every privilege
(a fresh uid/gid with no supplementary groups, ``no_new_privs``) and execs Python on
``main.py``. The network namespace has only a loopback device, which is down.
"""

import ctypes
import json
import os
import resource
import shutil
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38

libc = ctypes.CDLL(None, use_errno=True)


def mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} -> {target}: {os.strerror(err)}")


def bind_ro(root, path):
    target = root + path
    if os.path.islink(path):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(os.readlink(path), target)
        return
    if not os.path.exists(path):
        return
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    mount(path, target, None, MS_BIND | MS_REC)
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def main():
    cfg = json.loads(sys.argv[1])
    root = cfg["root"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    uid = cfg["uid"]
    # The private tmpfs mounts first: a Python installation or checkout under /tmp is then bound
    # on top of the fresh /tmp instead of being hidden by it.
    for path, size in (("/tmp", cfg["tmp_bytes"]), ("/sandbox", cfg["workdir_bytes"])):
        os.makedirs(root + path, exist_ok=True)
        mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=700,uid={uid},gid={uid}")
    for path in sorted(cfg["ro_paths"], key=lambda p: p.count("/")):
        if path in ("/", "/tmp", "/sandbox", "/proc", "/dev"):
            raise ValueError(f"cannot expose {path!r} read-only inside the sandbox (the Python installation must live below it)")
        bind_ro(root, path)
    for dev in ("null", "zero", "random", "urandom"):
        bind_ro(root, "/dev/" + dev)
    # bind_ro sets nodev on device binds; remount those without it so they work.
    for dev in ("null", "zero", "random", "urandom"):
        mount(None, root + "/dev/" + dev, None, MS_BIND | MS_REMOUNT | MS_NOSUID)
    os.makedirs(root + "/proc")
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV)
    for name in os.listdir(cfg["inputs"]):
        dst = root + "/sandbox/" + name
        shutil.copyfile(os.path.join(cfg["inputs"], name), dst)
        os.chown(dst, uid, uid)
    mount(None, root, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)

    os.chroot(root)
    os.chdir("/sandbox")
    pid = os.fork()
    if pid == 0:
        drop_privileges_and_exec(cfg, uid)
    # PID 1 of the namespace (root, inside the chroot): reap orphans until the
    # program exits, then exit, which kills everything left in the namespace.
    # A signal death is reported as exit status 128 + signal number.
    while True:
        done, status = os.wait()
        if done == pid:
            break
    sys.exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def drop_privileges_and_exec(cfg, uid):
    try:
        for name, (soft, hard) in cfg["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
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
    finally:
        os._exit(127)  # only reached when something above failed

if __name__ == "__main__":
    main()
