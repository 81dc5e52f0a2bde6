"""The architecture matrix: each of the 9 scripts on tiny random-init models of 13 architectures (tests/archs.py).

A cell either trains correctly or refuses before training with one line naming what is missing.
Training correctly: 2 steps whose first loss equals a direct computation from the model's own
`forward(...).logits` on the first batch (cross-entropy, or the method's formula: DFT's -p log p for ASFT at step 1,
whose KL anchor is 0 there; the logged `ce` for OTR; the last exit's `ce` for SoFT; RoSTE at 16 bits, where its
surgery is exact), and a saved model that `from_pretrained` loads and that generates. merge.py: a linear merge of two
models of the architecture equals the elementwise mean, loads and generates. Runs in-process (each script's `main`).
"""
import contextlib
import importlib
import io
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import archs
import common

WORLD = common.WORLD_DIR
SCRIPTS = ["sft", "s3ft", "fait", "otr", "asft", "drift", "sorted_ft", "roste", "merge"]
# (script, arch) -> a phrase of the one-line refusal. Everything else must train correctly.
REFUSALS = {
    ("roste", "gemma2"): "R1 cannot pass a post-norm", ("roste", "gemma3"): "R1 cannot pass a post-norm",
    ("roste", "olmo2"): "R1 cannot pass a post-norm", ("roste", "cohere"): "(CohereLayerNorm) is neither",
    ("roste", "phi3"): "has no self_attn.q_proj Linear", ("roste", "gpt2"): "GPT2Model has no `layers`",
    ("roste", "qwen2_moe"): "has no mlp.gate_proj Linear",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Width-64 models: threads cost more than they give (and much more on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Two random-init models per architecture (seeds 0 and 1) and 16-sample math and code training files."""
    root = tmp_path_factory.mktemp("zoo")
    models = {arch: (archs.make(arch, root / arch), archs.make(arch, root / f"{arch}_b", seed=1)) for arch in archs.ARCHS}
    files = {}
    for task in ("math", "code"):
        with open(os.path.join(WORLD, "data", task, "train.jsonl")) as f:
            (root / f"{task}16.jsonl").write_text("".join(next(f) for _ in range(16)))
        files[task] = str(root / f"{task}16.jsonl")
    return models, files


def script_args(script, arch, zoo, out):
    models, files = zoo
    model, other = models[arch]
    module = importlib.import_module(script)
    test_set = os.path.join(WORLD, "data", "code" if script == "fait" else "math", "test.jsonl")
    if script == "merge":
        return module, module.Args(method="linear", models=f"{model},{other}", output_dir=str(out), eval_datasets="",
                                   device="cpu")
    kw = dict(model=model, dataset=files["code" if script == "fait" else "math"], eval_datasets="", output_dir=str(out),
              steps=2, batch_size=4, lr=1e-3, save_every=0, compile=False, eval_before=False, device="cpu")
    kw |= {"s3ft": dict(gen_max_new_tokens=1, cache_dir=str(out / "cache")),
           "fait": dict(alpha=0.0, beta=0.0, num_samples=1, gen_max_new_tokens=16, cache_dir=str(out / "cache")),
           "otr": dict(samples=8),
           "drift": dict(reasoning_model=other),
           "sorted_ft": dict(exits="1,2", eval_datasets=f"math={test_set}", eval_samples=2, max_new_tokens=24,
                             early_exit_prompts=2),
           "roste": dict(w_bits=16, a_bits=16, kv_bits=16, search_samples=4)}.get(script, {})
    return module, module.Args(**kw)


def first_batch_logits(model_dir, args):
    """The starting model's own logits on step 1's global batch, its targets and loss-token mask, and for a mixture
    of experts the model's own router term coef * aux_loss."""
    model, tokenizer = common.load_model(model_dir)
    train, _ = common.load_sft_data(args.dataset, tokenizer, args.max_length, args.overlong)
    ids = common.batch_schedule([len(e["input_ids"]) for e in train], args.batch_size, args.steps, args.seed)[0]
    batch = common.collate(train, sorted(ids), tokenizer.pad_token_id, "cpu")
    moe = getattr(model.config, "router_aux_loss_coef", 0)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **({"output_router_logits": True} if moe else {}))
    router = moe * out.aux_loss.item() if moe else 0.0  # the model's own `loss += coef * aux_loss`
    return out.logits.double(), batch["targets"], batch["targets"] != common.IGNORE_INDEX, router


def direct_first_loss(script, model_dir, args) -> tuple:
    """(metric name, value) that the script's first step must log, from the model's own logits."""
    logits, targets, mask, router = first_batch_logits(model_dir, args)
    logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][mask]
    ce = -logp.mean().item()
    if script == "asft":  # DFT term; KL(pi_ref || pi_theta) = 0 at the start
        return "loss", -(logp.exp() * logp).mean().item() + router
    if script == "otr":
        return "method/ce", ce
    if script == "sorted_ft":
        return f"method/exit{args.exits.split(',')[-1]}/ce", ce
    return "loss", ce + router


def generates(final):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tokenizer = AutoModelForCausalLM.from_pretrained(final), AutoTokenizer.from_pretrained(final)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out.shape[1] > ids["input_ids"].shape[1]


@pytest.mark.parametrize("arch", list(archs.ARCHS))
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_trains_correctly_or_refuses(script, arch, zoo, tmp_path):
    module, args = script_args(script, arch, zoo, tmp_path / "out")
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            module.main(args)
    except common.UsageError as err:
        message = str(err)
        assert (script, arch) in REFUSALS, f"unexpected refusal: {message}"
        assert REFUSALS[script, arch] in message and "\n" not in message
        logged = []
        if os.path.isfile(tmp_path / "out" / "metrics.jsonl"):
            logged = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
        assert not any("loss" in r for r in logged) and not os.path.exists(tmp_path / "out" / "final")  # before training
        return
    assert (script, arch) not in REFUSALS, "expected a refusal"
    final = os.path.join(tmp_path, "out", "final")
    if script == "merge":
        merged, wa, wb = (load_file(os.path.join(d, "model.safetensors")) for d in (final, *zoo[0][arch]))
        assert merged.keys() == wa.keys()
        for name in merged:
            torch.testing.assert_close(merged[name], (wa[name] + wb[name]) / 2, rtol=1e-6, atol=1e-7, msg=name)
    else:
        records = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
        steps = [r for r in records if "loss" in r and "step" in r]
        assert [r["step"] for r in steps] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
        key, want = direct_first_loss(script, zoo[0][arch][0], args)
        assert steps[0][key] == pytest.approx(want, rel=1e-4), (key, steps[0][key], want)
    assert generates(final)
