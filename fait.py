"""FAIT: Fault-Aware Fine-Tuning for better code generation (Fan et al., 2025), arXiv 2503.16913 (v2+: "FGit").

Method: for each correct reference program, a model writes similar but incorrect variants; the sandboxed tests
confirm they fail. The lines (difflib) and characters (Levenshtein alignment) of the correct program that differ
from its closest failing variant are "error-sensitive"; their tokens get a larger weight w_j in the cross-entropy on
the correct program, L = -(1/n) sum_j w_j log p(c_j | prompt, c_<j). Only the correct program is ever a target.
The paper's weight rule is not readable: the defaults are the least-assuming reading of that formula (raw weights,
constant over training); per-sequence renormalisation and a decaying emphasis are ablations.

Usage:
    python fait.py                                  # embedded world: code with tests, variants sampled from the base
    torchrun --nproc_per_node 8 fait.py --model Qwen/Qwen2.5-Coder-1.5B-Instruct --dataset google-research-datasets/mbpp:full \
        --eval_datasets mbpp=google-research-datasets/mbpp:full --teacher Qwen/Qwen2.5-Coder-7B-Instruct \
        --dtype bfloat16 --lr 1e-5 --max_length 1024 --gen_max_new_tokens 512
    python fait.py --epochs 1                       # one pass over the data, as the paper trains (16 steps here)
    python fait.py --granularity line               # ablations: line | token | both; --weight_schedule decay; --renormalize true
    python fait.py --resume auto                    # reuses the cached variants (content hash) and the checkpoint
The variants are saved as <cache_dir>/fait_variants-<hash>.jsonl. Model-generated code runs only in common.run_sandboxed.
"""
import dataclasses
import difflib
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
    dataset: str = os.path.join(common.WORLD_DIR, "data", "code", "train.jsonl")
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
        ("code", "code", "test"), ("code_ood", "code", "test_ood"), ("math", "math", "test"), ("rc", "rc", "test"),
        ("knowledge", "knowledge", "test")])
    """comma-separated name=source pairs scored by the task judges; the first is the target task"""
    eval_split: str = "test"
    """split of hub eval datasets"""
    output_dir: str = "runs/fait"
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
    # method arguments (the paper's weight rule and values were not readable: see fait_weights)
    alpha: float = 1.0
    """weight added to tokens on changed lines (line level); our provisional default"""
    beta: float = 1.0
    """weight added to changed tokens (token level); our provisional default"""
    granularity: str = "both"
    """which differences are error-sensitive: both | line | token (the paper's ablation)"""
    weight_schedule: str = "constant"
    """how alpha and beta change over training: constant (default; no schedule is in the sources) | decay (ablation: linear to 0 at the last step)"""
    renormalize: bool = False
    """ablation: rescale each sequence's weights to mean 1 over its loss tokens (the project spec's earlier default; not in the visible formula)"""
    epochs: int = 0
    """passes over the training data, the step count becoming epochs x floor(N / batch_size) (the paper trains 1); 0 = use --steps, which must then stay at its default"""
    teacher: str = ""
    """model that writes the incorrect variants (hub id or directory); empty = the starting model"""
    variant_prompts: str = "corrupt,task"
    """candidate sources: corrupt = ask for an almost identical but incorrect version of the reference (the paper's);
    task = sample answers to the task itself (the model's own near-misses)"""
    corrupt_template: str = ("{prompt}\n\nCorrect solution:\n{reference}\n\nRewrite this solution so that it looks "
                             "almost the same but is incorrect. Change as little as possible.")
    """prompt of the corrupt source: {prompt} = the task, {reference} = the correct code"""
    num_samples: int = 4
    """candidates sampled per source and example"""
    min_similarity: float = 0.5
    """smallest difflib ratio between a variant and the correct code (0..1)"""
    gen_temperature: float = 1.0
    """sampling temperature of the candidates"""
    gen_max_new_tokens: int = 128
    """token budget per candidate; candidates cut off by it are dropped"""
    gen_batch_size: int = 64
    """prompts per generation batch (KV cache, left padding)"""
    gen_seed: int = 0
    """seed of the sampling (apart from --seed, so that training seeds share one generated set)"""
    cache_dir: str = "runs/cache"
    """generated data is saved here under a content hash of model, data, settings and code; reused by any run"""


