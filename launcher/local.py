"""Local mode: every learner rank and actor as a child process of this one.

Each child runs in its own session (so its whole process tree, vLLM's workers
included, can be signalled at once) and logs to ``<run dir>/logs/<name>.log``;
learner rank 0 is also echoed to this terminal. The supervisor polls the
children: when one exits non-zero it names it, shows the end of its log,
stops the others and returns non-zero, except an actor with restarts left
(``trainer.max_actor_restarts``): that one is started again after a backoff
(1 s, doubling up to 30 s), logged, while the run goes on with the others; the
learner requeues what the dead process held. Only an actor that keeps dying
ends the run, named with its last exit and log. On Ctrl-C or SIGTERM it stops
everything and says why. When
learner rank 0 finishes, the actors are given a grace period to hear 'stop'
and exit on their own, then are terminated. No process is left behind.

If this process itself dies without cleaning up (SIGKILL, OOM killer), each
child gets SIGKILL from the kernel (``PR_SET_PDEATHSIG``, Linux), so killing
``relay train``'s process group takes its learners and actors with it.

The same supervisor runs one node's share of a multi-node job: ``plan_learner_node``
(``relay learner``: this node's learner ranks) and ``plan_actors`` (``relay actor``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

try:  # resolved once here, not in the forked child
    import ctypes

    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int):
    """A ``preexec_fn``: SIGKILL this child when the process that started it dies."""

    def setup() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return setup


def free_port(pairs: int = 1) -> int:
    """A free TCP port p on 127.0.0.1 such that p .. p + pairs - 1 are all free."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + pairs > 65535:
            continue
        try:
            socks = []
            for p in range(base, base + pairs):
                t = socket.socket()
                t.bind(("127.0.0.1", p))
                socks.append(t)
            for t in socks:
                t.close()
            return base
        except OSError:
            for t in socks:
                t.close()
    raise RuntimeError("no free port range found")


