"""merge.py: each rule against a slow elementwise computation and its limiting cases (soups of identical models,
SLERP endpoints, TIES at density 1, DARE's expectation and norms, LiNeS at alpha = 1, beta = 0), the greedy soup's
guarantee, streaming from shards, refusals by tensor name, and parity with mergekit when it is installed."""
import json
import math
import os
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import archs
import common
import merge
from scripts import records, run_script

BASE = os.path.join(common.WORLD_DIR, "base")


def make_model(path, tensors=None, shards=1):
    """A copy of the embedded base model with the given tensors (default: the base's), in `shards` files."""
    os.makedirs(path, exist_ok=True)
    for f in os.listdir(BASE):
        if not f.endswith(".safetensors") and os.path.isfile(os.path.join(BASE, f)):
            shutil.copy(os.path.join(BASE, f), path)
    tensors = tensors or load_file(os.path.join(BASE, "model.safetensors"))
    names, index = sorted(tensors), {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        save_file({k: tensors[k].contiguous() for k in names[s::shards]}, os.path.join(path, file), metadata={"format": "pt"})
        index.update({k: file for k in names[s::shards]})
    if shards > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": index}, f)
    return str(path)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """The base and three 'fine-tuned' variants (base + a random task vector), one of them sharded."""
    root = tmp_path_factory.mktemp("models")
    base = load_file(os.path.join(BASE, "model.safetensors"))
    paths = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        tuned = {k: v + 0.02 * v.std() * torch.randn(v.shape, generator=g) for k, v in base.items()}
        paths.append(make_model(root / f"ft{i}", tuned, shards=2 if i == 1 else 1))
    return BASE, paths


def run_merge(tmp_path, method, models, base="", **kw):
    """merge.merge into fresh float32 tensors (what merge.py writes into the output model)."""
    args = merge.Args(method=method, models=",".join(models), base=base, **kw)
    checkpoints = [merge.Checkpoint(p) for p in models]
    out = {k: torch.empty(checkpoints[0].shape(k)) for k in checkpoints[0].where}
    weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * len(models)
    merge.merge(args, checkpoints, merge.Checkpoint(base) if base else None, weights, out)
    return out


def tensors(path):
    c = merge.Checkpoint(path)
    return {k: c.get(k) for k in c.where}


def test_uniform_soup_of_identical_models_is_the_model_and_linear_matches_the_formula(tmp_path, finetuned):
    base, (a, b, c) = finetuned
    out = run_merge(tmp_path, "uniform", [a, a, a])
    ta = tensors(a)
    assert all(torch.allclose(out[k], ta[k], atol=1e-6) for k in ta)
    out = run_merge(tmp_path, "linear", [a, b, c], weights="1,2,0.5")
    tb, tc = tensors(b), tensors(c)
    for k in ta:
        torch.testing.assert_close(out[k], (ta[k] + 2 * tb[k] + 0.5 * tc[k]) / 3.5, atol=1e-6, rtol=1e-6)
    swapped, ordered = run_merge(tmp_path, "uniform", [c, a, b]), run_merge(tmp_path, "uniform", [a, b, c])
    assert all(torch.allclose(swapped[k], ordered[k], atol=1e-6) for k in ta)


def slow_slerp(a, b, t):
    a, b = a.double().flatten().tolist(), b.double().flatten().tolist()
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    d = sum(x * y for x, y in zip(a, b)) / (na * nb)
    if abs(d) > 0.9995:
        return [(1 - t) * x + t * y for x, y in zip(a, b)]
    om = math.acos(d)
    return [math.sin((1 - t) * om) / math.sin(om) * x + math.sin(t * om) / math.sin(om) * y for x, y in zip(a, b)]


def test_slerp_formula_endpoints_symmetry_and_colinear_fallback():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 9, generator=g, dtype=torch.float64), torch.randn(7, 9, generator=g, dtype=torch.float64)
    for t in (0.0, 0.3, 0.5, 1.0):
        torch.testing.assert_close(merge.slerp(a, b, t).flatten(), torch.tensor(slow_slerp(a, b, t), dtype=torch.float64))
    torch.testing.assert_close(merge.slerp(a, b, 0.0), a)
    torch.testing.assert_close(merge.slerp(a, b, 1.0), b)
    torch.testing.assert_close(merge.slerp(a, b, 0.3), merge.slerp(b, a, 0.7))
    unit_b = b / b.norm() * a.norm()  # equal norms: the norm is kept all along the arc
    assert all(math.isclose(merge.slerp(a, unit_b, t).norm().item(), a.norm().item(), rel_tol=1e-9) for t in (0.2, 0.5, 0.9))
    torch.testing.assert_close(merge.slerp(a, 3 * a, 0.25), 0.75 * a + 0.75 * a)  # parallel: lerp
    torch.testing.assert_close(merge.slerp(a, -a, 0.5), torch.zeros_like(a))  # anti-parallel: lerp too


