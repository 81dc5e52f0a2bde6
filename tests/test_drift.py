"""DRIFT: the gradient edit against its formulas and limiting cases, which tensors get it, the frozen prior,
the loud failures the official code lacks, and the script (alpha = 0 is sft.py; 2 processes = 1 accumulating)."""
import os

import pytest
import torch
from safetensors.torch import load_file

import common
import drift
from scripts import losses, records, run_script
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
        got, got_cos = drift.drift_gradient(g, d, alpha, scale)
        torch.testing.assert_close(got, want)
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
    with pytest.raises(common.UsageError, match=r"matched no parameter .* named like: model\.embed_tokens"):
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


@pytest.mark.parametrize("flags,message", [
    (["--scale", "cosine"], "--scale must be one of absolute, gradnorm, adaptive"),
    (["--fsdp"], "Use DDP"),
    (["--merge_lambdas", "a,b"], "--merge_lambdas: comma-separated numbers"),
    (["--targets", "nothing_here"], "matched no parameter"),
])
def test_bad_flags_fail_clearly(tmp_path, reasoning, flags, message):
    proc = run_script("drift.py", tmp_path, *QUICK, "--model", BASE, "--reasoning_model", reasoning, *flags, check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_alpha_zero_trains_exactly_like_sft_py(tmp_path, reasoning):
    run_script("drift.py", tmp_path / "drift", *QUICK, "--model", BASE, "--reasoning_model", reasoning, "--alpha", "0")
    run_script("sft.py", tmp_path / "sft", *QUICK)
    assert losses(tmp_path / "drift") == losses(tmp_path / "sft")
    ours, theirs = (load_file(os.path.join(tmp_path, d, "final", "model.safetensors")) for d in ("drift", "sft"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_two_processes_equal_one_accumulating_and_the_merge_baseline(tmp_path, reasoning):
    """The bias is per micro-batch and before the reduction: 2 DDP processes give the same training as 1 process
    with the same micro-batches (accumulation 2), and differ from 1 process with the whole batch at once."""
    common_flags = [*QUICK, "--model", BASE, "--reasoning_model", reasoning]
    run_script("drift.py", tmp_path / "accum", *common_flags, "--micro_batch_size", "4", "--merge_lambdas", "0.5")
    run_script("drift.py", tmp_path / "ddp", *common_flags, nproc=2)
    run_script("drift.py", tmp_path / "whole", *common_flags)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "accum"), abs=1e-5)
    assert losses(tmp_path / "whole")[1:] != pytest.approx(losses(tmp_path / "accum")[1:], abs=1e-4)
    steps = [r for r in records(tmp_path / "accum") if "loss" in r]
    assert all(r["method/hook_calls"] == 2 * 7 * 4 for r in steps) and all(-1 <= r["method/cos"] <= 1 for r in steps)
    end = next(r for r in records(tmp_path / "accum") if r.get("event") == "eval_after")
    assert end["method/param_cos"] > 0.1 and end["method/distance_to_reasoning"] < 1
    merged = load_file(os.path.join(tmp_path, "accum", "merge_0.5", "model.safetensors"))
    base, theta_r = load_file(os.path.join(BASE, "model.safetensors")), load_file(os.path.join(reasoning, "model.safetensors"))
    for k in base:
        want = base[k] + 0.5 * (theta_r[k] - base[k]) if ("self_attn" in k or ".mlp." in k) else base[k]
        torch.testing.assert_close(merged[k], want, msg=k)