@dataclass
class Child:
    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    echo: bool = False
    echo_to: "Callable[[bytes], None] | None" = None
    """Where echoed lines go (the console panel's ``echo``); None = straight to stderr."""
    proc: subprocess.Popen | None = None
    pump: threading.Thread | None = None
    required: bool = True
    """A required child's failure fails the run (all are, today)."""
    max_restarts: int = 0
    """Times this child is started again after it dies before its failure fails the run."""
    restarts: int = 0
    returncode: int | None = field(default=None)
    restart_at: float | None = None
    """When a dead child is due to be started again (monotonic clock)."""

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )

        def pump():
            for line in self.proc.stdout:
                logf.write(line)
                logf.flush()
                if self.echo and self.echo_to is not None:
                    self.echo_to(line)
                elif self.echo:
                    sys.stderr.buffer.write(line)
                    sys.stderr.flush()
            logf.close()

        self.pump = threading.Thread(target=pump, daemon=True)
        self.pump.start()

    def tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + l for l in lines[-n:])

    def tree(self) -> list[psutil.Process]:
        try:
            p = psutil.Process(self.proc.pid)
            return [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Terminated(Exception):
    """SIGTERM reached the supervisor."""


class NoWatchdog:
    """Never reports a stall (nodes without the run's metrics: actor-only nodes, other learner nodes)."""

    def check(self, children: list[Child], now: float) -> str | None:
        return None


class Watchdog:
    """Diagnoses a run in which nothing progresses instead of waiting it out.

    Progress is the learner's ``metrics.jsonl`` growing (a step or a validation round). When it
    has not grown for ``stall_timeout_s`` (counted from the start, so a start-up that hangs is
    caught too): every running child is asked for the Python stacks of all its threads
    (``SIGUSR1``, which each child's ``faulthandler`` answers in its log), the learner's last
    ``status.json`` (actors, outstanding grants, buffered groups) is read, and a one-screen
    summary names the processes that cannot run (stopped by a signal, zombie) or, failing that,
    shows what each process is waiting in. The whole report goes to ``stall-report.txt`` in the
    run dir. ``action='stop'`` then fails the run; ``'wait'`` reports again after another
    ``stall_timeout_s``.
    """

    def __init__(self, run_dir: Path, stall_timeout_s: float, action: str = "stop", dump_wait_s: float = 2.0):
        self.run_dir = Path(run_dir)
        self.timeout_s = stall_timeout_s
        self.action = action
        self.dump_wait_s = dump_wait_s
        self._size = -1
        self._since = time.monotonic()

    def check(self, children: list[Child], now: float) -> str | None:
        try:
            size = (self.run_dir / "metrics.jsonl").stat().st_size
        except OSError:
            size = -1
        if size != self._size:
            self._size, self._since = size, now
            return None
        if now - self._since < self.timeout_s:
            return None
        report = self.report(children, now - self._since)
        self._since = now
        print(f"\n{report}", file=sys.stderr)
        return report if self.action == "stop" else None

    def report(self, children: list[Child], idle_s: float) -> str:
        states, offsets = {}, {}
        for c in children:
            states[c.name] = _state(c)
            try:
                offsets[c.name] = c.log_path.stat().st_size
            except OSError:
                offsets[c.name] = 0
            if states[c.name] in ("running", "sleeping", "disk-sleep") and c.proc and c.proc.poll() is None:
                try:
                    os.kill(c.proc.pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
        time.sleep(self.dump_wait_s)
        stacks = {c.name: _read_from(c.log_path, offsets[c.name]) for c in children}
        try:
            status = (self.run_dir / "status.json").read_text()
        except OSError:
            status = "(the learner wrote no status.json)"
        stuck = [n for n, st in states.items() if st in ("stopped", "tracing-stop", "zombie", "dead")]
        lines = [f"[relay] STALL: no step or validation finished for {idle_s:.0f}s (trainer.stall_timeout_s={self.timeout_s:g})"]
        if stuck:
            lines.append(f"[relay] stuck: {', '.join(f'{n} ({states[n]}: it cannot run, so everyone waiting on it waits)' for n in stuck)}")
        else:
            lines.append("[relay] no process is stopped; what each one is doing (innermost frame of each thread) follows")
        for c in children:
            pid = c.proc.pid if c.proc else "?"
            lines.append(f"  {c.name:<10} pid {pid:<7} {states[c.name]:<12} {_top_frames(stacks[c.name])}")
        lines.append(f"[relay] learner status: {_status_line(status)}")
        full = "\n".join(lines + ["", "== status.json", status] + [f"== {n} (stack dump)\n{stacks[n] or '(none)'}" for n in stacks])
        path = self.run_dir / "stall-report.txt"
        try:
            path.write_text(full)
            lines.append(f"[relay] full report with every stack: {path}")
        except OSError:
            pass
        return "\n".join(lines)


def _state(c: Child) -> str:
    if c.proc is None or c.proc.poll() is not None:
        return "exited"
    try:
        return psutil.Process(c.proc.pid).status()
    except psutil.Error:
        return "exited"


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read(200_000).decode(errors="replace")
    except OSError:
        return ""
    starts = [i for i in (text.find("Thread 0x"), text.find("Current thread 0x")) if i >= 0]
    return text[min(starts):] if starts else ""


def _top_frames(dump: str, n: int = 2) -> str:
    """The innermost frame of the first ``n`` threads of a faulthandler dump, one line."""
    tops, lines = [], dump.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("Thread 0x", "Current thread 0x")) and i + 1 < len(lines):
            tops.append(lines[i + 1].strip().replace('File "', "").replace('", line ', ":"))
    return " | ".join(tops[:n]) if tops else "(no stack: it did not answer)"


def _status_line(status: str) -> str:
    import json

    try:
        s = json.loads(status)
    except ValueError:
        return status[:200]
    actors = ", ".join(f"{a} v{i['version']} holds {i['outstanding']} silent {i['silent_s']}s" for a, i in s["actors"].items())
    return (f"v{s['version']}, {s['buffered_groups']}/{s['batch_groups']} groups buffered, {s['outstanding_groups']} in flight; "
            f"actors: {actors or 'none'}; dead: {s['dead_actors'] or 'none'}; "
            f"{time.time() - s['wall_time']:.0f}s old")


class Supervisor:
    """Starts children, watches them, and stops them all on the first failure."""

    def __init__(self, children: list[Child], poll_s: float = 0.5, watchdog: "Watchdog | NoWatchdog | None" = None, panel=None):
        from launcher.console import NoPanel

        self.children = children
        self.poll_s = poll_s
        self.watchdog = watchdog or NoWatchdog()
        self.panel = panel or NoPanel()
        """The terminal's live panel (``launcher.console``): echoed lines go through it."""
        for c in children:
            c.echo_to = self.panel.echo
        self.peak_rss = 0
        self.failure: str | None = None
        self.restarts: list[tuple[str, str]] = []
        """(child, how it died) for every restart, in order."""

    def rss(self) -> int:
        total = 0
        for c in self.children:
            for p in c.tree():
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        return total

    def run(self, main: str, grace_s: float = 60.0) -> int:
        """Run until child ``main`` exits; returns the run's exit status."""
        self.panel.start()
        try:
            return self._run(main, grace_s)
        finally:
            self.panel.stop()

    def _run(self, main: str, grace_s: float) -> int:
        for c in self.children:
            c.start()
        main_done_at: float | None = None
        previous = signal.getsignal(signal.SIGTERM)
        previous_int = signal.getsignal(signal.SIGINT)

        def on_sigterm(signum, frame):
            raise _Terminated()

        try:
            signal.signal(signal.SIGTERM, on_sigterm)
            # SIGINT stops the run even where it was ignored when Python started (a shell's `cmd &`
            # sets SIG_IGN, and Python then installs no KeyboardInterrupt handler of its own)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        except ValueError:  # not the main thread: Ctrl-C only
            previous = previous_int = None
        try:
            while True:
                self.peak_rss = max(self.peak_rss, self.rss())
                running = 0
                for c in self.children:
                    if c.restart_at is not None:
                        running += 1
                        if time.monotonic() >= c.restart_at and main_done_at is None:
                            c.restart_at, c.returncode = None, None
                            c.start()
                        continue
                    code = c.proc.poll()
                    if code is None:
                        running += 1
                        continue
                    if c.returncode is None:
                        c.returncode = code
                        if code != 0 and main_done_at is None and c.restarts < c.max_restarts:
                            c.restarts += 1
                            delay = min(30.0, 2.0 ** (c.restarts - 1))
                            self.restarts.append((c.name, describe_exit(code)))
                            print(f"[relay] {c.name} died ({describe_exit(code)}); restarting it in {delay:.0f}s "
                                  f"(restart {c.restarts} of {c.max_restarts}); log {c.log_path}", file=sys.stderr)
                            c.restart_at = time.monotonic() + delay
                            running += 1
                            continue
                        if code != 0 and c.name != main and main_done_at is not None:
                            continue  # an actor that failed after training finished: nothing left to lose
                        if code != 0:
                            again = f" after {c.restarts} restart(s)" if c.restarts else ""
                            self.failure = f"{c.name} failed{again} ({describe_exit(code)}); log {c.log_path}:\n{c.tail()}"
                            print(f"\n[relay] {self.failure}\n[relay] stopping the other processes", file=sys.stderr)
                            self.stop_all()
                            return 1
                        if c.name == main:
                            main_done_at = time.monotonic()
                if running == 0:
                    return 0
                if main_done_at is None and (stall := self.watchdog.check(self.children, time.monotonic())):
                    self.failure = stall
                    print("[relay] stopping every process (trainer.stall_action=wait keeps them running)", file=sys.stderr)
                    self.stop_all()
                    return 1
                if main_done_at is not None and time.monotonic() - main_done_at > grace_s:
                    left = [c.name for c in self.children if c.proc.poll() is None]
                    print(f"[relay] {main} finished; {left} still running after {grace_s:.0f}s: terminating them", file=sys.stderr)
                    self.stop_all()
                    return 0
                time.sleep(self.poll_s)
        except KeyboardInterrupt:
            print("\n[relay] interrupted: stopping every process", file=sys.stderr)
            self.failure = "interrupted (Ctrl-C)"
            self.stop_all()
            return 130
        except _Terminated:
            print("\n[relay] SIGTERM: stopping every process", file=sys.stderr)
            self.failure = "terminated (SIGTERM)"
            self.stop_all()
            return 143
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if previous_int is not None:
                signal.signal(signal.SIGINT, previous_int)

    def stop_all(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every child's process group, then SIGKILL whatever is left."""
        procs = [p for c in self.children for p in c.tree()]
        for c in self.children:
            if c.proc and c.proc.poll() is None:
                try:
                    os.killpg(c.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        _, alive = psutil.wait_procs(procs, timeout=timeout_s)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        for c in self.children:
            if c.proc:
                c.proc.wait(timeout=5)
                if c.returncode is None:
                    c.returncode = c.proc.returncode
            if c.pump:
                c.pump.join(timeout=2)


def python_child(name: str, module: str, args: list[str], log_dir: Path, extra_env: dict[str, str], echo=False) -> Child:
    env = dict(os.environ)
    env.update(extra_env)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return Child(name, [sys.executable, "-m", module, *args], env, log_dir / f"{name}.log", echo=echo)


def plan_local(
    config_path: Path, run_dir: Path, world: int, num_actors: int, port: int, threads: int = 1, max_actor_restarts: int = 0
) -> list[Child]:
    """The children of a local run: ``world`` learner ranks and ``num_actors`` actors. ``port`` 0:
    the learner binds a free pair itself and the actors read it from ``<run dir>/learner.json``."""
    learner = f"127.0.0.1:{port}" if port else f"file:{run_dir / 'learner.json'}"
    return [
        *plan_learner_node(config_path, run_dir, 0, 1, world, "127.0.0.1", free_port(), threads),
        *plan_actors(config_path, run_dir, learner, num_actors, 0, threads, echo=False, max_restarts=max_actor_restarts),
    ]


def learner_env(rank: int, local_rank: int, world: int, local_world: int, master_addr: str, master_port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(local_world),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }


def plan_learner_node(
    config_path: Path, run_dir: Path, node_rank: int, nnodes: int, per_node: int, master_addr: str, master_port: int, threads: int = 1
) -> list[Child]:
    """Learner ranks ``node_rank * per_node ..`` of a ``nnodes * per_node`` world (``relay learner``)."""
    world = nnodes * per_node
    children = []
    for local in range(per_node):
        rank = node_rank * per_node + local
        env = learner_env(rank, local, world, per_node, master_addr, master_port)
        children.append(
            python_child(f"learner-{rank}", "learner.main", ["--config", str(config_path), "--threads", str(threads)], run_dir / "logs", env, echo=local == 0)
        )
    return children


def plan_actors(
    config_path: Path, run_dir: Path, learner: str, num_actors: int, first_index: int = 0, threads: int = 1, echo: bool = True,
    max_restarts: int = 0,
) -> list[Child]:
    """Actors ``actor-<first_index> ..`` connecting to the learner at ``learner`` (HOST:PORT, or
    ``file:PATH`` of the file it writes its address to), each restarted up to ``max_restarts``
    times when it dies."""
    where = ["--learner-file", learner[len("file:"):]] if learner.startswith("file:") else ["--learner", learner]
    children = [
        python_child(
            f"actor-{i}",
            "actors.main",
            ["--config", str(config_path), "--actor-id", f"actor-{i}", *where, "--threads", str(threads)],
            run_dir / "logs",
            {},
            echo=echo and i == first_index,
        )
        for i in range(first_index, first_index + num_actors)
    ]
    for c in children:
        c.max_restarts = max_restarts
    return children
