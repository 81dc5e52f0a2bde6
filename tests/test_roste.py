"""RoSTE: the quantizer against a slow per-row reference, the straight-through gradient, Hadamard matrices, the
computational invariance of norm folding, R1 and every R2/R3/R4 switch, the rotation search, and the script
(16 bits without rotation is sft.py; the saved model reloads quantized)."""
import itertools
import math
import os
import re

import pytest
import torch
import transformers

import archs
import common
import roste
from scripts import losses, records, run_script
from test_train import GOLDEN, QUICK

BASE = os.path.join(common.WORLD_DIR, "base")
FULL = dict(w_bits=16, w_sym=False, w_clip=1.0, a_bits=16, a_sym=False, a_clip=1.0, kv_bits=16, kv_sym=False, kv_clip=1.0)


def slow_quantize(row, bits, symmetric, clip):
    """The quantizer's formula for one row, in Python floats."""
    if symmetric:
        top = 2 ** (bits - 1) - 1
        s = max(clip * max(abs(v) for v in row) / top, 1e-8)
        return [min(max(round(v / s), -top - 1), top) * s for v in row]
    top = 2 ** bits - 1
    lo, hi = clip * min(row), clip * max(row)
    s = max((hi - lo) / top, 1e-8)
    z = round(-lo / s)
    return [(min(max(round(v / s) + z, 0), top) - z) * s for v in row]


@pytest.mark.parametrize("bits,symmetric,clip", [(4, False, 1.0), (4, True, 1.0), (3, False, 0.8), (2, True, 0.9), (8, False, 1.0)])
def test_quantizer_matches_the_formula_per_row(bits, symmetric, clip):
    x = torch.randn(6, 33, dtype=torch.float64) * torch.tensor([0.01, 1, 5, 100, 1, 1], dtype=torch.float64)[:, None]
    x[4] = x[4].abs() + 1  # an all-positive row: the asymmetric zero point is negative
    q = roste.fake_quantize(x, roste.Quantizer(bits, symmetric, clip))
    want = torch.tensor([slow_quantize(r.tolist(), bits, symmetric, clip) for r in x], dtype=torch.float64)
    torch.testing.assert_close(q, want, atol=1e-9, rtol=1e-9)
    for row, qrow in zip(x, q):  # each row is on its own grid of at most 2^b levels
        assert len(set(qrow.tolist())) <= 2 ** bits
    assert torch.equal(roste.fake_quantize(x, roste.Quantizer(16)), x)
    assert not torch.isnan(roste.fake_quantize(torch.zeros(2, 8), roste.Quantizer(bits, symmetric, clip))).any()


def test_quantizer_range_error_bound_and_reduction_axis():
    x = torch.randn(64, 128, dtype=torch.float64)
    for symmetric in (True, False):
        q4 = roste.Quantizer(4, symmetric)
        q = roste.fake_quantize(x, q4)
        if symmetric:
            scale = x.abs().amax(-1, keepdim=True) / 7
            torch.testing.assert_close(q.abs().amax(-1), x.abs().amax(-1))  # the max maps to +-7 exactly
            assert ((q / scale).round() - q / scale).abs().max() < 1e-9 and (q / scale).min() >= -8
            torch.testing.assert_close(roste.fake_quantize(q, q4), q)  # idempotent
        else:
            scale = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 15
        assert ((q - x).abs() <= scale / 2 + 1e-12).all()
    # per row: scaling one row (a weight's output channel, a token) changes that row's grid only
    y = x.clone()
    y[3] *= 1000
    a, b = roste.fake_quantize(x, roste.Quantizer(4)), roste.fake_quantize(y, roste.Quantizer(4))
    rows = torch.arange(64) != 3
    assert torch.equal(a[rows], b[rows]) and torch.allclose(a[3] * 1000, b[3])
    # 4-bit per-token error of activations with an outlier channel drops after a Hadamard (the point of rotating)
    act = torch.randn(256, 256)
    act[:, 7] *= 50
    err = lambda t: (roste.fake_quantize(t, roste.Quantizer(4)) - t).pow(2).mean()
    assert err(roste.hadamard(act)) < err(act) / 10


