"""Data loading, schema adapters, masking, batching, judges: values and clear errors."""
import json
import os
import re

import pytest
import torch

import common
from common import IGNORE_INDEX, UsageError


@pytest.fixture(scope="module")
def tokenizer():
    return common.load_model(os.path.join(common.WORLD_DIR, "base"))[1]


def write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


ROWS = {
    "gsm8k": {"question": "Ana has 3 pens. She gets 2 more. How many?", "answer": "3 + 2 = 5\n#### 5"},
    "mbpp": {"task_id": 1, "text": "Write add(a, b).", "code": "def add(a, b):\n    return a + b",
             "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"]},
    "squad": {"id": "x", "context": "The sky is blue.", "question": "What colour is the sky?",
              "answers": {"text": ["blue"], "answer_start": [11]}},
    "prompt_response": {"prompt": "Say hi", "response": "hi"},
    "messages": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
    "prompt_completion": {"prompt": "Say hi", "completion": "hi"},
    "conversational_prompt_completion": {"prompt": [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Say hi"}],
                                         "completion": [{"role": "assistant", "content": "hi"}]},
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "a"},
                                   {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"},
                                   {"from": "gpt", "value": "d"}]},
}


def test_mask_history_trains_the_last_turn_only_and_a_template_that_rewrites_history_is_refused(tokenizer):
    msgs = ROWS["messages"]["messages"]
    (ids, labels), _ = common.tokenize_example(tokenizer, msgs, 512, "truncate")
    (ids_last, labels_last), _ = common.tokenize_example(tokenizer, msgs, 512, "truncate", mask_history=True)
    assert ids == ids_last and tokenizer.decode([t for t in labels_last if t != IGNORE_INDEX]) == "d<|im_end|>\n"
    assert sum(t != IGNORE_INDEX for t in labels) > sum(t != IGNORE_INDEX for t in labels_last)
    template = tokenizer.chat_template
    try:  # a template that renders earlier assistant turns otherwise in context (as reasoning templates drop <think>)
        tokenizer.chat_template = template.replace("{{ m['content'] }}", "{{ m['content'] if loop.last or m['role'] != 'assistant' else '...' }}")
        with pytest.raises(UsageError, match="renders an earlier assistant turn differently in context.*--mask_history"):
            common.tokenize_example(tokenizer, msgs, 512, "truncate")
        assert common.tokenize_example(tokenizer, msgs, 512, "truncate", mask_history=True)[1] == "ok"
    finally:
        tokenizer.chat_template = template


def test_the_ecosystems_schemas_become_the_same_messages():
    """TRL's conversational prompt-completion, Alpaca (with LLaMA-Factory's system and history) and ShareGPT map to
    the chat messages a TRL or LLaMA-Factory user would expect, not to a stringified list."""
    ex = common.to_example(ROWS["conversational_prompt_completion"], "x")
    assert ex["messages"] == ROWS["conversational_prompt_completion"]["prompt"] + [{"role": "assistant", "content": "hi"}]
    ex = common.to_example({**ROWS["alpaca"], "system": "S", "history": [["q1", "a1"]]}, "x")
    assert ex["messages"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                              {"role": "assistant", "content": "a1"}, {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                              {"role": "assistant", "content": "5"}]
    assert common.to_example({"instruction": "I", "input": "", "output": "O"}, "x")["messages"][0]["content"] == "I"
    ex = common.to_example(ROWS["sharegpt"], "x")
    assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert ex["messages"][-1]["content"] == ex["reference"] == "d"


@pytest.mark.parametrize("row,message", [
    ({"prompt": [{"role": "user", "content": "q"}], "completion": "a"}, "field 'completion' must be a list of"),
    ({"prompt": [{"role": "user"}], "completion": [{"role": "assistant", "content": "a"}]}, "field 'prompt' must be a list"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
     "'completion' must end with an assistant turn"),
    ({"instruction": "I", "output": 5}, "field 'output' must be a string, got int"),
    ({"instruction": "I", "output": "O", "history": ["q"]}, "field 'history' must be a list of [instruction, response] pairs"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]},
     "role 'function_call' is not one of"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}, "must end with a gpt (assistant) turn"),
    ({"conversations": "hi"}, "field 'conversations' must be a list of"),
])
def test_bad_rows_of_the_ecosystems_schemas_name_the_field(row, message):
    with pytest.raises(UsageError, match=re.escape(f"d.jsonl:7: ") + ".*" + re.escape(message)):
        common.to_example(row, "d.jsonl:7")


