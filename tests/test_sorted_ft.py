"""SoFT: exits against truncated models and full logits, the double-norm trap, the loss composition and its
gradients, early-exit decoding against slow references, the same on every common architecture (tiny random models:
sliding windows, softcaps, logit scales, GPT-2's layout) and the start-up refusals, and the script (--exits L is
sft.py)."""
import math
import os
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

import archs
import common
import sft
import sorted_ft
from scripts import losses, records, run_script
from test_train import GOLDEN, QUICK

BASE = os.path.join(common.WORLD_DIR, "base")


@pytest.fixture(scope="module")
def world():
    model, tok = common.load_model(BASE)
    args = sorted_ft.Args(compile=False)
    train, _ = common.load_sft_data(args.dataset, tok, 512, limit=6)
    batch = common.collate(train, [0, 1, 2, 3, 4, 5], tok.pad_token_id, "cpu")  # padded: lengths differ
    assert (batch["attention_mask"] == 0).any()
    return model, tok, args, batch


@pytest.fixture
def one_thread():
    """Tiny models on one thread: on a busy machine a second one only adds contention (up to 50x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def exit_logits(model, batch, n):
    """Exit n as the training loss reads it: hidden state after n blocks, final norm (once), shared head, then the
    model's logit post-processing (scale, softcap) that the fused loss applies."""
    out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    hidden = out.last_hidden_state if n == model.config.num_hidden_layers else sorted_ft.exit_parts(model)[1](out.hidden_states[n])
    scale, softcap = common.logit_map(model)
    z = model.get_output_embeddings()(hidden) * scale
    return softcap * torch.tanh(z / softcap) if softcap else z


def test_default_exits_are_every_quarter_and_always_end_at_the_last_layer():
    args = sorted_ft.Args()
    assert sorted_ft.exit_depths(args, 4) == [1, 2, 3, 4]
    assert sorted_ft.exit_depths(args, 40) == [10, 20, 30, 40]
    assert sorted_ft.exit_depths(sorted_ft.Args(exit_every=3), 8) == [3, 6, 8]
    assert sorted_ft.exit_depths(sorted_ft.Args(exits="12,16,20,24,28,32,36"), 40) == [12, 16, 20, 24, 28, 32, 36, 40]
    assert sorted_ft.exit_depths(sorted_ft.Args(exits="4"), 4, "1,3") == [1, 3, 4]  # --eval_exits
    with pytest.raises(common.UsageError, match="depths must be in 1..4"):
        sorted_ft.exit_depths(sorted_ft.Args(exits="0,2"), 4)


def test_paper_exit_schedule_is_30_percent_then_a_10_percent_stride_at_any_depth():
    assert sorted_ft.paper_exits(40) == [12, 16, 20, 24, 28, 32, 36, 40]  # Sec. 3, LLaMA-2-13B
    assert sorted_ft.paper_exits(24) == [7, 10, 12, 14, 17, 19, 22, 24] and sorted_ft.paper_exits(4) == [1, 2, 3, 4]
    for depth in range(1, 97):  # against the direct formula: round(k L / 10), halves up, k = 3..10, at least 1
        want = sorted({max(1, math.floor(Fraction(k * depth, 10) + Fraction(1, 2))) for k in range(3, 11)})
        got = sorted_ft.paper_exits(depth)
        assert got == want and got[-1] == depth and (len(got) == 8 or depth < 10)
    assert sorted_ft.exit_depths(sorted_ft.Args(exits="paper"), 24) == [7, 10, 12, 14, 17, 19, 22, 24]
    assert sorted_ft.exit_depths(sorted_ft.Args(exits="24"), 24, "paper") == sorted_ft.paper_exits(24)  # --eval_exits