# METHOD: FAIT error-sensitive segments (Sec. 3.1) and dynamic importance reweighting (Sec. 3.2)
def code_span(text: str) -> tuple:
    """(start, code): the first ```python block of a response, else the whole response."""
    match = re.search(r"```(?:python)?\n(.*?)```", text, re.S)
    return (match.start(1), match.group(1)) if match else (0, text)


def char_alignment(incorrect: str, correct: str) -> list:
    """Levenshtein alignment (unit costs) of one incorrect line to its correct line, as flags over the
    correct line's characters: substituted or inserted characters, and for each run of deleted characters
    the correct character just after it (the last one at the end), so a pure deletion still flags a token."""
    n, m = len(incorrect), len(correct)
    cost = [[i + j if i * j == 0 else 0 for j in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i][j] = min(cost[i - 1][j - 1] + (incorrect[i - 1] != correct[j - 1]), cost[i - 1][j] + 1, cost[i][j - 1] + 1)
    flags, i, j = [False] * m, n, m
    while i or j:  # backtrace, preferring match/substitution, then insertion into correct, then deletion
        if i and j and cost[i][j] == cost[i - 1][j - 1] + (incorrect[i - 1] != correct[j - 1]):
            flags[j - 1] |= incorrect[i - 1] != correct[j - 1]
            i, j = i - 1, j - 1
        elif j and cost[i][j] == cost[i][j - 1] + 1:
            flags[j - 1], j = True, j - 1
        else:
            if m:
                flags[min(j, m - 1)] = True
            i -= 1
    return flags


def difference_masks(correct: str, incorrect: str) -> tuple:
    """FAIT's error-sensitive segments (arXiv 2503.16913, Sec. 3.1) as two boolean masks over the characters
    of `correct`: line[k] = character k is on a line that difflib (SequenceMatcher over the lines, autojunk off)
    does not match to `incorrect` ('replace' or 'insert'); token[k] = character k differs in the character-level
    alignment of its line to the paired incorrect line (`char_alignment`). Our choices where the paper is not
    readable: 'replace' blocks pair lines by index and flag extra correct lines whole (in both masks);
    'delete' blocks (lines only in the incorrect code) flag nothing; newlines are never flagged. token <= line."""
    lines = correct.splitlines(keepends=True)
    starts = [sum(len(l) for l in lines[:i]) for i in range(len(lines))]
    cor = [l.rstrip("\r\n") for l in lines]
    inc = [l.rstrip("\r\n") for l in incorrect.splitlines()]
    line, token = [False] * len(correct), [False] * len(correct)
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, inc, cor, autojunk=False).get_opcodes():
        if op not in ("replace", "insert"):
            continue
        for j in range(j1, j2):
            paired = i1 + (j - j1) if op == "replace" and i1 + (j - j1) < i2 else None
            flags = char_alignment(inc[paired], cor[j]) if paired is not None else [True] * len(cor[j])
            for k, flag in enumerate(flags):
                line[starts[j] + k], token[starts[j] + k] = True, flag
    return line, token


def choose_variant(correct: str, candidates: list, judge, min_similarity: float) -> tuple:
    """The most similar candidate that differs from `correct` on some line, has similarity (difflib ratio) of at
    least min_similarity, and FAILS judge (tests run in the sandbox); (None, 0.0, judged) when there is none.
    Candidates are judged most similar first, stopping at the first failure."""
    scored = {}
    for text in candidates:
        if text is not None and text.strip() != correct.strip() and any(difference_masks(correct, text)[0]):
            scored[text] = difflib.SequenceMatcher(None, text, correct, autojunk=False).ratio()
    judged = 0
    for text, similarity in sorted(scored.items(), key=lambda kv: (-kv[1], kv[0])):
        if similarity < min_similarity:
            break
        judged += 1
        if not judge(text)[0]:
            return text, similarity, judged
    return None, 0.0, judged


