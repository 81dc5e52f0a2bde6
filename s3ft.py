"""S3FT: Selective Self-to-Supervised Fine-Tuning (Gupta et al., NAACL Findings 2025), arXiv 2502.08130.

Method: before training, the frozen starting model answers every training prompt; the task's judge keeps an
answer that is correct as the target (`own`); otherwise the model rewrites the gold answer in its own words
and an accepted rewrite becomes the target (`rewrite`); otherwise the gold stays (`gold`). Then plain SFT.
Training on its own wording moves the model less than the gold wording does, so it forgets less.

Usage:
    python s3ft.py                                  # embedded world: rebuild the math set (~2 min), then sft.py's run
    torchrun --nproc_per_node 8 s3ft.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset openai/gsm8k:main \
        --eval_datasets gsm8k=openai/gsm8k:main --dtype bfloat16 --batch_size 64 --lr 1e-5 --max_length 1024 \
        --gen_max_new_tokens 512
    python s3ft.py --own_answers false              # ablation: rewrite every example (SDFT-like, stage 1 off)
    python s3ft.py --resume auto                    # reuses the cached rebuild (content hash) and the checkpoint
The rebuilt set is saved as <cache_dir>/s3ft_data-<hash>.jsonl (a `messages` dataset with each target's source):
`python sft.py --dataset` on it trains exactly what this script trains.
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
    output_dir: str = "runs/s3ft"
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
    # method arguments (the paper gives no decoding settings: greedy keeps the rebuild deterministic)
    gen_max_new_tokens: int = 128
    """token budget of each own answer and rewrite; answers cut off by it are rejected"""
    gen_temperature: float = 0.0
    """sampling temperature of own answers and rewrites (0 = greedy; the paper does not say)"""
    gen_batch_size: int = 64
    """prompts per generation batch (KV cache, left padding)"""
    gen_seed: int = 0
    """seed of the sampling (apart from --seed, so that training seeds share one generated set)"""
    cache_dir: str = "runs/cache"
    """generated data is saved here under a content hash of model, data, settings and code; reused by any run"""
    own_answers: bool = True
    """stage 1, use the model's own correct answers; false = rewrite every example (SDFT-like ablation)"""
    rewrite_template: str = ("{prompt}\n\nReference answer:\n{reference}\n\n"
                             "Use the reference answer as a guide and write your own response.")
    """rewrite prompt (paper Figs. 6-7 in spirit): {prompt} = the question, {reference} = the gold answer"""
    leak_filter: bool = True
    """reject rewrites that mention the prompt's scaffolding ("reference answer", ...): SDFT's filter, not in S3FT"""


# METHOD: the paper's GSM8K prompt (Fig. 3), for benchmark/s3ft.sh's data files
GSM8K_INSTRUCTION = ("You are a math expert. Solve the following problem step by step, then end your response with "
                     "\"The answer is N.\", where N is the final answer as an integer.")


def paper_gsm8k_row(question: str, answer: str, normalize_gold: bool = True) -> dict:
    """A GSM8K row (the question; the gold solution ending in "#### N") with S3FT's GSM8K training prompt (Gupta et
    al. 2025, Fig. 3: reason step by step, then "The answer is {answer}", an integer). The sources we could read
    describe Fig. 3 but do not quote it, so GSM8K_INSTRUCTION's wording is ours. Returns a prompt/response row for
    the math judge (reference = N). normalize_gold: the gold gets the same ending, its calculator annotations
    <<...>> removed and "#### N" replaced by "The answer is N." (SDFT's normalisation; the paper does not say
    whether S3FT did), so that SFT's targets and S3FT's gold fallback follow the instruction."""
    if "####" not in answer:
        raise common.UsageError(f"GSM8K answer without its final '#### N': {answer[-80:]!r}")
    work, final = answer.rsplit("####", 1)
    final = final.strip().replace(",", "")
    response = f"{re.sub(r'<<[^<>]*>>', '', work).rstrip()}\nThe answer is {final}.".lstrip() if normalize_gold else answer
    return {"prompt": f"{GSM8K_INSTRUCTION}\n\n{question}", "response": response, "task": "math", "reference": final}


