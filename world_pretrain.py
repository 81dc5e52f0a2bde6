"""Pretrain the embedded world's base model, and measure it.

    python world.py && python world_pretrain.py   # world/data, then tokenizer + model in world/base (~60 min, 2 CPU cores)
    python world_pretrain.py --steps 20 --output_dir /tmp/base   # a quick smoke run
    python world_pretrain.py report          # accuracies of world/base: greedy per split, and pass@8 at T=1
    python world_pretrain.py variants        # DRIFT's variants: base + SFT on math (reasoning), on code (target)

A LlamaForCausalLM (hidden 256, 4 layers, 8 heads of 32, MLP 512: all powers of two for RoSTE's Hadamard
rotations; 3.15M parameters) trained from its seed on world.pretraining_documents: the tasks as raw text (never
in the chat template), arithmetic drills, knowledge statements and chat-formatted small talk, packed into
256-token rows separated by <|endoftext|>, loss through common.fused_linear_cross_entropy on every token (a
raw task's prompt weighted by --prompt_weight).
The held-out prompts never occur in the corpus (world.held_out_keys), so the accuracies are earned.
"""
import dataclasses
import json
import math
import os
import shutil
import sys
import time

import torch

import common
import world


@dataclasses.dataclass
class Args:
    output_dir: str = os.path.join(world.WORLD, "base")
    """where the model (safetensors, config, tokenizer) is written"""
    seed: int = 0
    """seed of the data, the corpus and the initialisation"""
    steps: int = 2600
    """optimizer steps"""
    batch_size: int = 16
    """rows of seq_length tokens per step"""
    seq_length: int = 256
    """tokens per packed row"""
    lr: float = 3e-3
    """peak learning rate (AdamW), linear warm-up then cosine to 10%"""
    warmup_steps: int = 100
    """linear warm-up steps"""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices"""
    hidden_size: int = 256
    """model width (a power of two)"""
    layers: int = 4
    """decoder layers"""
    heads: int = 8
    """attention heads (head size = hidden_size / heads, a power of two)"""
    intermediate_size: int = 512
    """MLP width (a power of two)"""
    prompt_weight: float = 0.25
    """loss weight of a raw task document's prompt tokens (its answer and all other text weigh 1)"""
    anneal_steps: int = 400
    """steps of the final stage on world.ANNEAL_MIX (math-heavy), fresh optimizer, linear decay to 0"""
    anneal_lr: float = 6e-4
    """peak learning rate of the final stage"""
    stage1_from: str = ""
    """skip stage 1 and load its finished output from this directory (same flags and seed: same result)"""
    log_every: int = 20
    """steps between log lines"""
    save_every: int = 500
    """steps between snapshots of the model in output_dir/snapshot (0 = off), to probe a long run"""


def build_model(args: Args, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=eos[1],
                         eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def packed_rows(tokenizer, docs: list, seq_length: int, prompt_weight: float) -> tuple:
    """Documents joined by <|endoftext|> and cut into rows of seq_length + 1 tokens, with per-token loss
    weights: prompt_weight on a raw document's prompt, 1 elsewhere."""
    sep = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    prompts = tokenizer([p + "\n\n" if p is not None else "" for p, _ in docs], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r for _, r in docs], add_special_tokens=False)["input_ids"]
    ids, weights = [], []
    for p, r in zip(prompts, responses):
        ids += p + r + [sep]
        weights += [prompt_weight] * len(p) + [1.0] * (len(r) + 1)
    n = len(ids) // (seq_length + 1)
    return (torch.tensor(ids[: n * (seq_length + 1)]).view(n, seq_length + 1),
            torch.tensor(weights[: n * (seq_length + 1)]).view(n, seq_length + 1))


