"""Python tool: REPL-like behaviour, and a hostile-input corpus that must stay contained.

Every hostile program must come back as a clear error result within its limits while this
process keeps running, and leave no process behind. The worst containment time is printed
(run with -s to see it). The last test runs the tool as an ordinary user (the laptop case).
"""

from __future__ import annotations

import ast
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy
import pytest

from arpo_ref.tools import PythonTool, PythonToolConfig

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the hostile corpus relies on Linux rlimits")

LIMITS = PythonToolConfig(timeout_seconds=5, cpu_time_limit_seconds=1, memory_limit_mb=512,
                          file_size_limit_mb=1, max_processes=8, max_output_chars=500)
SECRET_NAME, SECRET_VALUE = "ARPO_REF_TEST_SECRET", "hunter2-" + uuid.uuid4().hex
REPOSITORY = Path(__file__).resolve().parents[1]
UNIQUE = uuid.uuid4().hex[:12]
OUTSIDE_FILES = [Path(f"/tmp/arpo_ref_hostile_{UNIQUE}"), Path(f"/tmp/arpo_ref_hostile_up_{UNIQUE}"),
                 REPOSITORY / f"arpo_ref_hostile_{UNIQUE}"]


def processes_with(marker: str) -> list[int]:
    """Pids whose command line contains `marker` (a /proc scan, no psutil)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                command_line = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in command_line:
                found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def tool():
    return PythonTool(LIMITS)


def needs_namespaces(tool):
    if not tool.plan.use_namespaces:
        pytest.skip("this machine gives no namespaces: network and files are not isolated")


# ---------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("code, expected", [
    ("x = 5\nx * 2", "10"),
    ("'abc'", "abc"),                        # print(), as the official tool wraps it
    ("print('hi')\nNone", "hi"),             # None is not printed
    ("x = print(1)", "1"),                   # an assignment is not an expression: nothing extra
    ("for i in range(3):\n    print(i)", "0\n1\n2"),
    ("print('héllo ✓')", "héllo ✓"),
    ("import math\nmath.factorial(20)", "2432902008176640000"),
    ("import sys\nsys.exit(0)", ""),
])
def test_results_like_the_official_tool(tool, code, expected):
    result = tool(code)
    assert result.ok and result.text == expected and result.tool_name == "python"


def test_bare_expression_printing_can_be_turned_off():
    assert PythonTool(PythonToolConfig(print_last_expression=False))("6 * 7").text == ""


def test_errors_return_the_trimmed_traceback(tool):
    result = tool("def f(x):\n    return 1 / x\nf(0)")
    assert not result.ok and result.error_kind == "exception"
    assert result.text.startswith("Traceback") and result.text.endswith("ZeroDivisionError: division by zero")
    assert 'File "<code>", line 2, in f' in result.text and "return 1 / x" in result.text
    assert "sandbox_bootstrap" not in result.text
    syntax = tool("print(1")
    assert not syntax.ok and "SyntaxError" in syntax.text
    assert "EOFError" in tool("input()").text  # stdin is closed, never waits


def test_long_output_is_truncated(tool):
    result = tool("print('y' * 10000)")
    assert result.ok and result.text.startswith("y" * 500 + "\n[... 9501 more bytes not shown]")
    assert len(result.text) < 600
    noisy = tool("import sys\nfor i in range(5000):\n    print('warning', i, file=sys.stderr)\n1 / 0")
    assert noisy.text.endswith("ZeroDivisionError: division by zero")  # stderr keeps its tail


def test_each_call_gets_a_fresh_directory(tool):
    first = tool("open('state.txt', 'w').write('x')\nimport os\nos.getcwd()")
    assert first.ok
    assert tool("import os\nos.path.exists('state.txt')").text == "False"
    if not tool.plan.use_namespaces:
        assert not Path(ast.literal_eval(first.text)).exists()  # the throw-away directory was deleted


def test_calls_run_in_parallel(tool):
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(tool, ["import time\ntime.sleep(0.5)\n'done'"] * 6))
    assert all(r.text == "done" for r in results)
    assert time.monotonic() - start < 2.5  # one after the other would take 3 s


# ---------------------------------------------------------------------------- hostile corpus
HOSTILE = {
    "infinite_loop": "while True:\n    pass",
    "sleep_forever": "import time\ntime.sleep(1000)",
    "memory_bomb": "blocks = []\nwhile True:\n    blocks.append(bytes(10**8))",
    "recursion_bomb": "def f():\n    return f()\nf()",
    "c_stack_bomb": "import json, sys\nsys.setrecursionlimit(10**8)\njson.loads('[' * 10**6)",
    "huge_output": "while True:\n    print('x' * 10000)",
    "huge_file": "open('big.bin', 'wb').write(b'x' * 10**7)",
    "write_outside": (f"open({str(OUTSIDE_FILES[0])!r}, 'w').write('escaped')\n"
                      f"import os\nopen(os.path.join('..', {OUTSIDE_FILES[1].name!r}), 'w').write('escaped')"),
    "write_repository": f"open({str(OUTSIDE_FILES[2])!r}, 'w').write('escaped')",
    "read_secret": f"import os\nprint(os.environ.get({SECRET_NAME!r}))\nprint(sorted(os.environ))",
    "sys_exit": "import sys\nsys.exit(3)",
    "os_exit": "import os\nos._exit(4)",
    "interpreter_crash": "import ctypes\nctypes.string_at(0)",
    "network": "import socket\nsocket.create_connection(('8.8.8.8', 53), timeout=2)",
}


@pytest.fixture(scope="module")
def hostile_results(tool):
    os.environ[SECRET_NAME] = SECRET_VALUE
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = {name: pool.submit(tool, code) for name, code in HOSTILE.items()}
            results = {name: future.result() for name, future in futures.items()}
    finally:
        del os.environ[SECRET_NAME]
    yield results
    for path in OUTSIDE_FILES:
        path.unlink(missing_ok=True)


TIMEOUT_TEXTS = ("Error: CPU time limit of 1 s exceeded", "Error: timed out after 5 s")


@pytest.mark.parametrize("name, kind, text", [
    # On a loaded machine the CPU limit may come after the wall-clock one: either is a timeout.
    ("infinite_loop", "timeout", TIMEOUT_TEXTS),
    ("sleep_forever", "timeout", TIMEOUT_TEXTS[1:]),
    ("memory_bomb", "memory", "MemoryError"),
    ("recursion_bomb", "exception", "RecursionError: maximum recursion depth exceeded"),
    ("c_stack_bomb", "crash", "killed by signal SIGSEGV"),
    ("huge_output", "output_limit", "Error: output limit exceeded"),
    ("huge_file", "exception", "File too large"),
    ("sys_exit", "exit_code", "Error: the program exited with code 3"),
    ("os_exit", "exit_code", "Error: the program exited with code 4"),
    ("interpreter_crash", "crash", "killed by signal SIGSEGV"),
])
def test_hostile_program_gives_a_clear_error(hostile_results, name, kind, text):
    result = hostile_results[name]
    texts = (text,) if isinstance(text, str) else text
    assert not result.ok and result.error_kind == kind, result
    assert any(expected in result.text for expected in texts), result
    assert result.seconds < LIMITS.timeout_seconds + 1.0
    assert len(result.text) < 2 * LIMITS.max_output_chars + 200


def test_secrets_are_not_visible(hostile_results):
    result = hostile_results["read_secret"]
    assert result.ok and SECRET_VALUE not in result.text
    assert result.text.splitlines()[0] == "None"
    variables = ast.literal_eval(result.text.splitlines()[1])
    assert set(variables) <= {"PATH", "LANG", "HOME", "TMPDIR", "OMP_NUM_THREADS",
                              "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "LC_CTYPE"}


def test_writes_outside_the_working_directory_are_contained(tool, hostile_results):
    needs_namespaces(tool)
    assert not any(path.exists() for path in OUTSIDE_FILES)  # /tmp and ../ went to a private tmpfs
    repository = hostile_results["write_repository"]
    assert not repository.ok and ("Read-only file system" in repository.text
                                  or "Permission denied" in repository.text)


@pytest.mark.skipif(os.geteuid() != 0, reason="root's home is only a target when running as root")
def test_root_home_is_not_writable(tool):
    needs_namespaces(tool)
    result = tool(f"open('/root/arpo_ref_hostile_{UNIQUE}', 'w')")
    assert not result.ok and not Path(f"/root/arpo_ref_hostile_{UNIQUE}").exists()


def test_network_is_unreachable(tool, hostile_results):
    needs_namespaces(tool)
    result = hostile_results["network"]
    assert not result.ok and "OSError" in result.text


def test_fork_bomb_and_orphans_leave_no_process(tool, hostile_results):
    marker = f"arpo-ref-hostile-{uuid.uuid4().hex}"
    fork_bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    orphan = (f"import os\nif os.fork() == 0:\n    os.setsid()\n"
              f"    os.execv('/bin/sh', ['sh', '-c', 'sleep 60', '{marker}-orphan'])\nprint('left')")
    cap = ("import os, time\nchildren = 0\nfor _ in range(40):\n    try:\n        pid = os.fork()\n"
           "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n"
           "    children += 1\nchildren")
    bomb = tool.run(fork_bomb, call_id=f"{marker}-bomb")
    left = tool.run(orphan, call_id=f"{marker}-orphan-parent")
    capped = tool.run(cap, call_id=f"{marker}-cap")
    time.sleep(0.1)
    assert processes_with(marker) == []
    assert not bomb.ok and bomb.error_kind == "timeout"
    assert left.ok and left.text == "left"
    assert capped.ok and 1 <= int(capped.text) < LIMITS.max_processes
    worst = max([bomb.seconds, left.seconds, capped.seconds]
                + [result.seconds for result in hostile_results.values()])
    print(f"\nworst containment time: {worst:.2f} s (wall-clock limit {LIMITS.timeout_seconds} s); "
          f"sandbox: {tool.isolation_description}")
    assert worst < LIMITS.timeout_seconds + 1.0


def test_limits_only_mode_still_runs_with_a_scrubbed_environment():
    """isolation=none is the fallback for machines without namespaces (e.g. macOS)."""
    config = PythonToolConfig(timeout_seconds=1, isolation="none",
                              run_as_dedicated_user=os.geteuid() != 0)
    with pytest.warns(RuntimeWarning) as warned:
        fallback = PythonTool(config)
    messages = " ".join(str(warning.message) for warning in warned)
    assert "WITHOUT namespaces" in messages and "isolation is none" in messages
    assert os.geteuid() != 0 or "process limit" in messages
    assert not fallback.plan.use_namespaces
    os.environ[SECRET_NAME] = SECRET_VALUE
    try:
        result = fallback(f"import os\nos.environ.get({SECRET_NAME!r}), os.getcwd()")
    finally:
        del os.environ[SECRET_NAME]
    secret, workdir = ast.literal_eval(result.text)
    assert secret is None and not Path(workdir).exists()
    assert fallback("import time\ntime.sleep(10)").error_kind == "timeout"


# ---------------------------------------------------------------------------- ordinary user
# The test process is root (sessions and CI are), so a second Python is started as `nobody`
# with `setpriv` and drives the tool from there, through a user namespace. That Python must be
# a system interpreter every user can read, of this Python's version (numpy is reused).
SYSTEM_PYTHON = Path("/usr/bin/python3")
NOBODY = 65534
SOURCE = Path(__file__).resolve().parents[1] / "src"
SITE_PACKAGES = Path(numpy.__file__).resolve().parents[1]

DRIVER = """
import json, sys
sys.path[:0] = [{source!r}, {site_packages!r}]
from arpo_ref.tools import PythonTool, PythonToolConfig
tool = PythonTool(PythonToolConfig(timeout_seconds=2, cpu_time_limit_seconds=1,
                                   memory_limit_mb=512, max_processes=8))
