"""S3FT: the target-selection rule against its limiting cases, the wiring to the shared judges, the frozen
starting model, the cache, and the script end to end (a rebuild that keeps every gold target trains exactly
like sft.py)."""
import json
import os

import pytest

import common
import s3ft
from scripts import records, run_script, run_side_by_side

MATH = os.path.join(common.WORLD_DIR, "data", "math", "train.jsonl")
QUICK = ["--steps", "3", "--batch_size", "8", "--eval_datasets", "", "--save_every", "0", "--compile", "false"]


def never_called(indices):
    raise AssertionError(f"rewrite called for {indices}")


def test_reject_all_gives_exactly_the_gold_set():
    golds = ["g0", "g1", "g2"]
    calls = []
    records = s3ft.select_targets(golds, ["a0", "a1", None], lambda idx: calls.append(idx) or ["r0", "r1", "r2"],
                                  lambda i, text: (False, "no"))
    assert calls == [[0, 1, 2]]
    assert [r["target"] for r in records] == golds and {r["source"] for r in records} == {"gold"}


def test_accept_all_never_calls_the_rewriter():
    records = s3ft.select_targets(["g0", "g1"], ["a0", "a1"], never_called, lambda i, text: (True, "ok"))
    assert [(r["source"], r["target"]) for r in records] == [("own", "a0"), ("own", "a1")]


def test_priority_order_and_rejected_rewrites_are_never_used():
    golds = ["g0", "g1", "g2", "g3", "g4"]
    own = ["right", "wrong", "wrong", None, "wrong"]  # None: the answer ran out of tokens
    rewrites = {1: "right rewrite", 2: "wrong rewrite", 3: "right, as the reference answer says", 4: None}
    calls = []

    def rewrite(indices):
        calls.append(list(indices))
        return [rewrites[i] for i in indices]

    records = s3ft.select_targets(golds, own, rewrite, lambda i, text: (text.startswith("right"), "judged"))
    assert calls == [[1, 2, 3, 4]]  # once, with exactly the rejected predictions
    assert [r["source"] for r in records] == ["own", "rewrite", "gold", "gold", "gold"]
    assert [r["target"] for r in records] == ["right", "right rewrite", "g2", "g3", "g4"]
    assert records[3]["own_verdict"] == "cut off" and "scaffolding" in records[3]["rewrite_verdict"]
    # without the leak filter the judge decides alone
    records = s3ft.select_targets(golds, own, rewrite, lambda i, text: (text.startswith("right"), "j"), leak_filter=False)
    assert records[3]["source"] == "rewrite"


def test_stage_one_off_rewrites_everything():
    records = s3ft.select_targets(["g0", "g1"], None, lambda idx: ["x", "y"], lambda i, text: (text == "x", ""))
    assert [r["source"] for r in records] == ["rewrite", "gold"] and records[0]["own_verdict"] == "stage 1 off"


@pytest.mark.parametrize("text,leaks", [("The answer is 5.", False), ("Using the Reference Answer, 5", True),
                                        ("Your turn: 5", True), ("my response is 5", True), ("Now it's your turn", True)])
def test_leak_filter(text, leaks):
    assert s3ft.leaks_scaffolding(text) == leaks


def test_rewrite_prompt_substitutes_once_and_keeps_the_training_prompt():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Q {reference}"}]
    out = s3ft.rewrite_prompt(messages, "def f():\n    return {'a': 1}", "{prompt}\n--\n{reference}")
    assert out[0] == messages[0] and out[1]["content"] == "Q {reference}\n--\ndef f():\n    return {'a': 1}"
    assert messages[1]["content"] == "Q {reference}"  # the training prompt is untouched


def test_paper_gsm8k_prompt_asks_for_the_answer_is_n_and_the_gold_ends_that_way():
    row = s3ft.paper_gsm8k_row("Ana has 3 apples and buys 1,204 more. How many?",
                               "Ana has 3 + 1204 = <<3+1204=1207>>1,207 apples.\n#### 1,207")
    assert row == {"prompt": s3ft.GSM8K_INSTRUCTION + "\n\nAna has 3 apples and buys 1,204 more. How many?",
                   "response": "Ana has 3 + 1204 = 1,207 apples.\nThe answer is 1207.", "task": "math", "reference": "1207"}
    assert '"The answer is N."' in s3ft.GSM8K_INSTRUCTION and "integer" in s3ft.GSM8K_INSTRUCTION
    verbatim = s3ft.paper_gsm8k_row("Q", "2 + 2 = <<2+2=4>>4\n#### 4", normalize_gold=False)
    assert verbatim["response"] == "2 + 2 = <<2+2=4>>4\n#### 4" and verbatim["reference"] == "4"
    with pytest.raises(common.UsageError, match="without its final '#### N'"):
        s3ft.paper_gsm8k_row("Q", "The answer is 4.")
    # every training problem of the world: the judge accepts the rewritten gold and rejects another number, and the row
    # reads back through the shared loader as a math example whose prompt carries the instruction
    rows = common.read_records(MATH)
    for raw in rows:
        row = s3ft.paper_gsm8k_row(raw["question"], raw["answer"])
        assert row["response"].endswith(f"The answer is {row['reference']}.") and "####" not in row["response"]
        assert common.judge_math(row["response"], row["reference"])[0] and common.judge_math(raw["answer"], row["reference"])[0]
        assert not common.judge_math(row["response"], str(float(row["reference"]) + 1))[0]
    example = common.to_example(s3ft.paper_gsm8k_row(rows[0]["question"], rows[0]["answer"]), "x")
    assert example["task"] == "math" and example["messages"][0]["content"].startswith(s3ft.GSM8K_INSTRUCTION)


