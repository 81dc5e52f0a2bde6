"""DRIFT, Directional Reasoning Injection for Fine-Tuning: sft.py with a reasoning prior in gradient space.

Paper: Huang et al. 2025, "Directional Reasoning Injection for Fine-Tuning MLLMs" (v2: "DRIFT: Transferring
Reasoning Priors for Efficient MLLM Fine-Tuning", ACL 2026 Findings), https://arxiv.org/abs/2510.15050.

Method:
  The prior Delta = theta_reasoning - theta_target is computed once per selected weight tensor (Eq. 2), never updated.
  Each example's gradient g of a selected tensor becomes g + alpha * scale(g, Delta) (Eq. 3; alpha = -1 pulls
  toward theta_reasoning), in a hook that runs before accumulation, the cross-rank reduction and clipping; the loss is
  SFT's. Per example is the official setting (batch 1 per device); `--edit_per micro_batch` edits whole micro-batches.

Usage:
    python drift.py                                 # embedded world: the code model (target) learns math with the math model's prior
    python drift.py --alpha 0 --edit_per micro_batch  # plain SFT from the same start (bit-identical to sft.py --model <target>)
    python drift.py --merge_lambdas 0.1,0.5         # also evaluate the naive task-arithmetic merges theta_T + lambda * Delta
    torchrun --nproc_per_node 8 drift.py --model Qwen/Qwen2.5-Coder-1.5B-Instruct --reasoning_model Qwen/Qwen2.5-Math-1.5B-Instruct \
        --dataset openai/gsm8k:main --eval_datasets gsm8k=openai/gsm8k:main --dtype bfloat16 --batch_size 64 --lr 1e-6
Text models only: the paper's Qwen2.5-VL-7B + R1-Distill pair is refused (no image data or VL loading here).
"""
import dataclasses
import os
import re
import time

import torch

import common
from common import print0