# METHOD: S3FT target selection (Sec. 3, Fig. 1; target sources as in Table 3)
LEAK_PHRASES = ("reference answer", "your response", "my response", "your own response", "now it's your turn")


def leaks_scaffolding(text: str) -> bool:
    """True if a rewrite talks about the rewrite prompt instead of answering (SDFT's filter, our addition)."""
    lower = text.lower()
    return any(p in lower for p in LEAK_PHRASES) or lower.lstrip().startswith("your turn")


def select_targets(golds: list, own: list, rewrite, judge, leak_filter: bool = True) -> list:
    """S3FT's data rebuild (arXiv 2502.08130, Sec. 3 and Fig. 1), for examples i = 0..n-1:
    target_i = yhat_i if judge(yhat_i), else ytil_i if judge(ytil_i), else y_i.

    golds[i] = y_i, the gold response. own[i] = yhat_i, the frozen model's answer (None: cut off by the
    token budget; own=None: stage 1 off). rewrite(indices) returns ytil_i for those i, the model's rewrite
    of y_i given x_i (None: cut off); it is called once, with the rejected examples only. judge(i, text)
    returns (ok, reason) from the task's judge against example i's reference. A rewrite that mentions the
    prompt's scaffolding is rejected before judging when leak_filter is on. Returns one record per example,
    in order: target, source (own | rewrite | gold) and each verdict."""
    records = []
    for i in range(len(golds)):
        answer = None if own is None else own[i]
        ok, reason = (False, "stage 1 off") if own is None else (False, "cut off") if answer is None else judge(i, answer)
        records.append({"source": "own" if ok else None, "target": answer if ok else None, "own": answer, "own_verdict": reason})
    todo = [i for i, r in enumerate(records) if r["source"] is None]
    for i, text in zip(todo, rewrite(todo) if todo else []):
        if text is None:
            ok, reason = False, "cut off"
        elif leak_filter and leaks_scaffolding(text):
            ok, reason = False, "mentions the prompt's scaffolding"
        else:
            ok, reason = judge(i, text)
        records[i].update(source="rewrite" if ok else "gold", target=text if ok else golds[i], rewrite=text,
                          rewrite_verdict=reason)
    return records


def task_judge(task: str, where: str):
    """The shared judge of a task (common.JUDGES): S3FT's verdicts are the evaluation's verdicts."""
    if task not in common.JUDGES:
        raise common.UsageError(f"{where}: task {task!r} has no judge; S3FT needs one of {sorted(common.JUDGES)} "
                                f"(set a 'task' field per row, with a 'reference' for it)")
    return common.JUDGES[task]


def rewrite_prompt(messages: list, gold: str, template: str) -> list:
    """The conversation up to the answer, with the last user turn replaced by the rewrite request [x_i; y_i]."""
    fields = {"{prompt}": messages[-1]["content"], "{reference}": gold}
    content = re.sub(r"\{prompt\}|\{reference\}", lambda m: fields[m.group(0)], template)
    return messages[:-1] + [{"role": "user", "content": content}]


