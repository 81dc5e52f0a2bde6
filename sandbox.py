"""The jail for model-written code (imported by common.py): S3FT's code judge, FAIT's variant filter, code evaluation.

    from sandbox import judge_code, run_sandboxed, isolation
    judge_code(response, ["assert add(1, 2) == 3"])  # -> (passed, reason)

Isolation comes from the kernel, set up in pure Python (ctypes: unshare, mount, capset); nothing to install:
  1. the candidate's interpreter is pid 1 of its own PID namespace: when it ends, everything it started ends, and
     no signal reaches a process outside; in its own network (no interface up), IPC and UTS namespaces;
  2. in a private mount namespace it is chrooted into a read-only view of the system libraries and the standard
     library only (no /etc, /home, /proc, /sys, project or data); its one writable place is /work, a small tmpfs
     that vanishes with it;
  3. it runs as uid nobody with no capabilities (started by root), or in a user namespace with every capability
     dropped (started by anyone else), with no_new_privs, an empty environment and CPU, memory, file-size,
     open-file and process limits (no fork);
  4. an audit hook, the second layer: no subprocesses, sockets, ctypes, signals, tracing or frame and gc access.
The verdict is the harness's, not the exit status: the harness runs the code and then each test, and reports on a
pipe, prefixed with a per-run random nonce, either "every test ran" or the first failure in its own words. Exiting
(os._exit, sys.exit, SystemExit, atexit) cannot produce that report, so it is a failure.
Where the kernel refuses a layer, model code is not run unless HF_ALLOW_CODE_EVAL=1 (the `evaluate` library's
convention) says to run it anyway with the layers that remain; `isolation()` says which are active.
"""
import ast
import marshal
import os
import secrets
import subprocess
import sys
import tempfile

