"""The CPU rehearsal of the paper-scale recipes (`REHEARSAL=1 bash benchmark/<x>.sh`, benchmark/README.md): sft.sh and
merge.sh run end to end as a user runs them, into a temporary OUT, on benchmark/rehearsal.py's tiny stand-ins of the
hub models and data (nothing downloads: HF_HUB_OFFLINE). Checked: rc 0, the results tables with their rows, the
final/ directories load with transformers, the runs read the stand-ins, and the uniform soup is the mean of its two
ingredients; and that without REHEARSAL the recipe is the paper-scale one. ~80 s on 2 idle CPU cores (sft.sh ~22 s,
merge.sh ~55 s: it trains the second SFT seed, then 6 merges; mostly starting Python and torch, ~4 s per process)."""
import json
import os
import re
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# benchmark/common.sh's settings (and the scripts' own): the rehearsal's defaults apply, not the caller's
SETTINGS = ("MODEL", "NPROC", "SEEDS", "MICRO", "LR", "MATH_STEPS", "CODE_STEPS", "ABLATIONS", "DATA", "MATH_BATCH",
            "CODE_BATCH", "NEW_TOKENS", "SAVE_EVERY", "DEVICE", "COMPILE", "TEACHER", "REASONING", "EXITS", "BITS",
            "EXIT_THRESHOLD", "S3FT_PROMPT")


def rehearse(script, out):
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(REHEARSAL="1", OUT=str(out), HF_DATASETS_CACHE=str(out / "datasets_cache"))
    proc = subprocess.run(["bash", f"benchmark/{script}.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def table(stdout, first_metric):
    """{run: [cells]} of the results.py table whose header's first metric column is `first_metric`."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| run | seeds | {first_metric} |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def load(path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path)
    return {k: v.float() for k, v in model.state_dict().items()}


def test_without_rehearsal_the_recipe_reads_the_hub(tmp_path):
    """REHEARSAL unset: common.sh's model, data and budgets are the paper-scale ones, untouched by the rehearsal."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS + ("REHEARSAL",)}
    env["OUT"] = str(tmp_path)
    proc = subprocess.run(["bash", "-c", 'source benchmark/common.sh; echo "$MODEL"; echo "${MATH[*]}"; '
                           'echo "${CODE[*]}"; echo "${MERGE_EVAL[*]}"; echo "${HF_HUB_OFFLINE-unset}"'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    model, math, code, merge_eval, offline = proc.stdout.splitlines()
    assert model == "Qwen/Qwen2.5-0.5B-Instruct" and offline == "unset"
    hub_evals = "gsm8k=openai/gsm8k:main,mbpp=google-research-datasets/mbpp:full,"
    assert f"--eval_datasets {hub_evals}squad={tmp_path}/data/squad.jsonl" in math
    assert f"--eval_datasets {hub_evals}" in merge_eval and "--max_new_tokens 512" in merge_eval
    for flags in ("--batch_size 64 --micro_batch_size 8 --steps 330", "--max_new_tokens 512", "--save_every 100",
                  "--device auto --compile true", "--dtype bfloat16"):
        assert flags in math, flags
    assert code.startswith("--dataset google-research-datasets/mbpp:full --eval_datasets mbpp=google-research-")
    assert "--batch_size 32 --micro_batch_size 4 --steps 36" in code
    assert not os.listdir(tmp_path)  # nothing made: no stand-ins, no data


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("rehearsal")


@pytest.fixture(scope="module")
def sft_stdout(out):
    return rehearse("sft", out)


def test_sft(out, sft_stdout):
    rows = table(sft_stdout, "gsm8k")
    assert list(rows) == ["starting model", "sft"]
    assert rows["sft"][0] == "1"  # one seed
    loss = float(rows["sft"][-1])
    assert 6 < loss < 9, loss  # a random model over a 2,044-token vocabulary: ~ln(2044) = 7.6
    config = next(json.loads(line) for line in open(out / "sft_s0" / "metrics.jsonl"))
    stand_in = str(out / "hub" / "Qwen" / "Qwen2.5-0.5B-Instruct")
    assert config["model"] == stand_in and config["dtype"] == "bfloat16" and config["device"] == "cpu"
    assert config["dataset"] == str(out / "data" / "gsm8k_train.jsonl")
    assert config["eval_datasets"].startswith(f"gsm8k={out}/hub/openai/gsm8k/main/test.jsonl,")
    steps = [json.loads(line) for line in open(out / "sft_s0" / "metrics.jsonl")]
    assert [r["step"] for r in steps if "loss" in r and "event" not in r] == [1, 2]
    assert os.path.isdir(out / "sft_s0" / "checkpoint-1")  # SAVE_EVERY=1: the checkpoint path is rehearsed too
    trained, start = load(out / "sft_s0" / "final"), load(stand_in)
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start), "2 steps changed no weight"
    with open(out / "data" / "squad.jsonl") as f:  # prepare_data's own conversion ran on the SQuAD stand-in
        row = json.loads(f.readline())
    assert row["task"] == "rc" and row["response"] in row["prompt"]


def test_merge(out, sft_stdout):
    stdout = rehearse("merge", out)  # SEEDS defaults to "0 1" here: sft_s0 is reused, sft_s1 trained first
    assert f"== {out}/sft_s0 has finished: skipped" in stdout
    rows = table(stdout.split("soup_uniform_s0", 1)[1], "gsm8k")
    assert list(rows) == ["starting model", "lines", "sft", "soup_greedy", "soup_uniform", "ta_0.4"], list(rows)
    assert rows["sft"][0] == rows["lines"][0] == rows["ta_0.4"][0] == "2"
    assert re.search(r"\{'event': 'greedy_soup'", stdout)  # the selection log printed after the table
    for run in ("soup_uniform_s0", "soup_greedy_s0", "lines_s0", "lines_s1", "ta_0.4_s0", "ta_0.4_s1"):
        assert os.path.isdir(out / run / "final"), run
    soup, a, b = load(out / "soup_uniform_s0" / "final"), load(out / "sft_s0" / "final"), load(out / "sft_s1" / "final")
    for name in soup:  # the two SFT seeds' mean, saved in bf16 (--dtype bfloat16)
        mean = (a[name] + b[name]) / 2
        assert torch.allclose(soup[name], mean, rtol=2 ** -7, atol=1e-6), name
