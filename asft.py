"""Anchored Supervised Fine-Tuning (ASFT) and Dynamic Fine-Tuning (DFT): sft.py with a token-level objective.

Papers: ASFT, Zhu et al. 2025, https://arxiv.org/abs/2509.23753 (ICLR 2026); it builds on
DFT, Wu et al. 2025, "On the Generalization of SFT: A Reinforcement Learning Perspective with Reward
Rectification", https://arxiv.org/abs/2508.05629.

Method:
  DFT scales each response token's cross-entropy by that token's detached probability: -sg[p(y_t)] log p(y_t).
  ASFT adds an anchor: lambda * KL(pi_theta || pi_ref) (the paper's Eq. 6; --kl_direction code: KL(pi_ref || pi_theta),
  the official code's) over the full vocabulary at every response position, pi_ref the frozen starting model;
  both are per-chunk objectives of the shared fused loss (no full logits).

Usage:
    python asft.py                                  # ASFT (lambda 0.05) on the embedded world, sft.py's budget
    python asft.py --mode dft                       # DFT: no reference model, no extra cost
    python asft.py --mode sft+kl                    # cross-entropy + the anchor (ablation)
    torchrun --nproc_per_node 8 asft.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset openai/gsm8k:main \
        --eval_datasets gsm8k=openai/gsm8k:main --dtype bfloat16 --batch_size 64 --lr 1e-5 --max_length 1024
"""
import contextlib
import dataclasses
import os
import time

import torch

import common
from common import print0


@dataclasses.dataclass
class Args:
    # COMMON: the same block in every script
    model: str = os.path.join(common.WORLD_DIR, "base")
    """hub id or local directory of the starting model (Hugging Face format, safetensors)"""
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
    output_dir: str = "runs/asft"
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
    """global samples per optimizer step (identical results for any micro-batch x accumulation x processes)"""
    micro_batch_size: int = 0
    """samples per forward pass per process; 0 = batch_size / processes (no accumulation)"""
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
    # METHOD: ASFT / DFT
    mode: str = "asft"
    """sft | dft | sft+kl | asft: the token weight (1 or sg[p(y)]) and whether the KL anchor is on"""
    kl_weight: float = 0.05
    """lambda, weight of the KL anchor per response token: 0.05 in the paper; the official code's default is 0.1 (a verl recipe uses 0.03 in bf16)"""
    kl_direction: str = "paper"
    """paper: KL(pi_theta || pi_ref), as the v1 paper's Eq. 6 and Sec. 5.3 write it | code: KL(pi_ref || pi_theta), as the official train_v2.py computes it"""
    ref_model: str = ""
    """frozen reference pi_ref of the anchor (same vocabulary as --model); empty = --model, the starting weights"""


MODES = ("sft", "dft", "sft+kl", "asft")


# METHOD: the per-token objectives, run chunk by chunk inside common.fused_linear_cross_entropy
def dft_objective(logits, labels, weights):
    """DFT per-token loss (Wu et al. 2025, Eq. 9): l_t = -sg[p_t] * log p_t, p_t = softmax(z_t)[y_t].

    logits = z_t [C, V] (fp32), labels = y_t, weights = the token's loss weight (1, or 0 when ignored).
    The weight p_t is taken under stop-gradient (.detach()), so dl/dz = p_t * (softmax(z) - e_y): the SFT
    gradient times p_t. Equals l_SFT * exp(-l_SFT). Eq. 9 sums over a sequence's tokens; like every script
    here (and DFT's official code) the caller divides by the global count of loss tokens instead."""
    logp = common.label_logit(logits, labels) - logits.logsumexp(-1)
    return -weights * logp.exp().detach() * logp, logp


def asft_objective(logits, labels, weights, ref_hidden, ref_head, kl_weight, dft, theta_first=None, ref_scale=None,
                   ref_softcap=None):
    """ASFT per-token loss (Zhu et al. 2025): l_t = -w_t log p_t + lambda * KL_t, over the full vocabulary.

    logits = z_t [C, V] of pi_theta; ref_hidden [C, H_ref] and ref_head [V, H_ref] give the reference's logits
    for the same chunk (formed here, never for all tokens); kl_weight = lambda (0-d tensor); dft (0-d) = 1 for
    w_t = sg[p_t] (ASFT), 0 for w_t = 1 (sft+kl). theta_first (0-d) picks the direction:
      1: KL_t = KL(pi_theta || pi_ref) = sum_v p(v) (log p(v) - log r(v)), the v1 paper's Eq. 6 and Sec. 5.3
         (--kl_direction paper); logit gradient of the anchor lambda p (log p - log r - KL_t);
      0 or None: KL_t = KL(pi_ref || pi_theta) = sum_v r(v) (log r(v) - log p(v)), the official train_v2.py
         (--kl_direction code); logit gradient lambda (p - r).
    Both sides in fp32. ref_scale and ref_softcap (0-d) are the reference's own logit post-processing
    (common.logit_map; softcap 0 = none): the policy's is applied to `logits` by the fused loss before this call.
    Returns (loss, log p_t, KL_t)."""
    logp_all = logits.log_softmax(-1)
    logp = common.label_logit(logp_all, labels)
    ref_logits = (ref_hidden @ ref_head.t()).to(logits.dtype)
    if ref_scale is not None:
        ref_logits = ref_logits * ref_scale
        cap = ref_softcap.clamp(min=1e-6)
        ref_logits = torch.where(ref_softcap > 0, cap * torch.tanh(ref_logits / cap), ref_logits)
    ref_logp = ref_logits.log_softmax(-1)
    code = (ref_logp.exp() * (ref_logp - logp_all)).sum(-1)
    if theta_first is None:
        kl = code
    else:
        kl = torch.where(theta_first > 0, (logp_all.exp() * (logp_all - ref_logp)).sum(-1), code)
    w = torch.where(dft > 0, logp.exp().detach(), torch.ones_like(logp))
    return weights * (-w * logp + kl_weight * kl), logp, kl.detach()