def test_a_save_to_disk_directory_loads_like_jsonl(tmp_path, tokenizer):
    import datasets
    datasets.Dataset.from_list([ROWS["gsm8k"]] * 3).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list([ROWS["alpaca"]] * 2),
                          "test": datasets.Dataset.from_list([ROWS["alpaca"]])}).save_to_disk(str(tmp_path / "dd"))
    a = common.load_sft_data(str(tmp_path / "ds"), tokenizer, 512)[0]
    b = common.load_sft_data(write(tmp_path, [ROWS["gsm8k"]] * 3), tokenizer, 512)[0]
    assert [e["input_ids"] for e in a] == [e["input_ids"] for e in b]
    assert len(common.load_sft_data(str(tmp_path / "dd"), tokenizer, 512, split="test")[0]) == 1
    with pytest.raises(UsageError, match=r"dd: no split 'validation' \(it has train, test\)"):
        common.load_sft_data(str(tmp_path / "dd"), tokenizer, 512, split="validation")


@pytest.mark.parametrize("schema", sorted(ROWS))
def test_schemas_mask_everything_but_the_response(tmp_path, tokenizer, schema):
    examples, stats = common.load_sft_data(write(tmp_path, [ROWS[schema]]), tokenizer, 512)
    ex = examples[0]
    replies = [m["content"] for m in ex["messages"] if m["role"] == "assistant"]  # every assistant turn is trained
    trained = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "".join(f"{r}<|im_end|>\n" for r in replies) and stats["ok"] == 1
    first = ex["labels"].index(trained[0])
    assert tokenizer.decode(ex["input_ids"][:first]).endswith("<|im_start|>assistant\n")
    assert ex["task"] == {"gsm8k": "math", "mbpp": "code", "squad": "rc"}.get(schema, "exact")


def test_parquet_csv_and_json_load_like_jsonl(tmp_path, tokenizer):
    import datasets
    rows = [ROWS["gsm8k"]] * 3
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    a = common.load_sft_data(str(tmp_path / "d.parquet"), tokenizer, 512)[0]
    b = common.load_sft_data(str(tmp_path / "d.json"), tokenizer, 512)[0]
    c = common.load_sft_data(str(tmp_path / "d.csv"), tokenizer, 512)[0]
    assert [e["input_ids"] for e in a] == [e["input_ids"] for e in b] == [e["input_ids"] for e in c] and len(a) == 3


def test_malformed_line_names_file_and_line(tmp_path, tokenizer):
    path = write(tmp_path, [ROWS["gsm8k"], '{"question": "broken', ROWS["gsm8k"]])
    with pytest.raises(UsageError, match=r"d\.jsonl:2: malformed JSON"):
        common.load_sft_data(path, tokenizer, 512)


def test_missing_field_lists_expected_and_found(tmp_path, tokenizer):
    path = write(tmp_path, [ROWS["gsm8k"], {"question": "no answer here"}])
    with pytest.raises(UsageError, match=r"d\.jsonl:2: unknown schema. Found fields \['question'\]; expected .*gsm8k: question, answer"):
        common.load_sft_data(path, tokenizer, 512)


def test_empty_and_overlong_samples_are_counted(tmp_path, tokenizer):
    long = {"prompt": "x", "response": "word " * 200}
    rows = [ROWS["prompt_response"], {"prompt": "p", "response": "  "}, long]
    path = write(tmp_path, rows)
    ex, stats = common.load_sft_data(path, tokenizer, 64, "truncate")
    assert stats == {"rows": 3, "ok": 1, "truncated": 1, "dropped": 0, "empty": 1} and len(ex[1]["input_ids"]) == 64
    ex, stats = common.load_sft_data(path, tokenizer, 64, "drop")
    assert stats == {"rows": 3, "ok": 1, "truncated": 0, "dropped": 1, "empty": 1} and len(ex) == 1
    with pytest.raises(UsageError, match="no usable samples"):
        common.load_sft_data(write(tmp_path, [rows[1]], "e.jsonl"), tokenizer, 64)
    with pytest.raises(UsageError, match="--overlong"):
        common.load_sft_data(path, tokenizer, 64, "cut")


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="no such directory"):
        common.load_model(str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="could not be loaded"):
        common.load_model(str(tmp_path))  # exists, but holds no model


