"""Every bad input of the reliability audit's section A: one `error:` line naming the file, line, field or flag, the
script's exit (SystemExit with that line: status 1), and nothing written. The scripts run in-process (runpy), so the
38 rows cost seconds, not a torch import each; exit statuses are checked in subprocesses at the end."""
import os
import runpy
import shutil
import subprocess
import sys

import pytest

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(common.WORLD_DIR, "base")
FAST = ["--eval_datasets", "", "--eval_before", "false", "--compile", "false", "--steps", "2", "--batch_size", "2"]

DATA = {  # file name -> content (bytes or text) made in tmp_path
    "answer_int.jsonl": '{"question": "q", "answer": 4}\n',
    "msg_no_content.jsonl": '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}\n',
    "msg_str.jsonl": '{"messages": "hello"}\n',
    "resp_null.jsonl": '{"prompt": "hi", "response": null}\n',
    "mbpp_str_tests.jsonl": '{"text": "t", "code": "c", "test_list": "assert f(1) == 1"}\n',
    "latin1.jsonl": '{"prompt": "a", "response": "b"}\n'.encode() + b'{"prompt": "caf\xe9", "response": "x"}\n',
    "only_dict.json": '{"question": "q", "answer": "a"}',
    "squad_bad.jsonl": '{"context": "c", "question": "q", "answers": ["a"]}\n',
}

