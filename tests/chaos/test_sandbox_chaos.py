"""The sandbox under attack and under a dying caller: real processes, real cgroups, real SIGKILL.

Each test asserts a number: memory held by a fork-and-allocate program against the
sandbox's total limit, processes and directories left behind after the caller is
SIGKILLed, uids shared by concurrent sandboxes.
"""

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from envs.sandbox import (
    CGROUP_PREFIX,
    UID_BASE,
    SandboxLimits,
    UidLock,
    _cgroup_parents,
    isolation,
    resource_control,
    run_python,
    sweep_stale_workdirs,
)

REPO = Path(__file__).resolve().parents[2]
NAMESPACES = isolation() == "namespaces"
needs_namespaces = pytest.mark.skipif(not NAMESPACES, reason=f"isolation here is {isolation()!r}, not 'namespaces'")
CGROUPS = resource_control() if NAMESPACES else {}
needs_memory_cgroup = pytest.mark.skipif(
    not CGROUPS.get("memory", "").startswith("cgroup"), reason=f"no memory cgroup for sandboxes here: {CGROUPS}"
)
needs_pids_cgroup = pytest.mark.skipif(
    not CGROUPS.get("processes", "").startswith("cgroup"), reason=f"no pids cgroup for sandboxes here: {CGROUPS}"
)

FORK_AND_ALLOCATE = """
import os
N, SIZE = 4, 800 << 20
go_r, go_w = os.pipe()
kids = []
for i in range(N):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.close(go_w)
        b = bytearray(SIZE)
        b[::4096] = b"\\x01" * len(range(0, SIZE, 4096))  # touch every page
        os.write(w, b"r")
        os.read(go_r, 1)  # hold it until the parent has heard from every child
        os._exit(0)
    os.close(w)
    kids.append((pid, r))
ready = [os.read(r, 1) == b"r" for pid, r in kids]  # end-of-file: that child died first
# every child still alive now holds its 800 MB at this same moment
holding = sum(1 for (pid, _), ok in zip(kids, ready) if ok and os.waitpid(pid, os.WNOHANG) == (0, 0))
os.close(go_w)
statuses = [os.waitpid(pid, 0)[1] for pid, _ in kids]
print("holding", holding, "killed", sum(os.WIFSIGNALED(s) for s in statuses))
"""


@needs_namespaces
@needs_memory_cgroup
def test_fork_and_allocate_is_held_to_the_total_memory_limit():
    """Four children of 800 MB under a 1 GiB limit (RLIMIT_AS alone let them use 2.9 GiB)."""
    limit = 1 << 30
    r = asyncio.run(run_python(FORK_AND_ALLOCATE, SandboxLimits(wall_s=120, cpu_s=60, memory_bytes=limit, max_processes=16)))
    assert r.ok, (r.error, r.output)
    words = r.output.split()
    holding, killed = int(words[1]), int(words[3])
    assert holding <= 1  # 2 x 800 MB > 1 GiB
    assert holding + killed == 4
    assert r.oom_kills == killed >= 3
    assert r.peak_memory_bytes is not None and r.peak_memory_bytes <= limit


@needs_namespaces
@needs_memory_cgroup
def test_oom_of_the_program_itself_is_reported_as_the_memory_limit():
    code = "import os\nchunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n    chunks[-1][::4096] = b'x' * (16384)\n    if len(chunks) == 4:\n        os.fork()"
    r = asyncio.run(run_python(code, SandboxLimits(wall_s=60, cpu_s=30, memory_bytes=512 << 20, max_processes=8)))
    assert r.error and "memory limit of 536870912 bytes for the whole sandbox exceeded" in r.error, (r.error, r.output[-500:])
    assert r.oom_kills >= 1 and r.peak_memory_bytes <= 512 << 20


@needs_namespaces
@needs_pids_cgroup
def test_fork_bomb_is_held_to_the_process_limit():
    r = asyncio.run(run_python("import os\nwhile True:\n    os.fork()", SandboxLimits(wall_s=20, cpu_s=5, max_processes=8)))
    assert r.error
    if r.peak_processes is not None:  # pids.peak: kernels >= 6.1
        assert 1 < r.peak_processes <= 8


def test_uids_are_unique_while_held_across_processes():
    start = UID_BASE + 4242
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from envs.sandbox import UidLock\nl = UidLock(start={start})\nprint(l.uid, flush=True)\ninput()"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        held = int(holder.stdout.readline())
        with UidLock(start=held) as a, UidLock(start=held) as b:
            assert len({held, a.uid, b.uid}) == 3
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with UidLock(start=held) as again:  # released by the kernel when its holder died
        assert again.uid == held


@needs_namespaces
def test_concurrent_sandboxes_get_distinct_uids():
    async def many():
        return await asyncio.gather(*(run_python("import os; print(os.getuid())") for _ in range(12)))

    uids = [int(r.output) for r in asyncio.run(many())]
    assert len(set(uids)) == 12 and all(u >= UID_BASE for u in uids)