def emphasis(step: int, steps: int, schedule: str) -> float:
    """A factor on alpha and beta over training. The paper's "dynamic" is not readable, and no source ties it to
    the step (the secondary summary ties it to the token's significance and the correct/incorrect pair), so the
    default is 1 throughout (constant); decay (1 at step 0, linearly to 0 at the last step: FAIT becomes SFT) is
    the ablation, the project's earlier default."""
    if schedule == "constant":
        return 1.0
    if schedule == "decay":
        return 1.0 - step / steps
    raise ValueError(f"--weight_schedule must be decay or constant, got {schedule!r}")


def fait_weights(line_mask, token_mask, loss_mask, alpha: float, beta: float, renormalize: bool = False):
    """Per-token loss weights w_j [B, T] (no gradient) of FAIT's dynamic importance reweighting (arXiv 2503.16913,
    Sec. 3.2). The paper's rule for w_j is not readable; the only visible formula (a secondary summary, Moonlight)
    is L_Fait = -(1/n) sum_i sum_j w_j log P(c_correct,i,j | p_target,i, c_correct,i,<j), with w_j larger on
    error-sensitive tokens. Our reading: w_j = 1 + alpha * line_j + beta * token_j on loss tokens (0 elsewhere;
    line_mask, token_mask = the two error-sensitive masks, loss_mask = the correct code's loss tokens), used raw as
    the formula shows. `renormalize` (ablation, the project spec's earlier default, not in the formula) rescales
    each sequence's weights to mean 1 over its loss tokens, so emphasis only moves loss between a program's
    tokens. n = the global count of loss tokens, the project's one rule (the paper's n is not readable either).
    alpha = beta = 0, or empty masks, gives weights 1: plain SFT."""
    raw = (1 + alpha * line_mask + beta * token_mask) * loss_mask
    if renormalize:
        raw = raw * loss_mask.sum(-1, keepdim=True) / raw.sum(-1, keepdim=True).clamp(min=1e-12)
    return raw.detach()