# Runs as `python -I -S -c LAUNCHER` with the job (marshal) on stdin; it prints one Python literal, as the harness does. The launcher (trusted, with the caller's
# privileges) enters the new namespaces and forks the jail's pid 1, which builds the view, drops every privilege
# and then runs the harness. The launcher waits (wall-clock timeout), kills the jail and prints one JSON line.
LAUNCHER = r'''
import ctypes, marshal, os, resource, select, sys, time
job = marshal.loads(sys.stdin.buffer.read())
SIGKILL = 9
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
NEWNS, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
layers, missing = {}, []
root = os.geteuid() == 0
userns = job["userns"] or not root


def check(ok, what):
    if not ok:
        raise OSError(ctypes.get_errno(), what + ": " + os.strerror(ctypes.get_errno()))


def mount(src, dst, fstype, flags, data=None):
    check(libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(), flags, data and data.encode()) == 0,
          "mount " + dst)


def bind_readonly(src, dst):
    mount(src, dst, None, BIND)
    kept = os.statvfs(src).f_flag & (NODEV | NOEXEC)  # flags a user namespace may not clear (atime ones are kept)
    mount(None, dst, None, BIND | REMOUNT | RDONLY | NOSUID | kept)


def build_view(top):
    """A read-only root on a tmpfs: the libraries, the standard library, /dev/{null,zero,urandom}, /work (tmpfs)."""
    mount("tmpfs", top, "tmpfs", NOSUID | NODEV, "size=1m,mode=755")
    for path in job["binds"]:
        target = top + path
        if os.path.islink(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
        elif os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
            bind_readonly(path, target)
        elif os.path.isfile(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "w").close()
            bind_readonly(path, target)
    os.makedirs(top + "/work")
    owner = "" if userns else ",uid=65534,gid=65534"
    mount("tmpfs", top + "/work", "tmpfs", NOSUID | NODEV, f"size={job['disk_mb']}m,mode=700{owner}")
    os.symlink("work", top + "/tmp")
    mount(None, top, None, REMOUNT | RDONLY | NOSUID | NODEV)


def drop_privileges():
    if not userns:
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)  # leaves no capability
        layers["user"] = "uid 65534 (nobody)"
    else:
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        check(libc.capset(header, (ctypes.c_uint32 * 6)()) == 0, "capset")
        layers["user"] = f"user namespace (uid {os.getuid()} outside), no capabilities"
    check(libc.prctl(38, 1, 0, 0, 0) == 0, "no_new_privs")  # PR_SET_NO_NEW_PRIVS


def jail(report):
    """pid 1 of the new namespaces: view, privileges, limits, then the harness."""
    try:
        if not layers.get("pid"):
            raise OSError(0, "no mount namespace")
        mount(None, "/", None, REC | PRIVATE)
        build_view(job["top"])
        os.chroot(job["top"])
        os.chdir("/work")
        layers["filesystem"] = "read-only view of the libraries; /work tmpfs " + str(job["disk_mb"]) + " MiB"
    except OSError as err:
        missing.append(f"filesystem ({err})")
        os.chdir(job["work"])
    try:
        drop_privileges()
    except OSError as err:
        missing.append(f"unprivileged user ({err})")
    libc.prctl(1, SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG after the credential change, which clears it
    limits = {"CPU": job["cpu"], "AS": job["memory_mb"] << 20, "FSIZE": job["output_limit"], "NOFILE": 64, "CORE": 0,
              "NPROC": 0}
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, value))
    out = os.open("stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.closerange(3, report)
    os.closerange(report + 1, 1 << 16)
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "TMPDIR": "/work", "HOME": "/work"})
    harness(job["code"], job["tests"], job["nonce"], report,
            {"layers": layers, "missing": missing, "uid": os.getuid(), "pid": os.getpid()})


def harness(code, tests, nonce, fd, facts):
    """Runs the code, then each test, in one namespace, and reports on fd; it never returns. Its own references
    are bound before the candidate runs, so patching os or builtins cannot change what it writes."""
    write, exit_, compile_, exec_, type_, len_, str_, repr_, base = (os.write, os._exit, compile, exec, type, len, str,
                                                                     repr, BaseException)
    def say(message):
        write(fd, (nonce + " " + repr_(message) + "\n").encode())
    say({"facts": facts})
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    if job["hook"]:
        private = {"__builtins__": {"PermissionError": PermissionError}}
        exec_(compile_(HOOK, "hook", "exec"), private)
        sys.addaudithook(private.pop("hook"))
    globals().clear()  # the launcher's names (libc, job) are gone before the candidate runs
    steps = [("the code", code)] + [(f"test {k + 1} of {len_(tests)}", t) for k, t in enumerate(tests)]
    for i, (name, source) in enumerate(steps):
        try:
            exec_(compile_(source, "candidate.py" if i == 0 else f"test_{i}.py", "exec"), scope)
        except base as err:  # SystemExit and KeyboardInterrupt included: only running every test is a pass
            try:
                what = str_(type_(err).__name__)[:80]
                text = str_(err)[:200] if i == 0 else source[:200]
                what += ": " + text if text else ""
            except base:
                what = "an exception"
            say({"passed": False, "reason": f"{name} raised {what}"})
            exit_(0)
    say({"passed": True, "tests": len_(tests)})
    exit_(0)


# The audit hook, built from literals only: no globals, no closure, nothing a candidate can rebind to switch it off.
HOOK = """
def hook(event, args):
    if event.startswith(("subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.fork", "os.forkpty", "os.kill",
                         "os.killpg", "os.setns", "os.unshare", "signal.pthread_kill", "socket.", "ctypes.",
                         "sys._current_frames", "sys.settrace", "sys.setprofile", "sys.monitoring", "gc.get_",
                         "sys.addaudithook", "os.putenv", "os.unsetenv", "pty.",
                         "code.__new__", "function.__new__", "sys.remote_exec")) or (
            event == "import" and args[0].split(".")[0] in ("ctypes", "_ctypes", "_posixsubprocess", "subprocess",
            "socket", "_socket", "multiprocessing", "_multiprocessing", "pty", "asyncio", "_testcapi", "_testinternalcapi")):
        raise PermissionError("sandbox: " + event + " is not allowed")
"""


read, write = os.pipe()
job["launcher"] = os.getpid()
try:
    check(libc.unshare(NEWNS | NEWPID | NEWNET | NEWIPC | NEWUTS | (NEWUSER if userns else 0)) == 0, "unshare")
    if userns:
        uid, gid = job["outer_ids"]
        for name, text in (("uid_map", f"0 {uid} 1"), ("setgroups", "deny"), ("gid_map", f"0 {gid} 1")):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
    layers.update(pid="own PID namespace", net="own network namespace (no interface)", ipc="own IPC and UTS namespaces")
except OSError as err:
    missing.append(f"namespaces ({err})")
if missing and job["require"]:
    print(repr({"refused": "isolation unavailable: " + "; ".join(missing)}))
    sys.exit(0)
pid = os.fork()
if pid == 0:
    os.close(read)
    try:
        jail(write)
    finally:
        os._exit(0)
os.close(write)
deadline, data = time.monotonic() + job["timeout"], b""
poll = select.poll()
poll.register(read, select.POLLIN)
while len(data) < 1 << 16:
    left = deadline - time.monotonic()
    if left <= 0 or not poll.poll(left * 1000):
        break
    chunk = os.read(read, 1 << 16)
    if not chunk:
        break
    data += chunk
timed_out = time.monotonic() >= deadline
os.kill(pid, SIGKILL)  # pid 1 of the namespace: the kernel kills everything in it
_, status = os.waitpid(pid, 0)
print(repr({"report": data.decode(errors="replace"), "timed_out": timed_out,
                  "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}))
'''


def _binds() -> list:
    """What the jail sees, read-only: the system libraries, the loader's cache, and this interpreter's stdlib."""
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    paths = ["/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/local/lib",
             "/etc/ld.so.cache", "/dev/null", "/dev/zero", "/dev/urandom", stdlib]
    return [p for p in paths if os.path.lexists(p)]