def slow_ties(taus, weights, density, normalize):
    """TIES elementwise in Python: per-tensor top-k trim, weighted sign vote (0 sum -> +), disjoint (weighted) mean."""
    flat = [t.flatten().tolist() for t in taus]
    k = int(density * len(flat[0]))
    trimmed = []
    for f in flat:
        keep = set(sorted(range(len(f)), key=lambda j: -abs(f[j]))[:k]) if density < 1 else set(range(len(f)))
        trimmed.append([v if j in keep else 0.0 for j, v in enumerate(f)])
    out = []
    for j in range(len(flat[0])):
        u = [w * t[j] for w, t in zip(weights, trimmed)]
        sign = 1.0 if sum(u) >= 0 else -1.0
        agree = [i for i, v in enumerate(u) if v != 0 and math.copysign(1, v) == sign]
        num, den = sum(u[i] for i in agree), sum(weights[i] for i in agree)
        out.append(num / (den or 1.0) if normalize else num)
    return torch.tensor(out, dtype=torch.float64).view(taus[0].shape)


def test_ties_matches_the_slow_elementwise_rule_and_reduces_to_task_arithmetic():
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(6, 10, generator=g, dtype=torch.float64) for _ in range(3)]
    base = torch.randn(6, 10, generator=g, dtype=torch.float64)
    for density, weights, normalize in [(0.3, [1.0, 1.0, 1.0], True), (0.5, [1.0, 0.5, 2.0], True), (1.0, [1.0, 1.0, 1.0], False)]:
        trimmed = [merge.trim(t, density) for t in taus]
        assert all(int((t != 0).sum()) == int(density * 60) for t in trimmed)  # exactly k kept per tensor
        torch.testing.assert_close(merge.ties(base, trimmed, weights, 1.0, normalize), base + slow_ties(taus, weights, density, normalize))
    # density 1 and no sign conflict: the disjoint sum is task arithmetic, the disjoint mean is its mean
    same = [t.abs() for t in taus]
    torch.testing.assert_close(merge.ties(base, same, [1.0] * 3, 0.7, normalize=False), merge.task_arithmetic(base, same, [1.0] * 3, 0.7))
    torch.testing.assert_close(merge.ties(base, same, [1.0] * 3, 1.0, normalize=True), base + sum(same) / 3)
    # the global trim (TIES reference code): one threshold for the whole model
    t = taus[0]
    assert int((merge.trim(t, 0.25, threshold=t.abs().flatten().sort().values[-15]) != 0).sum()) == 15
    # bf16-like ties at the threshold: exactly k kept, never a smaller magnitude over a larger one
    tied = torch.randint(-6, 7, (64,), generator=g).double() * 2 ** -7
    kept = merge.trim(tied, 0.25) != 0
    assert int(kept.sum()) == 16 and tied[kept].abs().min() >= tied[~kept].abs().max()


