"""ASFT and DFT: the per-token objectives against direct full-logit formulas and their limiting cases, the
chunked fused path against full logits, TRL's DFT, the frozen reference, bad input, and the script end to end."""
import os

import pytest
import torch
import torch.nn.functional as F

import asft
import common
from common import IGNORE_INDEX
from scripts import losses, records, run_script, run_side_by_side
from test_train import GOLDEN

QUICK = ["--steps", "6", "--batch_size", "8", "--eval_datasets", "", "--save_every", "0", "--lr", "1e-3"]


def make(n=60, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).requires_grad_()
    z_ref = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,), generator=g)
    return z, z_ref, y


def logit_grad(objective, z, *args):
    """(per-token loss, d(sum of losses)/dz) of an objective on full logits, through plain autograd."""
    z.grad = None
    loss = objective(z, *args)[0]
    loss.sum().backward()
    return loss.detach(), z.grad.clone()


def asft_full(z, y, z_ref, kl_weight, dft=1.0, theta_first=0.0):
    """ASFT on full logits written out directly: identity head so asft_objective sees z_ref as its reference."""
    eye = torch.eye(z.shape[1], dtype=z.dtype)
    return asft.asft_objective(z, y, torch.ones(len(y), dtype=z.dtype), z_ref, eye,
                               torch.tensor(kl_weight, dtype=z.dtype), torch.tensor(dft, dtype=z.dtype),
                               torch.tensor(theta_first, dtype=z.dtype))


def test_dft_value_is_sft_times_its_probability():
    z, _, y = make()
    ones = torch.ones(len(y), dtype=z.dtype)
    dft = asft.dft_objective(z, y, ones)[0]
    sft = F.cross_entropy(z, y, reduction="none")
    torch.testing.assert_close(dft, sft * torch.exp(-sft))
    assert (dft >= 0).all() and (dft <= sft).all()


def test_dft_logit_gradient_is_probability_times_sft_gradient():
    z, _, y = make()
    _, grad = logit_grad(asft.dft_objective, z, y, torch.ones(len(y), dtype=z.dtype))
    p = z.detach().softmax(-1)
    p_y = p.gather(1, y[:, None])
    torch.testing.assert_close(grad, p_y * (p - F.one_hot(y, z.shape[1])))
    # the stop-gradient matters: without it the ratio to the SFT gradient would be p(y) (1 + log p(y))
    assert not torch.allclose(grad, p_y * (1 + p_y.log()) * (p - F.one_hot(y, z.shape[1])))


def test_dft_weight_is_one_over_vocab_for_uniform_logits():
    z = torch.zeros(4, 50, dtype=torch.float64)
    y = torch.tensor([0, 7, 13, 49])
    loss, logp = asft.dft_objective(z, y, torch.ones(4, dtype=z.dtype))
    torch.testing.assert_close(loss, -logp / 50)  # weight exp(log p) = 1/50


def test_weight_forced_to_one_without_anchor_is_sft():
    z, z_ref, y = make()
    loss, grad = logit_grad(asft_full, z, y, z_ref, 0.0, 0.0)
    torch.testing.assert_close(loss, F.cross_entropy(z.detach(), y, reduction="none"))
    p = z.detach().softmax(-1)
    torch.testing.assert_close(grad, p - F.one_hot(y, z.shape[1]))


def test_lambda_zero_is_dft():
    z, z_ref, y = make()
    a = logit_grad(asft_full, z, y, z_ref, 0.0)
    b = logit_grad(asft.dft_objective, z, y, torch.ones(len(y), dtype=z.dtype))
    for x, r in zip(a, b):
        torch.testing.assert_close(x, r)


