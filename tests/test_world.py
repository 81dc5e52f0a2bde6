"""The embedded world: generators deterministic and schema-valid, references pass their judges, corrupted
ones fail, the corpus never holds a held-out prompt, and the shipped base model is what the README says."""
import inspect
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
import world_pretrain

TASK_OF = {"math": "math", "code": "code", "rc": "rc", "knowledge": "exact", "math_verbose": "math"}
HELD_OUT = ("validation", "test", "test_ood")
EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


@pytest.fixture(scope="module")
def data():
    return world.build_data(0)


@pytest.fixture(scope="module")
def base():
    return world.base_data(0)


@pytest.fixture(scope="module")
def corpus_text():
    """world/base's full two-stage pretraining corpus (~275k documents), as one text."""
    return "\n".join(world.document_text(d) for stage in world.base_corpus(0) for d in stage)


def occurring(needles: list, text: str) -> list:
    """The needles (each starting with a capital letter) that occur anywhere in text: every capital letter of
    text is tried as a start, by an exact-prefix index (one pass instead of a scan per needle)."""
    assert needles and all(n[0].isupper() and len(n) >= 16 for n in needles)
    index = {}
    for n in needles:
        index.setdefault(n[:16], []).append(n)
    found = set()
    for m in re.finditer(r"[A-Z]", text):
        for n in index.get(text[m.start():m.start() + 16], ()):
            if text.startswith(n, m.start()):
                found.add(n)
    return sorted(found)


def test_generators_are_deterministic_by_seed(data):
    assert world.build_data(0) == data
    assert world.base_data(1)["math"]["test"] != data["math"]["test"][:200]
    docs = world.pretraining_documents(data, 300, 0)
    assert docs == world.pretraining_documents(data, 300, 0) and docs != world.pretraining_documents(data, 300, 1)


def test_shipped_files_are_the_generator_output(data):
    for task, splits in data.items():
        for split, rows in splits.items():
            with open(os.path.join(world.WORLD, "data", task, f"{split}.jsonl")) as f:
                assert [json.loads(line) for line in f] == rows, f"{task}/{split}: run python world.py"