# ----------------------------------------------------------------------------- SIGKILL of the caller

CALLER = """
import asyncio
from envs.tools import get_tool
code = "import os, time\\nfor _ in range(3):\\n    if os.fork() == 0:\\n        time.sleep(600)\\ntime.sleep(600)"
tool = get_tool("code_interpreter", wall_s=300.0)
asyncio.run(tool.call({"code": code}, timeout_s=300, max_output_tokens=100))
"""


def _processes() -> dict[int, tuple[int, int, int]]:
    """{pid: (ppid, start time, real uid)} from /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            status = Path(f"/proc/{name}/status").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        uid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:"))
        table[int(name)] = (int(fields[1]), int(fields[19]), uid)
    return table


def _descendants(root: int) -> dict[int, tuple[int, int]]:
    """{pid: (start time, uid)} of every process below ``root``."""
    table = _processes()
    out: dict[int, tuple[int, int]] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start, uid) in table.items():
            if ppid == parent and pid not in out:
                out[pid] = (start, uid)
                frontier.append(pid)
    return out


def _alive(procs: dict[int, tuple[int, int]]) -> int:
    table = _processes()
    return sum(1 for pid, (start, _) in procs.items() if pid in table and table[pid][1] == start)


def _sandbox_dirs() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("relay-sandbox")}


@needs_namespaces
def test_sigkill_of_the_caller_leaves_no_process_cgroup_or_directory():
    dirs_before = _sandbox_dirs()
    caller = subprocess.Popen([sys.executable, "-c", CALLER], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        tree: dict[int, tuple[int, int]] = {}
        while time.monotonic() < deadline:
            tree = _descendants(caller.pid)
            if sum(1 for _, uid in tree.values() if uid >= UID_BASE) >= 4:  # the program and its 3 children
                break
            assert caller.poll() is None, caller.stderr.read().decode()
            time.sleep(0.1)
        else:
            pytest.fail(f"the sandbox program and its children did not start within 60 s; saw {tree}")
        uids = {uid for _, uid in tree.values() if uid >= UID_BASE}
        assert len(uids) == 1
        caller.send_signal(signal.SIGKILL)
        caller.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _alive(tree) == 0, f"left behind: {tree}"  # sandbox program, children, launcher, unshare
        uid = uids.pop()
        leftover = [d for _, d in _cgroup_parents().values() if os.path.exists(os.path.join(d, f"{CGROUP_PREFIX}{uid}"))]
        assert leftover == []
        assert _sandbox_dirs() - dirs_before == set()
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait(timeout=30)


CALLER_RLIMITS = """
import asyncio
from envs.sandbox import run_python
asyncio.run(run_python("import time\\ntime.sleep(600)", mode="rlimits"))
"""


def test_sigkill_of_the_caller_kills_the_program_in_rlimits_mode():
    caller = subprocess.Popen([sys.executable, "-c", CALLER_RLIMITS], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        tree: dict[int, tuple[int, int]] = {}
        while time.monotonic() < deadline and not tree:
            tree = _descendants(caller.pid)
            assert caller.poll() is None, caller.stderr.read().decode()
            time.sleep(0.05)
        assert len(tree) == 1, tree  # the program, started with PR_SET_PDEATHSIG
        caller.send_signal(signal.SIGKILL)
        caller.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(tree) == 0
        # its working directory stays until a sweep (a caller killed by SIGKILL cannot remove it)
        left = {d for d in _sandbox_dirs() if d.startswith(f"relay-sandbox-{caller.pid}-")}
        assert len(left) == 1
        assert sweep_stale_workdirs() >= 1
        assert {d for d in _sandbox_dirs() if d.startswith(f"relay-sandbox-{caller.pid}-")} == set()
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait(timeout=30)


@needs_namespaces
def test_cancelling_the_call_leaves_no_process_or_cgroup():
    code = "import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        time.sleep(600)\ntime.sleep(600)"

    async def main() -> tuple[dict, set, object]:
        before = set(_descendants(os.getpid()))  # children of this test process from earlier tests are not the sandbox's
        task = asyncio.create_task(run_python(code, SandboxLimits(wall_s=300)))
        deadline = time.monotonic() + 60
        tree: dict[int, tuple[int, int]] = {}
        while time.monotonic() < deadline:
            tree = {pid: v for pid, v in _descendants(os.getpid()).items() if pid not in before}
            if sum(1 for _, uid in tree.values() if uid >= UID_BASE) >= 4:
                break
            await asyncio.sleep(0.05)
        uids = {uid for _, uid in tree.values() if uid >= UID_BASE}
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return tree, uids, task

    tree, uids, task = asyncio.run(main())
    assert task.cancelled() and len(uids) == 1
    assert _alive(tree) == 0  # run_python returns only once the launcher has killed and reaped them all
    uid = uids.pop()
    assert [d for _, d in _cgroup_parents().values() if os.path.exists(os.path.join(d, f"{CGROUP_PREFIX}{uid}"))] == []