@dataclasses.dataclass
class Args:
    # COMMON: the same block in every script
    model: str = os.path.join("runs", "world_variants", "target", "final")
    """hub id or local directory of the starting model theta_T (Hugging Face format, safetensors); the embedded default is built when missing"""
    chat_template: str = ""
    """chat template for a base model without one: a Jinja file, or a tokenizer (directory or hub id) to take it from"""
    dataset: str = os.path.join(common.WORLD_DIR, "data", "math", "train.jsonl")
    """training data: hub id (`id` or `id:config`), a .jsonl/.json/.csv/.parquet file or a save_to_disk directory (GSM8K, MBPP, SQuAD, prompt/response, messages, Alpaca, ShareGPT schema); comma-separated sources are concatenated, or mixed by --dataset_weights"""
    dataset_split: str = "train"
    """split of --dataset to train on when it is a hub id or a saved DatasetDict"""
    dataset_weights: str = ""
    """comma-separated weights of --dataset's sources: source i gives round(w_i / sum(w) x N) samples (N = all usable samples), drawn with --seed; empty = concatenate them"""
    dataset_num_proc: int = 1
    """processes tokenising the training data (datasets.map; TRL's dataset_num_proc); cached either way in $HF_DATASETS_CACHE/sft_tokenized"""
    mask_history: bool = False
    """train only the last assistant turn of multi-turn data (LLaMA-Factory's mask_history); default: every assistant turn, as TRL"""
    eval_datasets: str = ",".join(f"{name}={os.path.join(common.WORLD_DIR, 'data', task, split + '.jsonl')}" for name, task, split in [
        ("math", "math", "test"), ("math_ood", "math", "test_ood"), ("code", "code", "test"), ("rc", "rc", "test"),
        ("knowledge", "knowledge", "test")])
    """comma-separated name=source pairs scored by the task judges; the first is the target task"""
    eval_split: str = "test"
    """split of hub eval datasets"""
    output_dir: str = "runs/drift"
    """where checkpoints, the final model and metrics.jsonl go"""
    seed: int = 0
    """seed of data order, sampling and evaluation"""
    dtype: str = "float32"
    """compute dtype: float32 | bfloat16 (mixed precision: fp32 master weights and AdamW state, bf16 matmuls)"""
    save_dtype: str = ""
    """dtype of the saved final model: float32 | bfloat16 | float16; empty = the starting model's"""
    device: str = "auto"
    """auto | cpu | cuda"""
    max_length: int = 512
    """tokens per sample (prompt + response)"""
    overlong: str = "truncate"
    """what to do with samples over max_length: truncate | drop (both counted and reported)"""
    steps: int = 300
    """optimizer steps"""
    batch_size: int = 32
    """global samples per optimizer step (identical results for any processes x accumulation split of the same edits; see --edit_per)"""
    micro_batch_size: int = 0
    """samples per forward pass per process; 0 = 1 with --edit_per example, batch_size / processes with micro_batch (a DRIFT hyperparameter there)"""
    lr: float = 1e-3
    """peak learning rate (AdamW); use ~1e-5 for pretrained 0.5B+ models"""
    warmup_ratio: float = 0.05
    """fraction of steps of linear warm-up, then cosine decay to min_lr_ratio x lr"""
    min_lr_ratio: float = 0.1
    """floor of the cosine decay as a fraction of lr (0 = to zero, as Hugging Face Trainer, TRL and LLaMA-Factory)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    adam_beta2: float = 0.95
    """AdamW beta2 (beta1 is 0.9); 0.999 = the torch and Hugging Face Trainer default"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (0 = off)"""
    chunk_size: int = 0
    """tokens per chunk of the fused loss; 0 = sized for a 150 MiB logits buffer"""
    compile: bool = True
    """compile the fused loss's per-chunk function with torch.compile"""
    fsdp: bool = False
    """shard parameters, gradients and optimizer state with FSDP2 fully_shard instead of DDP"""
    gradient_checkpointing: bool = False
    """recompute each decoder layer's activations in the backward (non-reentrant): less memory, ~1.3x the compute"""
    lora_r: int = 0
    """LoRA rank (peft, an optional extra): only the adapters train, the base stays frozen in --dtype; 0 = full fine-tuning"""
    lora_alpha: float = 0.0
    """LoRA scale: the update is (lora_alpha / lora_r) B A; 0 = 2 x lora_r"""
    lora_dropout: float = 0.05
    """dropout on the LoRA adapters' input (TRL's default)"""
    lora_targets: str = "all-linear"
    """modules that get adapters: comma-separated names (e.g. q_proj,v_proj) or all-linear (every linear but the LM head, peft's convention)"""
    merge_lora: bool = False
    """also save final/merged: the adapters merged into the base, a plain model that from_pretrained loads without peft"""
    load_in_4bit: bool = False
    """QLoRA: the frozen base in 4-bit NF4 (bitsandbytes; CUDA only)"""
    save_every: int = 50
    """checkpoint every N steps (0 = only the final model)"""
    keep_checkpoints: int = 2
    """keep the newest N checkpoints (0 = all)"""
    report_to: str = "none"
    """mirror metrics.jsonl to a tracker: none | tensorboard | wandb | trackio (optional extras: requirements-extras.txt)"""
    resume: str = ""
    """checkpoint directory to continue from, or `auto` for the latest in output_dir"""
    overwrite: bool = False
    """start afresh in an output_dir that holds another run, removing its checkpoints (refused otherwise)"""
    eval_samples: int = 100
    """prompts per eval dataset (0 = all)"""
    eval_before: bool = True
    """also evaluate the starting model"""
    eval_every: int = 0
    """also score the target eval set every N steps (accuracy curve; 0 = only before and after training)"""
    eval_every_samples: int = 200
    """prompts of the target set scored every --eval_every steps: its first N, the same ones each time (0 = all of them); the final evaluation scores all --eval_samples"""
    max_new_tokens: int = 64
    """generation budget per eval answer"""
    eval_batch_size: int = 50
    """prompts per generation batch"""
    trust_remote_code: bool = False
    """allow model code from the hub (off unless asked)"""

    # METHOD: DRIFT
    reasoning_model: str = os.path.join("runs", "world_variants", "reasoning", "final")
    """theta_R, the reasoning model of the prior: same architecture and tensor names as --model"""
    prior_base: str = ""
    """if set, Delta = theta_R - theta(prior_base) (the paper's "hierarchical" prior, Table 10); default Delta = theta_R - theta_T"""
    alpha: float = -1.0
    """alpha in Eq. 3, the paper's sign: g + alpha * scale; -1 (paper) pulls toward theta_R, 0 = plain SFT"""
    scale: str = "adaptive"
    """absolute: alpha * Delta | gradnorm: alpha * |g| * Delta/|Delta| | adaptive (paper's default): gradnorm times (1 + cos(g, Delta)) / 2"""
    targets: str = "attn,mlp"
    """tensors that get the bias: comma-separated presets (attn, mlp, router, norm, embed, head; see PRESETS) or regexes over parameter names"""
    skip_first_n: int = 0
    """leave the first N decoder layers without bias"""
    edit_per: str = "example"
    """gradient each Eq. 3 edit sees: example (official yaml: batch 1 per device; a pass per sample) | micro_batch (faster, weaker bias)"""
    normalize_delta: bool = False
    """rescale each Delta to the norm of its parameter (official code and yaml, not the paper; only `absolute` changes: Table 4's row)"""
    prior_device: str = "auto"
    """where Delta lives: auto (the training device) | cpu (copied per use, as the official code)"""
    prior_dtype: str = "float32"
    """float32 | bfloat16: storage of Delta (always computed in fp32; the official code subtracts in bf16)"""
    merge_lambdas: str = ""
    """naive-merge baseline: comma-separated lambdas; before training, evaluate and save theta_T + lambda * Delta (0.1 = BR2V's (0.9, 0.1))"""