CASES = [  # (name, script, flags, message in the error line); DATA files by name, MODEL_* and OUT by placeholder
    ("answer is an int", "sft.py", ["--dataset", "answer_int.jsonl"], "answer_int.jsonl:1: field 'answer' must be a string, got int"),
    ("turn without content", "sft.py", ["--dataset", "msg_no_content.jsonl"], "msg_no_content.jsonl:1: field 'messages' must be a list"),
    ("messages is a string", "sft.py", ["--dataset", "msg_str.jsonl"], "msg_str.jsonl:1: field 'messages' must be a list"),
    ("response is null", "sft.py", ["--dataset", "resp_null.jsonl"], "resp_null.jsonl:1: field 'response' must be a string, got NoneType"),
    ("test_list is a string", "sft.py", ["--dataset", "mbpp_str_tests.jsonl"], "field 'test_list' must be a list of strings, got str"),
    ("a line not UTF-8", "sft.py", ["--dataset", "latin1.jsonl"], "latin1.jsonl:2: not UTF-8 (byte 0xe9"),
    ("a .json object", "sft.py", ["--dataset", "only_dict.json"], "only_dict.json: expected a JSON list of objects"),
    ("SQuAD answers not an object", "sft.py", ["--dataset", "squad_bad.jsonl"], "field 'answers' must be an object"),
    ("missing csv", "sft.py", ["--dataset", "missing.csv"], "missing.csv: no such file"),
    ("--batch_size 0", "sft.py", ["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    ("--micro_batch_size -2", "sft.py", ["--micro_batch_size", "-2"], "--micro_batch_size must be 0 (auto) or more, got -2"),
    ("--steps -3", "sft.py", ["--steps", "-3"], "--steps must be 0 or more, got -3"),
    ("--lr nan", "sft.py", ["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
    ("--lr inf", "sft.py", ["--lr", "inf"], "--lr must be a finite number >= 0, got inf"),
    ("--seed -1", "sft.py", ["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
    ("--device gpu", "sft.py", ["--device", "gpu"], "--device must be auto, cpu or cuda, got 'gpu'"),
    ("--keep_checkpoints -1", "sft.py", ["--keep_checkpoints", "-1"], "--keep_checkpoints must be 0 (all) or more, got -1"),
    ("--save_every -1", "sft.py", ["--save_every", "-1"], "--save_every must be 0 (off) or more, got -1"),
    ("--max_grad_norm -1", "sft.py", ["--max_grad_norm", "-1"], "--max_grad_norm must be 0 (off) or a finite positive number"),
    ("--max_length 0", "sft.py", ["--max_length", "0"], "--max_length must be at least 2, got 0"),
    ("--warmup_ratio 2", "asft.py", ["--warmup_ratio", "2"], "--warmup_ratio must be in [0, 1], got 2.0"),
    ("corrupt tokenizer.json", "sft.py", ["--model", "MODEL_BAD_TOKENIZER"], "could not be loaded as a local directory or hub id"),
    ("truncated model.safetensors", "sft.py", ["--model", "MODEL_TRUNCATED"], "could not be loaded as a local directory or hub id"),
    ("output dir's parent is a file", "sft.py", ["--output_dir", "A_FILE/out"], "is not a writable directory"),
    ("output dir is a file", "sft.py", ["--output_dir", "A_FILE"], "is a file"),
    ("merge --weights 1,abc", "merge.py", ["--models", "BASE,BASE", "--weights", "1,abc"], "--weights '1,abc': expected comma-separated numbers"),
    ("merge --weights 1,nan", "merge.py", ["--models", "BASE,BASE", "--weights", "1,nan"], "every weight must be finite"),
    ("merge --weights 1,-1", "merge.py", ["--models", "BASE,BASE", "--weights", "1,-1"], "sum to 0"),
    ("merge, a missing relative path", "merge.py", ["--models", "BASE,runs_nope/final"], "'runs_nope/final': no such directory"),
    ("merge, corrupt tokenizer.json", "merge.py", ["--models", "BASE,MODEL_BAD_TOKENIZER"], "bad_tokenizer: the tokenizer could not be loaded"),
    ("merge into a previous merge", "merge.py", ["--models", "BASE,BASE", "--output_dir", "A_RUN"], "holds another run (final, metrics.jsonl)"),
    ("merge, truncated safetensors", "merge.py", ["--models", "BASE,MODEL_TRUNCATED"], "a .safetensors file is corrupt"),
]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    for name, content in DATA.items():
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    bad_tok = d / "bad_tokenizer"
    shutil.copytree(BASE, bad_tok)
    text = (bad_tok / "tokenizer.json").read_text()
    (bad_tok / "tokenizer.json").write_text(text[: len(text) // 2])
    truncated = d / "truncated"
    shutil.copytree(BASE, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:1000])
    (d / "a_file").write_text("x")
    (d / "a_run" / "final").mkdir(parents=True)
    (d / "a_run" / "metrics.jsonl").write_text("")
    return {"MODEL_BAD_TOKENIZER": str(bad_tok), "MODEL_TRUNCATED": str(truncated), "A_FILE": str(d / "a_file"),
            "A_RUN": str(d / "a_run"), "BASE": BASE, "dir": d}


def run_in_process(script, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script, *argv])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    return exit_info.value.code


@pytest.mark.parametrize("name,script,flags,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_error_line_and_writes_nothing(name, script, flags, message, fixtures, tmp_path, monkeypatch):
    d = fixtures["dir"]
    flags = [os.path.join(d, f) if f in DATA else fixtures.get(f, f) for f in flags]
    for key in ("MODEL_BAD_TOKENIZER", "MODEL_TRUNCATED", "A_FILE", "A_RUN", "BASE"):
        flags = [f.replace(key, fixtures[key]) for f in flags]
    if "--output_dir" not in flags:
        flags += ["--output_dir", str(tmp_path / "out")]
    code = run_in_process(script, (FAST if script != "merge.py" else ["--eval_datasets", ""]) + flags, monkeypatch)
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code and message in code, code
    assert not (tmp_path / "out").exists() and sorted(os.listdir(d)) == sorted([*DATA, "bad_tokenizer", "truncated", "a_file", "a_run"])
    assert sorted(os.listdir(fixtures["A_RUN"])) == ["final", "metrics.jsonl"] and not os.listdir(os.path.join(fixtures["A_RUN"], "final"))


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/unshare"), reason="needs root for a private tmpfs")
def test_a_read_only_output_filesystem_is_refused_before_loading(tmp_path):
    disk = tmp_path / "ro"
    disk.mkdir()
    script = f"mount -t tmpfs -o ro,size=1m tmpfs {disk} && {sys.executable} sft.py --output_dir {disk}/run"
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr == f"error: --output_dir '{disk}/run': '{disk}' is not a writable directory\n"


def test_exit_statuses_unknown_flags_and_help(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "sft.py", "--output_dir", str(tmp_path / "out"), *a], cwd=ROOT,
                                    capture_output=True, text=True)
    usage = run("--bogus", "3")
    assert usage.returncode == 2 and usage.stderr.strip().splitlines()[-1] == "sft.py: error: unrecognized arguments: --bogus 3"
    error = run("--batch_size", "0")
    assert error.returncode == 1 and error.stderr == "error: --batch_size must be at least 1, got 0\n"
    help_text = run("--help").stdout
    assert "turn off --compile" in help_text and "turn off --eval_before" in help_text
    assert not (tmp_path / "out").exists()


def test_a_crash_in_the_final_evaluation_loses_nothing(tmp_path, monkeypatch):
    """final/ is saved before the final evaluation: a failure there leaves a loadable model (and no eval_after)."""
    import common
    import sft
    calls = []

    def evaluate(model, tokenizer, loss_model, eval_sets, rt, args, step):
        calls.append(step)
        if step == args.steps:
            raise RuntimeError("the judge crashed")
        return {"step": step}
    monkeypatch.setattr(sft, "evaluate", evaluate)
    monkeypatch.chdir(ROOT)
    lines = open(os.path.join(common.WORLD_DIR, "data", "math", "train.jsonl")).readlines()[:8]
    (tmp_path / "d.jsonl").write_text("".join(lines))
    args = common.parse_args(sft.Args, ["--steps", "2", "--batch_size", "4", "--save_every", "0", "--compile", "false",
                                        "--eval_datasets", "", "--dataset", str(tmp_path / "d.jsonl"),
                                        "--output_dir", str(tmp_path / "run")])
    with pytest.raises(RuntimeError, match="the judge crashed"):
        sft.main(args)
    from transformers import AutoModelForCausalLM
    assert calls == [0, 2] and AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final") is not None
    assert '"eval_after"' not in (tmp_path / "run" / "metrics.jsonl").read_text()