def _launch(code: str, tests: list, timeout: float, memory_mb: int, output_limit: int, require: bool,
            userns: bool = False, audit_hook: bool = True) -> dict:
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="sandbox-") as work:
        top = os.path.join(work, "root")
        os.mkdir(top)
        job = {"code": code, "tests": list(tests), "nonce": nonce, "timeout": timeout, "cpu": int(timeout) + 1,
               "memory_mb": memory_mb, "output_limit": output_limit, "disk_mb": 16, "require": require,
               "userns": userns, "hook": audit_hook, "outer_ids": [os.getuid(), os.getgid()], "top": top, "work": work, "binds": _binds()}
        proc = subprocess.run([os.path.realpath(sys.executable), "-I", "-S", "-c", LAUNCHER], input=marshal.dumps(job),
                              capture_output=True, cwd=work, env={"PATH": "/usr/bin:/bin"}, timeout=timeout + 30)
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"sandbox launcher failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace')[-500:]}")
    result = ast.literal_eval(lines[-1])
    messages = []
    for line in result.get("report", "").splitlines():
        if line.startswith(nonce + " "):
            try:
                message = ast.literal_eval(line[len(nonce) + 1:])
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                continue
            if isinstance(message, dict):
                messages.append(message)
    result["facts"] = next((m["facts"] for m in messages if "facts" in m), None)
    result["verdict"] = next((m for m in messages if "passed" in m), None)
    return result


_ISOLATION = {}


def isolation(userns: bool = False) -> dict:
    """The layers this machine gives the jail (probed once per process): {"layers": {...}, "missing": [...]}."""
    if userns not in _ISOLATION:
        result = _launch(PROBE, ["assert solve() == 6"], 10.0, 256, 1 << 16, require=False, userns=userns)
        facts, verdict = result["facts"] or {}, result["verdict"] or {"reason": "no report"}
        found, missing = dict(facts.get("layers", {})), list(facts.get("missing", ["the probe did not report"]))
        if found.get("user") == "uid 65534 (nobody)" and facts.get("uid") != 65534 or found.get("pid") and facts.get("pid") != 1:
            raise RuntimeError(f"sandbox probe disagrees with its layers: {facts}")
        if not verdict.get("passed"):
            missing.append(f"a working interpreter inside the jail ({verdict['reason']})")
        found["audit_hook"] = "audit hook (second layer)"
        _ISOLATION[userns] = {"layers": found, "missing": missing}
    return _ISOLATION[userns]


# The probe: the standard library imports, /work is writable, / is not.
PROBE = """import collections, dataclasses, functools, heapq, itertools, json, math, re, typing
open("/work/probe", "w").write("ok")
try:
    open("/probe", "w")
except OSError:
    pass
else:
    raise AssertionError("the root is writable")
def solve():
    return sum(collections.Counter("aab").values()) + len(re.findall("a", "aa")) + math.floor(1.5)"""


class IsolationUnavailable(RuntimeError):
    """The kernel refused a layer and HF_ALLOW_CODE_EVAL=1 was not given: model code is not run."""


def allowed() -> dict:
    """isolation(), or IsolationUnavailable with one line naming the missing layers."""
    found = isolation()
    if found["missing"] and os.environ.get("HF_ALLOW_CODE_EVAL") != "1":
        raise IsolationUnavailable("model-written code is not run here: the sandbox lacks " + "; ".join(found["missing"]) +
                                   ". Set HF_ALLOW_CODE_EVAL=1 to run it with the remaining layers")
    return found


def run_sandboxed(code: str, tests=(), timeout: float = 5.0, memory_mb: int = 512, output_limit: int = 1 << 20,
                  userns: bool = False, audit_hook: bool = True) -> tuple:
    """(passed, reason): passed only when the harness reports that `code` and then every test in `tests` ran
    without raising, within the wall-clock `timeout` and the limits. The reason is the harness's (or the
    launcher's: timeout, signal, no report); nothing the candidate prints is used. `userns` forces the
    user-namespace path that non-root callers get; `audit_hook=False` leaves the OS layers alone (for tests)."""
    allowed()
    require = os.environ.get("HF_ALLOW_CODE_EVAL") != "1"
    result = _launch(code, list(tests), timeout, memory_mb, output_limit, require, userns, audit_hook)
    if "refused" in result:
        raise IsolationUnavailable(result["refused"])
    verdict = result["verdict"]
    if verdict is not None:
        return (True, "all tests passed") if verdict["passed"] else (False, verdict["reason"])
    if result["timed_out"]:
        return False, f"timeout after {timeout:g}s"
    if result["signal"] not in (None, 9):
        import signal
        return False, f"killed by {signal.Signals(result['signal']).name}" + (" (CPU limit)" if result["signal"] == 24 else "")
    return False, "the program ended before the harness could report (it exited or was killed before the tests finished)"


def judge_code(response: str, reference) -> tuple:
    """(passed, reason): the response's code (a ```python block if present) run with the tests in the sandbox."""
    import re
    blocks = re.findall(r"```(?:python)?\n(.*?)```", response, re.S)
    return run_sandboxed(blocks[0] if blocks else response, list(reference))
