"""DRIFT: the gradient edit against its formulas and limiting cases, which tensors get it, the frozen prior,
the loud failures the official code lacks, and the script (alpha = 0 is sft.py; 2 processes = 1 accumulating)."""
import os
import re

import pytest
import torch
from safetensors.torch import load_file

import archs
import common
import drift
from scripts import losses, records, run_script, run_side_by_side
from test_train import QUICK

BASE = os.path.join(common.WORLD_DIR, "base")
CPU = common.Runtime(0, 0, 1, torch.device("cpu"), True)


@pytest.fixture(scope="module")
def reasoning(tmp_path_factory):
    """A stand-in theta_R: the base model with every weight moved by seeded noise (the real variants take 9 min)."""
    out = tmp_path_factory.mktemp("reasoning")
    model, tok = common.load_model(BASE)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def args_for(reasoning, **kw):
    return drift.Args(model=BASE, reasoning_model=reasoning, compile=False, **kw)


def pair(shape=(7, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("alpha", [-1.0, -0.3, 0.7])
def test_each_variant_equals_its_formula(alpha):
    g, d = pair()
    u = d / d.norm()
    cos = (g * d).sum() / (g.norm() * d.norm())
    expected = {"absolute": g + alpha * d, "gradnorm": g + alpha * g.norm() * u,
                "adaptive": g + alpha * (1 + cos) / 2 * g.norm() * u}
    for scale, want in expected.items():
        got, got_cos, bias_norm = drift.drift_gradient(g, d, alpha, scale)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(bias_norm, (want - g).norm())  # the logged |bias| (method/bias_norm)
        if scale != "absolute":
            torch.testing.assert_close(got_cos, cos.float(), check_dtype=False)
    # the norm of the bias (spec invariant 4) and the absolute bias split over micro-batches
    assert (drift.drift_gradient(g, d, alpha, "gradnorm")[0] - g).norm() == pytest.approx(abs(alpha) * g.norm())
    assert (drift.drift_gradient(g, d, alpha, "adaptive")[0] - g).norm() == pytest.approx(abs(alpha) * (1 + cos) / 2 * g.norm())
    torch.testing.assert_close(drift.drift_gradient(g, d, alpha, "absolute", absolute_factor=0.25)[0], g + alpha * d / 4)


def test_adaptive_limiting_cases_and_homogeneity():
    g, d = pair(seed=1)
    u = d / d.norm()
    assert drift.drift_gradient(3 * d, d, -1.0, "adaptive")[0].abs().max() < 1e-12  # g parallel to Delta: cancelled
    torch.testing.assert_close(drift.drift_gradient(-3 * d, d, -1.0, "adaptive")[0], -3 * d)  # already toward theta_R
    g_perp = g - (g * u).sum() * u
    torch.testing.assert_close(drift.drift_gradient(g_perp, d, -1.0, "adaptive")[0], g_perp - 0.5 * g_perp.norm() * u)
    for scale in ("gradnorm", "adaptive"):  # positively homogeneous: loss scaling and accumulation commute with it
        torch.testing.assert_close(drift.drift_gradient(5 * g, d, -1.0, scale)[0], 5 * drift.drift_gradient(g, d, -1.0, scale)[0])
    assert not torch.allclose(drift.drift_gradient(5 * g, d, -1.0, "absolute")[0], 5 * drift.drift_gradient(g, d, -1.0, "absolute")[0])


def test_zero_prior_zero_gradient_and_alpha_zero_leave_the_gradient_unchanged():
    g, d = pair(seed=2)
    for scale in drift.SCALES:
        for grad, delta, alpha in [(g, torch.zeros_like(d), -1.0), (torch.zeros_like(g), d, -1.0), (g, d, 0.0)]:
            out = drift.drift_gradient(grad.float(), delta.float(), alpha, scale)[0]
            if not (scale == "absolute" and alpha != 0 and delta.abs().sum() > 0):
                assert torch.equal(out, grad.float()), (scale, alpha)
            assert torch.isfinite(out).all()


def official_hook(grad, delta, scale, alpha=1.0, eps=1e-12):
    """The official hook's arithmetic, written out here (WikiChao/DRIFT@d60b91a,
    LLaMA-Factory/src/llamafactory/model/drift.py l.337-368: alpha 1 subtracted, norms clamped to eps; any scale
    other than absolute and adaptive_cosine is gradnorm), in fp64 on flattened tensors."""
    g, d = grad.double().flatten(), delta.double().flatten()
    if scale == "absolute":
        return (g - alpha * d).view(grad.shape)
    g_norm, d_norm = max(float((g * g).sum().sqrt()), eps), max(float((d * d).sum().sqrt()), eps)
    factor = 1.0
    if scale == "adaptive":  # its "adaptive_cosine"
        cos = min(max(float((g * d).sum()) / (g_norm * d_norm), -1.0), 1.0) if g_norm >= eps and d_norm >= eps else 0.0
        factor = 0.5 * (cos + 1.0)
    return (g - alpha * factor * g_norm * (d / d_norm)).view(grad.shape)


def official_delta(theta_t, theta_r, normalize, eps=1e-12):
    """The official Delta (l.288-296): prior - sft, with normalize_delta_to_param |Delta| := |theta_T|, both clamped."""
    delta = theta_r.double() - theta_t.double()
    return delta * (theta_t.double().norm().clamp_min(eps) / delta.norm().clamp_min(eps)) if normalize else delta


def test_the_bias_equals_the_official_hook_for_all_three_variants(tmp_path):
    """Qwen2's attn/mlp tensors with q/k/v biases (20 tensors): Delta and the edited gradient from drift.py's prior
    and hooks (alpha -1, fp32) against the official code's arithmetic (alpha +1, fp64), normalize_delta on and off.
    (Both models get nonzero biases: at an all-zero theta_T tensor the official normalisation keeps Delta's direction
    at norm eps, where drift.py's Delta is 0, so only the official code biases it; docs/drift.md.)"""
    import copy
    import shutil
    target, reasoning = tiny("qwen2", seed=0), tiny("qwen2", seed=1)
    with torch.no_grad():  # every tensor nonzero: the zero-init q/k/v biases too
        for p in [*target.parameters(), *reasoning.parameters()]:
            p.add_(torch.randn(p.shape) * 0.05)
    reasoning.save_pretrained(tmp_path)
    for name in archs.TOKENIZER_FILES:
        shutil.copy(os.path.join(archs.WORLD_BASE, name), tmp_path / name)
    theta_r = reasoning.state_dict()
    theta_t = {n: p.detach().clone() for n, p in target.named_parameters()}
    worst = 0.0
    for normalize in (False, True):
        args = drift.Args(model="qwen2", reasoning_model=str(tmp_path), normalize_delta=normalize)
        names = drift.select_tensors(target, args)
        prior = drift.build_prior(args, target, names, CPU)
        assert len(prior) == DEFAULT_COUNTS["qwen2"] and sum(n.endswith("bias") for n in prior) == 6
        for scale in drift.SCALES:
            args.scale = scale
            model = copy.deepcopy(target)
            drift.attach_hooks(model, prior, args, micro_steps=1)
            params = dict(model.named_parameters())
            weights = {n: torch.randn(params[n].shape, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(prior)}
            sum((params[n] * weights[n]).sum() for n in prior).backward()  # plain gradient = weights[n]
            for n in prior:
                want = official_hook(weights[n], official_delta(theta_t[n], theta_r[n], normalize), scale)
                torch.testing.assert_close(params[n].grad.double(), want, rtol=1e-6, atol=1e-6, msg=f"{scale} {normalize} {n}")
                worst = max(worst, ((params[n].grad.double() - want).abs().max() / want.abs().max()).item())
    assert worst < 1e-6  # fp32 against fp64


def one_step_gradients(args, reasoning_on=True):
    """Gradients of one micro-batch of the embedded base model, with DRIFT's hooks attached or not."""
    model, tok = common.load_model(BASE)
    train, _ = common.load_sft_data(args.dataset, tok, 512, limit=4)
    batch = common.collate(train, [0, 1, 2, 3], tok.pad_token_id, "cpu")
    prior, calls = None, None
    if reasoning_on:
        prior = drift.build_prior(args, model, drift.select_tensors(model, args), CPU)
        calls = drift.attach_hooks(model, prior, args, micro_steps=1)
    loss, _ = drift.compute_loss(model, batch, args)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, prior, calls


def test_hooks_fire_on_every_selected_tensor_only_and_pull_toward_the_reasoning_model(reasoning):
    args = args_for(reasoning)
    plain, _, _ = one_step_gradients(args, reasoning_on=False)
    biased, prior, calls = one_step_gradients(args)
    layers = common.load_model(BASE)[0].config.num_hidden_layers
    assert len(prior) == 7 * layers and len(calls) == len(prior)  # q, k, v, o, gate, up, down per layer, once each
    assert all(("self_attn" in n or ".mlp." in n) for n in prior)
    for name in plain:
        if name not in prior:  # embeddings, norms, head: exactly SFT's gradient
            assert torch.equal(biased[name], plain[name]), name
            continue
        step = plain[name] - biased[name]  # theta_DRIFT - theta_SFT after one SGD step of lr 1 (spec invariant 7)
        delta = prior[name][0]
        coef = (step * delta).sum() / delta.norm() ** 2
        assert coef >= 0, name
        torch.testing.assert_close(step, coef * delta, atol=1e-6, rtol=1e-4)
    assert sum(not torch.equal(biased[n], plain[n]) for n in prior) == len(prior)


def test_prior_is_the_checkpoint_difference_and_stays_fixed(reasoning):
    args = args_for(reasoning, scale="absolute")
    model, tok = common.load_model(BASE)
    names = drift.select_tensors(model, args)
    prior = drift.build_prior(args, model, names, CPU)
    theta_r = load_file(os.path.join(reasoning, "model.safetensors"))
    before = {n: d.clone() for n, (d, _) in prior.items()}
    for n in names:
        torch.testing.assert_close(prior[n][0], theta_r[n] - dict(model.named_parameters())[n].detach())
    drift.attach_hooks(model, prior, args, micro_steps=1)
    train, _ = common.load_sft_data(args.dataset, tok, 512, limit=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        drift.compute_loss(model, common.collate(train, [0, 1, 2, 3], tok.pad_token_id, "cpu"), args)[0].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(prior[n][0], before[n]) for n in names)
    # the official code's rescale |Delta| := |theta_T| (absolute bias norm = |alpha| |theta_T|); bf16 storage
    scaled = drift.build_prior(args_for(reasoning, normalize_delta=True, prior_dtype="bfloat16"), model, names[:1], CPU)
    d, _ = scaled[names[0]]
    assert d.dtype == torch.bfloat16
    assert d.float().norm() == pytest.approx(dict(model.named_parameters())[names[0]].detach().norm().item(), rel=1e-2)


def test_no_match_or_mismatched_shapes_fail_with_what_was_expected_and_found(reasoning, tmp_path):
    model, tok = common.load_model(BASE)
    with pytest.raises(common.UsageError, match=r"matched no parameter .* named like: model\.layers\.0\.self_attn\.q_proj\.weight"):
        drift.select_tensors(model, args_for(reasoning, targets="visual_proj"))
    import transformers
    config = transformers.AutoConfig.from_pretrained(reasoning)
    config.intermediate_size += 8  # another architecture: every MLP tensor's shape differs
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    args = args_for(str(tmp_path))
    with pytest.raises(common.UsageError, match=rf"model\.layers\.1\.mlp\.up_proj\.weight expected \({config.intermediate_size - 8}, {config.hidden_size}\), "
                                                 rf"found \({config.intermediate_size}, {config.hidden_size}\)"):
        drift.build_prior(args, model, drift.select_tensors(model, args), CPU)
    skipped = drift.select_tensors(model, args_for(reasoning, skip_first_n=1, targets="attn"))
    assert skipped and all(".layers.0." not in n and "self_attn" in n for n in skipped)


def tiny(arch, seed=0):
    """tests/archs.py's `arch`, in memory (2 layers, width 64)."""
    import transformers
    config_name, model_name, kwargs = archs.ARCHS[arch]
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs))


# tensors the default attn,mlp gets per architecture (2 layers each): q/k/v/o + gate/up/down = 7 per layer; Qwen2's
# q/k/v biases +3; Phi-3's fused qkv_proj and gate_up_proj; GPT-2's Conv1D c_attn/c_proj/c_fc/c_proj with biases;
# Qwen2-MoE: attention with biases, the fused 3-D experts.gate_up_proj/down_proj and the shared expert's three
DEFAULT_COUNTS = {"llama": 14, "qwen2": 20, "qwen3": 14, "gemma": 14, "gemma2": 14, "gemma3": 14, "phi3": 8, "mistral": 14,
                  "gpt2": 16, "olmo2": 14, "cohere": 14, "granite": 14, "qwen2_moe": 24}


@pytest.mark.parametrize("arch", sorted(archs.ARCHS))
def test_default_targets_are_every_decoder_tensor_but_norms_and_the_router(arch, capsys):
    model = tiny(arch)
    names = drift.select_tensors(model, drift.Args(model=arch))
    norm_or_router = re.compile(r"norm|ln_\d|\.mlp\.gate\.|shared_expert_gate")
    want = [n for n, _ in model.named_parameters() if re.search(r"\.(layers|h)\.\d+\.", n) and not norm_or_router.search(n)]
    assert names == want and len(names) == DEFAULT_COUNTS[arch]
    out = capsys.readouterr().out
    attn = sum(1 for n in names if re.search(r"\.(self_attn|attn)\.", n))
    assert f"DRIFT targets: attn {attn} tensors" in out and f"mlp {len(names) - attn} tensors" in out
    if arch == "qwen2_moe":  # the router is left out by default, said so, and the `router` preset adds it
        assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"} <= set(names)
        assert "router not targeted (4 tensors" in out
        routed = drift.select_tensors(model, drift.Args(model=arch, targets="attn,mlp,router"))
        assert sorted(set(routed) - set(names)) == [f"model.layers.{i}.mlp.{g}.weight" for i in (0, 1) for g in ("gate", "shared_expert_gate")]


def test_a_preset_that_misses_a_block_type_or_a_layer_is_refused(monkeypatch):
    # the attn regex before the fix: Phi-3's fused qkv_proj missed
    monkeypatch.setitem(drift.PRESETS, "attn", r"\.self_attn\.(q|k|v|o)_proj\.(weight|bias)$")
    with pytest.raises(common.UsageError, match=r"preset 'attn' leaves out 2 weight matrices .*: model\.layers\.0\.self_attn\.qkv_proj\.weight"):
        drift.select_tensors(tiny("phi3"), drift.Args(model="phi3"))
    # the old mlp regex matched no MoE MLP tensor at all; one that finds only the shared expert misses the experts
    monkeypatch.setitem(drift.PRESETS, "mlp", r"\.mlp\.shared_expert\.(gate|up|down)_proj\.weight$")
    with pytest.raises(common.UsageError, match=r"preset 'mlp' leaves out 4 weight matrices .*: model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        drift.select_tensors(tiny("qwen2_moe"), drift.Args(model="qwen2_moe"))
    monkeypatch.undo()
    model = tiny("llama")  # a layer whose attention module has another name: attn matches nothing there
    model.model.layers[1].mixer = model.model.layers[1].self_attn
    del model.model.layers[1].self_attn
    with pytest.raises(common.UsageError, match=r"preset 'attn' matches nothing in layer 1 .*model\.layers\.1\.mixer\.q_proj\.weight"):
        drift.select_tensors(model, drift.Args(model="llama"))
    names = drift.select_tensors(model, drift.Args(model="llama", targets=r"attn,mlp,mixer\.(q|k|v|o)_proj"))
    assert len(names) == 14 and "model.layers.1.mixer.o_proj.weight" in names
    with pytest.raises(common.UsageError, match=r"'head' .* matched no parameter .*tied to the input embeddings"):
        drift.select_tensors(model, drift.Args(model="llama", targets="attn,head"))


@pytest.mark.parametrize("arch", ["gpt2", "qwen2_moe"])
def test_prior_on_gpt2_and_fused_moe_experts_is_the_difference_and_the_hooks_edit_them(arch, tmp_path):
    """GPT-2 (transformer.h.*, Conv1D) and Qwen2-MoE (3-D experts, per-expert on disk): Delta is theta_R - theta_T of
    the same in-memory tensors, and the gradient of every one of them gets the bias."""
    target, reasoning = archs.make(arch, tmp_path / "t", seed=0), archs.make(arch, tmp_path / "r", seed=1)
    args = drift.Args(model=target, reasoning_model=reasoning, scale="absolute", alpha=-0.5)
    model = common.load_model(target)[0]
    names = drift.select_tensors(model, args)
    prior = drift.build_prior(args, model, names, CPU)
    theta_t, theta_r = model.state_dict(), common.load_model(reasoning)[0].state_dict()
    assert sorted(prior) == sorted(names) and len(names) == DEFAULT_COUNTS[arch]
    for n in names:
        assert torch.equal(prior[n][0], theta_r[n] - theta_t[n]) and (prior[n][0].abs().max() > 0 or n.endswith("bias")), n
    if arch == "qwen2_moe":  # the fused tensor against the checkpoint's per-expert tensors: gate then up, expert by expert
        disk_t, disk_r = (load_file(os.path.join(p, "model.safetensors")) for p in (target, reasoning))
        part = lambda d, e, w: d[f"model.layers.1.mlp.experts.{e}.{w}_proj.weight"]
        per_expert = torch.cat([torch.stack([part(disk_r, e, w) - part(disk_t, e, w) for e in range(4)]) for w in ("gate", "up")], 1)
        torch.testing.assert_close(prior["model.layers.1.mlp.experts.gate_up_proj"][0], per_expert)
    drift.attach_hooks(model, prior, args, micro_steps=1)
    params = dict(model.named_parameters())
    weights = {n: torch.randn(params[n].shape) for n in names}
    sum((params[n] * weights[n]).sum() for n in names).backward()  # plain gradient = weights[n]
    for n in names:
        torch.testing.assert_close(params[n].grad, weights[n] - 0.5 * prior[n][0])


def test_vision_towers_and_projectors_never_get_the_bias(capsys):
    """Qwen2.5-VL (the paper's target, tiny): model.visual.* (its ViT blocks have mlp.gate/up/down_proj, which the
    mlp preset would match) is left out as in the official code; only the language model's 20 tensors are selected.
    A regex naming only vision tensors is refused, and the LLaMA-Factory freeze keys (LLaVA's CLIP tower, the
    projector) are excluded by name."""
    import transformers
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                         vocab_size=256, bos_token_id=0, eos_token_id=1),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1]))
    model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    assert any(re.search(drift.PRESETS["mlp"], n) for n, _ in model.named_parameters() if ".visual." in n)  # would be picked
    names = drift.select_tensors(model, drift.Args(model="qwen2_5_vl"))
    assert len(names) == 20 and all(n.startswith("model.language_model.layers.") for n in names)
    assert f"vision/projector excluded ({sum('.visual.' in n for n, _ in model.named_parameters())} tensors)" in capsys.readouterr().out
    with pytest.raises(common.UsageError, match=r"matched no parameter .*vision/projector tensors match, e\.g\. model\.visual\.blocks\.0\.mlp"):
        drift.select_tensors(model, drift.Args(model="qwen2_5_vl", targets=r"attn,mlp,blocks\.\d+\.mlp\."))
    vision = ["model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight", "model.multi_modal_projector.linear_1.weight",
              "model.visual.merger.mlp.0.weight", "audio_tower.layers.0.fc1.weight", "vpm.encoder.layers.0.mlp.fc1.weight"]
    text = ["model.layers.0.self_attn.q_proj.weight", "model.language_model.layers.1.mlp.down_proj.weight", "lm_head.weight"]
    assert all(re.search(drift.VISION, n) for n in vision) and not any(re.search(drift.VISION, n) for n in text)


