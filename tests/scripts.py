"""Running the train-and-evaluate scripts in subprocesses, as a user would, and reading their metrics."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, out, *args, nproc=1, check=True):
    """`python <script> --output_dir <out> <args>` (torchrun with nproc > 1, one thread per process)."""
    cmd = [sys.executable, script, "--output_dir", str(out), *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29500 + os.getpid() % 1000), *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else "2"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return [r["loss"] for r in records(out) if "loss" in r]