def test_kth_largest_streams_what_kthvalue_finds_on_the_concatenation():
    g = torch.Generator().manual_seed(3)
    for trial in range(4):  # magnitudes from 1e-6 to 1e3, with and without many ties, and zeros
        parts = [torch.rand(int(torch.randint(1, 200, (1,), generator=g)), generator=g) * 10.0 ** (3 * trial - 6) for _ in range(3)]
        if trial % 2:
            parts = [(p * 2 ** 7).floor() * 2 ** -7 for p in parts]
        x = torch.cat(parts)
        for k in (1, 2, x.numel() // 3 + 1, x.numel()):
            assert torch.equal(merge.kth_largest(lambda: iter(parts), k), x.kthvalue(x.numel() - k + 1).values)


def test_global_trim_is_the_reference_codes_topk_values_mask(tmp_path, tiny_gpt2):
    """--ties_trim global against the reference topk_values_mask (LiNeS src/utils/utils.py L287-309, re-typed):
    kthvalue of the flattened |tau| at n - int(n K), keep |tau| >= it."""
    base, a, b = tiny_gpt2
    tb, ta, tbb = tensors(base), tensors(a), tensors(b)
    names = sorted(tb)
    flat = torch.stack([torch.cat([(t[k] - tb[k]).flatten() for k in names]) for t in (ta, tbb)])
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * 0.3), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    out = run_merge(tmp_path, "ties", [a, b], base, density=0.3, ties_trim="global", normalize="false")
    start = 0
    for k in names:
        n = tb[k].numel()
        want = merge.ties(tb[k], [trimmed[i, start:start + n].view_as(tb[k]) for i in range(2)], [1.0, 1.0], 1.0, False)
        assert torch.equal(out[k], want), k
        start += n


def test_checkpoint_reads_the_same_bytes_as_safetensors(tmp_path, finetuned):
    _, (_, sharded, _) = finetuned
    t = {k: v.to(torch.bfloat16) if i % 2 else v for i, (k, v) in enumerate(sorted(load_file(os.path.join(BASE, "model.safetensors")).items()))}
    path = make_model(tmp_path / "bf16", t, shards=3)
    for p in (path, sharded):
        c, want = merge.Checkpoint(p), {}
        for f in os.listdir(p):
            if f.endswith(".safetensors"):
                want.update(load_file(os.path.join(p, f)))
        assert set(c.where) == set(want) and all(torch.equal(c.get(k), want[k].float()) for k in want)


def test_dare_identity_expectation_norm_and_seed():
    g = torch.Generator().manual_seed(2)
    tau = torch.randn(200, 50, generator=g, dtype=torch.float64)
    assert torch.equal(merge.dare(tau, 1.0, g), tau)
    dropped = merge.dare(tau, 0.1, torch.Generator().manual_seed(0))
    assert abs((dropped != 0).double().mean().item() - 0.1) < 0.01  # binomial: std 0.002
    torch.testing.assert_close(dropped[dropped != 0], tau[dropped != 0] / 0.1)
    mean = sum(merge.dare(tau, 0.5, torch.Generator().manual_seed(s)) for s in range(400)) / 400
    assert (mean - tau).abs().mean() < 0.06 * tau.abs().mean()  # E[dare(tau)] = tau (inv_p)
    l1 = merge.dare(tau, 0.3, torch.Generator().manual_seed(1), rescale="l1")
    assert math.isclose(l1.abs().sum().item(), tau.abs().sum().item(), rel_tol=1e-9)
    assert torch.equal(merge.dare(tau, 0.3, torch.Generator().manual_seed(5)), merge.dare(tau, 0.3, torch.Generator().manual_seed(5)))


def test_lines_scales_the_task_vector_linearly_with_depth(tmp_path, finetuned):
    base, (a, _, _) = finetuned
    tb, ta = tensors(base), tensors(a)
    assert all(torch.allclose(v, ta[k], atol=1e-6) for k, v in run_merge(tmp_path, "lines", [a], base, alpha=1.0, beta=0.0).items() if k in ta)
    assert all(torch.allclose(v, tb[k], atol=1e-6) for k, v in run_merge(tmp_path, "lines", [a], base, alpha=0.0, beta=0.0).items() if k in tb)
    out = run_merge(tmp_path, "lines", [a], base, alpha=0.2)  # single-task: beta = 1 - alpha
    for k in tb:
        layer = k.split(".")[2] if k.startswith("model.layers.") else None
        scale = 0.2 + 0.8 * int(layer) / 3 if layer else 0.2
        torch.testing.assert_close(out[k], tb[k] + scale * (ta[k] - tb[k]), atol=1e-6, rtol=1e-6)
    assert merge.lines_scale("model.layers.3.mlp.up_proj.weight", 4, 0.2, 0.8) == 1.0
    assert merge.lines_scale("model.layers.11.mlp.0.weight", 12, 0.0, 1.0) == 1.0  # not block 1 (substring trap)
    assert merge.lines_scale("model.norm.weight", 4, 0.2, 0.8) == 0.2


