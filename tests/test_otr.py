"""OTR: the Monte-Carlo loss against its closed-form expectation (value and logit gradient, error shrinking with
K), the limiting cases (kappa = 1 -> (1 - beta) x DFT; beta = 0, kappa -> inf -> SFT / V; beta = 1, kappa = 1 -> 0),
the sampler, chunk invariance, determinism, --seq_norm's per-sequence 1/T average (direct formula, any split in
float64), bad input, and the script end to end."""
import pytest
import torch
import torch.nn.functional as F

import asft
import common
import otr
from common import IGNORE_INDEX
from scripts import losses, records, run_script

QUICK = ["--steps", "4", "--batch_size", "8", "--eval_datasets", "", "--save_every", "0", "--lr", "1e-3", "--compile", "false"]


def make(n=6, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    return z, y


def scalars(kappa, beta):
    return torch.tensor(kappa, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)


def mc(z, y, kappa, beta, k, seed):
    """(per-token loss, logit gradient, draws' hit fraction) of the MC objective with fresh uniforms."""
    u = torch.rand(len(y), k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z.grad = None
    loss, _, hit = otr.otr_objective(z, y, torch.ones(len(y), dtype=z.dtype), u, *scalars(kappa, beta))
    loss.sum().backward()
    return loss.detach(), z.grad.clone(), hit


def closed_form(z, y, kappa, beta):
    """(1 - beta) pi'(y) (pi - e_y) + beta (pi - pi'), written out."""
    pi, pi_s = z.detach().softmax(-1), (z.detach() / kappa).softmax(-1)
    e_y = F.one_hot(y, z.shape[1]).to(z.dtype)
    return (1 - beta) * pi_s.gather(1, y[:, None]) * (pi - e_y) + beta * (pi - pi_s)


def exact(z, y, kappa, beta):
    z.grad = None
    loss = otr.otr_expected_objective(z, y, torch.ones(len(y), dtype=z.dtype), *scalars(kappa, beta))[0]
    loss.sum().backward()
    return loss.detach(), z.grad.clone()


def test_sampler_draws_from_the_tempered_distribution():
    """With many draws, the objective's hit fraction is pi'(y) = softmax(z / kappa)[y], and the inverse-CDF draws
    have pi' as their histogram."""
    z, y = make(n=3, v=5)
    kappa = 1.3
    u = torch.rand(3, 200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pi_s = (z.detach() / kappa).softmax(-1)
    _, _, hit = otr.otr_objective(z, y, torch.ones(3, dtype=z.dtype), u, *scalars(kappa, 0.5))
    torch.testing.assert_close(hit, pi_s.gather(1, y[:, None]).squeeze(1), atol=4e-3, rtol=0)
    draws = torch.searchsorted(pi_s.cumsum(-1), u * pi_s.cumsum(-1)[:, -1:], right=True)
    torch.testing.assert_close(F.one_hot(draws, 5).double().mean(1), pi_s, atol=4e-3, rtol=0)


def test_closed_form_is_the_expected_objective_gradient():
    """The --estimator exact objective's autograd gradient equals the derived closed form."""
    z, y = make()
    for kappa, beta in [(1.3, -0.1), (0.7, 0.4), (1.0, 0.0)]:
        torch.testing.assert_close(exact(z, y, kappa, beta)[1], closed_form(z, y, kappa, beta))


@pytest.mark.parametrize("kappa,beta", [(1.3, -0.1), (2.0, 0.5)])
def test_monte_carlo_gradient_converges_to_the_closed_form(kappa, beta):
    """The mean MC gradient over many draws approaches the closed form (and the mean loss the expected loss),
    with an error that shrinks roughly like 1/sqrt(K)."""
    z, y = make()
    target_grad = closed_form(z, y, kappa, beta)
    target_loss = exact(z, y, kappa, beta)[0]
    errors = []
    for k in (4, 64, 1024):
        runs = [mc(z, y, kappa, beta, k, seed) for seed in range(200)]
        grad = torch.stack([r[1] for r in runs]).mean(0)
        loss = torch.stack([r[0] for r in runs]).mean(0)
        errors.append((grad - target_grad).abs().max().item())
        torch.testing.assert_close(loss, target_loss, atol=6 / (k * 200) ** 0.5, rtol=0)
    assert errors[2] < 3e-3 and errors[2] < errors[1] < errors[0], errors


def test_kappa_one_is_one_minus_beta_times_dft():
    z, y = make()
    beta = -0.2
    z.grad = None
    asft.dft_objective(z, y, torch.ones(len(y), dtype=z.dtype))[0].sum().backward()
    dft = z.grad.clone()
    torch.testing.assert_close(exact(z, y, 1.0, beta)[1], (1 - beta) * dft)
    torch.testing.assert_close(exact(z, y, 1.0, 0.0)[1], dft)
    runs = torch.stack([mc(z, y, 1.0, beta, 256, seed)[1] for seed in range(200)]).mean(0)
    torch.testing.assert_close(runs, (1 - beta) * dft, atol=5e-3, rtol=0)


def test_beta_zero_and_large_kappa_is_sft_over_vocab():
    z, y = make()
    pi = z.detach().softmax(-1)
    sft = pi - F.one_hot(y, z.shape[1])
    torch.testing.assert_close(exact(z, y, 1e6, 0.0)[1], sft / z.shape[1], atol=1e-6, rtol=0)


def test_constant_reward_has_zero_expected_gradient_at_kappa_one():
    z, y = make()
    torch.testing.assert_close(exact(z, y, 1.0, 1.0)[1], torch.zeros_like(z))
    assert mc(z, y, 1.0, 1.0, 8, 0)[1].abs().max() > 1e-3  # a single draw is noisy, its mean is not


def test_log_probabilities_are_at_temperature_one():
    """Guard: scoring the draws with log pi' instead of log pi changes the loss."""
    z, y = make()
    u = torch.rand(len(y), 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ones = torch.ones(len(y), dtype=z.dtype)
    kappa, beta = scalars(1.3, -0.1)
    ours = otr.otr_objective(z, y, ones, u, kappa, beta)[0]
    tempered = otr.otr_objective(z / 1.3, y, ones, u, torch.tensor(1.0, dtype=z.dtype), beta)[0]  # same draws, log pi'
    cdf = (z.detach() / 1.3).softmax(-1).cumsum(-1)
    draws = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    reward = torch.where(draws == y[:, None], 1.0, -0.1)
    torch.testing.assert_close(ours, -(reward * z.log_softmax(-1).gather(1, draws)).mean(-1))
    assert not torch.allclose(ours, tempered)


def test_fused_is_chunk_invariant_deterministic_and_ignores_masked_rows():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(90, 16, generator=g).requires_grad_(), torch.randn(53, 16, generator=g).requires_grad_()
    y = torch.randint(0, 53, (90,), generator=g)
    y[::5] = IGNORE_INDEX
    u = torch.rand(90, 64, generator=g)
    kappa, beta = torch.tensor(1.3), torch.tensor(-0.1)

    def run(chunk, compile, uniforms=u):
        loss = common.fused_linear_cross_entropy(x, w, y, objective=otr.otr_objective, token_inputs=(uniforms,),
                                                 constants=(kappa, beta), chunk_size=chunk, compile=compile)[0]
        return [loss.detach()] + list(torch.autograd.grad(loss, (x, w)))

    base = run(16, False)
    for other in (run(90, False), run(32, True), run(32, True)):
        for a, b in zip(base, other):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert base[1][y == IGNORE_INDEX].abs().max() == 0
    assert not torch.equal(run(16, False, torch.rand(90, 64, generator=g))[0], base[0])  # the draws matter
    # direct computation on full logits
    valid = y != IGNORE_INDEX
    full = otr.otr_objective((x @ w.t())[valid], y[valid], torch.ones(int(valid.sum())), u[valid], kappa, beta)[0].sum()
    torch.testing.assert_close(base[0], full.detach(), atol=1e-5, rtol=1e-5)
    all_masked = torch.full_like(y, IGNORE_INDEX)
    loss = common.fused_linear_cross_entropy(x, w, all_masked, objective=otr.otr_objective, token_inputs=(u,),
                                             constants=(kappa, beta), chunk_size=16, compile=False)[0]
    loss.backward()
    assert loss.item() == 0 and x.grad.abs().max() == 0


def test_rollout_uniforms_depend_on_seed_step_and_sample_only():
    args = otr.Args(samples=8)
    batch = {"targets": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    a = otr.rollout_uniforms(batch, [4, 9], 3, args)
    alone = otr.rollout_uniforms({k: v[1:] for k, v in batch.items()}, [9], 3, args)
    torch.testing.assert_close(a[1:], alone)
    assert (a[0, 3:] == 0).all() and (a[0, :3] > 0).all()
    assert not torch.equal(a, otr.rollout_uniforms(batch, [4, 9], 4, args))
    assert not torch.equal(a, otr.rollout_uniforms(batch, [4, 9], 3, otr.Args(samples=8, seed=1)))


def test_sequence_weights_direct_and_limits():
    targets = torch.full((4, 6), IGNORE_INDEX)
    targets[0, 1:3] = 5  # T = 2
    targets[1, :] = 7  # T = 6
    targets[3, 2:5] = 1  # T = 3; row 2 has no loss tokens
    w = otr.sequence_weights(targets, torch.float64)
    for i, t in [(0, 2), (1, 6), (3, 3)]:
        assert w[i][targets[i] != IGNORE_INDEX].tolist() == [1 / t] * t and w[i].sum() == pytest.approx(1)
    assert not w[2].any() and not w[targets == IGNORE_INDEX].any()
    batches = [{"targets": targets[:2]}, {"targets": targets[2:]}]
    assert otr.count_loss_sequences(batches).item() == 3  # the empty row is not a sequence of the average
    same = torch.zeros(3, 5, dtype=torch.long)  # equal lengths: the per-sequence mean is the global token mean
    torch.testing.assert_close(otr.sequence_weights(same, torch.float64) * 5, torch.ones(3, 5, dtype=torch.float64))


def test_seq_norm_is_the_per_sequence_mean_for_any_split(monkeypatch):
    """--seq_norm, float64, a tiny random Llama: the step's loss and gradient are (1/B) sum_i (1/T_i) sum_t l_it
    computed directly on full logits, identical for 1 micro-batch, 4 accumulated micro-batches and 2 processes x
    micro-batches of 1 (the loop's normalized_loss over count_loss_sequences, DDP's gradient average); and they
    differ from the global token mean, because the lengths differ."""
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, head_dim=8, initializer_range=0.5)
    model = transformers.LlamaForCausalLM(config).double()
    g = torch.Generator().manual_seed(0)
    examples = {}
    for i, (prompt, response) in zip([3, 8, 11, 20], [(2, 3), (5, 9), (1, 2), (4, 14)]):  # T_i = response length
        tokens = torch.randint(4, 40, (prompt + response,), generator=g).tolist()
        examples[i] = {"input_ids": tokens, "labels": [IGNORE_INDEX] * prompt + tokens[prompt:]}
    ids = sorted(examples)
    params = list(model.parameters())

    def step(ranks, micro, seq_norm=True):
        """The loss and gradient of one optimizer step, as the training loop computes them on `ranks` processes."""
        args = otr.Args(samples=16, seq_norm=seq_norm, compile=False)
        per_rank = []
        for rank in range(ranks):
            rt = common.Runtime(rank, rank, ranks, torch.device("cpu"), rank == 0)
            per_rank.append([])
            for mine in common.micro_batches(ids, rt, micro):
                batch = common.collate(examples, mine, 0, "cpu")
                per_rank[-1].append(batch | {"uniforms": otr.rollout_uniforms(batch, mine, 0, args)})
        everything = sum(per_rank, [])  # what the all-reduce of the count sees
        n = otr.count_loss_sequences(everything) if seq_norm else common.count_loss_tokens(everything)
        loss, grads = 0.0, [torch.zeros_like(p) for p in params]
        for batches in per_rank:
            for batch in batches:
                part = common.normalized_loss(otr.compute_loss(model, batch, args)[0], n, ranks)
                for total, grad in zip(grads, torch.autograd.grad(part, params)):
                    total += grad / ranks  # DDP averages the ranks' gradients
                loss += part.item() / ranks
        return loss, grads, args

    full = step(1, 4)
    for other in (step(1, 1), step(2, 1)):
        assert other[0] == pytest.approx(full[0], rel=1e-12)
        for a, b in zip(other[1], full[1]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    # the direct formula, sequence by sequence on full logits
    args = full[2]
    means = []
    for i in ids:
        batch = common.collate(examples, [i], 0, "cpu")
        keep = batch["targets"][0] != IGNORE_INDEX
        logits = model(input_ids=batch["input_ids"]).logits[0][keep]
        uniforms = otr.rollout_uniforms(batch, [i], 0, args)[0][keep]
        per_token = otr.otr_objective(logits, batch["targets"][0][keep], torch.ones(len(logits), dtype=logits.dtype),
                                      uniforms, torch.tensor(args.kappa), torch.tensor(args.beta))[0]
        means.append(per_token.mean())
    direct = torch.stack(means).mean()
    assert full[0] == pytest.approx(direct.item(), rel=1e-12)
    for a, b in zip(torch.autograd.grad(direct, params), full[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    token_mean = step(1, 4, seq_norm=False)[0]
    assert abs(token_mean - full[0]) > 0.05 * abs(full[0])  # the flag changes the loss
    # a MoE router loss (token units: 0.5 per loss token) still adds 0.5 to the step's loss under either rule
    forward = common.decoder_forward
    monkeypatch.setattr(common, "decoder_forward", lambda model, batch: (
        lambda out: (out[0], 0.5 * (batch["targets"] != IGNORE_INDEX).sum().double(), out[2]))(forward(model, batch)))
    assert step(1, 4)[0] == pytest.approx(full[0] + 0.5, rel=1e-12)
    assert step(2, 1)[0] == pytest.approx(full[0] + 0.5, rel=1e-12)
    # (common.count_loss_tokens is float32, so 1/N is rounded to float32 there: 1e-7, not 1e-12)
    assert step(1, 4, seq_norm=False)[0] == pytest.approx(token_mean + 0.5, rel=1e-7)


@pytest.mark.parametrize("flags,message", [
    (["--samples", "0"], "need --samples >= 1 (got 0)"),
    (["--kappa", "0"], "--kappa > 0 (got 0.0)"),
    (["--beta", "1.5"], "--beta < 1 (got 1.5)"),
])
def test_bad_flags_fail_clearly(tmp_path, flags, message):
    proc = run_script("otr.py", tmp_path, *QUICK, *flags, check=False, in_process=True)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_fixed_seed_same_losses_for_any_split_and_resume(tmp_path):
    """Identical losses on a rerun; with micro-batches of 2 (accumulation 4) and on 2 processes the draws are the
    same (seeded per seed, step and sample). Inverse-CDF draws are discontinuous in the logits, so the ~1e-7
    summation-order noise of other batch shapes flips the odd draw whose uniform sits on a boundary: step 1
    agrees to 1e-6, later steps to 1%."""
    run_script("otr.py", tmp_path / "a", *QUICK)
    run_script("otr.py", tmp_path / "b", *QUICK)
    run_script("otr.py", tmp_path / "accum", *QUICK, "--micro_batch_size", "2")
    run_script("otr.py", tmp_path / "ddp", *QUICK, nproc=2)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    for other in ("accum", "ddp"):
        assert losses(tmp_path / other)[0] == pytest.approx(losses(tmp_path / "a")[0], abs=1e-6)
        assert losses(tmp_path / other) == pytest.approx(losses(tmp_path / "a"), rel=1e-2)
    steps = [r for r in records(tmp_path / "a") if "loss" in r]
    assert 0 < steps[0]["method/hit_fraction"] < 1
