"""The embedded world: generators deterministic and schema-valid, references pass their judges, corrupted
ones fail, the corpus never holds a held-out prompt, and the shipped base model is what the README says."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
import world

TASK_OF = {"math": "math", "code": "code", "rc": "rc", "knowledge": "exact"}


@pytest.fixture(scope="module")
def data():
    return world.build_data(0)


def test_generators_are_deterministic_by_seed(data):
    assert world.build_data(0) == data
    assert world.build_data(1)["math"]["test"] != data["math"]["test"]
    docs = world.pretraining_documents(data, 300, 0)
    assert docs == world.pretraining_documents(data, 300, 0) and docs != world.pretraining_documents(data, 300, 1)


def test_shipped_files_are_the_generator_output(data):
    for task, splits in data.items():
        for split, rows in splits.items():
            with open(os.path.join(world.WORLD, "data", task, f"{split}.jsonl")) as f:
                assert [json.loads(line) for line in f] == rows, f"{task}/{split}: run python world.py"


def test_rows_follow_the_public_schemas(data):
    for task, splits in data.items():
        for split, rows in splits.items():
            for i, row in enumerate(rows):
                ex = common.to_example(row, f"{task}/{split}:{i}")
                assert ex["task"] == TASK_OF[task]
    for row in data["code"]["test"]:
        assert set(row) == {"task_id", "text", "code", "test_list"} and len(row["test_list"]) == 3
    for row in data["rc"]["test"]:
        text, start = row["answers"]["text"][0], row["answers"]["answer_start"][0]
        assert row["context"][start:start + len(text)] == text


def test_math_steps_are_correct_and_bounded(data):
    for row in data["math"]["train"] + data["math"]["test_ood"]:
        *steps, final = row["answer"].split("\n")
        assert 1 <= len(steps) <= 4 and final.startswith("#### ")
        value = None
        for line in steps:
            a, op, k, _, b = line.split()
            assert value is None or int(a) == value
            assert int(b) == {"+": int(a) + int(k), "-": int(a) - int(k), "*": int(a) * int(k), "/": int(a) // int(k)}[op]
            assert op != "/" or int(a) % int(k) == 0
            assert 0 <= int(b) <= 99
            value = int(b)
        assert int(final[5:]) == value


def test_splits_and_ood_templates_are_disjoint(data):
    train_prompts = {world.user_text(r)[0] for t in ("math", "code", "rc") for r in data[t]["train"]}
    assert not train_prompts & world.held_out_keys(data)
    code_keys = {s: {r["code"] for r in data["code"][s]} for s in data["code"]}
    assert not code_keys["train"] & code_keys["test"] and not code_keys["train"] & code_keys["validation"]
    docs = "\n".join(map(world.document_text, world.pretraining_documents(data, 3000, 0)))
    assert not any(world.user_text(r)[0] in docs for t in ("math", "rc") for r in data[t]["test"][:50])
    assert not any(r["code"] in docs for r in data["code"]["test"])
    ood_phrases = ([p for op in world.MATH_OPS.values() for p in op["ood"]] + world.MATH_START["ood"]
                   + [f[4] for f in world.CODE_FAMILIES] + [f[3] for f in world.RC_FACTS.values()])
    train_text = "\n".join(world.user_text(r)[0] for t in ("math", "code", "rc") for r in data[t]["train"])
    for phrase in ood_phrases:
        pattern = re.compile(r"[^.?\n]+?".join(map(re.escape, re.split(r"\{\w\}", phrase))))
        assert not pattern.search(docs) and not pattern.search(train_text), phrase


def test_every_reference_passes_its_judge(data):
    for task in ("math", "rc", "knowledge"):
        for row in data[task]["test"] + data[task]["test_ood"]:
            ex = common.to_example(row, task)
            assert common.JUDGES[ex["task"]](ex["messages"][-1]["content"], ex["reference"])[0], row
    for row in data["code"]["test"] + data["code"]["test_ood"] + data["code"]["validation"] + data["code"]["train"][::20]:
        assert common.judge_code(row["code"], row["test_list"]) == (True, "all tests passed"), row


def test_corrupted_references_fail_with_a_reason(data):
    for row in data["math"]["test"][:50]:
        final = row["answer"].split("####")[-1].strip()
        passed, reason = common.judge_math(row["answer"].replace(f"#### {final}", f"#### {int(final) + 1}"), final)
        assert not passed and reason.startswith("got")
    for row in data["code"]["test"]:
        name = row["code"].split("(")[0]
        for bad, why in [(row["code"].replace("return ", "return not "), "AssertionError"),
                         (f"{name}(x)\n    return x", "SyntaxError"), ("", "NameError")]:
            passed, reason = common.judge_code(bad, row["test_list"])
            assert not passed and why in reason, (bad, reason)
    for row in data["rc"]["test"][:20]:
        assert common.judge_rc("", row["answers"]["text"]) == (False, "exact 0, f1 0.00")
    assert common.judge_math("", "3") == (False, "no number in response")


# ============================================================ the shipped base model
def test_base_model_is_small_power_of_two_and_loads():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = os.path.join(world.WORLD, "base")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    c = model.config
    assert c.model_type == "llama" and 2e6 <= model.num_parameters() <= 10e6
    for size in (c.hidden_size, c.intermediate_size, c.hidden_size // c.num_attention_heads):
        assert size & (size - 1) == 0, size
    assert 1000 <= len(tok) <= 4096 and len(tok) <= c.vocab_size
    assert sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) < 40e6
    ids = tok.apply_chat_template([{"role": "user", "content": "12 + 7"}], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    text = tok.convert_ids_to_tokens(ids)
    assert text[0] == "<|im_start|>" and text[-2:] == ["assistant", "Ċ"] and "1" in text and "2" in text
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id


def test_pretraining_is_reproducible_from_its_seed(tmp_path):
    tiny = ["--steps", "3", "--anneal_steps", "2", "--batch_size", "2", "--seq_length", "32", "--hidden_size", "32",
            "--layers", "1", "--heads", "2", "--intermediate_size", "64", "--warmup_steps", "1", "--log_every", "1"]
    runs = {"a": [], "b": [], "stage1": ["--anneal_steps", "0"], "c": ["--stage1_from", str(tmp_path / "stage1")]}
    for name, extra in runs.items():
        subprocess.run([sys.executable, "world_pretrain.py", "--output_dir", str(tmp_path / name), *tiny, *extra],
                       cwd=os.path.dirname(world.__file__), check=True, capture_output=True, timeout=600)
    a, b, c, s1 = (load_file(tmp_path / n / "model.safetensors") for n in ("a", "b", "c", "stage1"))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)  # seed alone; stage 1 resumed
    assert not all(torch.equal(a[k], s1[k]) for k in a)  # stage 2 did train
    with open(tmp_path / "a" / "pretrain_log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [r["stage"] for r in log] == [1, 1, 1, 2, 2] and log[2]["loss"] < log[0]["loss"]
