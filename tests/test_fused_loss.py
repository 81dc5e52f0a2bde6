"""The fused linear cross-entropy against the naive full-logits formula (tolerances: ../shared/perf_anchors.md)."""
import pytest
import torch
import torch.nn.functional as F

import common
from common import IGNORE_INDEX, cross_entropy_objective, fused_linear_cross_entropy


def make(n=252, h=123, v=507, dtype=torch.float32, ignore=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=g, dtype=torch.float64) / h**0.5).to(dtype)
    w = torch.randn(v, h, generator=g, dtype=torch.float64).to(dtype)
    w[: n // 4] = x[: n // 4] * 3  # peaked softmax for some rows (CCE's trick)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore] = IGNORE_INDEX
    return x.requires_grad_(), w.requires_grad_(), y


def naive(x, w, y, weights=None, dtype=torch.float32):
    """Full logits in `dtype`, F.cross_entropy in fp32, token mean."""
    logits = (x.to(dtype) @ w.to(dtype).t()).float()
    per_token = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="none")
    if weights is not None:
        per_token = per_token * weights
    return per_token.sum() / (y != IGNORE_INDEX).sum().clamp(min=1)


def grads(loss_fn, x, w):
    x.grad = w.grad = None
    loss = loss_fn()
    loss.backward()
    return loss.detach(), x.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("compile", [False, True])
def test_fp32_matches_naive(compile):
    x, w, y = make()
    count = (y != IGNORE_INDEX).sum()
    ours = grads(lambda: fused_linear_cross_entropy(x, w, y, chunk_size=64, compile=compile)[0] / count, x, w)
    ref = grads(lambda: naive(x, w, y), x, w)
    torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(ours[1:], ref[1:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=5e-4)
    assert ours[1][y == IGNORE_INDEX].abs().max() == 0  # ignored rows get exactly zero gradient


def test_logp_of_label_matches_log_softmax():
    x, w, y = make()
    _, logp = fused_linear_cross_entropy(x, w, y, chunk_size=50)
    valid = y != IGNORE_INDEX
    ref = (x @ w.t()).log_softmax(-1)[valid].gather(1, y[valid, None]).squeeze(1)
    torch.testing.assert_close(logp[valid], ref.detach(), atol=1e-5, rtol=1e-5)
    assert (logp[~valid] == 0).all() and not logp.requires_grad


def test_bf16_no_worse_than_naive_bf16():
    x, w, y = make(dtype=torch.bfloat16)
    count = (y != IGNORE_INDEX).sum()
    ours = grads(lambda: fused_linear_cross_entropy(x, w, y, chunk_size=64)[0] / count, x, w)
    ref_bf16 = grads(lambda: naive(x, w, y, dtype=torch.bfloat16), x, w)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    truth = grads(lambda: naive(x64, w64, y, dtype=torch.float64), x64, w64)
    for a, b, t in zip(ours, ref_bf16, truth):
        err_ours, err_naive = (a.double() - t).abs(), (b.double() - t).abs()
        assert (err_ours <= err_naive + 1e-2).all(), (err_ours - err_naive).max()


def test_chunk_size_invariance_fp64():
    x, w, y = make(n=97, h=31, v=211, dtype=torch.float64)
    results = [grads(lambda: fused_linear_cross_entropy(x, w, y, chunk_size=c, compile=False)[0], x, w)
               for c in (1, 3, 7, 64, 97)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_all_ignored_gives_zero_loss_and_gradients():
    x, w, y = make(ignore=1.0)
    loss, logp = fused_linear_cross_entropy(x, w, y)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(loss)
    assert x.grad.abs().max() == 0 and w.grad.abs().max() == 0 and (logp == 0).all()


def test_non_contiguous_batched_input_and_scaled_loss():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 40, 2 * 33, generator=g, dtype=torch.float64)
    x = base[:, :, ::2].requires_grad_()  # non-contiguous [B, T, H]
    w = torch.randn(101, 33, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 101, (4, 40), generator=g)
    y[:, :5] = IGNORE_INDEX
    ours = grads(lambda: fused_linear_cross_entropy(x, w, y, chunk_size=16)[0] * 0.37, x, w)
    ref = grads(lambda: F.cross_entropy((x @ w.t()).reshape(-1, 101), y.reshape(-1), reduction="sum") * 0.37, x, w)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_two_micro_batches_accumulate_into_grad():
    x1, w, y1 = make(seed=1)
    x2, _, y2 = make(seed=2)
    w.grad = None
    fused_linear_cross_entropy(x1, w, y1)[0].backward()
    fused_linear_cross_entropy(x2, w, y2)[0].backward()
    ours = w.grad.clone()
    w.grad = None
    (naive(x1, w, y1) * (y1 != IGNORE_INDEX).sum() + naive(x2, w, y2) * (y2 != IGNORE_INDEX).sum()).backward()
    torch.testing.assert_close(ours, w.grad, atol=1e-4, rtol=5e-4)


def test_double_backward_with_retain_graph():
    x, w, y = make(dtype=torch.float64)
    loss = fused_linear_cross_entropy(x, w, y, compile=False)[0]
    (loss * 2.0).backward(retain_graph=True)
    first = w.grad.clone()
    (loss * -0.5).backward()  # recomputed, not the consumed buffers
    torch.testing.assert_close(w.grad, first * 0.75, atol=1e-10, rtol=1e-10)


def test_per_token_weights_match_weighted_formula():
    x, w, y = make()
    weights = torch.rand(y.shape, generator=torch.Generator().manual_seed(3))
    count = (y != IGNORE_INDEX).sum()
    ours = grads(lambda: fused_linear_cross_entropy(x, w, y, weights, chunk_size=64)[0] / count, x, w)
    ref = grads(lambda: naive(x, w, y, weights), x, w)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=5e-4)


