"""FAIT: error-sensitive masks on hand-made pairs (characters and tokens), the weight rule against a direct
computation and its limiting cases, the weighted loss against full logits, variant selection, bad input,
and the script end to end (weights 1 train exactly like sft.py)."""
import copy
import itertools
import json
import os
import random
import re

import pytest
import torch
import torch.nn.functional as F

import common
import fait
import sft
from scripts import losses, records, run_script, run_side_by_side

CODE = os.path.join(common.WORLD_DIR, "data", "code", "train.jsonl")
QUICK = ["--steps", "3", "--batch_size", "8", "--eval_datasets", "", "--save_every", "0", "--compile", "false"]


def flagged(text, mask):
    return "".join(c if m else "_" for c, m in zip(text, mask))


def test_one_changed_operator():
    correct = "def f(x):\n    return x + 1"
    line, token = fait.difference_masks(correct, "def f(x):\n    return x - 1")
    assert flagged(correct, line) == "__________    return x + 1"
    assert flagged(correct, token) == "_" * 23 + "+__"


def test_one_changed_line_among_others():
    correct = "def f(x):\n    y = x * 2\n    return y\n"
    line, token = fait.difference_masks(correct, "def f(x):\n    y = x + 3\n    return y\n")
    assert flagged(correct, line) == "_" * 10 + "    y = x * 2" + "_" * 14
    assert flagged(correct, token) == "_" * 20 + "*_2" + "_" * 14


def test_inserted_line_is_flagged_whole_and_deleted_line_flags_nothing():
    correct = "def f(x):\n    if x < 0:\n        return 0\n    return x"
    line, token = fait.difference_masks(correct, "def f(x):\n    return x")
    expected = "_" * 10 + "    if x < 0:" + "_" + "        return 0" + "_" * 13
    assert flagged(correct, line) == expected and flagged(correct, token) == expected
    line, token = fait.difference_masks("def f(x):\n    return x", correct)  # the variant has extra lines
    assert not any(line) and not any(token)


def test_deletion_inside_a_line_flags_the_next_character():
    line, token = fait.difference_masks("return x + 1", "return x + 12")  # the variant has an extra '2'
    assert flagged("return x + 1", token) == "___________1"
    line, token = fait.difference_masks("return [x]", "return [x, x]")
    # ambiguous alignments resolve from the end of the line: the deleted run is "x, " after "[", so "x" is flagged
    assert flagged("return [x]", token) == "________x_"


def test_identical_code_has_empty_masks():
    code = "def f(x):\n    return x"
    assert fait.difference_masks(code, code) == ([False] * len(code), [False] * len(code))


def levenshtein(a, b):
    @__import__("functools").lru_cache(None)
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j - 1) + (a[i - 1] != b[j - 1]), d(i - 1, j) + 1, d(i, j - 1) + 1)
    return d(len(a), len(b))


def test_alignment_against_a_direct_edit_distance_and_token_within_line():
    rng = random.Random(0)
    alphabet = "ab+ 1\n"
    for _ in range(300):
        correct = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        incorrect = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        line, token = fait.difference_masks(correct, incorrect)
        assert all(l or not t for l, t in zip(line, token))  # token mask within line mask
        assert not any(m for c, m in zip(correct, line) if c == "\n")  # newlines never flagged
        a, b = incorrect.split("\n")[0], correct.split("\n")[0]
        flags = fait.char_alignment(a, b)
        assert sum(flags) <= levenshtein(a, b) and (any(flags) or a == b or not b)
        if len(a) == len(b) and levenshtein(a, b) == sum(x != y for x, y in zip(a, b)):
            assert flags == [x != y for x, y in zip(a, b)]  # substitutions only: exactly the differing characters


@pytest.fixture(scope="module")
def world():
    return common.load_model(os.path.join(common.WORLD_DIR, "base"))


def code_example(tokenizer, code, prompt="Write a function to add 12 to a number."):
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": code}]
    ids, labels = common.tokenize_example(tokenizer, messages, 512, "truncate")[0]
    return {"messages": messages, "input_ids": ids, "labels": labels}