def epoch_steps(samples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of `epochs` passes over `samples` training samples (--epochs): common.batch_schedule cuts
    each epoch into floor(samples / batch_size) batches (dropping the remainder, other samples each epoch)."""
    return epochs * (samples // batch_size)


def token_masks(tokenizer, example: dict, line: list, token: list) -> tuple:
    """Character masks over the response's code -> per-position masks aligned with example["input_ids"]
    (a token is flagged if it covers a flagged character), through the tokenizer's offset mapping."""
    text = tokenizer.apply_chat_template(example["messages"], tokenize=False)
    prompt = tokenizer.apply_chat_template(example["messages"][:-1], add_generation_prompt=True, tokenize=False)
    response = example["messages"][-1]["content"]
    if not text.startswith(prompt + response):
        raise common.UsageError("chat template: the response does not follow the prompt verbatim; cannot map the masks")
    base = len(prompt) + code_span(response)[0]
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = example["input_ids"]
    if enc["input_ids"][:len(ids)] != ids:
        raise common.UsageError("tokenizer: the offset mapping does not reproduce the chat template's tokens")
    masks = []
    for chars in (line, token):
        masks.append([float(any(chars[max(s, base) - base:max(min(e, base + len(chars)) - base, 0)]))
                      for s, e in enc["offset_mapping"][:len(ids)]])
    return tuple(masks)


def find_variants(model, tokenizer, examples: list, args) -> tuple:
    """One closest failing variant (or None) per example, sampled from `model`; returns (rows, timing)."""
    sources = [s for s in args.variant_prompts.split(",") if s]
    if not sources or set(sources) - {"corrupt", "task"}:
        raise common.UsageError(f"--variant_prompts: comma-separated corrupt and/or task, got {args.variant_prompts!r}")
    timing = {"generate_s": 0.0, "judge_s": 0.0, "generated": 0, "judged": 0}
    prompts = []
    for ex in examples:
        task = ex["messages"][:-1]
        corrupt = args.corrupt_template.replace("{reference}", code_span(ex["messages"][-1]["content"])[1])
        corrupt = task[:-1] + [{"role": "user", "content": corrupt.replace("{prompt}", task[-1]["content"])}]
        prompts += [corrupt if s == "corrupt" else task for s in sources for _ in range(args.num_samples)]
    t0 = time.time()
    texts, finished = common.generate(model, tokenizer, prompts, args.gen_max_new_tokens, args.gen_temperature,
                                      args.gen_batch_size, seed=args.gen_seed, return_finished=True)
    timing["generate_s"], timing["generated"] = time.time() - t0, len(prompts)
    per = len(sources) * args.num_samples
    rows = []
    for i, ex in enumerate(examples):
        correct = code_span(ex["messages"][-1]["content"])[1]
        candidates = [code_span(t)[1] if done else None for t, done in zip(texts[i * per:(i + 1) * per], finished[i * per:(i + 1) * per])]
        t0 = time.time()
        judge = lambda code: common.judge_code(code, ex["reference"])
        reference_passes = judge(correct)[0]  # a reference that fails its own tests gets no variant (plain SFT)
        variant, similarity, judged = choose_variant(correct, candidates, judge, args.min_similarity) \
            if reference_passes else (None, 0.0, 0)
        timing["judge_s"] += time.time() - t0
        timing["judged"] += judged + 1
        source = sources[candidates.index(variant) // args.num_samples] if variant is not None else None
        rows.append({"variant": variant, "similarity": similarity, "source": source, "reference_passes": reference_passes})
    return rows, timing


# COMMON: the loss on one micro-batch. Methods change this (and only this) when their objective differs.
def compute_loss(model, batch, args):
    """Summed token cross-entropy of a micro-batch; the caller normalises by the global token count."""
    hidden, router_loss, metrics = common.decoder_forward(model, batch)  # router_loss: MoE load balancing, else 0
    # METHOD: FAIT's weighted cross-entropy on the correct code (per-token weights through the fused loss)
    weights = None
    if "line_mask" in batch:  # training batches; the held-out loss stays plain cross-entropy, comparable to sft.py
        loss_mask = (batch["targets"] != common.IGNORE_INDEX).float()
        alpha = args.alpha * batch["emphasis"] * (args.granularity in ("both", "line"))
        beta = args.beta * batch["emphasis"] * (args.granularity in ("both", "token"))
        weights = fait_weights(batch["line_mask"], batch["token_mask"], loss_mask, alpha, beta, args.renormalize)
        sensitive = batch["line_mask"] * loss_mask
        metrics |= {"emphasis": batch["emphasis"], "sensitive_fraction": (sensitive.sum() / loss_mask.sum().clamp(min=1)).item(),
                    "sensitive_weight": ((weights * sensitive).sum() / sensitive.sum().clamp(min=1)).item()}
    loss_sum, logp = common.fused_linear_cross_entropy(hidden, model.get_output_embeddings().weight, batch["targets"],
                                                       weights, logit_map=common.logit_map(model), chunk_size=args.chunk_size or None, compile=args.compile)
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
    if args.granularity not in ("both", "line", "token"):
        raise common.UsageError(f"--granularity must be both, line or token, got {args.granularity!r}")
    if args.weight_schedule not in ("decay", "constant"):
        raise common.UsageError(f"--weight_schedule must be decay or constant, got {args.weight_schedule!r}")
    if args.epochs < 0:
        raise common.UsageError(f"--epochs must be 0 (use --steps) or more, got {args.epochs}")
    if args.epochs and args.steps != Args.steps:
        raise common.UsageError(f"--epochs {args.epochs} and --steps {args.steps} both set the training length: give one "
                                f"(--epochs sets the steps from the data size and --batch_size)")

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

    # METHOD: incorrect variants from the teacher, judged in the sandbox, cached by content hash (reused on resume)
    for i, ex in enumerate(train):
        if ex["task"] != "code":
            raise common.UsageError(f"{args.dataset}: sample {i + 1} has no tests (task {ex['task']!r}); fait.py needs "
                                    f"code with tests, e.g. the MBPP schema (text, code, test_list)")
    teacher = model
    if args.teacher:
        teacher, teacher_tokenizer = common.load_model(args.teacher, args.dtype, rt.device, args.trust_remote_code)
        if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise common.UsageError(f"--teacher {args.teacher}: its tokenizer differs from --model {args.model}'s; "
                                    f"use a teacher of the same family")
    settings = {k: getattr(args, k) for k in ("variant_prompts", "corrupt_template", "num_samples", "min_similarity",
                                              "gen_temperature", "gen_max_new_tokens", "gen_seed", "dtype")}
    key = common.content_hash(teacher, [[ex["messages"], ex["reference"]] for ex in train], settings,
                              common.generate, common.decode, common.judge_code, common.run_sandboxed, common.sandbox.LAUNCHER, find_variants,
                              choose_variant)
    cache = os.path.join(args.cache_dir, f"fait_variants-{key[:16]}.jsonl")
    timing = {"generate_s": 0.0, "judge_s": 0.0, "generated": 0, "judged": 0, "cached": os.path.isfile(cache), "file": cache}
    if timing["cached"]:
        print0(f"FAIT: reusing {cache}")
    else:
        with common.precision(rt):  # generation in the compute dtype, like evaluation
            rows, spent = find_variants(teacher, tokenizer, train[rt.rank::rt.world_size], args)
        rows = common.gather_shards(rows, rt)
        timing.update({k: common.all_reduce_sum(torch.tensor(float(v))).item() / (rt.world_size if k.endswith("_s") else 1)
                       for k, v in spent.items()})
        if rt.is_main:
            common.write_jsonl(cache, rows)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    del teacher
    variants = common.read_records(cache)
    for ex, row in zip(train, variants):
        line, token = difference_masks(code_span(ex["messages"][-1]["content"])[1], row["variant"] or
                                       code_span(ex["messages"][-1]["content"])[1])
        ex["line_mask"], ex["token_mask"] = token_masks(tokenizer, ex, line, token)
    found = [row for row in variants if row["variant"] is not None]
    method_stats = {"method/with_variant": len(found) / len(variants),
                    "method/reference_fails": sum(not r.get("reference_passes", True) for r in variants) / len(variants),
                    "method/similarity": sum(r["similarity"] for r in found) / max(len(found), 1),
                    **{f"method/from_{s}": sum(r["source"] == s for r in found) / len(variants) for s in ("corrupt", "task")},
                    **{f"method/{k}": v for k, v in timing.items()}}
    print0(f"FAIT variants: {len(found)}/{len(variants)} examples | " +
           " | ".join(f"{k[7:]} {v:.3g}" for k, v in method_stats.items() if not k.endswith(("with_variant", "cached", "file"))))
    micro = args.micro_batch_size or args.batch_size // rt.world_size
    if args.batch_size % (micro * rt.world_size):
        raise common.UsageError(f"--batch_size {args.batch_size} must be a multiple of --micro_batch_size {micro} "
                         f"x {rt.world_size} processes")
    if args.epochs:  # METHOD: --epochs: the step count from the data size
        args.steps = epoch_steps(len(train), args.batch_size, args.epochs)
        print0(f"--epochs {args.epochs}: {args.steps} steps of {args.batch_size} samples")
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
        logger.log({"event": "eval_before", **evaluate(model, tokenizer, loss_model, eval_sets, rt, args, 0)})

    # COMMON: training loop
    loss_model.train()
    t_start, tokens_seen, compiled_before = time.time(), 0, common.compile_seconds()
    for step in range(start_step, args.steps):
        t0, compiled = time.time(), common.compile_seconds()
        batches = [common.collate(train, ids, tokenizer.pad_token_id, rt.device, ("line_mask", "token_mask"))
                   for ids in common.micro_batches(schedule[step], rt, micro)]
        for batch in batches:  # METHOD: this step's emphasis
            batch["emphasis"] = emphasis(step, args.steps, args.weight_schedule)
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