SCALES, EDIT_PER = ("absolute", "gradnorm", "adaptive"), ("example", "micro_batch")
# The attention and MLP blocks by their module names in transformers (self_attn + mlp: Llama, Qwen, Mistral, Gemma,
# Phi-3, OLMo2, Cohere, Granite, the MoEs; GPT-2 attn; GPT-NeoX attention; Falcon self_attention; Llama 4 feed_forward;
# Granite-MoE block_sparse_moe), and the projections inside them, weights and biases.
ATTN_BLOCK, MLP_BLOCK = r"\.(?:self_attn|attn|attention|self_attention)\.", r"\.(?:mlp|feed_forward|block_sparse_moe)\."
ATTN_PROJ = r"(?:q|k|v|o|qkv|q_a|q_b|kv_a|kv_b)_proj|kv_a_proj_with_mqa|c_attn|c_proj|query_key_value|dense"  # fused qkv: Phi-3; MLA: DeepSeek
MLP_PROJ = r"(?:gate|up|down|gate_up)_proj|c_fc|c_proj|fc1|fc2|dense_h_to_4h|dense_4h_to_h|w1|w2|w3"  # fused gate_up: Phi-3
PRESETS = {
    "attn": rf"{ATTN_BLOCK}(?:{ATTN_PROJ})\.(?:weight|bias)$",
    # dense MLPs, shared experts, per-expert modules (experts.<e>.*) and transformers 5's fused 3-D experts
    "mlp": rf"{MLP_BLOCK}(?:(?:(?:shared_experts?|experts\.\d+)\.)?(?:{MLP_PROJ})\.(?:weight|bias)"
           r"|experts\.(?:gate_up|gate|up|down)_proj(?:_bias)?)$",
    "router": rf"{MLP_BLOCK}(?:gate|router|shared_expert_gate)\.(?:weight|bias)$",  # MoE routing: not in the default
    "norm": r"(?:norm|ln_\w+)\.(?:weight|bias)$", "embed": r"(?:embed_tokens|wte|wpe|embed_in|word_embeddings)\.weight$",
    "head": r"^(?:lm_head|embed_out)\.weight$"}
LAYER = r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\."  # a decoder layer's index: model.layers.3., GPT-2 transformer.h.3.
# Never biased, whatever --targets says: names containing "visual" (the official code skips them: model/drift.py l.165)
# and the vision towers and projectors LLaMA-Factory freezes by default (model/model_utils/visual.py: vision_tower,
# vision_model, audio_tower, multi_modal_projector; MiniCPM's vpm, apm, resampler; Keye's mlp_AR).
VISION = r"visual|(?:^|\.)(?:vision_tower|vision_model|audio_tower|multi_modal_projector|vpm|apm|resampler|mlp_AR)\."