def rebuild(model, tokenizer, examples: list, args) -> tuple:
    """Run select_targets on these examples with the frozen model; returns (dataset rows, seconds spent)."""
    timing = {"generate_s": 0.0, "judge_s": 0.0, "generated": 0}

    def generate(prompts):
        t0 = time.time()
        texts, finished = common.generate(model, tokenizer, prompts, args.gen_max_new_tokens, args.gen_temperature,
                                          args.gen_batch_size, seed=args.gen_seed, return_finished=True)
        timing["generate_s"] += time.time() - t0
        timing["generated"] += len(prompts)
        return [t.strip() if done else None for t, done in zip(texts, finished)]

    def judge(i, text):
        t0 = time.time()
        verdict = common.JUDGES[examples[i]["task"]](text, examples[i]["reference"])
        timing["judge_s"] += time.time() - t0
        return verdict

    prompts = [ex["messages"][:-1] for ex in examples]
    golds = [ex["messages"][-1]["content"] for ex in examples]
    own = generate(prompts) if args.own_answers else None
    rewrite = lambda todo: generate([rewrite_prompt(prompts[i], golds[i], args.rewrite_template) for i in todo])
    records = select_targets(golds, own, rewrite, judge, args.leak_filter)
    rows = [{"messages": p + [{"role": "assistant", "content": r["target"]}], "task": ex["task"],
             "reference": ex["reference"], **r} for p, ex, r in zip(prompts, examples, records)]
    return rows, timing


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

    # METHOD: rebuild the training set with the frozen starting model, cached by content hash (reused on resume)
    for i, ex in enumerate(train):
        task_judge(ex["task"], f"{args.dataset}: sample {i + 1}")
    settings = {k: getattr(args, k) for k in ("gen_max_new_tokens", "gen_temperature", "own_answers", "rewrite_template",
                                              "leak_filter", "gen_seed", "dtype")}
    key = common.content_hash(model, [[ex["messages"], ex["task"], ex["reference"]] for ex in train], settings,
                              common.generate, common.decode, *common.JUDGES.values(), common.sandbox.LAUNCHER,
                              select_targets, rebuild)
    cache = os.path.join(args.cache_dir, f"s3ft_data-{key[:16]}.jsonl")
    timing = {"generate_s": 0.0, "judge_s": 0.0, "generated": 0, "cached": os.path.isfile(cache), "file": cache}
    if timing["cached"]:
        print0(f"S3FT: reusing {cache}")
    else:
        with common.precision(rt):  # generation in the compute dtype, like evaluation
            rows, spent = rebuild(model, tokenizer, train[rt.rank::rt.world_size], args)
        rows = common.gather_shards(rows, rt)
        timing.update({k: common.all_reduce_sum(torch.tensor(float(v))).item() / (1 if k == "generated" else rt.world_size)
                       for k, v in spent.items()})
        if rt.is_main:
            common.write_jsonl(cache, rows)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    rows = common.read_records(cache)
    sources = [row["source"] for row in rows]
    method_stats = {f"method/{s}": sources.count(s) / len(sources) for s in ("own", "rewrite", "gold")}
    method_stats.update({f"method/{k}": v for k, v in timing.items()})
    print0("S3FT targets: " + " | ".join(f"{s} {sources.count(s)}" for s in ("own", "rewrite", "gold")) +
           f" | {cache}" + ("" if timing["cached"] else f" | generate {timing['generate_s']:.0f}s judge {timing['judge_s']:.0f}s"))
    # the paper's motivation (Table 1, Fig. 2): where both are correct, the model's own answer is likelier than the gold
    own = [i for i, row in enumerate(rows) if row["source"] == "own"][:256]
    likelihood_sets = {"gold": [train[i] for i in own], "own": []}
    for i in own:
        ids, labels = common.tokenize_example(tokenizer, rows[i]["messages"], args.max_length, "truncate",
                                             args.mask_history)[0]
        likelihood_sets["own"].append({"input_ids": ids, "labels": labels})
    train, stats = common.load_sft_data(cache, tokenizer, args.max_length, args.overlong, mask_history=args.mask_history,
                                        num_proc=args.dataset_num_proc)
    micro = args.micro_batch_size or args.batch_size // rt.world_size
    if args.batch_size % (micro * rt.world_size):
        raise common.UsageError(f"--batch_size {args.batch_size} must be a multiple of --micro_batch_size {micro} "
                         f"x {rt.world_size} processes")
    schedule = common.batch_schedule([len(e["input_ids"]) for e in train], args.batch_size, args.steps, args.seed)
    common.check_objective(model, common.collate(train, schedule[0][:2] if schedule else [0], tokenizer.pad_token_id, rt.device), rt)

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
    logger.log({"event": "config", **dataclasses.asdict(args), "world_size": rt.world_size, **{f"data/{k}": v for k, v in stats.items()}, **method_stats})
    if args.eval_before and not resume:
        if own:  # METHOD: per-token NLL under the starting model of own vs gold targets, on the same prompts
            method_stats.update({f"method/nll_{name}": common.evaluate_loss(loss_model, examples, rt, tokenizer.pad_token_id)["loss"]
                                 for name, examples in likelihood_sets.items()})
        logger.log({"event": "eval_before", **evaluate(model, tokenizer, loss_model, eval_sets, rt, args, 0),
                    **{k: v for k, v in method_stats.items() if k.startswith("method/nll")}})

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
