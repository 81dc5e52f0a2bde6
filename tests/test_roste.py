"""RoSTE: the quantizer against a slow per-row reference, the straight-through gradient, Hadamard matrices, the
computational invariance of norm folding, R1 and every R2/R3/R4 switch, the rotation search, and the script
(16 bits without rotation is sft.py; the saved model reloads quantized)."""
import collections
import functools
import itertools
import math
import os
import random
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


def official_quantize(x, bits, symmetric, clip):
    """The official quantizer (quant_utils/quant_linear.py l.39-171, the same for weights, tokens, keys and values),
    written here from its formula and in its order of operations, in x's dtype: max/min over the last dimension times
    clip, scale = range / levels, zero point round(-min / scale), clamp(round(x / scale) + zero), minus zero, times scale."""
    if bits >= 16:
        return x
    if symmetric:
        q_min, q_max, zero = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, 0
        scale = x.abs().max(dim=-1, keepdim=True)[0] * clip / q_max
    else:
        q_min, q_max = 0, 2 ** bits - 1
        high, low = x.max(dim=-1, keepdim=True)[0] * clip, x.min(dim=-1, keepdim=True)[0] * clip
        scale = (high - low) / (q_max - q_min)
        zero = torch.round(-low / scale)
    return (torch.clamp(torch.round(x / scale) + zero, q_min, q_max) - zero) * scale