def test_schedule_is_deterministic_grouped_and_independent_of_world_size():
    lengths = [((i * 37) % 101) + 5 for i in range(400)]
    a = common.batch_schedule(lengths, 8, 120, seed=3)
    assert a == common.batch_schedule(lengths, 8, 120, seed=3) != common.batch_schedule(lengths, 8, 120, seed=4)
    assert len(a) == 120 and all(len(b) == 8 for b in a)
    assert sorted(i for b in a[:50] for i in b) == list(range(400))  # one epoch = each sample once
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    assert spread < 10  # length grouping: a random batch spreads ~75 tokens
    rt = [common.Runtime(r, r, 2, None, r == 0) for r in range(2)]
    shards = [common.micro_batches(a[0], r, 2) for r in rt]
    assert sorted(i for s in shards for mb in s for i in mb) == sorted(a[0])
    single = common.micro_batches(a[0], common.Runtime(0, 0, 1, None, True), 2)  # 1 process accumulating
    assert sorted(map(tuple, single)) == sorted(tuple(mb) for s in shards for mb in s)


def test_collate_shifts_labels_and_pads(tokenizer):
    examples = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, {"input_ids": [9, 10], "labels": [-100, 10]}]
    b = common.collate(examples, [0, 1], tokenizer.pad_token_id, "cpu")
    assert b["targets"].tolist() == [[-100, 7, 8, -100], [10, -100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


@pytest.mark.parametrize("response,reference,ok", [
    ("3 + 2 = 5\n#### 5", "5", True), ("so the answer is 1,200.", "1200", True), ("#### 7 apples, not 5", "7", True),
    ("#### 6", "5", False), ("", "5", False), ("no number", "5", False), ("#### -3.5", "-3.5", True)])
def test_math_judge(response, reference, ok):
    passed, reason = common.judge_math(response, reference)
    assert passed == ok and reason


def test_exact_judge_normalises():
    assert common.judge_exact("The Blue!", ["blue"])[0] and not common.judge_exact("red", ["blue"])[0]


def test_rc_judge_exact_match_and_f1():
    assert common.judge_rc("the Eiffel Tower.", ["Eiffel Tower", "tower"]) == (True, "exact 1, f1 1.00")
    passed, reason = common.judge_rc("Eiffel", ["Eiffel Tower"])
    assert not passed and reason == "exact 0, f1 0.67"
    assert common.token_f1("", "") == 1.0 and common.token_f1("red", "") == 0.0 and common.token_f1("a b", "c") == 0.0


def test_evaluate_accuracy_marks_each_prompt_in_the_order_given(monkeypatch):
    """"correct": one '0'/'1' per example, in the order of the list given, each the task judge's verdict on that
    example's response; accuracy is its mean."""
    cases = [("math", 5, "so 2 + 3 = 5"), ("rc", ["blue"], "red"), ("math", 7, "7"), ("exact", "B", "b"),
             ("math", 1, "no idea"), ("rc", ["the sky"], "Sky."), ("math", 4, "#### 40")]
    examples = [{"task": task, "reference": ref, "messages": [{"role": "user", "content": f"q{i}"},
                                                             {"role": "assistant", "content": str(ref)}]}
                for i, (task, ref, _) in enumerate(cases)]
    answers = {f"q{i}": response for i, (_, _, response) in enumerate(cases)}
    monkeypatch.setattr(common, "generate", lambda model, tokenizer, prompts, *a, **k: [answers[p[-1]["content"]] for p in prompts])
    rt = common.Runtime(0, 0, 1, torch.device("cpu"), True)
    acc = common.evaluate_accuracy(None, None, examples, rt)
    judged = "".join(str(int(common.JUDGES[task](response, ref)[0])) for task, ref, response in cases)
    assert acc["correct"] == judged == "1011010" and acc["n"] == 7 and acc["accuracy"] == pytest.approx(4 / 7)
    assert common.evaluate_accuracy(None, None, [], rt) == {"accuracy": 0.0, "n": 0, "correct": ""}

def test_every_sft_flag_has_help_and_parses(monkeypatch):
    import dataclasses

    import sft
    monkeypatch.setattr("sys.argv", ["sft.py", "--steps", "3", "--no_compile"])
    args = common.parse_args(sft.Args)
    assert args.steps == 3 and args.compile is False
    assert all(f.metadata["help"] for f in dataclasses.fields(sft.Args))


def test_a_config_file_sets_flags_and_the_command_line_overrides_it(tmp_path):
    import sft
    (tmp_path / "run.yaml").write_text("steps: 3\nlr: 1e-4\ncompile: false\ndataset: my.jsonl\nsave_dtype:\n")
    args = common.parse_args(sft.Args, [str(tmp_path / "run.yaml"), "--steps", "5"])
    assert (args.steps, args.lr, args.compile, args.dataset, args.save_dtype) == (5, 1e-4, False, "my.jsonl", "")
    (tmp_path / "run.json").write_text('{"batch_size": 4, "fsdp": true, "warmup_ratio": 0}')
    args = common.parse_args(sft.Args, [str(tmp_path / "run.json")])
    assert (args.batch_size, args.fsdp, args.warmup_ratio, args.steps) == (4, True, 0.0, sft.Args.steps)


@pytest.mark.parametrize("text,message", [
    ("steps: [1\n", "run.yaml:2: malformed YAML"),
    ("stepz: 1\n", "run.yaml: unknown field 'stepz'"),
    ("steps: 1.5\n", "run.yaml: field 'steps' must be int, got float 1.5"),
    ("compile: 1\n", "run.yaml: field 'compile' must be bool, got int 1"),
    ("lr: fast\n", "run.yaml: field 'lr' must be float, got str 'fast'"),
    ("- 1\n", "run.yaml: expected a mapping of flag names to values, got list"),
    ("lr: 1e-3\nlr: 2e-3\n", "run.yaml:2: duplicate field 'lr'"),
])
def test_a_bad_config_file_is_one_line_naming_the_file(tmp_path, text, message):
    import sft
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(common.UsageError, match=re.escape(message)):
        common.parse_args(sft.Args, [str(tmp_path / "run.yaml")])


def test_progress_in_a_log_file_prints_plain_lines_with_eta_and_nothing_for_short_phases(capsys):
    with common.LogProgress("evaluate math", 4, "prompt", delay=0, every=0) as bar:
        for _ in range(4):
            bar.update()
    lines = capsys.readouterr().err.splitlines()  # each update, and the last count once
    assert len(lines) == 4 and lines[0].startswith("evaluate math: 1/4 prompts (25%) | ") and " | eta " in lines[0]
    assert lines[-1].startswith("evaluate math: 4/4 prompts (100%)")
    with common.LogProgress("tokenise", 3, "sample") as bar:  # the default 10 s delay: a short phase is silent
        bar.update(3)
    assert capsys.readouterr().err == ""
    bar = common.progress("generate", 2)  # not a terminal here: plain lines, not tqdm's redrawn bar
    assert isinstance(bar, common.LogProgress)


def test_a_base_model_without_a_chat_template_is_refused_unless_one_is_given(tmp_path, tokenizer):
    import shutil
    base = tmp_path / "base"
    shutil.copytree(os.path.join(common.WORLD_DIR, "base"), base)
    template = tokenizer.chat_template
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="the tokenizer has no chat template; use an instruct model, or give one"):
        common.load_model(str(base))
    (tmp_path / "t.jinja").write_text(template)
    for source in (str(tmp_path / "t.jinja"), os.path.join(common.WORLD_DIR, "base")):  # a file, or a tokenizer's
        assert common.load_model(str(base), chat_template=source)[1].chat_template == template
    (tmp_path / "bad.jinja").write_text(template.replace("<|im_end|>", "</turn>"))
    with pytest.raises(UsageError, match="an assistant turn does not end with the tokenizer's eos token '<|im_end|>'"):
        common.load_model(str(base), chat_template=str(tmp_path / "bad.jinja"))
    with pytest.raises(UsageError, match="neither a file nor a loadable tokenizer"):
        common.load_model(str(base), chat_template=str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def world_prompts(tokenizer):
    prompts = []
    for task in ("math", "code", "rc"):
        examples, _ = common.load_sft_data(os.path.join(common.WORLD_DIR, "data", task, "test.jsonl"), tokenizer, 512,
                                           limit=6)
        prompts += [e["messages"][:-1] for e in examples]
    return prompts


def test_generate_greedy_equals_transformers_one_prompt_at_a_time(world_prompts):
    """common.generate (sorted, left-padded batches, finished rows dropped) gives the tokens transformers'
    generate gives each prompt alone, and says which answers ended with an end-of-turn token."""
    from transformers import GenerationConfig
    model, tokenizer = common.load_model(os.path.join(common.WORLD_DIR, "base"))
    stops = model.generation_config.eos_token_id
    config = GenerationConfig(max_new_tokens=24, do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    texts, finished = common.generate(model, tokenizer, world_prompts, 24, batch_size=7, return_finished=True)
    for prompt, text, done in zip(world_prompts, texts, finished):
        ids = tokenizer(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False),
                        return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, ids.shape[1]:]
        assert text == tokenizer.decode(out, skip_special_tokens=True)
        assert done == bool(torch.isin(out, torch.tensor(stops)).any())
    assert any(finished) and not all(finished)  # both cases occur with 24 new tokens


def test_decode_dropping_finished_rows_changes_nothing(world_prompts, tokenizer):
    model = common.load_model(os.path.join(common.WORLD_DIR, "base"))[0].eval()
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in world_prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    stops = torch.tensor(model.generation_config.eos_token_id)
    kept = common.decode(model, enc["input_ids"], enc["attention_mask"], 40, stops, compact=2.0)  # never drops
    dropped = common.decode(model, enc["input_ids"], enc["attention_mask"], 40, stops, compact=0.01)
    assert torch.equal(kept, dropped) and (kept == -1).any()
    # sampling: reproducible from the seed, and the seed matters
    g = lambda seed: common.decode(model, enc["input_ids"], enc["attention_mask"], 16, stops, 1.0,
                                   torch.Generator().manual_seed(seed))
    assert torch.equal(g(0), g(0)) and not torch.equal(g(0), g(1))


def test_preallocated_kv_cache_decodes_the_tokens_of_transformers_dynamic_cache(world_prompts, tokenizer, monkeypatch):
    """common.kv_cache writes into preallocated buffers (grown by doubling) instead of concatenating: the same
    greedy tokens as DynamicCache, with rows dropped as they finish, also when the buffers must grow."""
    from transformers import DynamicCache
    model = common.load_model(os.path.join(common.WORLD_DIR, "base"))[0].eval()
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in world_prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    stops = torch.tensor(model.generation_config.eos_token_id)
    assert {type(layer).__name__ for layer in common.kv_cache(model, 8).layers} == {"PreallocatedLayer"}
    decode = lambda: common.decode(model, enc["input_ids"], enc["attention_mask"], 40, stops, compact=0.1)
    preallocated = decode()
    preallocate = common.kv_cache
    monkeypatch.setattr(common, "kv_cache", lambda m, capacity: preallocate(m, 4))  # grows 4 -> ... -> prompt + 40
    grown = decode()
    monkeypatch.setattr(common, "kv_cache", lambda m, capacity: DynamicCache(config=m.config))
    assert torch.equal(preallocated, decode()) and torch.equal(grown, preallocated) and (preallocated == -1).any()


def test_content_hash_covers_weights_data_and_code():
    first = lambda x: x + 1  # noqa: E731
    second = lambda x: x + 2  # noqa: E731
    model = torch.nn.Linear(2, 2)
    key = common.content_hash(model, [{"a": 1}], first)
    assert key == common.content_hash(model, [{"a": 1}], first)
    assert key != common.content_hash(model, [{"a": 2}], first) and key != common.content_hash(model, [{"a": 1}], second)
    with torch.no_grad():
        model.weight[0, 0] += 1
    assert key != common.content_hash(model, [{"a": 1}], first)


# ---- mixtures of sources, and tokenisation through datasets.map (processes, cache)
@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The tokenised cache in this test's own directory (HF_DATASETS_CACHE/sft_tokenized)."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf" / "sft_tokenized"


def replies(examples):
    return [ex["messages"][-1]["content"] for ex in examples]


def test_a_mixture_gives_each_source_its_share_drawn_with_the_seed(tmp_path, tokenizer, cache):
    a = write(tmp_path, [{"prompt": "p", "response": f"a{i}"} for i in range(12)], "a.jsonl")
    b = write(tmp_path, [{"prompt": "p", "response": f"b{i}"} for i in range(4)], "b.jsonl")
    examples, stats = common.load_sft_data(f"{a},{b}", tokenizer, 64)  # no weights: concatenated, in order
    assert replies(examples) == [f"a{i}" for i in range(12)] + [f"b{i}" for i in range(4)]
    assert stats == {"rows": 16, "ok": 16, "truncated": 0, "dropped": 0, "empty": 0,
                     f"from {a}": "12 of 12", f"from {b}": "4 of 4"}
    mix = lambda weights, seed=0: replies(common.load_sft_data(f"{a},{b}", tokenizer, 64, weights=weights, seed=seed)[0])
    got = mix("1,3")  # N = 16: a gives round(16 / 4) = 4 of its 12, without repeats; b gives 12 = each of its 4 x 3
    assert len(got) == 16 and got[4:] == sorted([f"b{i}" for i in range(4)] * 3)
    assert len(set(got[:4])) == 4 and set(got[:4]) <= {f"a{i}" for i in range(12)}
    assert mix("1,3") == got and mix("1,3", seed=1)[:4] != got[:4] and mix("0.25,0.75") == got  # seeded; only ratios count
    got = mix("1,0")  # a gives all 16: each of its 12 once and 4 more, distinct
    assert len(got) == 16 and set(got) == {f"a{i}" for i in range(12)} and max(map(got.count, got)) == 2
    assert common.load_sft_data(f"{a},{b}", tokenizer, 64, weights="1,0")[1][f"from {b}"] == "0 of 4"
    small, large = common.mix_sources([3, 5], [2, 2], seed=0)  # N = 8, 4 each: 3 once and 1 repeated; 4 of 5
    assert len(small) == 4 and set(small) == {0, 1, 2} and len(large) == len(set(large)) == 4


def test_an_error_in_a_mixed_source_names_its_file_and_line(tmp_path, tokenizer, cache):
    a = write(tmp_path, [ROWS["prompt_response"]] * 2, "a.jsonl")
    b = write(tmp_path, [ROWS["prompt_response"], {"prompt": "p", "response": None}], "b.jsonl")
    with pytest.raises(UsageError, match=re.escape(f"{b}:2: field 'response' must be a string, got NoneType")):
        common.load_sft_data(f"{a},{b}", tokenizer, 64, weights="1,1")


@pytest.mark.parametrize("dataset,weights,message", [
    ("a.jsonl,b.jsonl", "1", "--dataset_weights has 1 values for 2 --dataset sources"),
    ("a.jsonl,b.jsonl", "1,-2", "--dataset_weights '1,-2': every weight must be finite and >= 0"),
    ("a.jsonl,b.jsonl", "1,nan", "--dataset_weights '1,nan': every weight must be finite and >= 0"),
    ("a.jsonl,b.jsonl", "inf,1", "--dataset_weights 'inf,1': every weight must be finite and >= 0"),
    ("a.jsonl,b.jsonl", "0,0", "--dataset_weights '0,0': the weights are all 0"),
    ("a.jsonl,b.jsonl", "1;2", "--dataset_weights '1;2': expected comma-separated numbers"),
    ("a.jsonl,,b.jsonl", "", "--dataset 'a.jsonl,,b.jsonl': an empty source name"),
    ("a.jsonl,", "", "--dataset 'a.jsonl,': an empty source name"),
    ("a.jsonl,a.jsonl", "", "--dataset 'a.jsonl,a.jsonl': a source is named twice"),
])
def test_bad_mixture_flags_are_refused_before_anything_is_loaded(dataset, weights, message):
    import sft
    with pytest.raises(UsageError, match=re.escape(message)):
        common.parse_args(sft.Args, ["--dataset", dataset, "--dataset_weights", weights])


def test_the_mixture_is_a_run_setting_and_hub_ids_with_a_config_still_parse():
    import sft
    common.parse_args(sft.Args, ["--dataset", "openai/gsm8k:main,tatsu-lab/alpaca", "--dataset_weights", "2,1"])
    assert common.RUN_SETTINGS["dataset_weights"] == "2,1" and "dataset_num_proc" not in common.RUN_SETTINGS
    assert common.dataset_sources("openai/gsm8k:main, tatsu-lab/alpaca") == (["openai/gsm8k:main", "tatsu-lab/alpaca"], None)


class RecordingBar:
    """Stands in for common.progress: what the tokenisation reports."""
    made = []

    def __init__(self, desc, total):
        self.desc, self.total, self.n = desc, total, 0
        RecordingBar.made.append(self)

    def update(self, n=1):
        self.n += n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def counting(tokenizer, monkeypatch):
    """Counts the tokenizer's apply_chat_template calls in this process."""
    calls, render = [], tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template", lambda *a, **k: calls.append(1) or render(*a, **k))
    return calls


def test_two_processes_give_exactly_what_one_gives_and_their_cache_serves_one(tmp_path, tokenizer, monkeypatch):
    import datasets
    rows = [ROWS[s] for s in sorted(ROWS)] * 3 + [{"prompt": "p", "response": " "}, {"prompt": "x", "response": "y " * 80}]
    path = write(tmp_path, rows)
    monkeypatch.setattr(common, "progress", RecordingBar)
    results = {}
    for num_proc in (1, 2):
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / f"hf{num_proc}"))
        results[num_proc] = common.load_sft_data(path, tokenizer, 48, num_proc=num_proc)
        assert (RecordingBar.made[-1].desc, RecordingBar.made[-1].n) == ("tokenise d.jsonl", len(rows))
    assert results[1] == results[2] and results[1][1] == {"rows": 29, "ok": 24, "truncated": 1, "dropped": 3, "empty": 1}
    files = sorted(os.listdir(tmp_path / "hf2" / "sft_tokenized"))
    assert len(files) == 2 and files[0].endswith("_00000_of_00002.arrow")  # two processes wrote a shard each
    calls, made = counting(tokenizer, monkeypatch), len(RecordingBar.made)
    assert common.load_sft_data(path, tokenizer, 48) == results[2] and not calls and len(RecordingBar.made) == made


