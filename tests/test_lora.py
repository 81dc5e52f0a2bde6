"""LoRA through peft (an optional extra: these tests skip without it): the fused loss on an adapted model equals
peft's own forward, only the adapters train, the merged model is base + (alpha/r) B A, resume is exact, DDP and FSDP2
give one process's gradients, and ASFT's reference is the base with the adapters bypassed."""
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import common
import sft
from scripts import ROOT, losses, records, run_script
from test_train import step_gradients

peft = pytest.importorskip("peft")
BASE = os.path.join(common.WORLD_DIR, "base")
QUICK = ["--steps", "4", "--batch_size", "8", "--eval_datasets", "", "--lr", "1e-2", "--lora_r", "8", "--lora_dropout", "0",
         "--compile", "false"]


def adapted(r=4, targets="all-linear", seed=0):
    """world/base in float64 with LoRA adapters whose B is drawn at random (so that A gets a gradient too)."""
    model, tokenizer = common.load_model(BASE, "float32", "cpu")
    args = sft.Args(lora_r=r, lora_dropout=0.0, lora_targets=targets, compile=False)
    torch.manual_seed(seed)
    model = common.add_lora(model, args).double()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model, tokenizer, args


def a_batch(tokenizer, n=4):
    train, _ = common.load_sft_data(os.path.join(common.WORLD_DIR, "data", "math", "train.jsonl"), tokenizer, 512, limit=n)
    return common.collate(train, list(range(n)), tokenizer.pad_token_id, "cpu")