def test_a_vision_language_model_is_refused_by_name(tmp_path, reasoning):
    """The paper's Qwen2.5-VL-7B cannot run here (AutoModelForCausalLM, text data): one line before anything loads."""
    import transformers
    transformers.Qwen2_5_VLConfig(text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2, intermediate_size=128)).save_pretrained(tmp_path)
    with pytest.raises(common.UsageError, match=r"--model .* is a vision-language model \(qwen2_5_vl\).*not supported"):
        drift.main(drift.Args(model=str(tmp_path), reasoning_model=reasoning))


@pytest.mark.parametrize("kw,message", [
    (dict(micro_batch_size=4), r"--micro_batch_size 4 with --edit_per example: .*or --edit_per micro_batch"),
    (dict(edit_per="batch"), r"--edit_per must be one of example, micro_batch"),
])
def test_per_example_editing_cannot_be_silently_replaced(kw, message):
    """Several samples per forward pass would edit their summed gradient: refused before anything loads."""
    with pytest.raises(common.UsageError, match=message):
        drift.main(drift.Args(model="never-loaded", reasoning_model="never-loaded", **kw))


@pytest.mark.parametrize("flags,message", [
    (["--scale", "cosine"], "--scale must be one of absolute, gradnorm, adaptive"),
    (["--fsdp"], "Use DDP"),
    (["--merge_lambdas", "a,b"], "--merge_lambdas: comma-separated numbers"),
    (["--targets", "nothing_here"], "matched no parameter"),
])
def test_bad_flags_fail_clearly(tmp_path, reasoning, flags, message):
    proc = run_script("drift.py", tmp_path, *QUICK, "--model", BASE, "--reasoning_model", reasoning, *flags, check=False, in_process=True)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_alpha_zero_trains_exactly_like_sft_py(tmp_path, reasoning):
    run_side_by_side(("drift.py", tmp_path / "drift", *QUICK, "--model", BASE, "--reasoning_model", reasoning, "--alpha",
                      "0", "--edit_per", "micro_batch"),  # sft.py's micro-batches (the default, one per pass, is slower)
                     ("sft.py", tmp_path / "sft", *QUICK))
    assert losses(tmp_path / "drift") == losses(tmp_path / "sft")
    ours, theirs = (load_file(os.path.join(tmp_path, d, "final", "model.safetensors")) for d in ("drift", "sft"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_per_example_edits_by_default_two_processes_equal_one_and_the_merge_baseline(tmp_path, reasoning):
    """The default edits each example's gradient (the paper's batch 1 per device), before the reduction: 4 hook calls
    per tensor per step of 4 samples, whether 1 process runs them or 2 DDP processes split them (the same training);
    one edit of the whole batch (--edit_per micro_batch) trains differently, with a weaker bias at step 1."""
    common_flags = [*QUICK, "--steps", "3", "--batch_size", "4", "--model", BASE, "--reasoning_model", reasoning]
    run_side_by_side(("drift.py", tmp_path / "accum", *common_flags, "--merge_lambdas", "0.5"),
                     ("drift.py", tmp_path / "whole", *common_flags, "--edit_per", "micro_batch", "--save_every", "1"))
    run_script("drift.py", tmp_path / "ddp", *common_flags, nproc=2)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "accum"), abs=1e-5)
    assert losses(tmp_path / "whole")[1:] != pytest.approx(losses(tmp_path / "accum")[1:], abs=1e-4)
    steps, whole, ddp = ([r for r in records(tmp_path / run) if "loss" in r] for run in ("accum", "whole", "ddp"))
    assert all(r["method/hook_calls"] == 4 * 7 * 4 for r in steps) and all(-1 <= r["method/cos"] <= 1 for r in steps)
    assert all(r["method/hook_calls"] == 7 * 4 for r in whole) and all(r["method/hook_calls"] == 2 * 7 * 4 for r in ddp)
    assert ddp[0]["method/bias_norm"] == pytest.approx(steps[0]["method/bias_norm"], rel=1e-4)  # after the reduction
    assert steps[0]["method/bias_norm"] > 1.2 * whole[0]["method/bias_norm"]  # same weights and batch at step 1
    # the samples per edit set the bias, so a resume cannot change them (other scripts may change --micro_batch_size)
    proc = run_script("drift.py", tmp_path / "whole", *common_flags, "--edit_per", "micro_batch", "--save_every", "1",
                      "--resume", "auto", "--micro_batch_size", "2", check=False, in_process=True)
    assert proc.returncode != 0 and "other settings: --micro_batch_size 4 (now 2)" in proc.stderr, proc.stderr[-2000:]
    end = next(r for r in records(tmp_path / "accum") if r.get("event") == "eval_after")
    assert end["method/param_cos"] > 0.1 and end["method/distance_to_reasoning"] < 1
    merged = load_file(os.path.join(tmp_path, "accum", "merge_0.5", "model.safetensors"))
    base, theta_r = load_file(os.path.join(BASE, "model.safetensors")), load_file(os.path.join(reasoning, "model.safetensors"))
    for k in base:
        want = base[k] + 0.5 * (theta_r[k] - base[k]) if ("self_attn" in k or ".mlp." in k) else base[k]
        torch.testing.assert_close(merged[k], want, msg=k)