def test_the_first_bad_row_is_named_with_two_processes(tmp_path, tokenizer, cache, monkeypatch):
    turns = ROWS["messages"]  # with a template that rewrites earlier assistant turns, a multi-turn row fails to tokenise
    monkeypatch.setattr(tokenizer, "chat_template", tokenizer.chat_template.replace(
        "{{ m['content'] }}", "{{ m['content'] if loop.last or m['role'] != 'assistant' else '...' }}"))
    rows = [ROWS["prompt_response"]] * 6 + [turns, ROWS["prompt_response"], turns, ROWS["prompt_response"]]
    with pytest.raises(UsageError, match=r"d\.jsonl:7: chat template: it renders an earlier assistant turn"):
        common.load_sft_data(write(tmp_path, rows), tokenizer, 64, num_proc=2)  # line 7 is in the second shard
    rows[8] = {"question": 1, "answer": "a"}  # a schema error after it: line 7 is still the first bad row
    with pytest.raises(UsageError, match=r"d\.jsonl:7: chat template"):
        common.load_sft_data(write(tmp_path, rows), tokenizer, 64, num_proc=2)
    rows[6] = ROWS["prompt_response"]
    with pytest.raises(UsageError, match=r"d\.jsonl:9: field 'question' must be a string, got int"):
        common.load_sft_data(write(tmp_path, rows), tokenizer, 64, num_proc=2)