def official_lines_alpha(taus, merged):
    """The official multi-task alpha (LiNeS src/eval/aggregation.py L177-178, src/eval/eval.py L119), on flat vectors."""
    flat = torch.stack([torch.cat([t[k].flatten() for k in sorted(t)]) for t in taus])
    merged = torch.cat([merged[k].flatten() for k in sorted(merged)])
    return (flat.sum(dim=0).abs().sum().item() / merged.abs().sum().item()) * 1 / len(taus)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """Three tiny GPT-2 models (tests/archs.py, 2 blocks transformer.h.<i>.): a base and two others."""
    root = tmp_path_factory.mktemp("gpt2")
    return [archs.make("gpt2", root / f"g{seed}", seed) for seed in range(3)]


def test_lines_multi_task_alpha_is_the_official_norm_ratio_over_T(tmp_path, tiny_gpt2):
    base, *paths = tiny_gpt2
    tb, tf = tensors(base), [tensors(p) for p in paths]
    taus = [{k: t[k].double() - tb[k].double() for k in tb} for t in tf]
    for weights in ([1.0, 1.0], [1.0, 0.5]):
        merged = {k: sum(w * t[k] for w, t in zip(weights, taus)) for k in tb}
        alpha = official_lines_alpha(taus, merged)
        if weights == [1.0, 1.0]:
            assert alpha == 1 / 2 and merge.lines_alpha(1.0, 1.0, 2) == 1 / 2  # the summed merge: exactly 1/T
        out = run_merge(tmp_path, "lines", paths, base, weights=",".join(map(str, weights)), beta=0.3)
        for k in tb:  # block 0 and the non-block tensors get alpha, block 1 (the last) alpha + beta
            scale = alpha + 0.3 * (k.startswith("transformer.h.1."))
            torch.testing.assert_close(out[k].double(), tb[k].double() + scale * merged[k], atol=1e-6, rtol=1e-5, msg=k)


def test_block_of_places_the_common_layouts_and_refuses_the_rest():
    placed = {"model.layers.7.self_attn.q_proj.weight": 7, "transformer.h.3.attn.c_attn.weight": 3,
              "transformer.blocks.2.ffn.up_proj.weight": 2, "gpt_neox.layers.5.mlp.dense_h_to_4h.bias": 5,
              "model.decoder.layers.1.fc1.weight": 1, "model.language_model.layers.0.mlp.up_proj.weight": 0,
              "model.layers.11.mlp.0.weight": 11, "model.embed_tokens.weight": None, "transformer.wte.weight": None,
              "transformer.wpe.weight": None, "transformer.ln_f.weight": None, "transformer.norm_f.weight": None,
              "model.norm.weight": None, "lm_head.weight": None, "embed_out.weight": None,
              "transformer.word_embeddings_layernorm.bias": None, "model.decoder.final_layer_norm.weight": None}
    assert {name: merge.block_of(name, 12) for name in placed} == placed
    for name in ("model.vision_tower.encoder.layers.3.mlp.fc1.weight", "model.layers.12.mlp.up_proj.weight",
                 "transformer.h.3", "encoder.block.0.layer.0.SelfAttention.q.weight", "model.mtp.norm.weight"):
        with pytest.raises(common.UsageError, match=f"tensor {name} is neither in one of the 12 decoder blocks"):
            merge.block_of(name, 12)


