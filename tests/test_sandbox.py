"""The jail for model-written code (sandbox.py): every class of attack the audit found gets the right verdict and is
contained (no file written or changed, no process left, no signal delivered, no connection made), with the audit
hook on and with it off (the OS layers alone); real solutions pass."""
import hashlib
import os
import socket
import subprocess
import sys
import time

import pytest

import common
import sandbox

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOUND = sandbox.isolation()
jailed = pytest.mark.skipif(bool(FOUND["missing"]), reason=f"this kernel refuses a layer: {FOUND['missing']}")
TESTS = ["assert f(2) == 4"]

# The exit-0 tricks and forged reports: each must fail, whatever the exit status.
FALSE_PASSES = {
    "os._exit(0) before the tests": "import os\nos._exit(0)",
    "sys.exit(0) before the tests": "import sys\nsys.exit(0)",
    "SystemExit(0) inside the tested function": "def f(x):\n    raise SystemExit(0)",
    "atexit os._exit(0) after a failed assert": "import atexit, os\natexit.register(os._exit, 0)\ndef f(x):\n    return 0",
    "KeyboardInterrupt inside the tested function": "def f(x):\n    raise KeyboardInterrupt",
    "a report written to every descriptor": ("import os\nfor fd in range(64):\n    try:\n        os.write(fd, b'x {\"passed\": True}\\n')"
                                             "\n    except OSError:\n        pass\nos._exit(0)"),
    "an exception whose text claims a pass": "class Fine(Exception):\n    def __str__(self):\n        return 'all tests passed'\nraise Fine()",
    "the hook's settings rebound from __main__": ("import sys\nm = sys.modules['__main__'].__dict__\nfor k in list(m):\n    m[k] = None"
                                                   "\nimport subprocess\nsubprocess.run(['sh', '-c', 'true'])\ndef f(x):\n    return 4"),
}

# Escapes: run with the audit hook on and off; VICTIM is a host file, VDIR its folder, VICTIM_PID a process the
# parent owns, PORT a loopback listener, PROJECT this repository, STDLIB a file of the interpreter's stdlib.
ESCAPES = {
    "run sh": "import os\nos.execv('/bin/sh', ['sh', '-c', 'echo x > VDIR/escaped'])",
    "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'echo x > VDIR/escaped'])",
    "fork": "import os\nos.fork()",
    "setsid daemon": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1.5)\n    open('VDIR/daemon', 'w').write('x')"
                      "\n    os._exit(0)\ntime.sleep(0.2)"),
    "kill a process the parent owns": "import os\nos.kill(VICTIM_PID, 9)",
    "kill everything it may": "import os\nos.kill(-1, 9)\nraise AssertionError('still here')",
    "connect to a loopback listener": "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=1)",
    "re-enter the host network namespace": ("import ctypes, os\nfd = os.open('/proc/1/ns/net', os.O_RDONLY)\n"
                                            "assert ctypes.CDLL(None).setns(fd, 0) == 0"),
    "unshare or mount": ("import ctypes\nlibc = ctypes.CDLL(None)\nassert libc.unshare(0x20000) == 0 or "
                         "libc.mount(b'none', b'/work', b'tmpfs', 0, None) == 0"),
    "chroot out": "import os\nos.chroot('/work')",
    "write into the project": "open('PROJECT/ESCAPED', 'w').write('x')",
    "write into the stdlib": "open('STDLIB', 'a').write('x')",
    "read the parent's environment": "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())\nassert 'SANDBOX_SECRET' in os.environ",
    "read a root-only file": "print(open('/etc/shadow').read())",
    "read the host's processes": "import os\nprint(os.listdir('/proc'))",
    "open with dir_fd": "import os\nd = os.open('VDIR', os.O_RDONLY)\nos.close(os.open('victim.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=d))",
    "rename over a host file": "open('/work/x', 'w').write('x')\nimport os\nos.replace('/work/x', 'VICTIM')",
    "symlink into the project": "import os\nos.symlink('/work', 'PROJECT/ESCAPED')",
    "truncate": "import os\nos.truncate('VICTIM', 0)",
    "truncate the stdlib": "import os\nos.truncate('STDLIB', 0)",
    "hard link": "import os\nos.link('VICTIM', '/work/v')",
    "O_RDONLY | O_CREAT": "import os\nos.close(os.open('VDIR/created', os.O_RDONLY | os.O_CREAT))",
    "fill the disk": "with open('/work/big', 'wb') as f:\n    for _ in range(200):\n        f.write(bytes(1 << 20))",
    "many files": "for i in range(100000):\n    open(f'/work/{i}', 'w').write('x' * 4000)",
    "infinite loop": "while True:\n    pass",
    "allocate 10 GB": "x = bytearray(10 * 1024**3)",
    "print 1 GB": "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)",
}