def test_paper_thresholds_are_app_a1s_by_depth_and_other_forms_parse_or_are_refused():
    paper = sorted_ft.exit_thresholds("paper", sorted_ft.paper_exits(40), 40)
    assert paper == {12: 0.95, 16: 0.95, 20: 0.9, 24: 0.9, 28: 0.8, 32: 0.8, 36: 0.7}  # App. A.1
    taus = list(paper.values())
    for depth in range(10, 97):  # the k-th exit of the paper's schedule gets the paper's k-th threshold at any depth
        assert list(sorted_ft.exit_thresholds("paper", sorted_ft.paper_exits(depth), depth).values()) == taus
    for depth in range(1, 41):  # against the direct rule: depth in tenths, rounded half up
        for n in range(1, depth):
            tenths = math.floor(Fraction(10 * n, depth) + Fraction(1, 2))
            assert sorted_ft.paper_threshold(n, depth) == (0.95 if tenths <= 4 else 0.9 if tenths <= 6 else 0.8 if tenths <= 8 else 0.7)
    assert sorted_ft.exit_thresholds("paper", [1, 2, 3, 4], 4) == {1: 0.95, 2: 0.9, 3: 0.8}
    assert sorted_ft.exit_thresholds("0.9", [1, 2, 3, 4], 4) == {1: 0.9, 2: 0.9, 3: 0.9}
    assert sorted_ft.exit_thresholds("0.5,0.6,2", [1, 2, 3, 4], 4) == {1: 0.5, 2: 0.6, 3: 2.0}
    with pytest.raises(common.UsageError, match=r"--exit_threshold '0.5,0.6': 2 thresholds for the 3 exits \[1, 2, 3\]"):
        sorted_ft.exit_thresholds("0.5,0.6", [1, 2, 3, 4], 4)
    for bad in ("x", "-0.1", "nan", "0.9,", "Paper"):
        with pytest.raises(common.UsageError, match="--exit_threshold must be a number >= 0"):
            sorted_ft.parse_thresholds(bad)


@pytest.mark.parametrize("flags,message", [({"exits": "12,a"}, "--exits must be comma-separated layer numbers or `paper`"),
                                           ({"eval_exits": "papers"}, "--eval_exits must be comma-separated"),
                                           ({"exits": "paper", "exit_every": 2}, "--exit_every 2: .* applies only with --exits empty"),
                                           ({"exit_every": -1}, "--exit_every -1: must be >= 0"),
                                           ({"exit_threshold": "high"}, "--exit_threshold must be a number")])
def test_bad_method_flags_are_refused_before_anything_is_loaded_or_written(tmp_path, flags, message):
    out = tmp_path / "never"
    with pytest.raises(common.UsageError, match=message):
        sorted_ft.main(sorted_ft.Args(output_dir=str(out), **flags))
    assert not out.exists()