def test_anchor_in_the_papers_direction_value_and_gradient():
    """--kl_direction paper: KL(pi_theta || pi_ref) (Eq. 6), logit gradient lambda p (log p - log r - KL)."""
    z, z_ref, y = make()
    lam = 0.3
    loss, grad = logit_grad(asft_full, z, y, z_ref, lam, 1.0, 1.0)
    dft_loss, dft_grad = logit_grad(asft.dft_objective, z, y, torch.ones(len(y), dtype=z.dtype))
    logp, logp_ref = z.detach().log_softmax(-1), z_ref.log_softmax(-1)
    theta_first = (logp.exp() * (logp - logp_ref)).sum(-1)
    ref_first = (logp_ref.exp() * (logp_ref - logp)).sum(-1)
    torch.testing.assert_close(loss - dft_loss, lam * theta_first)
    assert not torch.allclose(loss - dft_loss, lam * ref_first, rtol=1e-2) and (theta_first >= 0).all()
    torch.testing.assert_close(grad - dft_grad, lam * logp.exp() * (logp - logp_ref - theta_first[:, None]))
    torch.testing.assert_close(asft_full(z, y, z_ref, lam, 1.0, 1.0)[2], theta_first)


def test_anchor_in_the_official_codes_direction_value_and_gradient():
    """--kl_direction code: KL(pi_ref || pi_theta), as the official train_v2.py computes it."""
    z, z_ref, y = make()
    lam = 0.3
    loss, grad = logit_grad(asft_full, z, y, z_ref, lam)
    dft_loss, dft_grad = logit_grad(asft.dft_objective, z, y, torch.ones(len(y), dtype=z.dtype))
    logp, logp_ref = z.detach().log_softmax(-1), z_ref.log_softmax(-1)
    forward = (logp_ref.exp() * (logp_ref - logp)).sum(-1)  # KL(pi_ref || pi_theta): the official code's direction
    reverse = (logp.exp() * (logp - logp_ref)).sum(-1)
    kl = loss - dft_loss
    torch.testing.assert_close(kl, lam * forward)
    assert not torch.allclose(kl, lam * reverse, rtol=1e-2)
    assert (forward >= 0).all()
    torch.testing.assert_close(grad - dft_grad, lam * (logp.exp() - logp_ref.exp()))
    torch.testing.assert_close(asft_full(z, y, z_ref, lam)[2], forward)


def test_anchor_is_zero_with_zero_gradient_at_the_reference():
    z, _, y = make()
    a = logit_grad(asft_full, z, y, z.detach().clone(), 0.5)
    b = logit_grad(asft.dft_objective, z, y, torch.ones(len(y), dtype=z.dtype))
    for x, r in zip(a, b):
        torch.testing.assert_close(x, r)


def hidden_and_heads(n=150, h=24, v=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.5).requires_grad_()
    x_ref, w_ref = torch.randn(n, h + 5, generator=g), torch.randn(v, h + 5, generator=g) * 0.5
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = IGNORE_INDEX
    return x, w, x_ref, w_ref, y