def load_reference(args, model, tokenizer, rt, batch):
    """The frozen pi_ref: --ref_model or the starting weights, eval mode, no gradients; returns its decoder
    (final hidden states), LM head weight and logit post-processing (scale, softcap) as 0-d tensors, after
    common.check_objective on `batch`, and the context its forward runs in. Under FSDP the decoder is sharded like
    the policy's and the head is a whole copy on every rank (the anchor needs all V rows per chunk). With LoRA and no
    --ref_model, pi_ref is the policy's own base with its adapters bypassed: no second copy (head None: the policy's)."""
    if args.lora_r and not args.ref_model:
        ref_map = tuple(torch.tensor(v, device=rt.device) for v in common.logit_map(model))
        return model.get_decoder(), None, ref_map, lambda: common.adapters_disabled(model)
    reference, ref_tokenizer = common.load_model(args.ref_model or args.model, args.dtype, rt.device, args.trust_remote_code)
    vocab, ref_vocab = model.get_output_embeddings().weight.shape[0], reference.get_output_embeddings().weight.shape[0]
    if ref_vocab != vocab or ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise common.UsageError(f"--ref_model {args.ref_model!r}: its vocabulary ({ref_vocab} rows, {len(ref_tokenizer)} "
                                f"tokens) differs from --model {args.model!r}'s ({vocab} rows, {len(tokenizer)} tokens)")
    reference.eval().requires_grad_(False)
    common.check_objective(reference, batch, rt, "--ref_model")
    ref_map = tuple(torch.tensor(v, device=rt.device) for v in common.logit_map(reference))
    decoder, head = reference.get_decoder(), reference.get_output_embeddings().weight
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        head = head.detach().clone()
        for layer in common.decoder_layers(reference):
            fully_shard(layer)
        fully_shard(decoder)
    return decoder, head, ref_map, contextlib.nullcontext


# COMMON: the loss on one micro-batch. Methods change this (and only this) when their objective differs.
def compute_loss(model, batch, args, reference=None):
    """Summed per-token ASFT/DFT loss of a micro-batch; the caller normalises by the global token count."""
    hidden, router_loss, metrics = common.decoder_forward(model, batch)  # router_loss: MoE load balancing, else 0
    # METHOD: the objective of --mode in training; the held-out loss (no grad) stays plain cross-entropy, as in sft.py
    objective, inputs, constants = common.cross_entropy_objective, (), ()
    if torch.is_grad_enabled() and args.mode == "dft":
        objective = dft_objective
    elif torch.is_grad_enabled() and args.mode in ("sft+kl", "asft"):
        ref_decoder, ref_head, ref_map, ref_context = reference
        with torch.no_grad(), ref_context():
            ref_hidden = ref_decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        objective, inputs = asft_objective, (ref_hidden,)
        ref_head = model.get_output_embeddings().weight.detach() if ref_head is None else ref_head
        constants = (ref_head, torch.tensor(args.kl_weight, device=hidden.device),
                     torch.tensor(float(args.mode == "asft"), device=hidden.device),
                     torch.tensor(float(args.kl_direction == "paper"), device=hidden.device), *ref_map)
    loss_sum, logp, *kl = common.fused_linear_cross_entropy(hidden, model.get_output_embeddings().weight, batch["targets"],
                                                            objective=objective, token_inputs=inputs, constants=constants,
                                                            logit_map=common.logit_map(model),
                                                            chunk_size=args.chunk_size or None, compile=args.compile)
    mask = batch["targets"] != common.IGNORE_INDEX
    n = mask.sum().clamp(min=1)
    metrics |= {"ce": (-logp[mask].sum() / n).item(), "label_prob": (logp[mask].exp().sum() / n).item()}
    if kl:
        metrics["kl"] = (kl[0][mask].sum() / n).item()
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
    if args.mode not in MODES:
        raise common.UsageError(f"--mode must be one of {', '.join(MODES)}, got {args.mode!r}")
    if args.kl_weight < 0:
        raise common.UsageError(f"--kl_weight must be >= 0, got {args.kl_weight}")
    if args.kl_direction not in ("paper", "code"):
        raise common.UsageError(f"--kl_direction must be paper or code, got {args.kl_direction!r}")

    # COMMON: seed, distributed
    rt = common.setup_distributed(args.device, args.dtype)
    common.prepare_output_dir(args.output_dir, args.resume, args.overwrite, rt)  # before anything is loaded
    common.seed_everything(args.seed)  # identical init on every rank

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
    micro = args.micro_batch_size or args.batch_size // rt.world_size
    if args.batch_size % (micro * rt.world_size):
        raise common.UsageError(f"--batch_size {args.batch_size} must be a multiple of --micro_batch_size {micro} "
                         f"x {rt.world_size} processes")
    schedule = common.batch_schedule([len(e["input_ids"]) for e in train], args.batch_size, args.steps, args.seed)
    common.check_objective(model, common.collate(train, schedule[0][:2] if schedule else [0], tokenizer.pad_token_id, rt.device), rt)

    # METHOD: the frozen reference model when the anchor is on
    reference = None
    if args.mode in ("sft+kl", "asft"):
        reference = load_reference(args, model, tokenizer, rt, common.collate(train, schedule[0][:2] if schedule else [0], tokenizer.pad_token_id, rt.device))

    # COMMON: optimizer and schedule
    loss_model = common.wrap_model(model, lambda m, b: compute_loss(m, b, args, reference), rt, args.fsdp, args.gradient_checkpointing)
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