def test_characters_map_to_exactly_the_covering_tokens(world):
    tokenizer = world[1]
    correct = "def add_twelve(x):\n    return x + 12"
    ex = code_example(tokenizer, correct)
    line, token = fait.token_masks(tokenizer, ex, *fait.difference_masks(correct, "def add_twelve(x):\n    return x + 13"))
    pieces = [tokenizer.decode([i]) for i in ex["input_ids"]]
    assert [p for p, m in zip(pieces, token) if m] == ["2"]  # digits are single tokens in the world tokenizer
    line_text = "".join(p for p, m in zip(pieces, line) if m)
    assert line_text.strip("\n") == "    return x + 12" or line_text.endswith("return x + 12")
    assert all(not m for m, lab in zip(line, ex["labels"]) if lab == common.IGNORE_INDEX)  # never on the prompt
    # fenced code: only the code inside the block is diffed and mapped
    fenced = code_example(tokenizer, "Here:\n```python\n" + correct + "\n```")
    _, token = fait.token_masks(tokenizer, fenced, *fait.difference_masks(correct, correct.replace("12", "13")))
    assert [tokenizer.decode([i]) for i, m in zip(fenced["input_ids"], token) if m] == ["2"]


def test_weights_against_the_direct_formula_and_limits():
    g = torch.Generator().manual_seed(0)
    line = (torch.rand(3, 7, generator=g) < 0.5).float()
    token = line * (torch.rand(3, 7, generator=g) < 0.5).float()
    loss_mask = (torch.rand(3, 7, generator=g) < 0.8).float()
    loss_mask[2] = 0  # a row without loss tokens
    w = fait.fait_weights(line, token, loss_mask, 2.0, 3.0, renormalize=False)
    for b, t in itertools.product(range(3), range(7)):
        assert w[b, t] == (1 + 2 * line[b, t] + 3 * token[b, t]) * loss_mask[b, t]
    w = fait.fait_weights(line, token, loss_mask, 2.0, 3.0, renormalize=True)
    assert torch.isfinite(w).all() and (w >= 0).all() and not w[2].any()
    for b in range(2):
        raw = [(1 + 2 * line[b, t] + 3 * token[b, t]).item() for t in range(7) if loss_mask[b, t]]
        want = [r * len(raw) / sum(raw) for r in raw]
        assert w[b][loss_mask[b].bool()].tolist() == pytest.approx(want, rel=1e-6)
    assert torch.equal(fait.fait_weights(line, token, loss_mask, 2.0, 3.0), (1 + 2 * line + 3 * token) * loss_mask)  # default: raw
    for renorm in (True, False):  # the SFT limits: no emphasis, or no differences
        assert torch.equal(fait.fait_weights(line, token, loss_mask, 0.0, 0.0, renorm), loss_mask)
        assert torch.equal(fait.fait_weights(0 * line, 0 * token, loss_mask, 2.0, 3.0, renorm), loss_mask)