def kl_objective(logits, labels, weights, ref_hidden, ref_weight, lam):
    """Test extension: CE + lam * KL(pi_ref || pi) with the reference logits formed per chunk."""
    ce, logp = cross_entropy_objective(logits, labels, weights)
    ref_logp = (ref_hidden @ ref_weight.t()).float().log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logits.log_softmax(-1))).sum(-1)
    return ce + lam * weights * kl, logp, kl


def test_objective_extension_with_token_inputs_and_constants():
    x, w, y = make(n=100, h=32, v=97)
    ref_h, ref_w = torch.randn(100, 32) / 6, torch.randn(97, 32)
    lam = torch.tensor(0.3)
    loss, logp, kl = fused_linear_cross_entropy(x, w, y, objective=kl_objective, token_inputs=(ref_h,),
                                                constants=(ref_w, lam), chunk_size=16)
    ours = grads(lambda: fused_linear_cross_entropy(x, w, y, objective=kl_objective, token_inputs=(ref_h,),
                                                    constants=(ref_w, lam), chunk_size=16)[0], x, w)
    valid = y != IGNORE_INDEX

    def direct():
        logp_all = (x @ w.t()).log_softmax(-1)[valid]
        ref_logp = (ref_h @ ref_w.t()).log_softmax(-1)[valid]
        kl_ref = (ref_logp.exp() * (ref_logp - logp_all)).sum(-1)
        return -logp_all.gather(1, y[valid, None]).sum() + lam * kl_ref.sum()
    ref = grads(direct, x, w)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=5e-4)
    assert (kl[valid] >= -1e-6).all() and (kl[~valid] == 0).all()


def test_no_recompiles_across_lengths():
    from torch._dynamo.utils import counters
    x, w, y = make(n=600, h=64, v=300)
    fused_linear_cross_entropy(x, w, y, chunk_size=128)[0].backward()  # warm-up
    fused_linear_cross_entropy(x[:77], w, y[:77], chunk_size=128)[0].backward()  # second shape: goes dynamic
    before, compiling = counters["stats"]["unique_graphs"], common.compile_seconds()
    assert compiling > 0  # the calls that compiled were timed (the scripts leave them out of tok/s and ETA)
    for n in (300, 451, 599, 130, 258, 17):
        fused_linear_cross_entropy(x[:n], w, y[:n], chunk_size=128)[0].backward()
    assert counters["stats"]["unique_graphs"] == before and common.compile_seconds() == compiling


def test_shape_and_dtype_errors():
    x, w, y = make()
    with pytest.raises(ValueError, match="shapes"):
        fused_linear_cross_entropy(x, w, y[:-1])
    with pytest.raises(ValueError, match="dtype"):
        fused_linear_cross_entropy(x, w.detach().double(), y)


def test_every_objective_is_compiled_however_many_share_a_process():
    """Dynamo's recompile limit (8) counts per code object: were all objectives compiled through one shared
    wrapper, the ninth would silently run eager. Each gets its own here, so every new objective adds graphs."""
    from torch._dynamo.utils import counters
    x, w, y = make(n=300, h=32, v=200)

    def make_objective(scale):
        def objective(logits, labels, weights):
            logp = logits.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
            return -scale * weights * logp, logp
        return objective

    for i in range(12):
        before, objective = counters["stats"]["unique_graphs"], make_objective(1.0 + i)
        for n in (300, 171):  # a full-size chunk and a remainder
            fused_linear_cross_entropy(x[:n], w, y[:n], objective=objective, chunk_size=128)[0].backward()
        assert counters["stats"]["unique_graphs"] > before, f"objective {i} ran eager"


def test_a_compiler_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    """Inductor bugs exist (OTR's sampler in fp32 on CUDA, torch 2.11): the objective then runs eagerly, same values."""
    def objective(logits, labels, weights):  # a fresh objective, so nothing compiled is cached for it
        return common.cross_entropy_objective(logits, labels, weights)
    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("InductorError: simulated")
        return run
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(20, 8, generator=g).requires_grad_(), torch.randn(30, 8, generator=g)
    y = torch.randint(0, 30, (20,), generator=g)
    want = common.fused_linear_cross_entropy(h, w, y, objective=objective, compile=False)[0]
    monkeypatch.setattr(common.torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="torch.compile failed for chunk_step_objective .*simulated.*running it eagerly"):
        got = common.fused_linear_cross_entropy(h, w, y, objective=objective, compile=True)[0]
    assert torch.equal(got, want)
    common.fused_linear_cross_entropy(h, w, y, objective=objective, compile=True)  # later calls: eager, no new warning