# METHOD: DRIFT's gradient edit (Eq. 3), one tensor at a time
def drift_gradient(grad, delta, alpha, scale, delta_norm=None, absolute_factor=1.0, eps=1e-12):
    """g~ = g + alpha * scale(g, Delta) (Huang et al. 2025, Eq. 3) for one parameter tensor.

    grad = g (one example's or micro-batch's gradient of the tensor), delta = Delta = theta_R - theta_T (Eq. 2), alpha = alpha
    (paper: -1; the official code subtracts with +1, the same update), u = Delta / |Delta| (0 if |Delta| < eps):
      absolute:  g + alpha * Delta                                (times absolute_factor: 1 / edits per step and process)
      gradnorm:  g + alpha * |g| * u
      adaptive:  g + alpha * (1 + cos(g, Delta)) / 2 * |g| * u    cos over the flattened tensor, clamped to [-1, 1],
                                                                   0 when a norm is < eps (paper's default variant)
    With alpha = -1 the adaptive bias is strongest when the SFT step -g points away from theta_R (cos = 1: g~ = 0
    if g is parallel to Delta) and vanishes when it already points toward it (cos = -1). Norms are per tensor.
    The official hook (WikiChao/DRIFT, LLaMA-Factory/src/llamafactory/model/drift.py l.337-370) is the same with its
    alpha = -ours, except that it clamps |g| and |Delta| to eps instead of zeroing the bias (a difference of eps * u).
    gradnorm and adaptive are positively homogeneous in g (c > 0: edit(c g) = c edit(g)), absolute is not.
    Returns (g~ in grad's dtype, cos(g, Delta), |g~ - g|); computed in fp32 (fp64 for fp64 input)."""
    work = torch.promote_types(grad.dtype, torch.float32)  # fp32, or fp64 when given fp64
    g, d = grad.to(work), delta.to(device=grad.device, dtype=work)
    d_norm = torch.linalg.vector_norm(d) if delta_norm is None else delta_norm.to(device=g.device, dtype=work)
    if scale == "absolute":
        return (g + (alpha * absolute_factor) * d).to(grad.dtype), torch.zeros((), device=grad.device), abs(alpha * absolute_factor) * d_norm
    g_norm = torch.linalg.vector_norm(g)
    ok = (g_norm > eps) & (d_norm > eps)
    cos = torch.where(ok, (g * d).sum() / (g_norm * d_norm).clamp(min=eps), 0.0).clamp(-1.0, 1.0)
    coef = alpha * (1 + cos) / 2 if scale == "adaptive" else torch.full_like(cos, alpha)
    u_coef = torch.where(d_norm > eps, coef * g_norm / d_norm.clamp(min=eps), 0.0)
    return (g + u_coef * d).to(grad.dtype), cos, u_coef.abs() * d_norm


def select_tensors(model, args):
    """Names of the parameters that get the bias (--targets, from layer --skip_first_n on), with the count of each
    target printed. Fails loudly, where the official code silently attaches fewer hooks (none when module names
    differ): when a target matches nothing, and when `attn` or `mlp` would leave out a weight matrix inside the
    blocks it is named for (a fused qkv, an expert tensor) or a decoder layer with none of its tensors. Vision towers
    and projectors (VISION) are never selected, as in the official code."""
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    layer_of = {n: int(m[1]) if (m := re.search(LAYER, n)) else None for n, _ in model.named_parameters()}
    vision = [n for n, _ in model.named_parameters() if re.search(VISION, n)]
    params = {n: p for n, p in model.named_parameters()
              if p.requires_grad and n not in vision and (layer_of[n] is None or layer_of[n] >= args.skip_first_n)}
    matched = {t: [n for n in params if re.search(PRESETS.get(t, t), n)] for t in targets}
    selected = {n for found in matched.values() for n in found}
    layers = sorted({layer_of[n] for n in params} - {None})
    sample = lambda layer: ", ".join([n for n in params if layer_of[n] == layer][:12] or list(params)[:12])

    for t in targets:
        if not matched[t]:
            tied = " (the head is tied to the input embeddings: use embed)" if t == "head" and getattr(model.config, "tie_word_embeddings", False) else ""
            seen = [n for n in vision if re.search(PRESETS.get(t, t), n)]
            tied += f" ({len(seen)} vision/projector tensors match, e.g. {seen[0]}, but are never biased)" if seen else ""
            raise common.UsageError(f"--targets {t!r} ({PRESETS.get(t, t)}) matched no parameter of --model {args.model!r}"
                                    f"{tied}; its parameters are named like: {sample(layers[0] if layers else None)}, ...")
    regex_layers = {layer_of[n] for t in targets if t not in PRESETS for n in matched[t]}
    for t, block in [("attn", ATTN_BLOCK), ("mlp", MLP_BLOCK)]:
        if t not in targets:
            continue
        missed = [n for n, p in params.items() if p.dim() >= 2 and layer_of[n] is not None and re.search(block, n)
                  and n not in selected and not (t == "mlp" and re.search(PRESETS["router"], n))]
        empty = sorted(set(layers) - {layer_of[n] for n in matched[t]} - regex_layers)
        if missed or empty:
            what = (f"leaves out {len(missed)} weight matrices of the blocks it is named for: {', '.join(missed[:6])}"
                    if missed else f"matches nothing in layer {empty[0]} (of {len(empty)} such layers): {sample(empty[0])}")
            raise common.UsageError(f"--targets preset {t!r} {what}; add a regex for these tensors to --targets "
                                    f"(e.g. --targets {args.targets},'<regex>')")
    names = [n for n in params if n in selected]
    counts = " | ".join(f"{t} {len(found)} tensors, {sum(params[n].numel() for n in found) / 1e6:.3g}M weights"
                        for t, found in matched.items())
    router = [n for n in params if re.search(PRESETS["router"], n) and n not in selected]
    print0(f"DRIFT targets: {counts}" + (f" | router not targeted ({len(router)} tensors; --targets {args.targets},router "
                                        "adds it)" if router else "") + (f" | vision/projector excluded ({len(vision)} tensors)" if vision else ""))
    return names