def nobody_processes():
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                if any(line.startswith("Uid:") and line.split()[1] == "65534" for line in f):
                    pids.add(pid)
        except OSError:
            pass
    return pids


class Host:
    """A victim file, a victim process, a loopback listener, a stdlib file and the project's listing."""

    def __init__(self, tmp_path):
        self.dir, self.victim = tmp_path, tmp_path / "victim.txt"
        self.victim.write_text("precious")
        self.stdlib = os.path.join(os.path.dirname(os.__file__), "this.py")
        self.digest = hashlib.sha256(open(self.stdlib, "rb").read()).hexdigest()
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        self.server.settimeout(0.02)
        self.sleeper = subprocess.Popen(["sleep", "60"])
        self.project, self.before = sorted(os.listdir(ROOT)), nobody_processes()
        self.values = {"VICTIM_PID": str(self.sleeper.pid), "VICTIM": str(self.victim), "VDIR": str(tmp_path),
                       "PORT": str(self.server.getsockname()[1]), "PROJECT": ROOT, "STDLIB": self.stdlib}

    def __call__(self, code):
        for key in sorted(self.values, key=len, reverse=True):
            code = code.replace(key, self.values[key])
        return code

    def escapes(self) -> list:
        """What got out: a changed or new file, a killed process, a connection, a jailed process still alive."""
        found = []
        if not self.victim.exists() or self.victim.read_text() != "precious" or sorted(os.listdir(self.dir)) != ["victim.txt"]:
            found.append("host file written")
        if hashlib.sha256(open(self.stdlib, "rb").read()).hexdigest() != self.digest or sorted(os.listdir(ROOT)) != self.project:
            found.append("stdlib or project changed")
        if self.sleeper.poll() is not None:
            found.append("victim process killed")
        try:
            self.server.accept()[0].close()
            found.append("connection made")
        except socket.timeout:
            pass
        deadline = time.time() + 3
        while nobody_processes() - self.before and time.time() < deadline:
            time.sleep(0.05)
        if nobody_processes() - self.before:
            found.append("a jailed process outlived the judge")
        return found

    def close(self):
        self.sleeper.kill()
        self.server.close()


@pytest.fixture
def host(tmp_path, monkeypatch):
    monkeypatch.setenv("SANDBOX_SECRET", "hunter2")
    host = Host(tmp_path)
    yield host
    try:
        assert not host.escapes()
    finally:
        host.close()


def test_the_containment_checks_see_an_unjailed_escape(tmp_path):
    """The control: the same attacks run as a plain subprocess are seen by the checks."""
    host = Host(tmp_path)
    try:
        for name in ["kill a process the parent owns", "connect to a loopback listener", "truncate"]:
            subprocess.run([sys.executable, "-c", host(ESCAPES[name])], capture_output=True)
        assert host.escapes() == ["host file written", "victim process killed", "connection made"]
    finally:
        host.close()


@jailed
@pytest.mark.parametrize("name", sorted(FALSE_PASSES))
def test_exiting_or_forging_is_not_a_pass(name, host):
    passed, reason = sandbox.run_sandboxed(host(FALSE_PASSES[name]), TESTS, timeout=3.0)
    assert not passed and reason != "all tests passed" and not reason.startswith("all"), reason