@pytest.mark.parametrize("mode", ["dft", "asft", "sft+kl"])
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("theta_first", [0.0, 1.0], ids=["code direction", "paper direction"])
def test_chunked_fused_equals_full_logits(mode, compile, theta_first):
    """The fused path (chunks of 32 rows, reference logits formed per chunk) vs the formulas on [N, V] logits,
    dX and dW included; ignored rows count for nothing."""
    x, w, x_ref, w_ref, y = hidden_and_heads()
    lam, dft = torch.tensor(0.2), torch.tensor(float(mode != "sft+kl"))
    valid = y != IGNORE_INDEX
    if mode == "dft":
        fused = lambda: common.fused_linear_cross_entropy(x, w, y, objective=asft.dft_objective, chunk_size=32, compile=compile)
    else:
        fused = lambda: common.fused_linear_cross_entropy(x, w, y, objective=asft.asft_objective, token_inputs=(x_ref,),
                                                          constants=(w_ref, lam, dft, torch.tensor(theta_first)),
                                                          chunk_size=32, compile=compile)

    def full():
        logp = (x @ w.t()).log_softmax(-1)[valid]
        logp_y = logp.gather(1, y[valid, None]).squeeze(1)
        weight = logp_y.exp().detach() if mode != "sft+kl" else 1.0
        loss = -(weight * logp_y).sum()
        if mode != "dft":
            logp_ref = (x_ref @ w_ref.t()).log_softmax(-1)[valid]
            pair = (logp, logp_ref) if theta_first else (logp_ref, logp)
            loss = loss + lam * (pair[0].exp() * (pair[0] - pair[1])).sum()
        return loss

    ours = [fused()[0]] + list(torch.autograd.grad(fused()[0], (x, w)))
    ref = [full()] + list(torch.autograd.grad(full(), (x, w)))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_dft_equals_trl_on_the_same_model_and_batch(tmp_path):
    """TRL's SFTTrainer with loss_type="dft" (its own loss code) gives the same value as the fused DFT."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    model, tok = common.load_model(os.path.join(common.WORLD_DIR, "base"))
    train, _ = common.load_sft_data(os.path.join(common.WORLD_DIR, "data", "math", "train.jsonl"), tok, 512, limit=4)
    batch = common.collate(train, [0, 1, 2, 3], tok.pad_token_id, "cpu")
    labels = torch.full_like(batch["targets"], IGNORE_INDEX)
    labels[:, 1:] = batch["targets"][:, :-1]  # unshifted labels, as transformers expects
    config = SFTConfig(output_dir=str(tmp_path), loss_type="dft", report_to=[], use_cpu=True, bf16=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list([{"text": "a"}]), processing_class=tok)
    with torch.no_grad():
        theirs = trainer.compute_loss(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                              "labels": labels})
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ours, _ = common.fused_linear_cross_entropy(hidden, model.get_output_embeddings().weight, batch["targets"],
                                                    objective=asft.dft_objective, compile=False)
    assert float(ours / (batch["targets"] != IGNORE_INDEX).sum()) == pytest.approx(float(theirs), rel=1e-5)


def test_reference_is_frozen_and_untouched_by_a_training_step():
    args = asft.Args(compile=False)
    rt = common.Runtime(0, 0, 1, torch.device("cpu"), True)
    model, tok = common.load_model(args.model)
    train, _ = common.load_sft_data(args.dataset, tok, 512, limit=4)
    batch = common.collate(train, [0, 1, 2, 3], tok.pad_token_id, "cpu")
    decoder, head, ref_map, context = asft.load_reference(args, model, tok, rt, batch)
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        loss, metrics = asft.compute_loss(model, batch, args, (decoder, head, ref_map, context))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert metrics["kl"] > 0 and not decoder.training
    assert all(p.grad is None and not p.requires_grad for p in decoder.parameters()) and not head.requires_grad
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_reference_with_another_vocabulary_is_refused(tmp_path):
    args = asft.Args(ref_model=str(tmp_path))
    model, tok = common.load_model(args.model)
    other, _ = common.load_model(args.model)
    other.resize_token_embeddings(other.config.vocab_size + 8)
    other.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(common.UsageError, match="vocabulary .* differs from --model"):
        asft.load_reference(args, model, tok, common.Runtime(0, 0, 1, torch.device("cpu"), True), None)


@pytest.mark.parametrize("flags,message", [
    (["--kl_weight", "-0.1"], "--kl_weight must be >= 0"),
    (["--kl_direction", "reverse"], "--kl_direction must be paper or code"),
    (["--mode", "kl"], "--mode must be one of sft, dft, sft+kl, asft"),
])
def test_bad_flags_fail_clearly(tmp_path, flags, message):
    proc = run_script("asft.py", tmp_path, *QUICK, *flags, check=False, in_process=True)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_mode_sft_trains_exactly_like_sft_py(tmp_path):
    run_script("asft.py", tmp_path, *QUICK, "--mode", "sft")
    assert losses(tmp_path) == pytest.approx(GOLDEN, abs=1e-4)


def test_asft_starts_as_dft_and_matches_across_processes(tmp_path):
    """Step 1: KL = 0 and ASFT's loss equals DFT's; two processes (DDP, reference on each) and FSDP2 (sharded
    reference) log the same losses as one."""
    run_side_by_side(("asft.py", tmp_path / "dft", *QUICK, "--mode", "dft"), ("asft.py", tmp_path / "asft", *QUICK))
    run_script("asft.py", tmp_path / "fsdp", *QUICK, "--fsdp", nproc=2)
    first = [r for r in records(tmp_path / "asft") if "loss" in r]
    assert first[0]["method/kl"] == pytest.approx(0, abs=1e-6) and first[-1]["method/kl"] > 1e-3
    assert first[0]["loss"] == pytest.approx(losses(tmp_path / "dft")[0], abs=1e-6)
    assert losses(tmp_path / "asft")[1:] != pytest.approx(losses(tmp_path / "dft")[1:], abs=1e-4)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "asft"), abs=1e-5)