def refuse_multimodal(args):
    """A vision-language model (the paper's Qwen2.5-VL-7B) is refused by name: common.load_model loads causal LMs
    (AutoModelForCausalLM, which does not map qwen2_5_vl) and the data is text, so its image-text SFT cannot run here."""
    import transformers
    for flag, path in [("--model", args.model), ("--reasoning_model", args.reasoning_model), ("--prior_base", args.prior_base)]:
        if not path or (not os.path.isdir(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1)):
            continue  # unset, or a local directory not built yet
        try:
            config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError):
            continue  # not a model: load_model says so
        if getattr(config, "vision_config", None) is not None:
            raise common.UsageError(f"{flag} {path!r} is a vision-language model ({config.model_type}): drift.py trains "
                                    "text-only causal LMs on text data, so the paper's Qwen2.5-VL setting is not supported; "
                                    "use a text model pair with the same tensor names (e.g. benchmark/drift.sh's Qwen2.5 Coder/Math)")


def build_prior(args, model, names, rt):
    """Delta[name] = theta_R[name] - theta_T[name] (or - theta_prior_base[name]) in fp32, once, on --prior_device
    in --prior_dtype; every expected tensor must exist with the same shape in the prior's checkpoints."""
    params = dict(model.named_parameters())
    device = rt.device if args.prior_device == "auto" else torch.device(args.prior_device)
    reasoning = common.load_model(args.reasoning_model, "float32", "cpu", args.trust_remote_code)[0].state_dict()
    base = common.load_model(args.prior_base, "float32", "cpu", args.trust_remote_code)[0].state_dict() if args.prior_base else None
    problems = []
    for source, state in [(args.reasoning_model, reasoning), (args.prior_base, base)]:
        for name in names if state is not None else []:
            if name not in state or state[name].shape != params[name].shape:
                found = tuple(state[name].shape) if name in state else "missing"
                problems.append(f"{source}: {name} expected {tuple(params[name].shape)}, found {found}")
    if problems:
        raise common.UsageError(f"the prior's checkpoints do not match --model ({len(problems)} tensors):\n  " + "\n  ".join(problems[:20]))
    prior = {}
    for name in names:
        start = base[name] if base is not None else params[name].detach().float().cpu()
        delta = reasoning[name] - start
        if args.normalize_delta:  # the official code's default: |Delta| := |theta_T| per tensor
            delta = delta * (torch.linalg.vector_norm(params[name].detach().float()).cpu() / torch.linalg.vector_norm(delta).clamp(min=1e-12))
        prior[name] = (delta.to(device=device, dtype=common.DTYPES[args.prior_dtype]), torch.linalg.vector_norm(delta).to(rt.device))
    return prior


def attach_hooks(model, prior, args, micro_steps):
    """One gradient hook per selected tensor (Parameter.register_hook: it edits each backward's gradient before it
    is accumulated into .grad, before DDP's all-reduce and before clipping, as the official code), so there is one
    edit per forward pass: per example with --edit_per example. micro_steps = edits per step and process. The
    gradient a hook sees is its samples' share of the global token mean (tokens / global tokens x processes, as the
    loss); gradnorm and adaptive are homogeneous, so an edit of that share is the share of the edited token-mean
    gradient: the step's bias is the token-weighted sum of the per-example biases. Returns the list the hooks
    append (tensor index, cos(g, Delta), |bias|) to, read and cleared by the training loop for logging."""
    seen = []
    params = dict(model.named_parameters())
    for index, (name, (delta, delta_norm)) in enumerate(prior.items()):
        def hook(grad, index=index, delta=delta, delta_norm=delta_norm):
            new, cos, bias = drift_gradient(grad, delta, args.alpha, args.scale, delta_norm, absolute_factor=1.0 / micro_steps)
            seen.append((index, cos.detach(), bias.detach()))
            return new
        params[name].register_hook(hook)
    print0(f"DRIFT: {args.scale} bias, alpha {args.alpha}, on {len(prior)} tensors "
           f"({sum(d.numel() for d, _ in prior.values()) / 1e6:.2f}M weights; Delta on {next(iter(prior.values()))[0].device})")
    return seen