def train_stage(model, tokenizer, rows, row_weights, order, steps: int, lr_at, args: Args, stage: int, log):
    """One stage: AdamW (fresh state) over `steps` batches of packed rows in `order`, weighted token loss."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    model.train()
    start, smooth = time.time(), None
    for step in range(steps):
        pick = order[step * args.batch_size:(step + 1) * args.batch_size]
        inputs, targets, weights = rows[pick, :-1], rows[pick, 1:], row_weights[pick, 1:]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        hidden = model.model(input_ids=inputs).last_hidden_state
        loss_sum, _ = common.fused_linear_cross_entropy(hidden, model.lm_head.weight, targets, weights)
        loss = loss_sum / weights.sum()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % args.log_every == 0 or step == steps - 1:
            elapsed = time.time() - start
            tps = (step + 1) * targets.numel() / elapsed
            rec = {"stage": stage, "step": step, "loss": round(loss.item(), 4), "loss_smooth": round(smooth, 4),
                   "lr": lr_at(step), "grad_norm": round(grad_norm.item(), 3), "tokens_per_s": round(tps),
                   "elapsed_s": round(elapsed)}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if args.save_every and step and step % args.save_every == 0:
            model.save_pretrained(os.path.join(args.output_dir, "snapshot"))
            tokenizer.save_pretrained(os.path.join(args.output_dir, "snapshot"))


def pretrain(args: Args):
    """Stage 1: the main mix, cosine schedule. Stage 2 (anneal): a math-heavy mix, fresh optimizer, lr decaying
    linearly to 0, the way modern pretraining ends on its most wanted data."""
    torch.manual_seed(args.seed)
    data = world.base_data(args.seed)  # the original splits: their held-out prompts stay out of the corpus
    os.makedirs(args.output_dir, exist_ok=True)
    log_path = os.path.join(args.output_dir, "pretrain_log.jsonl")
    start = time.time()
    if args.stage1_from:  # a finished stage 1 of the same command: its weights are what stage 1 would compute
        model, tokenizer = common.load_model(args.stage1_from)
        with open(os.path.join(args.stage1_from, "pretrain_log.jsonl")) as f:
            stage1_log = [line for line in f if '"stage": 2' not in line]
        log = open(log_path, "w")
        log.writelines(stage1_log)
    else:
        docs_needed = args.steps * args.batch_size * args.seq_length // 45 + 1000  # ~45 tokens per document
        docs = world.pretraining_documents(data, docs_needed, args.seed)
        tokenizer = world.build_tokenizer([world.document_text(d) for d in docs[:30000]])
        rows, row_weights = packed_rows(tokenizer, docs, args.seq_length, args.prompt_weight)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed))
        need = args.steps * args.batch_size
        if need > len(rows):
            raise SystemExit(f"corpus has {len(rows)} rows, {need} needed: raise docs_needed")
        model = build_model(args, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}, {len(docs)} documents, "
              f"{len(rows)} rows of {args.seq_length} ({need} used)", flush=True)

        def cosine(step):
            if step < args.warmup_steps:
                return args.lr * (step + 1) / args.warmup_steps
            progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
            return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

        log = open(log_path, "w")
        train_stage(model, tokenizer, rows, row_weights, order, args.steps, cosine, args, 1, log)
    if args.anneal_steps:
        docs = world.pretraining_documents(data, args.anneal_steps * args.batch_size * args.seq_length // 45 + 1000,
                                           args.seed + 100, world.ANNEAL_MIX)
        rows, row_weights = packed_rows(tokenizer, docs, args.seq_length, args.prompt_weight)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed + 100))
        warm = max(1, args.anneal_steps // 20)
        linear = lambda step: args.anneal_lr * min((step + 1) / warm, (args.anneal_steps - step) / (args.anneal_steps - warm))
        train_stage(model, tokenizer, rows, row_weights, order, args.anneal_steps, linear, args, 2, log)
    model.save_pretrained(args.output_dir, safe_serialization=True)
    tokenizer.save_pretrained(args.output_dir)
    shutil.rmtree(os.path.join(args.output_dir, "snapshot"), ignore_errors=True)
    print(f"saved to {args.output_dir} after {time.time() - start:.0f} s", flush=True)


# ============================================================ REPORT
def pass_at_k(model, tokenizer, examples: list, k: int, max_new_tokens: int, seed: int = 0) -> float:
    """Fraction of prompts with at least one of k samples at temperature 1 passing the judge."""
    prompts = [e["messages"][:-1] for e in examples for _ in range(k)]
    outs = common.generate(model, tokenizer, prompts, max_new_tokens, temperature=1.0, batch_size=64, seed=seed)
    hits = [common.JUDGES[e["task"]](outs[i * k + j], e["reference"])[0] for i, e in enumerate(examples) for j in range(k)]
    return sum(any(hits[i * k:(i + 1) * k]) for i in range(len(examples))) / len(examples)


def report(model_path: str, n: int = 200, k: int = 8, max_new_tokens: int = 64):
    rt = common.setup_distributed("cpu")
    model, tokenizer = common.load_model(model_path, "float32", rt.device)
    print(f"| split | greedy accuracy | pass@{k} (T=1) |\n|---|---|---|")
    for task in ("math", "code", "rc", "knowledge"):
        for split in ("test", "test_ood"):
            path = os.path.join(world.WORLD, "data", task, f"{split}.jsonl")
            examples, _ = common.load_sft_data(path, tokenizer, 1024, limit=n)
            acc = common.evaluate_accuracy(model, tokenizer, examples, rt, max_new_tokens, batch_size=64)["accuracy"]
            pk = f"{pass_at_k(model, tokenizer, examples[:100], k, max_new_tokens):.1%}" if task in ("math", "code") and split == "test" else ""
            print(f"| {task}/{split} | {acc:.1%} | {pk} |", flush=True)


# ============================================================ VARIANTS (DRIFT's reasoning and target-domain models)
VARIANTS = {  # name: training set; both start from world/base and use sft.py's defaults otherwise
    "reasoning": os.path.join(world.WORLD, "data", "math", "train.jsonl"),
    "target": os.path.join(world.WORLD, "data", "code", "train.jsonl"),
}


def variants(out_dir: str = os.path.join("runs", "world_variants")):
    """base + SFT on worked math (reasoning) and base + SFT on code (target domain), each via sft.py."""
    import subprocess
    for name, dataset in VARIANTS.items():
        cmd = [sys.executable, os.path.join(world.ROOT, "sft.py"), "--dataset", dataset, "--output_dir",
               os.path.join(out_dir, name), "--eval_before", "false"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        print(f"{name} variant: {os.path.join(out_dir, name, 'final')}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["report"]:
        report(sys.argv[2] if len(sys.argv) > 2 else os.path.join(world.WORLD, "base"))
    elif sys.argv[1:2] == ["variants"]:
        variants(*sys.argv[2:3])
    else:
        pretrain(common.parse_args(Args))
