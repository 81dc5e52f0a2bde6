"""Running the train-and-evaluate scripts in subprocesses, as a user would, and reading their metrics."""
import contextlib
import io
import json
import os
import runpy
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port that is free now, for torchrun's rendezvous (pytest -n 2 runs two tests at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_script(script, out, *args, nproc=1, check=True, in_process=False):
    """`python <script> --output_dir <out> <args>` (torchrun with nproc > 1, one thread per process). in_process:
    run it in this process instead (a refusal then costs no torch import; see `run_in_process`)."""
    cmd = [sys.executable, script, "--output_dir", str(out), *args]
    if in_process:
        proc = run_in_process(cmd[1:])
        if check:
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else "2"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_side_by_side(*runs, check=True):
    """Each run, (script, out, *args), as `python <script> --output_dir <out> <args>`, all at once with one thread
    each: a 3M model gains little from a second thread, so two single-threaded runs take about half the time of two
    in a row. Runs compared for equality here all get the same one thread. Returns their CompletedProcesses."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [(run, subprocess.Popen([sys.executable, run[0], "--output_dir", str(run[1]), *run[2:]], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for run in runs]
    done = []
    for run, proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        if check:
            assert proc.returncode == 0, f"{run[:2]}: {stdout[-3000:]}{stderr[-3000:]}"
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


def run_in_process(argv):
    """`python <argv>` as __main__ in this process (runpy), for runs that stop with an `error:` line: the line is the
    SystemExit's code, returned as stderr with returncode 1, what Python prints and returns for it. Any other
    exception propagates, so a traceback fails the test as it would in a subprocess. Tests of exit statuses and
    of what a user's shell sees run real subprocesses (test_bad_inputs)."""
    import common
    saved, cwd, modes = sys.argv, os.getcwd(), list(common.EMULATION)
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    sys.argv = argv
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_path(os.path.join(ROOT, argv[0]), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = saved
        os.chdir(cwd)
        while len(common.EMULATION) > len(modes):  # a bf16 run's process-wide mode ends with the run here
            common.EMULATION.pop().__exit__(None, None, None)
    if isinstance(code, str):
        stderr.write(code + "\n")
        code = 1
    return subprocess.CompletedProcess(argv, code or 0, stdout.getvalue(), stderr.getvalue())


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return [r["loss"] for r in records(out) if "loss" in r]