def test_emphasis_schedule():
    assert [fait.emphasis(s, 4, "decay") for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert {fait.emphasis(s, 4, "constant") for s in range(4)} == {1.0}
    assert fait.Args().weight_schedule == "constant" and fait.Args().renormalize is False  # the defaults: the visible formula
    with pytest.raises(ValueError):
        fait.emphasis(0, 4, "cosine")


def test_one_epoch_sees_each_sample_at_most_once():
    """--epochs: the world's 534 programs at batch 32 are 16 steps an epoch; one epoch's schedule has no repeated
    sample (22 are left out), two epochs use each sample at most twice."""
    assert fait.epoch_steps(534, 32, 1) == 16 and fait.epoch_steps(534, 32, 2) == 32 and fait.epoch_steps(40, 8, 3) == 15
    lengths = [random.Random(i).randint(5, 50) for i in range(534)]
    for epochs in (1, 2):
        seen = [i for batch in common.batch_schedule(lengths, 32, fait.epoch_steps(534, 32, epochs), 0) for i in batch]
        assert len(seen) == 512 * epochs and max(seen.count(i) for i in set(seen)) == epochs


@pytest.mark.parametrize("flags,message", [
    (dict(epochs=1, steps=50), "--epochs 1 and --steps 50 both set the training length"),
    (dict(epochs=-1), "--epochs must be 0 (use --steps) or more, got -1"),
    (dict(weight_schedule="cosine"), "--weight_schedule must be decay or constant"),
    (dict(granularity="words"), "--granularity must be both, line or token"),
])
def test_bad_flags_fail_before_anything_is_loaded_or_written(tmp_path, flags, message):
    out = tmp_path / "run"
    with pytest.raises(common.UsageError, match=re.escape(message)):
        fait.main(fait.Args(output_dir=str(out), cache_dir=str(tmp_path / "cache"), model=str(tmp_path / "absent"), **flags))
    assert not out.exists() and not (tmp_path / "cache").exists()


def batch_of(world, alpha, beta, renormalize=None):
    model, tokenizer = world
    examples = []
    for correct, wrong in [("def add_twelve(x):\n    return x + 12", "def add_twelve(x):\n    return x - 12"),
                           ("def count_s(s):\n    return s.count('s')", "def count_s(s):\n    return s.count('a')")]:
        ex = code_example(tokenizer, correct)
        ex["line_mask"], ex["token_mask"] = fait.token_masks(tokenizer, ex, *fait.difference_masks(correct, wrong))
        examples.append(ex)
    batch = common.collate(examples, [0, 1], tokenizer.pad_token_id, "cpu", ("line_mask", "token_mask"))
    batch["emphasis"] = 1.0
    args = fait.Args(alpha=alpha, beta=beta, compile=False, **({} if renormalize is None else {"renormalize": renormalize}))
    return model, batch, args


def gradients(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_weights_one_equal_sft_loss_and_gradients(world):
    model, batch, args = batch_of(world, 0.0, 0.0, True)
    loss, _ = fait.compute_loss(model, batch, args)
    ref, _ = sft.compute_loss(model, {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "targets")},
                              sft.Args(compile=False))
    assert loss.item() == ref.item()
    for a, b in zip(gradients(model, loss), gradients(model, ref)):
        assert torch.equal(a, b)


def test_weighted_loss_against_full_logits(world):
    model, batch, args = batch_of(world, 2.0, 1.0)  # the default: raw weights, constant emphasis
    model = copy.deepcopy(model).double()  # float64: the comparison is exact up to rounding
    loss, metrics = fait.compute_loss(model, batch, args)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["targets"] != common.IGNORE_INDEX
    per_token = F.cross_entropy(logits[keep], batch["targets"][keep], reduction="none")
    w = 1 + 2 * batch["line_mask"][keep] + batch["token_mask"][keep]
    direct = (w * per_token).sum()
    torch.testing.assert_close(loss, direct, rtol=1e-12, atol=0)
    for a, b in zip(gradients(model, loss), gradients(model, direct)):  # gradient k x SFT's on a weight-k token
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert metrics["emphasis"] == 1.0 and 0 < metrics["sensitive_fraction"] < 1 and metrics["sensitive_weight"] > 3


def test_choose_variant_keeps_the_closest_failing_candidate():
    correct = "def f(x):\n    return x + 1"
    calls = []

    def judge(code):
        calls.append(code)
        return code in ("def f(x):\n    return 1 + x", correct), "judged"

    candidates = [correct, "def f(x):\n    return 1 + x", "def f(x):\n    return x + 2", "print('hi')",
                  "def f(x):\n    return x * 3", None, "def f(x):\n    return x + 2"]
    variant, similarity, judged = fait.choose_variant(correct, candidates, judge, 0.5)
    assert variant == "def f(x):\n    return x + 2" and similarity > 0.9
    assert judged == 1 and calls == [variant]  # most similar first; identical code never judged
    assert fait.choose_variant(correct, [correct, "print('hi')", None], judge, 0.5)[0] is None  # too far
    assert fait.choose_variant(correct, ["def f(x):\n    return 1 + x"], judge, 0.5)[0] is None  # passes its tests


def test_find_variants_checks_the_reference_and_runs_candidates_in_the_sandbox(monkeypatch, world):
    model, tokenizer = world
    rows = [{"text": "Write add_one(x).", "code": "def add_one(x):\n    return x + 1", "test_list": ["assert add_one(1) == 2"]},
            {"text": "Write add_two(x).", "code": "def add_two(x):\n    return x + 3", "test_list": ["assert add_two(1) == 3"]}]
    examples = [common.to_example(r, "row") for r in rows]
    prompts_seen = []

    def fake_generate(model, tokenizer, prompts, *args, **kwargs):
        prompts_seen.extend(prompts)
        return ["def add_one(x):\n    return x - 1", "def add_one(x):\n    return 1 + x"] * 2, [True] * 4

    monkeypatch.setattr(common, "generate", fake_generate)
    args = fait.Args(variant_prompts="corrupt,task", num_samples=1)
    out, timing = fait.find_variants(model, tokenizer, examples, args)
    assert out[0]["variant"] == "def add_one(x):\n    return x - 1" and out[0]["source"] == "corrupt"
    assert out[1] == {"variant": None, "similarity": 0.0, "source": None, "reference_passes": False}  # wrong reference
    assert "Correct solution:\ndef add_one(x)" in prompts_seen[0][-1]["content"] and prompts_seen[1] == examples[0]["messages"][:-1]
    assert timing["generated"] == 4 and timing["judged"] == 3  # two references, one candidate


def run(out, *extra, check=True, script="fait.py", in_process=False):
    cache = ["--cache_dir", str(out)] if script == "fait.py" and "--cache_dir" not in extra else []
    quick = QUICK[2:] if "--epochs" in extra else QUICK  # --epochs replaces --steps
    return run_script(script, out, *quick, *extra, *cache, check=check, in_process=in_process)


def test_script_with_unit_weights_trains_like_sft_and_variants_fail_their_tests(tmp_path):
    data = tmp_path / "code16.jsonl"
    with open(CODE) as f:
        data.write_text("".join(next(f) for _ in range(16)))
    proc, _ = run_side_by_side(  # one epoch of 16 at batch 8: 2 steps
        ("fait.py", tmp_path / "fait", *QUICK[2:], "--dataset", str(data), "--alpha", "0", "--beta", "0", "--num_samples",
         "2", "--cache_dir", str(tmp_path / "cache"), "--epochs", "1"),
        ("sft.py", tmp_path / "sft", *QUICK, "--dataset", str(data), "--steps", "2"))
    assert losses(tmp_path / "fait") == losses(tmp_path / "sft") and len(losses(tmp_path / "sft")) == 2
    assert "FAIT variants:" in proc.stdout and "--epochs 1: 2 steps of 8 samples" in proc.stdout
    assert {r["method/emphasis"] for r in records(tmp_path / "fait") if "loss" in r} == {1.0}  # constant by default
    cache = [f for f in os.listdir(tmp_path / "cache") if f.startswith("fait_variants-")]
    rows = common.read_records(str(tmp_path / "cache" / cache[0]))
    tests = [json.loads(line)["test_list"] for line in data.read_text().splitlines()]
    assert len(rows) == 16 and any(r["variant"] for r in rows)
    for row, test in zip(rows, tests):
        if row["variant"] is not None:  # model-written code, judged again here, in the sandbox
            assert not common.judge_code(row["variant"], test)[0] and row["similarity"] >= 0.5


def test_bad_inputs_are_clear_errors(tmp_path, world):
    proc = run(tmp_path / "a", "--dataset", os.path.join(common.WORLD_DIR, "data", "math", "validation.jsonl"), check=False, in_process=True)
    assert proc.returncode != 0 and "sample 1 has no tests (task 'math')" in proc.stderr
    model, tokenizer = world
    other = tmp_path / "teacher"
    model.save_pretrained(other)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    proc = run(tmp_path / "b", "--dataset", CODE, "--teacher", str(other), check=False, in_process=True)
    assert proc.returncode != 0 and "its tokenizer differs" in proc.stderr
    proc = run(tmp_path / "c", "--dataset", CODE, "--epochs", "1", "--steps", "5", check=False, in_process=True)  # one line, no traceback
    assert proc.returncode != 0 and "both set the training length" in proc.stderr and "Traceback" not in proc.stderr
