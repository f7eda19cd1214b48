"""Each escape or runaway comes back as an error observation within its limits."""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import envs.sandbox
from envs.sandbox import SandboxLimits, isolation, run_python
from envs.tools import get_tool

LIMITS = SandboxLimits(wall_s=8.0, cpu_s=2, memory_bytes=512 << 20, max_processes=8, max_output_bytes=10_000)
NAMESPACES = isolation() == "namespaces"
needs_namespaces = pytest.mark.skipif(not NAMESPACES, reason=f"isolation here is {isolation()!r}, not 'namespaces'")


def run(code, limits=LIMITS, **kw):
    return asyncio.run(run_python(code, limits, **kw))


def interpreter(code, **limits):
    tool = get_tool("python_executor", **{"wall_s": 8.0, "cpu_s": 2, **limits})
    return asyncio.run(tool.call({"code": code}, timeout_s=30, max_output_tokens=2000))


def test_prints_and_workdir_is_writable():
    r = run("open('f.txt', 'w').write('abc')\nprint(open('f.txt').read(), 6 * 7)")
    assert r.ok and r.output == "abc 42\n" and r.exit_code == 0


def test_interpreter_success_and_exception():
    assert interpreter("print(sum(range(10)))").text == "45\n"
    assert interpreter("x = 1").text == "(no output)"
    bad = interpreter("raise ValueError('nope')")
    assert bad.error and bad.text.startswith("Error: exit status 1") and "ValueError: nope" in bad.text


@needs_namespaces
def test_reading_files_outside_is_refused():
    for path in ("/work/main/pyproject.toml", "/etc/shadow", "/root/.bashrc"):
        result = interpreter(f"print(open({path!r}).read())")
        assert result.error, path
        assert "FileNotFoundError" in result.text or "PermissionError" in result.text


@needs_namespaces
def test_writing_outside_is_refused():
    result = interpreter("open('/usr/owned', 'w').write('x')")
    assert result.error and "Read-only file system" in result.text


@needs_namespaces
def test_network_is_refused_even_to_host_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        result = interpreter(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('connected')")
        assert result.error and "\nconnected" not in result.text and "Error" in result.text
        result = interpreter("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)")
        assert result.error and "OSError" in result.text
    finally:
        server.close()


def test_network_guard_in_weaker_modes():
    r = run("import socket\nsocket.socket()", mode="rlimits")
    assert not r.ok and "network access is disabled" in r.output


def test_fork_bomb():
    result = interpreter("import os\nwhile True:\n    os.fork()")
    assert result.error


def test_memory_bomb():
    result = interpreter("x = bytearray(4 << 30)\nprint('allocated')", memory_bytes=512 << 20)
    assert result.error and "MemoryError" in result.text


def test_infinite_loop_hits_cpu_limit():
    result = interpreter("while True:\n    pass")
    assert result.error and "CPU-time limit" in result.text


def test_sleeping_forever_hits_wall_limit():
    result = interpreter("import time\ntime.sleep(600)", wall_s=2.0)
    assert result.error and "wall-time limit" in result.text


def test_100mb_of_output_is_cut_and_killed():
    r = run("import sys\nfor _ in range(1600):\n    sys.stdout.write('x' * 65536)")
    assert not r.ok and "output exceeded" in r.error
    assert len(r.output) == LIMITS.max_output_bytes


def test_tool_timeout_shorter_than_wall_kills_the_run():
    tool = get_tool("code_interpreter", wall_s=60.0)
    result = asyncio.run(tool.call({"code": "import time\ntime.sleep(600)"}, timeout_s=1.0, max_output_tokens=100))
    assert result.error and "timed out" in result.text


def test_isolation_mode_is_reported():
    assert isolation() in ("namespaces", "uid", "rlimits")


@needs_namespaces
def test_root_holds_only_the_documented_trees():
    code = "import os, sys\nprint(sorted(os.listdir('/')))\nprint(sorted(os.listdir('/dev')))\nprint(sys.prefix)"
    r = run(code)
    assert r.ok, r.output
    tops, devs, prefix = r.output.splitlines()
    python_tops = {p.split("/")[1] for p in envs.sandbox._python_paths()}
    host_links = {d for d in ("bin", "sbin", "lib", "lib32", "lib64", "libx32") if os.path.lexists("/" + d)}
    assert set(eval(tops)) == {"usr", "etc", "dev", "proc", "tmp", "sandbox"} | host_links | python_tops
    assert eval(devs) == ["null", "random", "urandom", "zero"]
    assert prefix == sys.prefix


SANDBOX_FROM_TMP = """
import asyncio, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("relay_sandbox", sys.argv[1])
sandbox = sys.modules["relay_sandbox"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sandbox)
code = "import os, sys\\nprint(sys.prefix)\\nprint(sorted(os.listdir('/tmp')))\\nopen('/tmp/x', 'w').write('ok')\\nprint(open('/tmp/x').read())"
r = asyncio.run(sandbox.run_python(code))
print(json.dumps({"mode": sandbox.isolation(), "output": r.output, "error": r.error}))
"""


def test_python_and_checkout_under_tmp(tmp_path):
    """A venv and a checkout both under /tmp (real interpreter, real sandbox): the private /tmp of the
    sandbox must not hide them (it once did: every run failed with exit status 127)."""
    base = Path(tempfile.mkdtemp(prefix="relay-tmp-checkout-", dir="/tmp"))
    try:
        venv, checkout = base / "venv", base / "checkout"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
        (checkout / "envs").mkdir(parents=True)
        here = Path(envs.sandbox.__file__).parent
        for name in ("sandbox.py", "sandbox_launcher.py"):
            shutil.copy(here / name, checkout / "envs" / name)
        out = subprocess.run(
            [str(venv / "bin" / "python"), "-c", SANDBOX_FROM_TMP, str(checkout / "envs" / "sandbox.py")],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout.splitlines()[-1])
        assert report["error"] is None, report
        prefix, tmp_listing, written = report["output"].splitlines()
        assert prefix == str(venv) and written == "ok"
        if report["mode"] == "namespaces":
            # the venv's own path is visible (bound on top of the private /tmp), nothing else of the host /tmp
            assert eval(tmp_listing) == [base.name]
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_namespaces
def test_program_holds_only_stdio_and_cannot_look_into_pid_1():
    code = (
        "import os\nprint(len(os.listdir('/proc/self/fd')))\n"  # 0, 1, 2 and listdir's own
        "for p in ('/proc/1/fd', '/proc/1/root/'):\n"
        "    try:\n        os.listdir(p)\n        print('open')\n"
        "    except PermissionError:\n        print('denied')\n"
    )
    r = run(code)
    assert r.ok and r.output.split() == ["4", "denied", "denied"]  # the control and uid-lock sockets stay with PID 1