@torch.no_grad()
def test_each_exit_equals_the_truncated_from_pretrained_model(world):
    model, _, _, batch = world
    mask = batch["attention_mask"].bool()
    for n in range(1, model.config.num_hidden_layers + 1):
        small = transformers.AutoModelForCausalLM.from_pretrained(BASE, num_hidden_layers=n)
        want = small(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(exit_logits(model, batch, n)[mask], want[mask], atol=1e-4, rtol=1e-4)
        with sorted_ft.truncated(model, n):  # what evaluation and generation use
            torch.testing.assert_close(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[mask],
                                       want[mask], atol=1e-4, rtol=1e-4)
    assert model.config.num_hidden_layers == 4


@torch.no_grad()
def test_last_exit_is_the_model_output_normalised_once(world):
    model, _, _, batch = world
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(exit_logits(model, batch, 4), full)
    out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    twice = model.get_output_embeddings()(model.get_decoder().norm(out.hidden_states[-1]))  # the trap: already normalised
    assert not torch.allclose(twice, full, atol=1e-3)


def test_loss_is_the_mean_of_per_exit_cross_entropies_and_gradients_nest(world):
    model, _, args, batch = world
    loss, metrics = sorted_ft.compute_loss(model, batch, args, depths=[1, 2, 3, 4])
    mask = batch["targets"] != common.IGNORE_INDEX
    per_exit = [F.cross_entropy(exit_logits(model, batch, n)[mask], batch["targets"][mask], reduction="sum") for n in (1, 2, 3, 4)]
    torch.testing.assert_close(loss, torch.stack(per_exit).mean(), rtol=1e-5, atol=1e-4)
    for n, value in zip((1, 2, 3, 4), per_exit):
        assert metrics[f"exit{n}/ce"] == pytest.approx(value.item() / mask.sum().item(), rel=1e-5)
    model.zero_grad()
    sorted_ft.sorted_loss([model.get_decoder().norm(model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states[2])],
        model.get_output_embeddings().weight, batch["targets"], compile=False)[0].backward()
    layers = model.get_decoder().layers
    assert all(p.grad is None or not p.grad.any() for layer in layers[2:] for p in layer.parameters())  # blocks 3, 4: nothing
    assert all(p.grad is not None and p.grad.any() for layer in layers[:2] for p in layer.parameters())
    assert model.get_decoder().norm.weight.grad.any() and model.get_output_embeddings().weight.grad.any()
    model.zero_grad()


def test_only_the_last_exit_has_sft_py_loss_and_gradients(world):
    model, _, args, batch = world
    grads = []
    for loss_fn in (lambda: sorted_ft.compute_loss(model, batch, args, depths=[4]), lambda: sft.compute_loss(model, batch, args)):
        model.zero_grad()
        loss, _ = loss_fn()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    model.zero_grad()
    assert torch.equal(grads[0][0], grads[1][0]) and all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def slow_early_exit(model, prompt, thresholds, max_new_tokens, stops):
    """Reference: for every token, recompute the whole sequence without a cache through each sub-model's own
    forward (the model truncated to n blocks); emit at the first exit whose top probability passes its threshold."""
    ids, tokens, depths, last = list(prompt), [], [], model.config.num_hidden_layers
    for _ in range(max_new_tokens):
        for n in sorted(thresholds) + [last]:
            with sorted_ft.truncated(model, n):
                prob, token = model(input_ids=torch.tensor([ids])).logits[:, -1].float().softmax(-1).max(-1)
            if n == last or prob.item() >= thresholds[n]:
                break
        tokens.append(token.item())
        depths.append(n)
        if token.item() in stops:
            break
        ids.append(token.item())
    return tokens, depths


@torch.no_grad()
def test_early_exit_decoding_is_exact(world, one_thread):
    model, tok, _, _ = world
    model.eval()
    examples, _ = common.load_sft_data(os.path.join(common.WORLD_DIR, "data", "math", "test.jsonl"), tok, 512, split="test", limit=3)
    stops = {tok.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id or [])}
    mixed = 0
    for e in examples:
        prompt = tok.apply_chat_template(e["messages"][:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
        full, depths, _ = sorted_ft.early_exit_decode(model, torch.tensor(prompt), {1: 2.0, 2: 2.0, 3: 2.0}, 24, stops)
        assert set(depths) == {4}
        assert tok.decode([t for t in full if t not in stops], skip_special_tokens=True) == common.generate(model, tok, [e["messages"][:-1]], 24, batch_size=1)[0]
        first, depths, _ = sorted_ft.early_exit_decode(model, torch.tensor(prompt), {1: 0.0}, 24, stops)
        with sorted_ft.truncated(model, 1):
            assert tok.decode([t for t in first if t not in stops], skip_special_tokens=True) == common.generate(model, tok, [e["messages"][:-1]], 24, batch_size=1)[0]
        assert set(depths) == {1}
        thresholds = {1: 0.9, 2: 0.6, 3: 0.5}
        out, depths, _ = sorted_ft.early_exit_decode(model, torch.tensor(prompt), thresholds, 24, stops)
        want, want_depths = slow_early_exit(model, prompt, thresholds, 24, stops)
        assert out == want and depths == want_depths
        mixed += len(set(depths)) > 1
    assert mixed  # the catch-up path (tokens after an early exit that go deeper) was exercised


@pytest.fixture(scope="module")
def arch_model(tmp_path_factory):
    """arch -> (directory, model in eval mode, tokenizer) of a tiny random model (tests/archs.py), made once."""
    made = {}

    def get(arch):
        if arch not in made:
            path = archs.make(arch, tmp_path_factory.mktemp(arch))
            model, tok = common.load_model(path)
            made[arch] = (path, model.eval(), tok)
        return made[arch]
    return get


@pytest.mark.parametrize("arch", list(archs.ARCHS))
def test_every_architectures_exits_are_its_sub_models_and_the_last_its_own_logits(arch, arch_model, one_thread):
    path, model, tok = arch_model(arch)
    train, _ = common.load_sft_data(sorted_ft.Args().dataset, tok, 512, limit=3)
    batch = common.collate(train, [0, 1, 2], tok.pad_token_id, "cpu")
    assert batch["input_ids"].shape[1] > 16 and (batch["attention_mask"] == 0).any()  # past the sliding windows, padded
    inputs, mask = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(exit_logits(model, batch, 2)[mask], model(**inputs).logits[mask])  # softcap, scales, ln_f
        want = transformers.AutoModelForCausalLM.from_pretrained(path, num_hidden_layers=1)(**inputs).logits
        torch.testing.assert_close(exit_logits(model, batch, 1)[mask], want[mask], atol=1e-4, rtol=1e-4)
        with sorted_ft.truncated(model, 1):  # what evaluation and generation use (GPT-2 runs its whole block list)
            torch.testing.assert_close(model(**inputs).logits[mask], want[mask], atol=1e-4, rtol=1e-4)
    assert model.config.num_hidden_layers == len(getattr(model.get_decoder(), sorted_ft.exit_parts(model)[0])) == 2  # restored


@pytest.mark.parametrize("arch", list(archs.ARCHS))
def test_every_architectures_loss_trains_each_exit_on_those_logits(arch, arch_model, one_thread):
    _, model, tok = arch_model(arch)
    train, _ = common.load_sft_data(sorted_ft.Args().dataset, tok, 512, limit=3)
    batch = common.collate(train, [0, 1, 2], tok.pad_token_id, "cpu")
    mask = batch["attention_mask"].bool()
    _, metrics = sorted_ft.compute_loss(model, batch, sorted_ft.Args(compile=False), depths=[1, 2])
    targets = batch["targets"][mask]
    for n in (1, 2):
        ce = F.cross_entropy(exit_logits(model, batch, n)[mask].detach(), targets, ignore_index=common.IGNORE_INDEX)
        assert metrics[f"exit{n}/ce"] == pytest.approx(ce.item(), rel=1e-4)


@pytest.mark.parametrize("arch", list(archs.ARCHS))
@torch.no_grad()
def test_every_architectures_early_exit_decoding_is_greedy_and_exact_past_the_sliding_window(arch, arch_model, one_thread):
    _, model, tok = arch_model(arch)
    examples, _ = common.load_sft_data(os.path.join(common.WORLD_DIR, "data", "math", "test.jsonl"), tok, 512, split="test", limit=1)
    prompt = torch.tensor(tok.apply_chat_template(examples[0]["messages"][:-1], add_generation_prompt=True, tokenize=True, return_dict=False))
    new = 24  # the prompt alone is past the 16-token windows, and 24 tokens more
    assert len(prompt) > 16
    sorted_ft.check_exits(model, [1, 2], prompt)  # the start-up guard lets every one of them train
    greedy = lambda: common.decode(model, prompt[None], torch.ones_like(prompt)[None], new, torch.tensor([-1]))[0].tolist()
    full, depths, work = sorted_ft.early_exit_decode(model, prompt, {1: 2.0}, new, set())
    assert full == greedy() and depths == [2] * new and work == 2 * (len(prompt) + new - 1)
    first, depths, _ = sorted_ft.early_exit_decode(model, prompt, {1: 0.0}, new, set())
    with sorted_ft.truncated(model, 1):
        assert first == greedy() and depths == [1] * new
    # a threshold between two of exit 1's confidences along the greedy answer: some tokens leave early, some go deeper
    ids, probs = prompt.tolist(), []
    for token in full:
        with sorted_ft.truncated(model, 1):
            probs.append(model(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1).max().item())
        ids.append(token)
    probs = sorted(probs)
    thresholds = {1: (probs[new // 2 - 1] + probs[new // 2]) / 2}
    out, depths, _ = sorted_ft.early_exit_decode(model, prompt, thresholds, new, set())
    assert (out, depths) == slow_early_exit(model, prompt.tolist(), thresholds, new, set())
    assert set(depths) == {1, 2}  # the catch-up of block 2 (over the sliding window) was exercised


def test_layouts_the_exits_cannot_read_are_refused_at_start_up(arch_model, one_thread, monkeypatch):
    path, _, _ = arch_model("gpt2")
    model, ids = transformers.AutoModelForCausalLM.from_pretrained(path).eval(), torch.arange(4, 40)
    sorted_ft.check_exits(model, [1, 2], ids)  # GPT-2's layout (h, ln_f) is read
    decoder = model.get_decoder()
    decoder.norm = torch.nn.LayerNorm(64)  # a `norm` the decoder never applies: exit 1 would be read wrongly
    torch.nn.init.constant_(decoder.norm.weight, 2.0)
    with pytest.raises(common.UsageError, match="exit 1 as the loss reads it .* differs from the model truncated to 1 blocks"):
        sorted_ft.check_exits(model, [1, 2], ids)
    del decoder.norm
    decoder.final_norm = decoder.ln_f
    del decoder.ln_f
    with pytest.raises(common.UsageError, match=r"GPT2Model has no final norm \(one of norm, ln_f"):
        sorted_ft.check_exits(model, [1, 2], ids)
    decoder.ln_f = decoder.final_norm
    sorted_ft.check_exits(model, [1, 2], ids)
    monkeypatch.setattr(sorted_ft.Resume, "forward", lambda self, *args, **kwargs: 2 * self.hidden)  # a wrong decoder
    with pytest.raises(common.UsageError, match="does not reproduce greedy decoding .* --early_exit_prompts 0"):
        sorted_ft.check_exits(model, [1, 2], ids)
    sorted_ft.check_exits(model, [1, 2], ids, decoding=False)  # training without the early-exit test is still fine


def test_script_logs_the_optimised_mean_saves_a_plain_model_and_last_exit_only_is_sft(tmp_path):
    run_script("sorted_ft.py", tmp_path / "soft", *QUICK, "--eval_datasets", f"math={os.path.join(common.WORLD_DIR, 'data', 'math', 'test.jsonl')}",
               "--eval_samples", "4", "--eval_before", "false", "--early_exit_prompts", "2", "--max_new_tokens", "8",
               "--exit_threshold", "0,2,2")  # per exit: always leave at layer 1, never at 2 or 3
    steps = [r for r in records(tmp_path / "soft") if "loss" in r]
    for r in steps:  # one micro-batch per step: the logged loss is exactly the mean of the exits' token means
        assert r["loss"] == pytest.approx(sum(r[f"method/exit{n}/ce"] for n in (1, 2, 3, 4)) / 4, rel=1e-5)
    end = next(r for r in records(tmp_path / "soft") if r.get("event") == "eval_after")
    assert all(f"eval/math/exit{n}/accuracy" in end and f"eval/math/exit{n}/loss" in end for n in (1, 2, 3))
    assert end["eval/math/exit1/loss"] > end["eval/math/exit3/loss"] > end["eval/math/loss"]
    assert end["method/full/mean_exit_layer"] == 4 and end["method/exit1/mean_exit_layer"] == 1
    assert end["method/threshold/mean_exit_layer"] == 1 and end["method/threshold/accuracy"] == end["method/exit1/accuracy"]
    saved, base = load_file(os.path.join(tmp_path, "soft", "final", "model.safetensors")), load_file(os.path.join(BASE, "model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in base.items()}  # no new parameters
    run_script("sorted_ft.py", tmp_path / "last", *QUICK, "--exits", "4", "--eval_exits", "2", "--eval_datasets",
               f"math={os.path.join(common.WORLD_DIR, 'data', 'math', 'test.jsonl')}", "--eval_samples", "4", "--early_exit_prompts", "0")
    assert losses(tmp_path / "last") == pytest.approx(GOLDEN, abs=1e-4)
    last = records(tmp_path / "last")
    assert not any("method/exit2/ce" in r for r in last)  # trained through the last exit only, evaluated at layer 2 too
    assert "eval/math/exit2/loss" in next(r for r in last if r.get("event") == "eval_after")