def test_straight_through_gradient_is_the_identity_even_where_clipped():
    x = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 40, dtype=torch.float64)
    for q in (roste.Quantizer(4, False, 0.5), roste.Quantizer(2, True, 0.7), roste.Quantizer(16)):
        (grad,) = torch.autograd.grad((roste.quantize(x, q) * g).sum(), x)
        assert torch.equal(grad, g)
    assert (roste.quantize(x, roste.Quantizer(4, False, 0.5)) != x).all()  # and the forward is quantized


@pytest.mark.parametrize("n", [1, 2, 32, 256, 512, 12, 20, 28, 896, 1536])
def test_hadamard_matrices_are_orthogonal_and_the_fast_transform_equals_the_matrix(n):
    h = roste.hadamard_matrix(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close((h * math.sqrt(n)).abs(), torch.ones(n, n, dtype=torch.float64))  # entries +-1
    x = torch.randn(3, 2, n, dtype=torch.float64)
    torch.testing.assert_close(roste.hadamard(x), x @ h, atol=1e-10, rtol=0)
    torch.testing.assert_close(roste.hadamard(x, dense_up_to=0), x @ h, atol=1e-10, rtol=0)  # the butterfly path
    w = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(roste.hadamard(x) @ roste.hadamard(w).T, x @ w.T, atol=1e-9, rtol=0)
    assert math.isclose(roste.hadamard(w).norm().item(), w.norm().item(), rel_tol=1e-12)  # ||W H||_F = ||W||_F


def test_no_hadamard_of_an_unsupported_order_is_a_clear_error():
    for n, m in [(4864, 76), (8960, 140), (18944, 148), (14336, 28)]:  # Qwen2.5 0.5B/1.5B/7B, Llama-3 8B MLPs
        hm, p = roste.hadamard_factor(n)
        assert hm.shape[0] * p == n and hm.shape[0] == m
        torch.testing.assert_close(hm @ hm.T, m * torch.eye(m, dtype=torch.float64))
    with pytest.raises(common.UsageError, match="no Hadamard matrix of order 6"):
        roste.hadamard_matrix(6)


@pytest.fixture(scope="module")
def batch():
    _, tok = common.load_model(BASE)
    train, _ = common.load_sft_data(roste.Args().dataset, tok, 512, limit=6)
    b = common.collate(train, range(6), tok.pad_token_id, "cpu")
    assert (b["attention_mask"] == 0).any()
    return b


def logits(model, batch):
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out[batch["attention_mask"].bool()]


def test_norm_folding_r1_and_every_online_rotation_leave_the_full_precision_model_unchanged(batch):
    model, tok = common.load_model(BASE)
    want = logits(model, batch)
    roste.fuse_norms(model)
    torch.testing.assert_close(logits(model, batch), want, atol=1e-4, rtol=0)
    assert all(torch.equal(layer.input_layernorm.weight, torch.ones(256)) for layer in model.get_decoder().layers)
    embed, head = model.get_decoder().embed_tokens.weight, model.get_output_embeddings().weight
    assert embed.data_ptr() != head.data_ptr() and not model.config.tie_word_embeddings  # untied before R1
    roste.rotate_residual(model, 42)
    torch.testing.assert_close(logits(model, batch), want, atol=1e-4, rtol=0)
    assert not torch.allclose(embed, head)
    roste.quantize_model(model, FULL)
    for on in itertools.product([False, True], repeat=3):  # every combination, and mixed per layer
        roste.set_rotations(model, {i: dict(zip(roste.ROTATIONS, on)) for i in range(4)})
        torch.testing.assert_close(logits(model, batch), want, atol=1e-4, rtol=0)
    roste.set_rotations(model, {i: dict(zip(roste.ROTATIONS, [i % 2 == 0, i < 2, i > 0])) for i in range(4)})
    torch.testing.assert_close(logits(model, batch), want, atol=1e-4, rtol=0)
    # greedy generation through the KV cache is unchanged too
    reference, _ = common.load_model(BASE)
    prompts = [[{"role": "user", "content": "What is 17 + 25?"}], [{"role": "user", "content": "Write a function f"}]]
    assert common.generate(model, tok, prompts, 24) == common.generate(reference, tok, prompts, 24)


def test_quantized_cache_generation_equals_recomputing_the_whole_sequence(batch):
    """KV quantization is per token, so quantizing the cache at every call equals the training-time forward."""
    model, tok = common.load_model(BASE)
    roste.fuse_norms(model)
    roste.rotate_residual(model, 1)
    roste.quantize_model(model, {**FULL, "w_bits": 4, "a_bits": 4, "kv_bits": 4})
    roste.set_rotations(model, {i: dict.fromkeys(roste.ROTATIONS, True) for i in range(4)})
    ids = batch["input_ids"][:1, :12]
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :8], use_cache=True, cache=cache)
        step = model(input_ids=ids[:, 8:], use_cache=True, cache=cache).logits
        whole = model(input_ids=ids).logits[:, 8:]
    torch.testing.assert_close(step, whole, atol=1e-4, rtol=0)