def test_fused_loss_and_gradients_equal_peft_own_forward_in_float64():
    """sft.compute_loss on the adapted model (decoder_forward + the fused loss on the frozen head) against peft's own
    PeftModel on a fresh base with the same adapter weights, cross-entropy of its full logits: loss and every adapter
    gradient equal to 1e-8 of its largest entry; the base gets no gradient at all."""
    model, tokenizer, args = adapted()
    batch = a_batch(tokenizer)
    ours, _ = sft.compute_loss(model, batch, args)
    ours.backward()
    base = common.load_model(BASE, "float32", "cpu")[0].double()
    direct = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trained) == 2 * 7 * 4  # A and B on the 7 linears of each of the 4 layers; never the LM head
    missing, unexpected = direct.load_state_dict({"base_model.model." + n: p.detach() for n, p in trained.items()}, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    logits = direct(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    theirs = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="sum")
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    direct_params = dict(direct.named_parameters())
    for name, p in trained.items():  # seen: 2e-10 of the largest entry, in the first layer (float32 arithmetic: 1e-6)
        theirs = direct_params["base_model.model." + name].grad
        assert (p.grad - theirs).abs().max() <= 1e-8 * theirs.abs().max() and theirs.abs().max() > 0, name
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_adapters_disabled_is_the_base_model_and_leaves_requires_grad_alone():
    model, tokenizer, _ = adapted()
    batch = a_batch(tokenizer, 2)
    base = common.load_model(BASE, "float32", "cpu")[0].double()
    with torch.no_grad():
        with common.adapters_disabled(model):
            off = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        on = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        plain = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(off, plain) and (on - plain).abs().max() > 1e-3
    assert sum(p.requires_grad for p in model.parameters()) == 56


def test_bad_lora_flags_are_refused_before_anything_is_loaded():
    import drift
    import roste
    cases = [(sft.Args(merge_lora=True), "--merge_lora needs LoRA"), (sft.Args(lora_r=-1), "--lora_r and --lora_alpha"),
             (sft.Args(lora_r=8, lora_dropout=1.0), "--lora_dropout in [0, 1)"),
             (sft.Args(lora_r=8, lora_targets=" , "), "--lora_targets: give module names")]
    if not torch.cuda.is_available():
        cases.append((sft.Args(lora_r=8, load_in_4bit=True), "--load_in_4bit: QLoRA's 4-bit base needs a CUDA GPU"))
    for args, message in cases:
        with pytest.raises(common.UsageError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            common.check_args(args)
    for script, message in [(drift, "DRIFT biases each weight tensor's gradient"), (roste, "RoSTE trains the rotated")]:
        with pytest.raises(common.UsageError, match=message):
            script.main(script.Args(lora_r=8, output_dir="/nonexistent/never-written"))
    model, _ = common.load_model(BASE, "float32", "cpu")
    with pytest.raises(common.UsageError, match="reaches the LM head or the embeddings"):
        common.add_lora(model, sft.Args(lora_r=4, lora_targets="q_proj,lm_head"))
    model, _ = common.load_model(BASE, "float32", "cpu")
    with pytest.raises(common.UsageError, match="--lora_targets 'no_such_proj'"):
        common.add_lora(model, sft.Args(lora_r=4, lora_targets="no_such_proj"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    run_script("sft.py", out, *QUICK, "--save_every", "2", "--merge_lora", "true")
    return out


def test_only_the_adapters_train_and_the_merged_model_is_base_plus_scaled_ba(lora_run):
    """final/ is a peft adapter, final/merged a plain model. Merged = W + (alpha/r) B A for each adapted linear
    (from the starting model's file and the adapter's, in float64), every other tensor bit for bit the base's."""
    assert losses(lora_run)[-1] < losses(lora_run)[0]
    base, merged = load_file(os.path.join(BASE, "model.safetensors")), load_file(os.path.join(lora_run, "final", "merged", "model.safetensors"))
    adapter = load_file(os.path.join(lora_run, "final", "adapter_model.safetensors"))
    assert merged.keys() == base.keys() and all(k.startswith("base_model.model.") for k in adapter)
    scale = 16 / 8  # --lora_alpha 0 means 2 r
    adapted = set()
    for key in base:
        a_key = "base_model.model." + key.replace(".weight", ".lora_A.weight")
        if a_key in adapter:
            a, b = adapter[a_key].double(), adapter[a_key.replace("lora_A", "lora_B")].double()
            assert b.abs().max() > 0, key  # B started at zero: it trained
            expected = base[key].double() + scale * (b @ a)
            torch.testing.assert_close(merged[key].double(), expected, atol=1e-6, rtol=1e-6, msg=key)
            adapted.add(key)
        else:
            assert torch.equal(merged[key], base[key]), key
    assert len(adapted) == 28


def test_final_loads_with_from_pretrained_as_adapter_and_as_merged_model(lora_run):
    """transformers' from_pretrained loads final/ (an adapter dir: peft puts it on its base) and final/merged (no
    peft needed); both give the same logits."""
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        as_adapter = AutoModelForCausalLM.from_pretrained(os.path.join(lora_run, "final"))(ids).logits
        as_merged = AutoModelForCausalLM.from_pretrained(os.path.join(lora_run, "final", "merged"))(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(BASE)(ids).logits
    torch.testing.assert_close(as_adapter, as_merged, atol=1e-5, rtol=1e-5)
    assert (as_merged - plain).abs().max() > 1e-3


def test_merge_py_takes_the_merged_model_and_refuses_the_adapter_with_a_line(lora_run):
    import merge
    with pytest.raises(common.UsageError, match="a LoRA adapter, not a model; merge its merged model"):
        merge.Checkpoint(str(lora_run / "final"))
    assert len(merge.Checkpoint(str(lora_run / "final" / "merged")).where) == len(load_file(os.path.join(BASE, "model.safetensors")))


def test_resume_is_bit_identical(lora_run, tmp_path):
    """A LoRA checkpoint holds the adapters and the optimizer (the base comes from --model); resuming it gives
    the uninterrupted run's adapters bit for bit."""
    assert not [f for f in os.listdir(lora_run / "checkpoint-2") if f == "model.safetensors"]
    run_script("sft.py", tmp_path, *QUICK, "--resume", str(lora_run / "checkpoint-2"))
    whole, resumed = (load_file(os.path.join(d, "final", "adapter_model.safetensors")) for d in (lora_run, tmp_path))
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    assert losses(tmp_path) == losses(lora_run)[2:]


def test_adapter_gradients_are_the_same_under_ddp_and_fsdp2_in_float64(tmp_path):
    reference = step_gradients(tmp_path / "one.safetensors", 8, 1, "lora")
    assert len(reference) == 56
    for name, micro, nproc, extra in [("ddp", 4, 2, ("lora",)), ("fsdp", 4, 2, ("fsdp", "lora"))]:
        other = step_gradients(tmp_path / f"{name}.safetensors", micro, nproc, *extra)
        assert other.keys() == reference.keys()
        for k in reference:
            torch.testing.assert_close(other[k], reference[k], atol=1e-12, rtol=1e-10, msg=f"{name}: {k}")


def test_fsdp2_with_gradient_checkpointing_trains_and_resumes(lora_run, tmp_path):
    """2 FSDP2 processes with gradient checkpointing: one process's losses (to 1e-4: after AdamW steps another
    summation order may flip near-zero gradients; the float64 test above compares before the optimizer); its
    checkpoint resumes exactly."""
    run_script("sft.py", tmp_path / "fsdp", *QUICK, "--fsdp", "--gradient_checkpointing", "--save_every", "2", nproc=2)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(lora_run), abs=1e-4)
    run_script("sft.py", tmp_path / "resumed", *QUICK, "--fsdp", "--resume", str(tmp_path / "fsdp" / "checkpoint-2"), nproc=2)
    whole, resumed = (load_file(str(tmp_path / d / "final" / "adapter_model.safetensors")) for d in ("fsdp", "resumed"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole) and whole.keys() == resumed.keys()


def test_asft_reference_is_the_base_with_adapters_bypassed(tmp_path):
    """With LoRA and no --ref_model, ASFT's pi_ref is the policy's own base with its adapters off: the KL is zero at
    step 1 (B = 0: policy = base) and grows once the adapters move; were the adapters left on, it would stay zero."""
    run_script("asft.py", tmp_path, *QUICK, "--steps", "3", "--save_every", "0")
    kl = [r["method/kl"] for r in records(tmp_path) if "loss" in r]
    assert abs(kl[0]) < 1e-7 and kl[2] > 1e-5, kl
