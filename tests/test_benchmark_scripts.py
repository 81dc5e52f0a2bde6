"""benchmark/*.sh, the paper-scale commands: bash syntax, and every --flag passed to a repo script is one that script
accepts (a field of its Args dataclass; results.py: its argparse options), so a renamed flag fails here. Nothing is
run but `bash -n`; a few seconds (the method modules are imported once for their Args)."""
import dataclasses
import glob
import importlib
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmark")
SHELL = sorted(glob.glob(os.path.join(BENCH, "*.sh")))
COMMON = os.path.join(BENCH, "common.sh")
TRAINING = ["sft", "s3ft", "fait", "asft", "otr", "drift", "sorted_ft", "roste"]
SCRIPTS = TRAINING + ["merge", "results"]
# benchmark/<name>.sh -> the repo script whose method it runs
METHOD_SCRIPTS = {"sft": "sft", "s3ft": "s3ft", "fait": "fait", "dft": "asft", "asft": "asft", "otr": "otr",
                  "drift": "drift", "sorted_ft": "sorted_ft", "roste": "roste", "merge": "merge"}
SCRIPT_TOKEN = re.compile(r"(?<![\w/.-])(" + "|".join(SCRIPTS) + r")\.py(?![\w.])")
FLAG = re.compile(r"(?<![\w-])--([A-Za-z_][\w-]*)")


def accepted_flags(script: str) -> set:
    if script == "results":  # argparse, read from the source (results.py is not a training script)
        with open(os.path.join(ROOT, "results.py")) as f:
            return set(re.findall(r"add_argument\(\s*\"--([\w-]+)\"", f.read()))
    module = importlib.import_module(script)
    return {f.name for f in dataclasses.fields(module.Args)}


FLAGS = {}


def flags_of(script: str) -> set:
    if script not in FLAGS:
        FLAGS[script] = accepted_flags(script)
    return FLAGS[script]


def shell_text(path: str) -> str:
    """The file without heredoc bodies (inline Python) and comments, with backslash continuations joined."""
    with open(path) as f:
        text = f.read()
    text = re.sub(r"<<-?\s*'?(\w+)'?[^\n]*\n.*?\n\s*\1[ \t]*(?=\n|$)", "", text, flags=re.S)
    text = text.replace("\\\n", " ")
    lines = [re.sub(r"\s+#\s.*$", "", line) for line in text.splitlines() if not line.lstrip().startswith("#")]
    return "\n".join(lines)


def arrays(text: str) -> dict:
    """NAME=( ... ) and NAME+=( ... ) bodies (balanced parentheses, so "$(...)" inside is kept), by name."""
    found = {}
    for m in re.finditer(r"(?<![\w$])([A-Za-z_]\w*)\+?=\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        assert depth == 0, f"unbalanced array {m.group(1)}"
        found.setdefault(m.group(1), []).append(text[m.end():i - 1])
    return found


def invocations(path: str) -> list:
    """(script, prefix, flags) of every `<script>.py` call in a benchmark file; "${ARRAY[@]}" arguments are expanded
    from the arrays defined in that file and in common.sh."""
    text = shell_text(path)
    defined = arrays(shell_text(COMMON))
    for name, bodies in arrays(text).items():
        defined[name] = defined.get(name, []) + bodies
    out = []
    for line in text.splitlines():
        m = SCRIPT_TOKEN.search(line)
        if not m:
            continue
        rest = re.split(r"\s(?:;|&&|\|\||\|)\s|;\s*$", line[m.end():])[0]
        flags = set(FLAG.findall(rest))
        for name in re.findall(r"\$\{(\w+)\[@\]\}", rest):
            assert name in defined, f"{os.path.basename(path)}: array {name} is not defined"
            flags |= {f for body in defined[name] for f in FLAG.findall(body)}
        out.append((m.group(1), line[:m.start()], flags))
    return out


def unknown_flags(path: str) -> list:
    return [f"{os.path.basename(path)}: {script}.py has no --{flag}"
            for script, _, flags in invocations(path) for flag in sorted(flags - flags_of(script))]


def test_every_method_has_a_script():
    names = {os.path.basename(p)[:-3] for p in SHELL}
    assert set(METHOD_SCRIPTS) <= names, sorted(set(METHOD_SCRIPTS) - names)
    assert os.path.isfile(os.path.join(BENCH, "README.md"))


@pytest.mark.parametrize("path", SHELL, ids=os.path.basename)
def test_bash_syntax(path):
    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("path", SHELL, ids=os.path.basename)
def test_flags_exist(path):
    assert unknown_flags(path) == []


@pytest.mark.parametrize("name", sorted(METHOD_SCRIPTS))
def test_script_shape(name):
    path = os.path.join(BENCH, name + ".sh")
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and lines[1] == "set -euo pipefail"
    assert lines[2].startswith("#"), "a comment block follows: what it reproduces, hardware, time, hub downloads"
    header = "\n".join(line for line in lines[2:] if line.startswith("#"))
    assert "Hardware" in header and "Time" in header and "hub" in header
    assert "arXiv" in header or name == "sft", "the paper and its arXiv id (sft.sh is the baseline of them all)"
    calls = invocations(path)
    scripts = [script for script, _, _ in calls]
    assert METHOD_SCRIPTS[name] in scripts and scripts[-1] == "results"
    assert re.search(r"^python results\.py ", "\n".join(lines), re.M)
    for script, prefix, flags in calls:
        if script in TRAINING:  # every training run: torchrun with NPROC processes, bf16, its own output directory
            assert re.search(r"torchrun .*--nproc_per_node \"\$NPROC\" $", prefix), prefix
            assert {"dtype", "model", "seed", "lr", "batch_size", "max_length", "steps"} <= flags, sorted(flags)
        else:
            assert re.search(r"\bpython $", prefix), prefix
            if script == "merge":
                assert {"method", "models", "dtype"} <= flags


def test_env_overrides():
    with open(COMMON) as f:
        common = f.read()
    for var in ("NPROC", "SEEDS", "OUT", "MODEL"):
        assert re.search(rf"^{var}=\$\{{{var}:-", common, re.M), var
    for name in METHOD_SCRIPTS:
        with open(os.path.join(BENCH, name + ".sh")) as f:
            text = f.read()
        assert re.search(r"^MODEL=\$\{MODEL:-", text, re.M) and 'common.sh"' in text, name
    for array in ("MATH", "CODE"):  # the shared training budgets
        (body,) = arrays(shell_text(COMMON))[array]
        assert "--dtype bfloat16" in " ".join(body.split()), array


def test_a_renamed_flag_fails(tmp_path):
    """The check is not vacuous: a flag no Args has, directly and through an array, is reported."""
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/usr/bin/env bash\nX=(--learning_rate 1e-5)\n'
                   'torchrun --standalone --nproc_per_node "$NPROC" sft.py "${MATH[@]}" \\\n  --warmup_steps 10 "${X[@]}"\n'
                   'python results.py runs/x_s0 --metric eval/x/accuracy\n')
    assert unknown_flags(str(bad)) == ["bad.sh: sft.py has no --learning_rate", "bad.sh: sft.py has no --warmup_steps",
                                       "bad.sh: results.py has no --metric"]