def test_select_rotations_takes_the_lower_error_numerically_and_ties_stay_off():
    off = {(0, "R2"): 0.5, (0, "R3"): 9.5, (0, "R4"): 0.30001, (1, "R2"): 0.2, (1, "R3"): 1.0, (1, "R4"): 3.0}
    on = {(0, "R2"): 0.4, (0, "R3"): 10.2, (0, "R4"): 0.30002, (1, "R2"): 0.2, (1, "R3"): 0.9, (1, "R4"): 3.1}
    assert roste.select_rotations(off, on) == {0: {"R2": True, "R3": False, "R4": False}, 1: {"R2": False, "R3": True, "R4": False}}
    # "10.2000" < "9.5000" as strings (the official script's comparison) would switch R3 on; rounding makes 0 R4 a tie
    assert roste.select_rotations(off, on, decimals=4)[0] == {"R2": True, "R3": False, "R4": False}


def test_the_search_switches_r4_on_where_an_outlier_channel_makes_it_pay(batch):
    """Constructed case: channel 5 of layer 0's down_proj input scaled x100 (up_proj row x100, down_proj column
    /100: the full-precision function is unchanged). The search must log a lower R4 error with the rotation there,
    switch it on, and its logged error must equal a direct computation."""
    model, _ = common.load_model(BASE)
    roste.fuse_norms(model)
    roste.rotate_residual(model, 42)
    mlp = model.get_decoder().layers[0].mlp
    with torch.no_grad():
        mlp.up_proj.weight[5] *= 100
        mlp.down_proj.weight[:, 5] /= 100
    roste.quantize_model(model, {**FULL, "w_bits": 4, "a_bits": 4, "kv_bits": 4})
    inputs = []
    hook = mlp.down_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    config, (off, on) = roste.search_rotations(model, [batch])
    hook.remove()
    assert config[0]["R4"] and on[(0, "R4")] < off[(0, "R4")] / 2
    assert config == roste.select_rotations(off, on)
    assert all(config[layer][kind] == (on[(layer, kind)] < off[(layer, kind)]) for layer, kind in off)
    q = roste.Quantizer(4)
    x, w = inputs[0], mlp.down_proj.weight  # the first forward: rotations off
    direct = (roste.fake_quantize(w, q) - w).pow(2).mean() + (roste.fake_quantize(x, q) - x).pow(2).mean()
    assert off[(0, "R4")] == pytest.approx(direct.item(), rel=1e-5)
    x, w = roste.hadamard(inputs[1]), roste.hadamard(w)  # the second: R4 on
    direct = (roste.fake_quantize(w, q) - w).pow(2).mean() + (roste.fake_quantize(x, q) - x).pow(2).mean()
    assert on[(0, "R4")] == pytest.approx(direct.item(), rel=1e-5)


def test_16_bits_without_rotation_is_an_sft_py_step(batch):
    """The same loss and gradients as sft.py's compute_loss (the quantizers and the attention function are in the
    path, at 16 bits they are identities)."""
    import sft
    ours, tok = common.load_model(BASE)
    train, _ = common.load_sft_data(roste.Args().dataset, tok, 512, limit=2)  # the start-up invariance check's input
    roste.prepare(ours, train, roste.Args(w_bits=16, a_bits=16, kv_bits=16, rotation="none"), None, tok.pad_token_id)
    theirs, _ = common.load_model(BASE)
    loss_ours, _ = roste.compute_loss(ours, batch, roste.Args(compile=False))
    loss_theirs, _ = sft.compute_loss(theirs, batch, sft.Args(compile=False))
    loss_ours.backward()
    loss_theirs.backward()
    assert isinstance(ours.model.layers[0].self_attn.q_proj, roste.QuantLinear)
    assert loss_ours.item() == loss_theirs.item()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours.parameters(), theirs.parameters()))