@jailed
@pytest.mark.parametrize("hook", [True, False], ids=["with hook", "OS layers alone"])
@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_escape_is_contained(name, hook, host):
    start = time.time()
    passed, reason = sandbox.run_sandboxed(host(ESCAPES[name]), ["assert True"], timeout=3.0, audit_hook=hook)
    assert time.time() - start < 8
    if name == "setsid daemon":
        time.sleep(2)  # the daemon, had it lived, would write its file now; the fixture checks the folder
    contained_by_running = {"many files", "print 1 GB"} if hook else {"many files", "print 1 GB", "fork", "setsid daemon"}
    if os.geteuid() == 0 or name not in contained_by_running:  # as nobody a fork fails; a user namespace may fork
        assert not passed or name in contained_by_running, reason
    assert "hunter2" not in reason


@jailed
def test_the_candidate_is_unprivileged():
    """As root the candidate is uid nobody; otherwise a user namespace without capabilities. Either way pid 1 of
    its namespace, with an empty environment."""
    code = "import os\nuid, pid, env = os.getuid(), os.getpid(), dict(os.environ)"
    tests = ["assert pid == 1", "assert env == {'PATH': '/usr/bin:/bin', 'TMPDIR': '/work', 'HOME': '/work'}"]
    assert sandbox.run_sandboxed(code, tests, userns=True) == (True, "all tests passed")
    if os.geteuid() == 0:
        tests.append("assert uid == 65534")
    assert sandbox.run_sandboxed(code, tests) == (True, "all tests passed")
    expected = "uid 65534 (nobody)" if os.geteuid() == 0 else f"user namespace (uid {os.geteuid()} outside), no capabilities"
    assert FOUND["layers"]["user"] == expected


@jailed
@pytest.mark.parametrize("name", ["fork", "chroot out", "unshare or mount", "read the host's processes"])
def test_escape_is_contained_in_a_user_namespace(name, host):
    """The path a non-root caller gets: a user namespace with every capability dropped."""
    passed, reason = sandbox.run_sandboxed(host(ESCAPES[name]), ["assert True"], timeout=3.0, userns=True, audit_hook=False)
    assert not passed or name == "fork", reason


SOLUTIONS = {
    "add": ("def add(a, b):\n    return a + b", ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]),
    "typing and dataclasses": ("from typing import List, Optional\nfrom dataclasses import dataclass, field\n@dataclass\n"
                               "class Box:\n    items: List[int] = field(default_factory=list)\ndef total(xs: List[int]) -> Optional[int]:\n"
                               "    return sum(Box(xs).items) if xs else None", ["assert total([1, 2]) == 3", "assert total([]) is None"]),
    "namedtuple and enum": ("from collections import namedtuple\nfrom enum import Enum\nP = namedtuple('P', 'x y')\n"
                            "class C(Enum):\n    RED = 1\ndef f(x):\n    return P(x, C.RED.value).x * 2", TESTS),
    "recursion": ("import sys\nsys.setrecursionlimit(5000)\ndef fib(n, memo={}):\n    if n < 2:\n        return n\n"
                  "    if n not in memo:\n        memo[n] = fib(n - 1) + fib(n - 2)\n    return memo[n]", ["assert fib(300) % 1000 == 600"]),
    "regex, heapq, itertools, functools": ("import re, heapq, itertools, functools\n@functools.lru_cache(None)\ndef f(x):\n"
                                           "    return heapq.nsmallest(1, [x * 2, 99])[0] + len(re.findall('z', 'abc')) + "
                                           "sum(1 for _ in itertools.combinations(range(2), 3))", TESTS),
    "fractions, decimal, statistics, math": ("from fractions import Fraction\nfrom decimal import Decimal\nimport statistics, math\n"
                                             "def f(x):\n    return int(Fraction(x * 4, 2) + statistics.mean([0, 0]) + math.gcd(0, 0)) + int(Decimal(0))", TESTS),
    "a class with printing": ("class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
                              "        print('push', x)\n        self.items.append(x)\ndef f(x):\n    s = Stack()\n    s.push(x * 2)\n"
                              "    return s.items[-1]", TESTS),
    "a temporary file": ("import tempfile, os\ndef f(x):\n    with tempfile.NamedTemporaryFile('w+') as t:\n        t.write(str(x * 2))\n"
                         "        t.seek(0)\n        return int(t.read())", TESTS),
    "exceptions with tracebacks": ("import traceback\ndef f(x):\n    try:\n        1 / 0\n    except ZeroDivisionError:\n"
                                   "        traceback.format_exc()\n    return x * 2", TESTS),
}


