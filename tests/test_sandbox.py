"""The code judge's sandbox: each attack fails inside the limits, and the test process is unharmed."""
import os
import socket
import time

import pytest

from common import judge_code, run_sandboxed

EXPECTED = {"infinite loop": "timeout", "allocate 10 GB": "MemoryError", "print 1 GB": "File too large"}
ATTACKS = {
    "infinite loop": "while True:\n    pass",
    "allocate 10 GB": "x = bytearray(10 * 1024**3)",
    "fork bomb": "import os\nwhile True:\n    os.fork()",
    "fork via subprocess": "import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])",
    "write outside the temp dir": "open('/tmp/sandbox_escape_test', 'w').write('x')",
    "write outside via os.open": "import os\nos.close(os.open('/tmp/sandbox_escape_test', os.O_WRONLY | os.O_CREAT))",
    "open a socket": "import socket\ns = socket.create_connection(('127.0.0.1', PORT), timeout=2)",
    "read the parent's environment": "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())\nassert 'SANDBOX_SECRET' in os.environ",
    "kill the parent": "import os, signal\nos.kill(PARENT, signal.SIGKILL)",
    "print 1 GB": "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)",
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_contained(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SANDBOX_SECRET", "hunter2")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    code = ATTACKS[name].replace("PORT", str(server.getsockname()[1])).replace("PARENT", str(os.getpid()))
    start = time.time()
    passed, reason = run_sandboxed(code, timeout=3.0)
    elapsed = time.time() - start
    assert not passed and EXPECTED.get(name, "sandbox:") in reason, reason
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert not os.path.exists("/tmp/sandbox_escape_test")
    with pytest.raises(socket.timeout):
        server.accept()  # nothing connected
    server.close()
    assert "hunter2" not in reason


def test_passing_and_failing_solutions_get_reasons():
    tests = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"]
    assert judge_code("def add(a, b):\n    return a + b", tests) == (True, "all tests passed")
    assert judge_code("Here:\n```python\ndef add(a, b):\n    return a + b\n```", tests)[0]
    passed, reason = judge_code("def add(a, b):\n    return a - b", tests)
    assert not passed and "AssertionError" in reason
    passed, reason = judge_code("def add(a, b) return", tests)
    assert not passed and "SyntaxError" in reason
    passed, reason = judge_code("", tests)
    assert not passed and "NameError" in reason


def test_writing_inside_the_working_directory_is_allowed():
    assert run_sandboxed("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'")[0]


def test_standard_library_imports_work():
    assert run_sandboxed("import re, collections, itertools, math, json, heapq\nassert re.sub('a', 'b', 'aa') == 'bb'")[0]