def test_roste_trains_saves_and_reloads_quantized(tmp_path):
    out = tmp_path / "r"
    run_script("roste.py", out, *QUICK, "--eval_datasets", f"math={os.path.join(common.WORLD_DIR, 'data', 'math', 'test.jsonl')}",
               "--eval_samples", "4", "--eval_before", "false", "--max_new_tokens", "16")
    assert losses(out) != pytest.approx(GOLDEN, abs=1e-3) and all(math.isfinite(v) for v in losses(out))
    end = next(r for r in records(out) if r.get("event") == "eval_after")
    final = os.path.join(out, "final")
    plain = transformers.AutoModelForCausalLM.from_pretrained(final)  # the latent full-precision model (untied)
    assert not plain.config.tie_word_embeddings and plain.config.roste["r1"]
    model, tok = roste.load_quantized(final)
    examples, _ = common.load_sft_data(os.path.join(common.WORLD_DIR, "data", "math", "test.jsonl"), tok, 512, limit=4)
    rt = common.Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), is_main=True)
    loss_fn = lambda m, b: roste.compute_loss(m, b, roste.Args(compile=False))
    held_out = common.evaluate_loss(common.LossModule(model, loss_fn, rt), examples, rt, tok.pad_token_id)
    assert held_out["loss"] == pytest.approx(end["eval/math/loss"], rel=1e-4)
    with roste.full_precision(model):
        fp = common.evaluate_loss(common.LossModule(model, loss_fn, rt), examples, rt, tok.pad_token_id)
    assert fp["loss"] == pytest.approx(end["fp/eval/math/loss"], rel=1e-4) and fp["loss"] != pytest.approx(held_out["loss"], rel=1e-4)
    plain_loss = common.evaluate_loss(common.LossModule(plain, loss_fn, rt), examples, rt, tok.pad_token_id)
    assert plain_loss["loss"] == pytest.approx(fp["loss"], rel=1e-4)


def test_non_llama_layers_are_refused_by_name():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    with pytest.raises(common.UsageError, match="Llama-style layers"):
        roste.blocks(transformers.GPT2LMHeadModel(config))



POST_NORMS = r"post-norm; the \w+ model's layer 0 normalises .* \(post_attention_layernorm, post_feedforward_layernorm\)"
REFUSED = {  # per --rotation: the refusal's message names what is missing
    "all": {"gemma2": POST_NORMS, "gemma3": POST_NORMS, "olmo2": POST_NORMS,
            "cohere": r"layer 0 input_layernorm \(CohereLayerNorm\) is neither .* mean subtraction"},
    "none": {"gemma2": r"no attention-logit softcapping; the gemma2 model's layer 0 uses softcap 50.0"},
}
for refused in REFUSED.values():
    refused.update({"phi3": r"layer 0 has no self_attn.q_proj Linear \(its linears: .*self_attn.qkv_proj",
                    "gpt2": r"decoder GPT2Model has no `layers`", "qwen2_moe": r"layer 0 has no mlp.gate_proj Linear"})


@pytest.mark.parametrize("arch", sorted(archs.ARCHS))
def test_every_architecture_is_kept_exact_at_16_bits_or_refused_before_the_surgery(arch, tmp_path):
    """tests/archs.py's tiny models, with R1 and every online rotation (--rotation all) and without (none): prepare
    (norms folded, R1, R2-R4, roste_attention) leaves the logits within 1e-4 of their scale and greedy generation
    identical, or refuses with one line naming what is missing, before any weight has changed."""
    path = archs.make(arch, tmp_path / arch)
    reference, tok = common.load_model(path)
    train, _ = common.load_sft_data(roste.Args().dataset, tok, 512, limit=2)
    batch = common.collate(train, range(2), tok.pad_token_id, "cpu")
    want, start = logits(reference, batch), reference.state_dict()
    prompts = [[{"role": "user", "content": "What is 17 + 25?"}], [{"role": "user", "content": "Write a function f"}]]
    answers = None
    for rotation in ("all", "none"):
        model, _ = common.load_model(path)
        args = roste.Args(w_bits=16, a_bits=16, kv_bits=16, rotation=rotation)
        if arch in REFUSED[rotation]:
            with pytest.raises(common.UsageError, match=REFUSED[rotation][arch]):
                roste.prepare(model, train, args, None, tok.pad_token_id)
            assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
            continue
        roste.prepare(model, train, args, None, tok.pad_token_id)
        assert (logits(model, batch) - want).abs().max() <= 1e-4 * want.abs().max()
        embed = model.get_input_embeddings().weight  # R1 really is in the weights (or not)
        assert torch.equal(embed, start[next(k for k in start if k.endswith("embed_tokens.weight"))]) == (rotation == "none")
        answers = answers or common.generate(reference, tok, prompts, 6)
        assert common.generate(model, tok, prompts, 6) == answers