def test_greedy_soup_keeps_only_improvements_and_is_never_worse_than_its_best_ingredient():
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        scores = torch.rand(5, generator=g).tolist()
        soup_value = {}
        kept, best, log = merge.greedy_soup(scores, lambda idx: soup_value.setdefault(tuple(idx), torch.rand(1, generator=g).item()))
        assert kept[0] == max(range(5), key=lambda i: scores[i]) and best >= max(scores)
        accepted = [e["candidate_score"] for e in log if e["accepted"]]
        assert accepted == sorted(accepted) and all(s > max(scores) for s in accepted)
        assert all(not e["accepted"] for e in log if e["candidate_score"] <= max([max(scores)] + [a for a in accepted if a < e["candidate_score"]]))
    assert merge.greedy_soup([0.5, 0.5], lambda idx: 0.5)[0] == [1]  # equal is not better (official `>`)
    # ties: the official stable ascending sort, reversed, puts the later of two equal scores first
    kept, _, log = merge.greedy_soup([0.40, 0.415, 0.415, 0.38], lambda idx: 0.0)
    assert kept == [2] and [e["ingredient"] for e in log] == [1, 0, 3]


def test_greedy_soup_script_writes_a_loadable_model_and_logs_each_decision(tmp_path, finetuned):
    base, paths = finetuned
    out = tmp_path / "greedy"
    run_script("merge.py", out, "--method", "greedy", "--models", ",".join(paths), "--greedy_metric", "loss",
               "--select_samples", "8", "--eval_datasets", "")
    rec = records(out)
    ingredients = [r["select/loss"] for r in rec if r.get("event") == "ingredient"]
    soup = next(r for r in rec if r.get("event") == "greedy_soup")
    assert len(ingredients) == 3 and soup["select/loss"] <= min(ingredients)
    assert soup["kept"][0] == paths[ingredients.index(min(ingredients))]  # the best ingredient first
    saved = transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    want = run_merge(tmp_path, "uniform", soup["kept"])
    assert all(torch.allclose(saved.state_dict()[k], v) for k, v in want.items())
    assert os.path.isfile(out / "final" / "tokenizer.json") and saved.config.merge["method"] == "greedy"