def parameter_drift(model, start, prior):
    """cos(theta_t - theta_T, Delta) over all selected tensors (the spec's check: clearly > 0 under DRIFT, ~0 under
    SFT), and the distance to theta_R relative to |Delta| (1 at the start)."""
    params = dict(model.named_parameters())
    moved = torch.cat([(params[n].detach().float().cpu() - start[n]).flatten() for n in prior])
    delta = torch.cat([prior[n][0].float().cpu().flatten() for n in prior])
    cos = (moved @ delta / (moved.norm() * delta.norm()).clamp(min=1e-12)).item()
    return {"method/param_cos": cos, "method/distance_to_reasoning": ((delta - moved).norm() / delta.norm().clamp(min=1e-12)).item()}


# COMMON: the loss on one micro-batch. Methods change this (and only this) when their objective differs.
def compute_loss(model, batch, args):
    """Summed token cross-entropy of a micro-batch; the caller normalises by the global token count."""
    hidden, router_loss, metrics = common.decoder_forward(model, batch)  # router_loss: MoE load balancing, else 0
    loss_sum, logp = common.fused_linear_cross_entropy(hidden, model.get_output_embeddings().weight, batch["targets"],
                                                       logit_map=common.logit_map(model),
                                                       chunk_size=args.chunk_size or None, compile=args.compile)
    return loss_sum + router_loss, metrics


def evaluate(model, tokenizer, loss_model, eval_sets, rt, args, step):
    """Judge accuracy on every eval set plus held-out loss on the target set."""
    results = {"step": step}
    if not eval_sets:
        return results
    target = next(iter(eval_sets))  # loss first: FSDP must run the root's forward before anything else
    held_out = common.evaluate_loss(loss_model, eval_sets[target], rt, tokenizer.pad_token_id)
    results[f"eval/{target}/loss"], results[f"eval/{target}/perplexity"] = held_out["loss"], held_out["perplexity"]
    with common.unsharded(loss_model):
        for name, examples in eval_sets.items():
            acc = common.evaluate_accuracy(model, tokenizer, examples, rt, args.max_new_tokens,
                                           batch_size=args.eval_batch_size, synced=args.fsdp)
            results[f"eval/{name}/accuracy"], results[f"eval/{name}/n"] = acc["accuracy"], acc["n"]
            results[f"eval/{name}/correct"] = acc["correct"]  # '0'/'1' per prompt, in eval set order (paired bootstrap)
    return results