def test_quantizer_is_bit_identical_to_the_official_one_in_float32_and_float64():
    """Regression guard: 2/3/4/8 bits, symmetric and asymmetric, clip 1 / 0.95 / 0.9, fp32 and fp64, on rows with an
    outlier channel, large, all-positive and all-negative rows: torch.equal, not a tolerance. bf16 inputs are
    quantized in float32 (the documented difference: the official code rounds in bf16)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 96, generator=g, dtype=torch.float64)
    base[:, 5] *= 40
    base[3] *= 1e3
    base[4], base[5] = base[4].abs() + 0.5, -base[5].abs() - 0.5
    for dtype, bits, symmetric, clip in itertools.product((torch.float32, torch.float64), (2, 3, 4, 8), (False, True), (1.0, 0.95, 0.9)):
        x = base.to(dtype)
        ours = roste.fake_quantize(x, roste.Quantizer(bits, symmetric, clip))
        assert ours.dtype == dtype and torch.equal(ours, official_quantize(x, bits, symmetric, clip)), (dtype, bits, symmetric, clip)
    x = base.to(torch.bfloat16)
    q = roste.Quantizer(4, False, 0.95)
    assert torch.equal(roste.fake_quantize(x, q), official_quantize(x.float(), 4, False, 0.95).to(torch.bfloat16))
    assert not torch.equal(roste.fake_quantize(x, q), official_quantize(x, 4, False, 0.95))  # the bf16 difference


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


@functools.lru_cache(maxsize=None)
def walsh(n):
    """Sylvester's Hadamard matrix by its entry formula, H[i, j] = (-1)^popcount(i & j) / sqrt(n) (n a power of 2):
    the matrix the official matmul_hadU(eye(n)) computes for powers of 2."""
    i = torch.arange(n)
    both, ones = i[:, None] & i[None, :], torch.zeros(n, n, dtype=torch.long)
    for bit in range(max(1, n.bit_length())):
        ones += (both >> bit) & 1
    return (1 - 2 * (ones % 2)).double() / math.sqrt(n)


@pytest.mark.parametrize("d", [64, 256, 896])
def test_r1_is_the_official_draw(d):
    """The official R1 (rotation_utils/main.py l.50 set_seed(42); hadamard.py l.20-23: torch.randint(0, 2, (d,)) on
    the global generator, diag(2 s - 1) times the Hadamard): the same signs for every d, the same matrix for powers
    of 2 (for 896 the Hadamard factor is another construction than the official tables, so only the signs)."""
    with torch.random.fork_rng():
        torch.random.manual_seed(42)
        signs = torch.randint(low=0, high=2, size=(d,)).to(torch.float64) * 2 - 1
    r1 = roste.r1_matrix(d, 42)
    assert torch.equal(r1, torch.diag(signs) @ roste.hadamard_matrix(d))
    if d & (d - 1) == 0:
        assert torch.equal(r1, torch.diag(signs) @ walsh(d))
    assert not torch.equal(roste.r1_matrix(d, 43), r1)


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


def direct_forward(model, ids, spec, config):
    """Slow float64 forward of a Llama model after roste's surgery (norms folded, R1 in the weights), written from
    the official sites (quant_r_linear.py, modeling_qwen2_rq_online.py l.260-345) with the weights and the model's
    own norms, rotary tables and LM head: every q/k/v/o/gate/up/down computes Q_a(x) Q_w(W)^T; R3 on q and k after
    RoPE; R2 on the values (per head) and on o_proj's weight (per head block); then K and V quantized per token and
    head; softmax attention; R4 on down_proj's input and weight; official_quantize and walsh throughout."""
    dec, cfg = model.get_decoder(), model.config
    qw, qa, qkv = (lambda x, k=k: official_quantize(x, spec[f"{k}_bits"], spec[f"{k}_sym"], spec[f"{k}_clip"]) for k in ("w", "a", "kv"))
    linear = lambda x, w: qa(x) @ qw(w).T
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    half = lambda t: torch.cat((-t[..., hd // 2:], t[..., :hd // 2]), -1)
    b, t = ids.shape
    h = dec.embed_tokens.weight[ids]
    cos, sin = (c[:, None] for c in dec.rotary_emb(h, torch.arange(t)[None]))
    causal = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    for i, layer in enumerate(dec.layers):
        a, m, on = layer.self_attn, layer.mlp, config[i]
        x = layer.input_layernorm(h)
        q = linear(x, a.q_proj.weight).view(b, t, heads, hd).transpose(1, 2)
        k, v = (linear(x, w).view(b, t, kv_heads, hd).transpose(1, 2) for w in (a.k_proj.weight, a.v_proj.weight))
        q, k = q * cos + half(q) * sin, k * cos + half(k) * sin
        if on["R3"]:
            q, k = q @ walsh(hd), k @ walsh(hd)
        if on["R2"]:
            v = v @ walsh(hd)
        k, v = (qkv(z).repeat_interleave(heads // kv_heads, 1) for z in (k, v))
        o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, -1) @ v
        w_o = a.o_proj.weight
        if on["R2"]:
            w_o = (w_o.view(-1, heads, hd) @ walsh(hd)).flatten(1)
        h = h + linear(o.transpose(1, 2).reshape(b, t, heads * hd), w_o)
        x = layer.post_attention_layernorm(h)
        act, w_down = torch.nn.functional.silu(linear(x, m.gate_proj.weight)) * linear(x, m.up_proj.weight), m.down_proj.weight
        if on["R4"]:
            act, w_down = act @ walsh(act.shape[-1]), w_down @ walsh(act.shape[-1])
        h = h + linear(act, w_down)
    return dec.norm(h) @ model.get_output_embeddings().weight.T


def test_rotations_and_quantizers_sit_where_the_official_code_puts_them(batch):
    """Regression guard for the placement: the quantized network (W4A4KV4, mixed per-layer R2/R3/R4) in float64
    equals direct_forward to rounding, under the training default (asymmetric, clip 0.95) and the search's quantizer
    (symmetric, clip 1); a network with the rotations elsewhere (all off) is far from it."""
    model, _ = common.load_model(BASE)
    model.double()
    roste.fuse_norms(model)
    roste.rotate_residual(model, 42)
    ids = batch["input_ids"][:2, :24]
    assert batch["attention_mask"][:2, :24].all()
    config = {i: dict(zip(roste.ROTATIONS, [i % 2 == 0, i < 2, i > 0])) for i in range(4)}
    for symmetric, clip in ((False, 0.95), (True, 1.0)):
        spec = {f"{k}_{f}": v for k in ("w", "a", "kv") for f, v in (("bits", 4), ("sym", symmetric), ("clip", clip))}
        roste.quantize_model(model, spec)
        roste.set_rotations(model, config)
        with torch.no_grad():
            got, want = model(input_ids=ids).logits, direct_forward(model, ids, spec, config)
            elsewhere = direct_forward(model, ids, spec, {i: dict.fromkeys(roste.ROTATIONS, False) for i in range(4)})
        assert (got - want).abs().max() <= 1e-9 * want.abs().max(), (symmetric, clip, (got - want).abs().max())
        assert (elsewhere - want).abs().max() > 1e-2 * want.abs().max()


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
    /100: the full-precision function is unchanged). The search must log a lower R4 error with the rotation there
    and switch it on; and every logged error of layer 0, with R2-R4 off and on, must equal a direct computation
    from the layer's inputs: R4 = e(down_proj), R2 = e(o_proj) + the value cache's, R3 = the key cache's (after
    RoPE), e(W, X) = mean (Q(W~) - W~)^2 + mean (Q(X~) - X~)^2 (the official logging sites)."""
    model, _ = common.load_model(BASE)
    roste.fuse_norms(model)
    roste.rotate_residual(model, 42)
    dec = model.get_decoder()
    attn, mlp = dec.layers[0].self_attn, dec.layers[0].mlp
    with torch.no_grad():
        mlp.up_proj.weight[5] *= 100
        mlp.down_proj.weight[:, 5] /= 100
    roste.quantize_model(model, {**FULL, "w_bits": 4, "a_bits": 4, "kv_bits": 4, "w_clip": 0.95, "a_clip": 0.95, "kv_clip": 0.95})
    seen = collections.defaultdict(list)
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: seen[name].append(a[0].detach()))
             for name, m in (("down", mlp.down_proj), ("o", attn.o_proj))]
    hooks += [m.register_forward_hook(lambda m, a, out, name=name: seen[name].append(out.detach()))
              for name, m in (("k", attn.k_proj), ("v", attn.v_proj))]
    config, logs = roste.search_rotations(model, [batch])
    for hook in hooks:
        hook.remove()
    off, on = logs
    assert config[0]["R4"] and on[(0, "R4")] < off[(0, "R4")] / 2
    assert config == roste.select_rotations(off, on)
    assert all(config[layer][kind] == (on[(layer, kind)] < off[(layer, kind)]) for layer, kind in off)
    mse = lambda a, b: (a - b).pow(2).mean().item()
    q = lambda t: official_quantize(t, 4, False, 0.95)
    err = lambda w, x: mse(q(w), w) + mse(q(x), x)
    heads = lambda t: t.view(*t.shape[:2], -1, 32).transpose(1, 2)
    cos, sin = (c[:, None] for c in dec.rotary_emb(seen["k"][0], torch.arange(batch["input_ids"].shape[1])[None]))
    rope = lambda t: t * cos + torch.cat((-t[..., 16:], t[..., :16]), -1) * sin
    with torch.no_grad():
        for i, rotated in enumerate((False, True)):  # the first forward has R2-R4 off, the second on
            h = walsh(32) if rotated else torch.eye(32, dtype=torch.float64)
            h, h4 = h.float(), (walsh(512) if rotated else torch.eye(512, dtype=torch.float64)).float()
            w_o = (attn.o_proj.weight.view(-1, 8, 32) @ h).flatten(1)
            key, value = rope(heads(seen["k"][i])) @ h, heads(seen["v"][i]) @ h
            direct = {(0, "R4"): err(mlp.down_proj.weight @ h4, seen["down"][i] @ h4),
                      (0, "R2"): err(w_o, seen["o"][i]) + mse(q(value), value), (0, "R3"): mse(q(key), key)}
            assert {k: logs[i][k] for k in direct} == pytest.approx(direct, rel=1e-4), rotated


def test_prepare_searches_under_the_official_quantizer_then_trains_under_the_recipes(monkeypatch):
    """--search_quantizer symmetric (default): during the search every linear and the KV cache quantize symmetric,
    clip 1, at the training bits (the official search); then the training quantizer (default asymmetric, clip 0.95,
    the recipes') and the search's choice are installed and recorded. train: the search uses the training quantizer.
    The search's input: --search_batches random (default) or official."""
    _, tok = common.load_model(BASE)
    train, _ = common.load_sft_data(roste.Args().dataset, tok, 512, limit=8)
    seen, chosen = [], {i: {"R2": i == 0, "R3": i != 1, "R4": i > 1} for i in range(4)}

    def search(model, batches, decimals):  # records what the search would see; its own tests are above
        layer = model.get_decoder().layers[2]
        seen.append(((layer.self_attn.q_proj.w_quant, layer.mlp.down_proj.a_quant, layer.self_attn.kv_quant),
                     [b["input_ids"] for b in batches]))
        return chosen, [{}, {}]
    monkeypatch.setattr(roste, "search_rotations", search)
    recipe, longest = roste.Quantizer(4, False, 0.95), max(len(train[i]["input_ids"]) for i in random.Random(0).sample(range(8), 4))
    for kw, searched, shape in [({}, roste.Quantizer(4, True, 1.0), (4, longest)),
                                (dict(search_quantizer="train", search_batches="official"), recipe, (4, 512))]:
        model, _ = common.load_model(BASE)
        assert roste.prepare(model, train, roste.Args(search_samples=4, **kw), tok) == chosen
        assert seen[-1][0] == (searched,) * 3 and [tuple(b.shape) for b in seen[-1][1]] == [shape]
        for i, layer in enumerate(model.get_decoder().layers):
            assert (layer.self_attn.q_proj.w_quant, layer.mlp.down_proj.a_quant, layer.self_attn.kv_quant) == (recipe,) * 3
            assert (layer.self_attn.rotate_v, layer.self_attn.rotate_qk, bool(layer.mlp.down_proj.rotate_block)) == \
                tuple(chosen[i][k] for k in roste.ROTATIONS)
        assert model.config.roste["layers"] == {str(i): c for i, c in chosen.items()} and model.config.roste["w_clip"] == 0.95
    assert torch.equal(seen[1][1][0], roste.make_search_batches(train, roste.Args(search_batches="official", search_samples=4), tok, "cpu")[0]["input_ids"])


def test_official_search_batches_are_the_first_prompts_left_padded_with_eos():
    """rotate_model_r234_quant_error.py l.18-45: the first N prompts (text alone, no chat template), cut to 512 tokens,
    left-padded to 512 with eos; and the search's mean over equal-shape batches is the one-forward mean."""
    model, tok = common.load_model(BASE)
    train, _ = common.load_sft_data(roste.Args().dataset, tok, 512, limit=20)
    batches = roste.make_search_batches(train, roste.Args(search_batches="official", search_samples=20), tok, "cpu")
    assert [tuple(b["input_ids"].shape) for b in batches] == [(16, 512), (4, 512)]
    ids, mask = (torch.cat([b[k] for b in batches]) for k in ("input_ids", "attention_mask"))
    for i in range(20):
        tokens = tok(train[i]["messages"][0]["content"])["input_ids"]
        pad = 512 - len(tokens)
        assert ids[i, pad:].tolist() == tokens and (ids[i, :pad] == tok.eos_token_id).all()
        assert mask[i, pad:].all() and not mask[i, :pad].any()
    roste.fuse_norms(model)
    roste.rotate_residual(model, 42)
    roste.quantize_model(model, {**FULL, "w_bits": 4, "a_bits": 4, "kv_bits": 4})
    one = {"input_ids": ids[:2, -64:], "attention_mask": mask[:2, -64:]}  # equal shapes, left padding kept
    halves = [{k: v[s] for k, v in one.items()} for s in (slice(0, 1), slice(1, 2))]
    (_, whole), (_, split) = roste.search_rotations(model, [one]), roste.search_rotations(model, halves)
    assert whole[0] == pytest.approx(split[0], rel=1e-5) and whole[1] == pytest.approx(split[1], rel=1e-5)
    assert whole[0] != pytest.approx({k: 2 * v for k, v in split[0].items()}, rel=1e-2)  # a mean, not a sum


def test_bad_method_flags_fail_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    for kw, message in [(dict(search_quantizer="asym"), "--search_quantizer must be symmetric or train, got 'asym'"),
                        (dict(search_batches="first"), "--search_batches must be random or official, got 'first'"),
                        (dict(w_clip=0.0), "--w_clip must be in (0, 1], got 0.0"),
                        (dict(kv_clip=1.5), "--kv_clip must be in (0, 1], got 1.5"),
                        (dict(a_bits=1), "--a_bits must be >= 2 (16 or more = off), got 1"),
                        (dict(search_samples=0), "--search_samples must be >= 1, got 0"),
                        (dict(search_decimals=-2), "--search_decimals must be >= 0, or -1 for exact numbers, got -2"),
                        (dict(rotation="r2"), "--rotation 'r2': expected adaptive, all, r1 or none"),
                        (dict(rotation="none", search_batches="official"),
                         "--search_batches sets the rotation search, which only --rotation adaptive runs (got --rotation none)")]:
        with pytest.raises(common.UsageError, match=re.escape(message)):
            roste.main(roste.Args(output_dir=str(out), device="cpu", **kw))
    assert not out.exists()
    roste.check_method_args(roste.Args(rotation="none", search_samples=128))  # a default value is not a setting


def test_16_bits_without_rotation_is_an_sft_py_step(batch):
    """The same loss and gradients as sft.py's compute_loss (the quantizers and the attention function are in the
    path, at 16 bits they are identities)."""
    import sft
    ours, tok = common.load_model(BASE)
    train, _ = common.load_sft_data(roste.Args().dataset, tok, 512, limit=2)  # the start-up invariance check's input
    roste.prepare(ours, train, roste.Args(w_bits=16, a_bits=16, kv_bits=16, rotation="none"), tok)
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
                roste.prepare(model, train, args, tok)
            assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
            continue
        roste.prepare(model, train, args, tok)
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
        roste.prepare(model, train, roste.Args(w_bits=16, a_bits=16, kv_bits=16), tok)
    diff, scale = (float(v) for v in re.search(r"by ([\d.e+-]+) \(max \|logit\| ([\d.e+-]+)", str(refusal.value)).groups())
    assert diff == pytest.approx(scale, rel=1e-3) and scale > 1 and not searched  # the head was zeroed: logits 0
    monkeypatch.undo()
    model, _ = common.load_model(str(tmp_path / "gemma"))  # and the correct fold passes the same check
    roste.prepare(model, train, roste.Args(w_bits=16, a_bits=16, kv_bits=16, rotation="all"), tok)
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