def test_mismatched_inputs_are_refused_by_tensor_name_and_nothing_is_written(tmp_path, finetuned):
    base, (a, _, _) = finetuned
    t = load_file(os.path.join(BASE, "model.safetensors"))
    wrong = make_model(tmp_path / "wrong_shape", {**t, "model.layers.1.mlp.up_proj.weight": torch.zeros(3, 3)})
    missing = make_model(tmp_path / "missing", {k: v for k, v in t.items() if k != "model.norm.weight"})
    for bad, message in [(wrong, "model.layers.1.mlp.up_proj.weight: shape"), (missing, "tensor model.norm.weight is in")]:
        proc = run_script("merge.py", tmp_path / "out", "--models", f"{a},{bad}", check=False, in_process=True)
        assert proc.returncode != 0 and message in proc.stderr and not os.path.exists(tmp_path / "out" / "final")
    other_vocab = make_model(tmp_path / "tok")
    with open(os.path.join(other_vocab, "tokenizer.json")) as f:
        tok = json.load(f)
    tok["added_tokens"][-1]["content"] = "<|renamed|>"
    with open(os.path.join(other_vocab, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    with pytest.raises(common.UsageError, match="tokenizers differ"):
        merge.check_compatible([merge.Checkpoint(a), merge.Checkpoint(other_vocab)])
    with pytest.raises(common.UsageError, match="needs --base"):
        merge.main(merge.Args(method="ties", models=a, output_dir=str(tmp_path / "o")))


def test_method_flags_are_checked_before_anything_is_loaded_or_written(tmp_path, finetuned):
    base, (a, _, _) = finetuned
    out = str(tmp_path / "o")
    for flags, message in [(dict(method="uniform", alpha=0.3), "--alpha is LiNeS' .*not --method uniform's"),
                           (dict(method="lines", beta=-0.5), "--beta must be >= 0, or -1 for its default, got -0.5"),
                           (dict(method="lines", scaling=0.5), "leave --scaling at 1 and --normalize at auto"),
                           (dict(method="lines", normalize="true"), "leave --scaling at 1 and --normalize at auto"),
                           (dict(method="ties", ties_trim="Global"), "--ties_trim must be one of tensor, global, got 'Global'"),
                           (dict(method="greedy", greedy_metric="acc"), "--greedy_metric must be one of accuracy, loss")]:
        with pytest.raises(common.UsageError, match=message):
            merge.main(merge.Args(models="/nonexistent", base="/nonexistent", output_dir=out, **flags))
    t = load_file(os.path.join(BASE, "model.safetensors"))  # LiNeS cannot place a vision tower's layer: refused
    odd = make_model(tmp_path / "odd", {**t, "model.vision_tower.layers.0.weight": torch.zeros(2)})
    with pytest.raises(common.UsageError, match="tensor model.vision_tower.layers.0.weight is neither in one of the 4"):
        merge.main(merge.Args(method="lines", models=odd, base=odd, output_dir=out, eval_datasets=""))
    assert not os.path.exists(out)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """Tiny Qwen2-MoE models (tests/archs.py): a base and two 'fine-tuned' ones. transformers 5 keeps each layer's
    experts fused in memory (mlp.experts.gate_up_proj, 3-D) and writes them per expert (experts.<e>.gate_proj.weight)."""
    root = tmp_path_factory.mktemp("moe")
    return [archs.make("qwen2_moe", root / f"m{seed}", seed) for seed in range(3)]


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_moe_merge_is_elementwise_on_the_saved_tensors_and_loads_fused(tmp_path, moe, method):
    base, a, b = moe
    merge.main(merge.Args(method=method, models=f"{a},{b}", base=base if method == "ties" else "", eval_datasets="",
                          output_dir=str(tmp_path), density=0.5))
    saved = load_file(os.path.join(tmp_path, "final", "model.safetensors"))
    want = run_merge(tmp_path, method, [a, b], base if method == "ties" else "", density=0.5)  # per-expert, on-disk names
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in saved and set(saved) == set(want)
    assert all(torch.equal(saved[k], want[k]) for k in want)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    if method == "linear":  # in memory: the fused experts (and everything else) are the average of the inputs'
        inputs = [transformers.AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (a, b)]
        assert "model.layers.1.mlp.experts.gate_up_proj" in loaded
        for k in loaded:
            torch.testing.assert_close(loaded[k], (inputs[0][k] + inputs[1][k]) / 2, atol=1e-6, rtol=1e-6, msg=k)


def test_gpt2_merges_with_its_own_config_names_and_lines_scales_its_h_blocks(tmp_path):
    """GPT-2's config has n_layer (read through the config object as num_hidden_layers) and blocks transformer.h.<l>."""
    base, ft = archs.make("gpt2", tmp_path / "base", 0), archs.make("gpt2", tmp_path / "ft", 1)
    merge.main(merge.Args(method="lines", models=ft, base=base, alpha=0.25, eval_datasets="", output_dir=str(tmp_path / "out")))
    saved = load_file(os.path.join(tmp_path, "out", "final", "model.safetensors"))
    tb, tf = load_file(os.path.join(base, "model.safetensors")), load_file(os.path.join(ft, "model.safetensors"))
    for k in tb:  # L = 2: block 0 gets alpha, block 1 alpha + beta = 1, embeddings and ln_f alpha
        scale = {"transformer.h.0.": 0.25, "transformer.h.1.": 1.0}.get(k[:16], 0.25)
        torch.testing.assert_close(saved[k], tb[k] + scale * (tf[k] - tb[k]), atol=1e-6, rtol=1e-6, msg=k)
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final").config.merge["method"] == "lines"
    deeper = tmp_path / "deeper"
    shutil.copytree(ft, deeper)
    with open(deeper / "config.json") as f:
        config = json.load(f)
    with open(deeper / "config.json", "w") as f:
        json.dump({**config, "n_layer": 3}, f)
    with pytest.raises(common.UsageError, match=r"config num_hidden_layers differs: 2 in .*, 3 in"):
        merge.check_compatible([merge.Checkpoint(ft), merge.Checkpoint(str(deeper))])


MERGEKIT = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
REPLAY = """import hashlib, sys, torch
import mergekit.sparsify as sparsify
masks = torch.load(sys.argv[1])
def replayed(tensor, density, rescale_norm=None):  # merge.py's mask for this delta, found by its bytes
    mask = masks[hashlib.sha256(tensor.float().contiguous().numpy().tobytes()).hexdigest()]
    return sparsify.rescaled_masked_tensor(tensor, mask.to(tensor.dtype), rescale_norm)
sparsify.bernoulli = replayed
from mergekit.scripts.run_yaml import main
sys.argv = ["mergekit-yaml"] + sys.argv[2:]
main()
"""


def dare_masks(models, base, density, seed=0):
    """merge.py's DARE masks (the generator's order: sorted tensor names, then models), keyed by the delta's bytes."""
    import hashlib
    generator, tb, inputs, masks = torch.Generator().manual_seed(seed), tensors(base), [tensors(m) for m in models], {}
    for k in sorted(tb):
        for t in inputs:
            delta = (t[k] - tb[k]).contiguous()
            masks[hashlib.sha256(delta.numpy().tobytes()).hexdigest()] = (torch.rand(delta.shape, generator=generator) < density).float()
    return masks


@pytest.mark.skipif(not MERGEKIT, reason="mergekit not installed (mergekit-yaml not on PATH, MERGEKIT_YAML not set)")
@pytest.mark.parametrize("method,extra", [("linear", {}), ("task_arithmetic", {}), ("ties", {"density": 0.5}),
                                          ("ties_bf16", {"density": 0.5}), ("slerp", {"t": 0.3}),
                                          ("dare_linear", {"density": 1.0}), ("dare_ties", {"density": 1.0}),
                                          ("dare_linear", {"density": 0.3, "dare_rescale": "l1"}),
                                          ("dare_ties", {"density": 0.3, "dare_rescale": "l1"})])
def test_same_tensors_as_mergekit_bit_for_bit(tmp_path, finetuned, method, extra):
    """mergekit-yaml 0.1.5 with its defaults (float32) against merge.py's rule: every tensor bit-identical. TIES also
    with a bf16 input, whose norm weights tie at the trim threshold (the same argsort keeps the same entries); DARE
    below density 1 with mergekit's bernoulli replaced by merge.py's masks (REPLAY), so all that differs is the RNG."""
    import subprocess
    base, (a, b, c) = finetuned
    if method == "ties_bf16":
        method, t, g = "ties", tensors(a), torch.Generator().manual_seed(9)
        t.update({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in t.items() if k.endswith("norm.weight")})
        a = make_model(tmp_path / "a_bf16", {k: v.to(torch.bfloat16) for k, v in t.items()})  # norms near 1: |tau| ties
    models = [a, b] if method == "slerp" else [a, b, c]
    weights = [1.0, 1.0] if method == "slerp" else [1.0, 0.5, 2.0]
    per_model = {"weight": None} if method == "slerp" else {}
    config = {"merge_method": method, "dtype": "float32",
              "models": [{"model": m, **({} if per_model else {"parameters": {"weight": w, **({"density": extra["density"]} if "density" in extra else {})}})}
                         for m, w in zip(models, weights)]}
    if method == "slerp":
        config.update(base_model=a, parameters={"t": extra["t"]})
    elif method != "linear":
        config["base_model"] = base
    with open(tmp_path / "config.yml", "w") as f:
        json.dump(config, f)  # JSON is YAML
    command = [MERGEKIT]
    if extra.get("density", 1) < 1 and method.startswith("dare"):
        torch.save(dare_masks(models, base, extra["density"]), tmp_path / "masks.pt")
        with open(MERGEKIT) as f:  # the interpreter of mergekit's entry point
            python = f.readline()[2:].strip()
        (tmp_path / "replay.py").write_text(REPLAY)
        command = [python, str(tmp_path / "replay.py"), str(tmp_path / "masks.pt")]
    proc = subprocess.run(command + [str(tmp_path / "config.yml"), str(tmp_path / "mk"), "--no-copy-tokenizer",
                                     "--no-write-model-card", "--random-seed", "0", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = tensors(str(tmp_path / "mk"))
    ours = run_merge(tmp_path, method, models, "" if method in ("linear", "slerp") else base,
                     weights="" if method == "slerp" else ",".join(map(str, weights)), **extra)
    assert set(theirs) == set(ours)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), (k, (ours[k] - theirs[k]).abs().max().item())