def test_the_tokenised_cache_is_hit_when_all_is_equal_and_missed_on_any_change(tmp_path, tokenizer, cache, monkeypatch):
    path = write(tmp_path, [ROWS["messages"], ROWS["gsm8k"], {"prompt": "x", "response": "y " * 80}])
    calls = counting(tokenizer, monkeypatch)
    first = common.load_sft_data(path, tokenizer, 64)
    assert calls and os.listdir(cache)
    calls.clear()
    assert common.load_sft_data(path, tokenizer, 64) == first and not calls  # hit: nothing tokenised
    for change in ({"max_length": 63}, {"overlong": "drop"}, {"mask_history": True}):
        other = common.load_sft_data(path, tokenizer, **{"max_length": 64, **change})
        assert calls and other != first, change
        calls.clear()
    template = tokenizer.chat_template
    monkeypatch.setattr(tokenizer, "chat_template", template.replace("<|im_end|>\n{%", "<|im_end|>\n\n{%"))
    assert common.load_sft_data(path, tokenizer, 64)[0] != first[0] and calls
    calls.clear()
    monkeypatch.setattr(tokenizer, "chat_template", template)  # back: an edited row misses, the same rows hit
    assert common.load_sft_data(write(tmp_path, [ROWS["messages"], ROWS["gsm8k"]]), tokenizer, 64) and calls
    calls.clear()
    assert common.load_sft_data(write(tmp_path, [ROWS["messages"], ROWS["gsm8k"], {"prompt": "x", "response": "y " * 80}]),
                                tokenizer, 64) == first and not calls