def test_gain_offset_reads_the_norm_form_from_the_module_not_its_name():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    llama, gemma, layer_norm = LlamaRMSNorm(24), GemmaRMSNorm(24), torch.nn.LayerNorm(24, bias=False)
    for norm in (llama, gemma, layer_norm):
        torch.nn.init.normal_(norm.weight)
    assert roste.gain_offset(llama, "n", "x") == 0 and roste.gain_offset(gemma, "n", "x") == 1
    assert roste.gain_offset(torch.nn.RMSNorm(24), "n", "x") == 0 and roste.gain_offset(GemmaRMSNorm(24), "n", "x") == 1
    with pytest.raises(common.UsageError, match=r"the x model's n \(LayerNorm\) is neither"):
        roste.gain_offset(layer_norm, "n", "x")
    with pytest.raises(common.UsageError, match=r"\(LayerNorm\) has a bias"):
        roste.gain_offset(torch.nn.LayerNorm(24), "n", "x")


def test_the_start_up_invariance_check_refuses_a_surgery_that_changed_the_model(tmp_path, monkeypatch):
    """What no layout check catches, the logits do: the old fold (gain w, Llama's rule) on Gemma's x (1 + w) norms
    zeroes a fresh Gemma's readers (w = 0), and prepare must stop before the search and training, with the
    measured difference in the message."""
    def llama_rule(model):
        with torch.no_grad():
            for norm, readers, _ in roste.check_layout(model):
                for linear in readers:
                    linear.weight.mul_(norm.weight)
                norm.weight.fill_(1.0)
    model, tok = common.load_model(archs.make("gemma", tmp_path / "gemma"))
    train, _ = common.load_sft_data(roste.Args().dataset, tok, 512, limit=2)
    searched = []
    monkeypatch.setattr(roste, "fuse_norms", llama_rule)
    monkeypatch.setattr(roste, "search_rotations", lambda *a: searched.append(1))
    with pytest.raises(common.UsageError, match=r"moved the gemma model's full-precision logits by") as refusal:
        roste.prepare(model, train, roste.Args(w_bits=16, a_bits=16, kv_bits=16), None, tok.pad_token_id)
    diff, scale = (float(v) for v in re.search(r"by ([\d.e+-]+) \(max \|logit\| ([\d.e+-]+)", str(refusal.value)).groups())
    assert diff == pytest.approx(scale, rel=1e-3) and scale > 1 and not searched  # the head was zeroed: logits 0
    monkeypatch.undo()
    model, _ = common.load_model(str(tmp_path / "gemma"))  # and the correct fold passes the same check
    roste.prepare(model, train, roste.Args(w_bits=16, a_bits=16, kv_bits=16, rotation="all"), None, tok.pad_token_id)
    assert all(torch.equal(layer.input_layernorm.weight, torch.zeros(64)) for layer in model.get_decoder().layers)

def test_resume_from_a_checkpoint_reaches_the_same_weights(tmp_path):
    """The rotation and the search are redone at start-up (deterministic), then the checkpoint's latent weights,
    optimizer and RNG are loaded: resuming at step 3 ends exactly where the uninterrupted run ends."""
    import shutil
    from safetensors.torch import load_file
    flags = [*QUICK, "--save_every", "3", "--search_samples", "16"]
    run_script("roste.py", tmp_path / "whole", *flags)
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    run_script("roste.py", tmp_path / "resumed", *flags, "--resume", "auto")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "whole")[3:]
    ours, theirs = (load_file(os.path.join(tmp_path, d, "final", "model.safetensors")) for d in ("resumed", "whole"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