def main(args):
    # METHOD: bad flags fail before anything loads
    if args.scale not in SCALES:
        raise common.UsageError(f"--scale must be one of {', '.join(SCALES)}, got {args.scale!r}")
    if args.prior_dtype not in ("float32", "bfloat16") or args.prior_device not in ("auto", "cpu"):
        raise common.UsageError(f"--prior_dtype float32|bfloat16 and --prior_device auto|cpu, got {args.prior_dtype!r}, {args.prior_device!r}")
    if args.edit_per not in EDIT_PER:
        raise common.UsageError(f"--edit_per must be one of {', '.join(EDIT_PER)}, got {args.edit_per!r}")
    if args.edit_per == "example" and args.micro_batch_size > 1:
        raise common.UsageError(f"--micro_batch_size {args.micro_batch_size} with --edit_per example: DRIFT edits each example's "
                                "gradient, one forward pass per sample; use --micro_batch_size 1 (or 0), or --edit_per "
                                f"micro_batch to edit the gradient of {args.micro_batch_size} samples at once (a weaker bias)")
    if args.lora_r:
        raise common.UsageError("--lora_r: DRIFT biases each weight tensor's gradient toward the reasoning model's weights "
                                "(Delta = theta_R - theta); LoRA's adapters have no such weights to move toward. Train fully")
    if args.fsdp:
        raise common.UsageError("DRIFT biases each rank's whole-tensor gradient before the reduction; FSDP2 only exposes "
                                "reduced shards. Use DDP (the paper's setting is ZeRO-2, i.e. replicated gradients)")
    try:
        merge_lambdas = [float(x) for x in args.merge_lambdas.split(",") if x.strip()]
    except ValueError:
        raise common.UsageError(f"--merge_lambdas: comma-separated numbers, got {args.merge_lambdas!r}") from None
    refuse_multimodal(args)

    # COMMON: seed, distributed
    rt = common.setup_distributed(args.device, args.dtype)
    common.prepare_output_dir(args.output_dir, args.resume, args.overwrite, rt)  # before anything is loaded
    common.seed_everything(args.seed)  # identical init on every rank

    # METHOD: the embedded default's two variants (base + SFT on code, base + SFT on math) are built once, ~9 min
    defaults = Args()
    if (args.model, args.reasoning_model) == (defaults.model, defaults.reasoning_model) and not os.path.isdir(args.model):
        if rt.is_main:
            print0("building the embedded world's variants: python world_pretrain.py variants (~9 min, once)")
            import subprocess
            import sys
            subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "world_pretrain.py"),
                            "variants", os.path.dirname(os.path.dirname(args.model))], check=True)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    # COMMON: model and tokenizer
    model, tokenizer = common.load_model(args.model, common.weights_dtype(args), rt.device, args.trust_remote_code,
                                         args.chat_template, args.load_in_4bit)  # fp32 master weights; LoRA: a frozen base in --dtype
    model = common.add_lora(model, args)  # --lora_r > 0: peft's LoRA adapters (fp32), the only weights that train
    model.config.use_cache = False

    # COMMON: data
    train, stats = common.load_sft_data(args.dataset, tokenizer, args.max_length, args.overlong, args.dataset_split,
                                        mask_history=args.mask_history, weights=args.dataset_weights, seed=args.seed,
                                        num_proc=args.dataset_num_proc)
    print0(f"data {args.dataset}: {len(train)} samples | " + " | ".join(f"{k} {v}" for k, v in stats.items()))
    eval_sets = {}
    for pair in filter(None, args.eval_datasets.split(",")):
        name, _, source = pair.partition("=")
        if not source:
            raise common.UsageError(f"--eval_datasets entry {pair!r}: expected name=source")
        examples, _ = common.load_sft_data(source, tokenizer, args.max_length, "truncate", args.eval_split,
                                           mask_history=args.mask_history)
        eval_sets[name] = examples[: args.eval_samples or None]
    micro = args.micro_batch_size or (1 if args.edit_per == "example" else args.batch_size // rt.world_size)  # METHOD: the edit's samples
    if args.batch_size % (micro * rt.world_size):
        raise common.UsageError(f"--batch_size {args.batch_size} must be a multiple of --micro_batch_size {micro} "
                         f"x {rt.world_size} processes")
    common.RUN_SETTINGS["micro_batch_size"] = micro  # METHOD: the samples per edit set the bias: a resume must keep them
    schedule = common.batch_schedule([len(e["input_ids"]) for e in train], args.batch_size, args.steps, args.seed)
    common.check_objective(model, common.collate(train, schedule[0][:2] if schedule else [0], tokenizer.pad_token_id, rt.device), rt)

    # METHOD: the prior Delta (Eq. 2), once; the hooks that add the bias (Eq. 3) to every selected tensor's gradient
    names = select_tensors(model, args)
    prior = build_prior(args, model, names, rt)
    start = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if n in prior}
    seen_cos = attach_hooks(model, prior, args, micro_steps=args.batch_size // (micro * rt.world_size))

    # COMMON: optimizer and schedule
    loss_model = common.wrap_model(model, lambda m, b: compute_loss(m, b, args), rt, args.fsdp, args.gradient_checkpointing)
    optimizer = torch.optim.AdamW([p for p in loss_model.parameters() if p.requires_grad], lr=args.lr,  # LoRA: the adapters
                                  weight_decay=args.weight_decay, betas=(0.9, args.adam_beta2), fused=True)  # fused: no weight-sized temporaries
    warmup = max(1, int(args.warmup_ratio * args.steps))
    floor = args.min_lr_ratio  # linear warm-up, then cosine from lr down to floor x lr
    cosine = lambda s: min((s + 1) / warmup, floor + (1 - floor) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / max(1, args.steps))).item()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    start_step, resume = 0, args.resume
    if resume == "auto":
        resume = common.latest_checkpoint(args.output_dir) or ""
    if resume:
        start_step = common.load_checkpoint(resume, model, optimizer, scheduler, rt, args.fsdp)["step"]
        print0(f"resumed from {resume} at step {start_step}")
    logger = common.MetricsLogger(args.output_dir, rt, args.steps, resume=bool(resume), report_to=args.report_to)
    logger.log({"event": "config", **dataclasses.asdict(args), "world_size": rt.world_size, **{f"data/{k}": v for k, v in stats.items()}})
    if args.eval_before and not resume:
        logger.log({"event": "eval_before", **evaluate(model, tokenizer, loss_model, eval_sets, rt, args, 0)})
    for lam in merge_lambdas if not resume else []:  # METHOD: the naive-merge baseline, theta_T + lambda * Delta
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in prior:
                params[n].copy_(start[n].to(params[n]) + lam * prior[n][0].to(params[n]))
        merged = evaluate(model, tokenizer, loss_model, eval_sets, rt, args, 0)
        common.save_checkpoint(os.path.join(args.output_dir, f"merge_{lam:g}"), model, tokenizer, rt)
        logger.log({"event": "eval_merge", "merge_lambda": lam, **merged})
        with torch.no_grad():
            for n in prior:
                params[n].copy_(start[n])

    # COMMON: training loop
    loss_model.train()
    t_start, tokens_seen, compiled_before = time.time(), 0, common.compile_seconds()
    for step in range(start_step, args.steps):
        t0, compiled = time.time(), common.compile_seconds()
        batches = [common.collate(train, ids, tokenizer.pad_token_id, rt.device)
                   for ids in common.micro_batches(schedule[step], rt, micro)]
        global_tokens = common.count_loss_tokens(batches)
        loss_total, padded, real = torch.zeros((), device=rt.device), 0, 0
        for i, batch in enumerate(batches):
            with common.gradient_sync(loss_model, sync=i == len(batches) - 1):
                loss_sum, metrics = loss_model(batch)
                common.normalized_loss(loss_sum, global_tokens, rt.world_size).backward()
            loss_total += loss_sum.detach()
            padded, real = padded + batch["attention_mask"].numel(), real + int(batch["attention_mask"].sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(loss_model.parameters(), args.max_grad_norm or float("inf"))
        common.check_finite(loss_total, grad_norm, step + 1)  # a NaN or inf stops the run here
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # METHOD: over this step's hook calls (tensors x edits): mean cos(g, Delta), how many fired, and the norm of the
        # step's bias after the reduction (per tensor the biases are collinear with Delta, so their norms add up)
        bias = torch.zeros(len(prior), device=rt.device)
        if seen_cos:
            bias.index_add_(0, torch.tensor([i for i, _, _ in seen_cos], device=rt.device), torch.stack([b for *_, b in seen_cos]).float())
            metrics["cos"] = torch.stack([c for _, c, _ in seen_cos]).mean().item()
        metrics.update(hook_calls=len(seen_cos), bias_norm=(common.all_reduce_sum(bias) / rt.world_size).norm().item())
        seen_cos.clear()

        # COMMON: logging (the logged loss is the optimised loss: global token mean)
        stats_t = common.all_reduce_sum(torch.tensor([loss_total.item(), float(real), float(padded)]))
        tokens_seen += stats_t[1].item()
        dt = time.time() - t0 - (common.compile_seconds() - compiled)  # tok/s and ETA leave out the compile
        elapsed = time.time() - t_start - (common.compile_seconds() - compiled_before)
        logger.log({"step": step + 1, "loss": stats_t[0].item() / global_tokens.item(), "lr": lr,
                    "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                    "tokens": int(stats_t[1].item()), "tokens_per_s": stats_t[1].item() / dt, "padding_fraction": 1 - stats_t[1].item() / stats_t[2].item(),
                    "loss_tokens": int(global_tokens.item()), "eta_s": elapsed / (step + 1 - start_step) * (args.steps - step - 1),
                    **{k if k.startswith("moe/") else f"method/{k}": v for k, v in metrics.items()}})
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            common.save_checkpoint(os.path.join(args.output_dir, f"checkpoint-{step + 1}"), model, tokenizer, rt,
                                   optimizer, scheduler, {"step": step + 1}, args.fsdp)
            common.prune_checkpoints(args.output_dir, args.keep_checkpoints, rt)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:  # the target set only
            target_set = {name: examples[:args.eval_every_samples or None] for name, examples in list(eval_sets.items())[:1]}
            logger.log({"event": "eval", **evaluate(model, tokenizer, loss_model, target_set, rt, args, step + 1)})

    # COMMON: evaluate and save
    common.save_checkpoint(os.path.join(args.output_dir, "final"), model, tokenizer, rt, fsdp=args.fsdp, dtype=args.save_dtype,
                           merge_lora=args.merge_lora)
    final = evaluate(model, tokenizer, loss_model, eval_sets, rt, args, args.steps)  # after saving: a crash here loses nothing
    final.update(parameter_drift(model, start, prior))  # METHOD: where training moved theta, relative to Delta
    logger.log({"event": "eval_after", **final, "train_time_s": time.time() - t_start, "tokens_seen": tokens_seen,
                "peak_memory_gib": common.peak_memory_gib(rt.device)})
    print0(f"saved {os.path.join(args.output_dir, 'final')}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main(common.parse_args(Args))
    except common.UsageError as err:
        raise SystemExit(f"error: {err}") from None