cases = json.loads(sys.argv[1])
results = {{name: tool.run(code, call_id={marker!r} + name).__dict__ for name, code in cases.items()}}
print(json.dumps({{"plan": tool.plan.description, "results": results}}))
"""


def writable_place_outside_scratch() -> Path:
    for parent in (Path("/run"), Path("/var/lib"), Path("/opt")):
        if parent.is_dir() and os.access(parent, os.W_OK):
            return parent
    pytest.skip("no root-writable directory outside the scratch directories")


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                    reason="needs Linux and root to impersonate an unprivileged user")
@pytest.mark.skipif(shutil.which("setpriv") is None or not SYSTEM_PYTHON.exists(),
                    reason="needs setpriv and a system python3")
def test_unprivileged_user_is_contained():
    version = subprocess.run([str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.skip(f"system python {version} differs from {sys.version_info[:2]} (numpy ABI)")
    target = writable_place_outside_scratch() / f"arpo_ref-test-{uuid.uuid4().hex[:12]}"
    target.mkdir(mode=0o755)
    os.chown(target, NOBODY, NOBODY)
    marker = f"arpo-ref-unprivileged-{uuid.uuid4().hex}-"
    cases = {
        "identity": "import os\nos.getuid(), os.getcwd()",
        "own_directory": f"open({str(target / 'x')!r}, 'w').write('escaped')",
        "remount": ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                    "libc.mount(None, b'/', None, 32 | 4096, None), ctypes.get_errno()"),
        "capabilities": "[l for l in open('/proc/self/status') if l.startswith('CapEff')][0].split()[1]",
        "network": "import socket\nsocket.create_connection(('8.8.8.8', 53), timeout=2)",
        "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "orphan": (f"import os\nif os.fork() == 0:\n    os.setsid()\n"
                   f"    os.execv('/bin/sh', ['sh', '-c', 'sleep 60', '{marker}sleeper'])\nprint('left')"),
    }
    driver = DRIVER.format(source=str(SOURCE), site_packages=str(SITE_PACKAGES), marker=marker)
    try:
        completed = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             str(SYSTEM_PYTHON), "-c", driver, json.dumps(cases)],
            capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}, cwd="/")
        written = (target / "x").exists()
    finally:
        shutil.rmtree(target, ignore_errors=True)
    if completed.returncode != 0 and "ModuleNotFoundError" in completed.stderr:
        pytest.skip(f"nobody cannot import the package: {completed.stderr[-300:]}")
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(completed.stdout)
    if not report["plan"].startswith("namespaces"):
        pytest.skip(f"user namespaces are not available here: {report['plan']}")
    results = report["results"]
    assert results["identity"]["text"] == "(0, '/tmp/work')"  # root of its own user namespace only
    assert not results["own_directory"]["ok"] and "Read-only file system" in results["own_directory"]["text"]
    assert not written
    assert results["remount"]["text"] == "(-1, 1)"            # EPERM: no capabilities left
    assert results["capabilities"]["text"] == "0000000000000000"
    assert not results["network"]["ok"]
    assert results["fork_bomb"]["error_kind"] == "timeout"
    assert results["orphan"]["text"] == "left"
    assert processes_with(marker) == []