def test_base_data_is_the_original_prefix_and_the_corpus_world_base_saw(data, base):
    """base_data is the original data (sizes SPLITS) and the shipped files start with it; the pretraining run
    builds its corpus from base_data with the flags base_corpus assumes."""
    sizes = {"math": dict(world.SPLITS), "rc": dict(world.SPLITS), "knowledge": {"test": 80, "test_ood": 80},
             "code": {"validation": 40, "test": 50, "test_ood": 50, "train": 534}}
    assert {t: {s: len(r) for s, r in splits.items()} for t, splits in base.items()} == sizes
    for task, splits in base.items():
        for split, rows in splits.items():
            assert data[task][split][:len(rows)] == rows, (task, split)
            with open(os.path.join(world.WORLD, "data", task, f"{split}.jsonl")) as f:
                assert [json.loads(line) for line in f][:len(rows)] == rows, (task, split)
    assert world.BASE_CORPUS == {k: getattr(world_pretrain.Args, k) for k in world.BASE_CORPUS}
    assert "world.base_data(args.seed)" in inspect.getsource(world_pretrain.pretrain)
    stage1, stage2 = world.base_corpus(0)
    assert (len(stage1), len(stage2)) == (2600 * 16 * 256 // 45 + 1000, 400 * 16 * 256 // 45 + 1000)
    assert list(stage2[:200]) == world.pretraining_documents(base, 200, 100, world.ANNEAL_MIX)


def test_split_sizes_and_distinct_prompts(data):
    sizes = {"math": {"train": 3000, "validation": 1000, "test": 2000, "test_ood": 2000},
             "code": {"validation": 40, "test": 200, "test_ood": 200, "train": 534},
             "rc": {"train": 3000, "validation": 200, "test": 1000, "test_ood": 1000},
             "knowledge": {"test": 80, "test_ood": 80}, "math_verbose": {"train": 3000}}
    assert {t: {s: len(r) for s, r in splits.items()} for t, splits in data.items()} == sizes
    for task in ("math", "code", "rc"):  # within and across splits
        prompts = [world.user_text(r)[0] for rows in data[task].values() for r in rows]
        assert len(set(prompts)) == len(prompts), task
    ids = [r["task_id"] for rows in data["code"].values() for r in rows]
    assert len(set(ids)) == len(ids)
    assert [r["task_id"] for r in data["code"]["test"]] == list(range(6000, 6200))
    assert [r["task_id"] for r in data["code"]["test_ood"]] == list(range(7000, 7200))
    assert len({r["id"] for rows in data["rc"].values() for r in rows}) == sum(map(len, data["rc"].values()))
    keys = {s: [world._key_of(r) for r in data["code"][s]] for s in data["code"]}
    assert len(set(keys["test"])) == 50 and keys["test"] == keys["test"][:50] * 4 and keys["test_ood"] == keys["test"]
    assert len(set(keys["validation"])) == 40 == len(keys["validation"])
    for split in ("test", "test_ood"):  # the 4 rows of a key: 12 different asserts
        for key in set(keys[split]):
            asserts = [a for r, k in zip(data["code"][split], keys[split]) if k == key for a in r["test_list"]]
            assert len(asserts) == 12 == len(set(asserts)), (split, key)
    ood = {s: "ood" if s == "test_ood" else "train" for s in data["code"]}
    for split, rows in data["code"].items():
        assert all(r["text"].startswith("Create a Python" if ood[split] == "ood" else "Write a function") for r in rows)


def test_verbose_math_is_math_train_in_another_style(data, corpus_text):
    """math_verbose: math/train's questions in order, the same equations and answers, retold in sentences that
    neither the corpus nor math/train ever shows."""
    rows, originals = data["math_verbose"]["train"], data["math"]["train"]
    assert set(world.VERBOSE_HOW) == {t for op in world.MATH_OPS.values() for s in op.values() for t in s}
    for phrase in ["So the answer is", ", that is ", " gets to ", " leaves "]:
        assert phrase not in corpus_text and not any(phrase in r["answer"] for r in originals), phrase
    assert [r["question"] for r in rows] == [r["question"] for r in originals]
    for row, orig in zip(rows, originals):
        assert set(row) == {"question", "answer"} and row["answer"] != orig["answer"]
        *lines, closing, final = row["answer"].split("\n")
        *steps, orig_final = orig["answer"].split("\n")
        assert final == orig_final and closing == f"So the answer is {final[5:]}."
        assert len(lines) == len(steps)
        for line, step in zip(lines, steps):  # each line: one equation, the original step, arithmetic correct
            (a, op, k, b), = EQUATION.findall(line)
            assert f"{a} {op} {k} = {b}" == step
            assert int(b) == {"+": int(a) + int(k), "-": int(a) - int(k), "*": int(a) * int(k), "/": int(a) // int(k)}[op]
            assert line.endswith(".")
        assert re.findall(r"\d+", lines[0])[0] == steps[0].split()[0]  # the starting amount is said first
        ex = common.to_example(row, "math_verbose")
        assert ex["task"] == "math" and common.judge_math(ex["messages"][-1]["content"], orig_final[5:])[0]
    styles = {line.split()[0] for r in rows for line in r["answer"].split("\n")[1:-2]}
    assert len(styles) >= 3  # the wording varies
    assert world.verbose_answer(originals[0]) == rows[0]["answer"]  # deterministic


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
    for row in [r for rows in data["math"].values() for r in rows]:
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


def test_held_out_prompts_and_keys_never_reach_pretraining_or_training(data, corpus_text):
    """Every held-out prompt of math, code and rc (all validation/test/test_ood rows, original and new) occurs
    nowhere in world/base's full two-stage corpus nor in any training split; no held-out code key's function is in
    either; the ood phrasings never appear in either."""
    train = [world.user_text(r) for t in ("math", "code", "rc", "math_verbose") for r in data[t]["train"]]
    held = [world.user_text(r)[0] for t in ("math", "code", "rc") for s in HELD_OUT for r in data[t][s]]
    assert len(held) == 5000 + 440 + 2200 and not {p for p, _ in train} & world.held_out_keys(data)
    assert not set(held) & world.base_corpus_prompts(0)
    text = corpus_text + "\n" + "\n".join(f"{p}\n\n{r}" for p, r in train)  # training prompts and answers
    assert occurring(held, text) == []
    probe = [p for p, _ in world.base_corpus(0)[1][:300] if p and len(p) >= 16 and p[0].isupper()][:50]
    assert len(probe) == 50  # the search does find what is there
    assert occurring(probe + held[:50], text) == sorted(set(probe))
    held_keys = {world._key_of(r) for t in HELD_OUT for r in data["code"][t]}
    train_keys = {world._key_of(r) for r in data["code"]["train"]}
    assert len(held_keys) == 90 and not held_keys & train_keys
    defined = set(re.findall(r"def (\w+)\(", text))
    names = {s: {r["code"].split("(")[0][len("def "):] for r in data["code"][s]} for s in data["code"]}
    held_names = set().union(*(names[s] for s in HELD_OUT))
    assert len(held_names) == 90 and not held_names & defined and names["train"] <= defined
    ood_phrases = ([p for op in world.MATH_OPS.values() for p in op["ood"]] + world.MATH_START["ood"] + world.MATH_ASK["ood"]
                   + [f[4] for f in world.CODE_FAMILIES] + [f[3] for f in world.RC_FACTS.values()]
                   + ["Create a Python function that will"])
    for phrase in ood_phrases:  # the literal pieces in order within a sentence (looser than the phrase: stricter test)
        pieces = [p for p in re.split(r"\{\w\}", phrase) if p]
        pattern = re.compile(r"[^.?\n]+?".join(map(re.escape, pieces)))
        assert not pattern.search(text), phrase
    docs = "\n".join(map(world.document_text, world.pretraining_documents(data, 3000, 0)))  # build_data's own bans
    assert not any(world.user_text(r)[0] in docs for t in ("math", "rc") for r in data[t]["test"][:50])


def test_every_reference_passes_its_judge(data):
    for task in ("math", "rc", "knowledge"):
        for row in data[task]["test"] + data[task]["test_ood"]:
            ex = common.to_example(row, task)
            assert common.JUDGES[ex["task"]](ex["messages"][-1]["content"], ex["reference"])[0], row
    by_code = {}  # one sandbox run per reference with the asserts of all its rows (test: 4 rows of a key)
    for row in data["code"]["test"] + data["code"]["test_ood"] + data["code"]["validation"] + data["code"]["train"][::20]:
        by_code.setdefault(row["code"], []).extend(row["test_list"])
    assert sum(map(len, by_code.values())) == 3 * (400 + 40 + len(data["code"]["train"][::20]))
    for code, tests in by_code.items():
        assert common.judge_code(code, tests) == (True, "all tests passed"), (code, tests)


def test_corrupted_references_fail_with_a_reason(data):
    for row in data["math"]["test"][:50]:
        final = row["answer"].split("####")[-1].strip()
        passed, reason = common.judge_math(row["answer"].replace(f"#### {final}", f"#### {int(final) + 1}"), final)
        assert not passed and reason.startswith("got")
    for row in data["code"]["test"][:50]:  # the 50 keys once (the judge's behaviour; every reference: above)
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
    runs = {"a": [], "stage1": ["--anneal_steps", "0"], "c": ["--stage1_from", str(tmp_path / "stage1")]}
    for name, extra in runs.items():
        subprocess.run([sys.executable, "world_pretrain.py", "--output_dir", str(tmp_path / name), *tiny, *extra],
                       cwd=os.path.dirname(world.__file__), check=True, capture_output=True, timeout=600)
    a, c, s1 = (load_file(tmp_path / n / "model.safetensors") for n in ("a", "c", "stage1"))
    assert all(torch.equal(a[k], c[k]) for k in a)  # the seed alone: two processes, stage 1 written then resumed
    assert not all(torch.equal(a[k], s1[k]) for k in a)  # stage 2 did train
    with open(tmp_path / "a" / "pretrain_log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [r["stage"] for r in log] == [1, 1, 1, 2, 2] and log[2]["loss"] < log[0]["loss"]