def test_judges_are_the_shared_ones():
    for task, judge in common.JUDGES.items():
        assert s3ft.task_judge(task, "x") is judge
    with pytest.raises(common.UsageError, match="has no judge"):
        s3ft.task_judge("poetry", "data.jsonl: sample 3")


@pytest.fixture(scope="module")
def world():
    model, tokenizer = common.load_model(os.path.join(common.WORLD_DIR, "base"))
    examples, _ = common.load_sft_data(MATH, tokenizer, 512, limit=12)
    return model, tokenizer, examples


def test_rebuild_uses_the_frozen_model_and_the_task_judge(world):
    model, tokenizer, examples = world
    args = s3ft.Args(gen_max_new_tokens=48, gen_batch_size=12)
    before = common.content_hash(model)
    rows, timing = s3ft.rebuild(model, tokenizer, examples, args)
    assert common.content_hash(model) == before  # generation never touches the weights
    assert rows == s3ft.rebuild(model, tokenizer, examples, args)[0]  # greedy: byte-identical rebuild
    assert timing["generated"] == len(examples) + sum(r["source"] != "own" for r in rows)
    for row, ex in zip(rows, examples):
        verdict = common.judge_math(row["own"], ex["reference"])[0] if row["own"] is not None else False
        assert (row["source"] == "own") == verdict
        assert row["messages"][:-1] == ex["messages"][:-1] and row["messages"][-1]["content"] == row["target"]
    assert {r["source"] for r in rows} >= {"own", "gold"}  # the base solves some training problems, not all


def run(script, out, *extra, check=True, in_process=False):
    return run_script(script, out, *QUICK, *extra, check=check, in_process=in_process)


def test_all_gold_rebuild_trains_exactly_like_sft_and_is_cached(tmp_path):
    data = tmp_path / "math16.jsonl"
    with open(MATH) as f:
        data.write_text("".join(next(f) for _ in range(16)))
    # a 1-token budget cuts every own answer and rewrite off: all rejected, every target is the gold
    cache = ["--cache_dir", str(tmp_path / "cache"), "--gen_max_new_tokens", "1"]
    s3, sft = run_side_by_side(("s3ft.py", tmp_path / "s3ft", *QUICK, "--dataset", str(data), *cache),
                               ("sft.py", tmp_path / "sft", *QUICK, "--dataset", str(data)))
    s3_losses = [r["loss"] for r in records(tmp_path / "s3ft") if "loss" in r]
    assert s3_losses == [r["loss"] for r in records(tmp_path / "sft") if "loss" in r] and len(s3_losses) == 3
    config = records(tmp_path / "s3ft")[0]
    assert config["method/gold"] == 1.0 and config["method/own"] == 0.0 and config["method/generated"] == 32
    assert "S3FT targets: own 0 | rewrite 0 | gold 16" in s3.stdout and "generate" in s3.stdout and sft.returncode == 0
    files = os.listdir(tmp_path / "cache")
    assert config["method/file"] == str(tmp_path / "cache" / files[0]) and files[0].startswith("s3ft_data-")
    rows = common.read_records(config["method/file"])
    assert len(rows) == 16 and all(r["source"] == "gold" and r["own_verdict"] == "cut off" for r in rows)
    again = run("s3ft.py", tmp_path / "again", "--dataset", str(data), *cache, "--steps", "1")
    assert "S3FT: reusing" in again.stdout and records(tmp_path / "again")[0]["method/cached"] is True


def test_a_task_without_judge_is_a_clear_error(tmp_path):
    data = tmp_path / "poems.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"poem {i}", "response": "roses", "task": "poetry"}) + "\n"
                            for i in range(8)))
    proc = run("s3ft.py", tmp_path / "out", "--dataset", str(data), "--cache_dir", str(tmp_path), check=False, in_process=True)
    assert proc.returncode != 0 and "sample 1: task 'poetry' has no judge" in proc.stderr + proc.stdout