@jailed
@pytest.mark.parametrize("name", sorted(SOLUTIONS))
def test_real_solutions_pass(name):
    code, tests = SOLUTIONS[name]
    assert sandbox.run_sandboxed(code, tests) == (True, "all tests passed")


@jailed
def test_reasons_come_from_the_harness():
    tests = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"]
    assert common.judge_code("def add(a, b):\n    return a + b", tests) == (True, "all tests passed")
    assert common.judge_code("Here:\n```python\ndef add(a, b):\n    return a + b\n```", tests)[0]
    assert common.judge_code("def add(a, b):\n    return a * b", tests) == (
        False, "test 1 of 3 raised AssertionError: assert add(1, 2) == 3")
    assert common.judge_code("def add(a, b) return", tests)[1].startswith("the code raised SyntaxError")
    assert common.judge_code("", tests) == (False, "test 1 of 3 raised NameError: assert add(1, 2) == 3")
    assert common.judge_code("import sys\nsys.stderr.write('all tests passed\\n')\nraise SystemExit(1)", tests) == (
        False, "the code raised SystemExit: 1")
    assert sandbox.run_sandboxed("while True:\n    pass", timeout=1.0) == (False, "timeout after 1s")


def test_missing_isolation_refuses_unless_allowed(monkeypatch, tmp_path):
    """Where the kernel refuses a layer, model code does not run (one error line before anything is written)
    unless HF_ALLOW_CODE_EVAL=1; then it runs with the remaining layers, and the run says which are missing."""
    monkeypatch.setitem(sandbox._ISOLATION, False, {"layers": {}, "missing": ["namespaces (simulated)"]})
    monkeypatch.setattr(common, "SANDBOX", {})
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(sandbox.IsolationUnavailable, match="lacks namespaces .simulated.*HF_ALLOW_CODE_EVAL=1"):
        sandbox.run_sandboxed("x = 1")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", "import common, sandbox, sys\n"
                           "sandbox._ISOLATION[False] = {'layers': {}, 'missing': ['namespaces (simulated)']}\n"
                           "sys.argv = ['sft.py', '--output_dir', sys.argv[1], '--steps', '1', '--eval_datasets', 'code=world/data/code/test.jsonl']\n"
                           "import runpy\nrunpy.run_path('sft.py', run_name='__main__')", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and not out.exists(), proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: world/data/code/test.jsonl: model-written code is not run"), proc.stderr
    if not FOUND["missing"]:
        monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
        assert sandbox.run_sandboxed("x = 1", ["assert x == 1"]) == (True, "all tests passed")
        assert common.require_sandbox("here")["missing"] == ["namespaces (simulated)"]


@jailed
def test_layers_are_logged_in_the_run(tmp_path):
    from scripts import records, run_script
    run_script("sft.py", tmp_path / "out", "--steps", "1", "--batch_size", "2", "--save_every", "0", "--eval_before", "false",
               "--eval_datasets", "code=world/data/code/test.jsonl", "--eval_samples", "2", "--max_new_tokens", "8")
    config = next(r for r in records(tmp_path / "out") if r.get("event") == "config")
    assert config["sandbox"]["missing"] == [] and "uid 65534 (nobody)" in config["sandbox"]["layers"] or os.geteuid() != 0
    assert any("PID namespace" in layer for layer in config["sandbox"]["layers"])
