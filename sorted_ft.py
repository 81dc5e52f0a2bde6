"""Sorted Fine-Tuning (SoFT, "Sorted LLaMA"): sft.py trained through several depths at once, many models in one.

Paper: Kavehzadeh et al. 2024, "Sorted LLaMA: Unlocking the Potential of Intermediate Layers of Large Language
Models for Dynamic Inference", https://arxiv.org/abs/2309.08968 (v1: "... Using Sorted Fine-Tuning (SoFT)").

Method:
  Exit n reads the hidden state after the first n decoder layers through the model's own final norm and LM head
  (no new parameters): z_n = W N(h_n). The loss is the mean over the exits of each exit's cross-entropy (Eq. 1),
  every exit at every step, each through the fused loss. Any prefix of the trained model is then a usable model.

Usage:
    python sorted_ft.py                             # embedded world (4 layers): exits after layers 1, 2, 3, 4
    python sorted_ft.py --exits 4                   # only the last exit: exactly sft.py
    torchrun --nproc_per_node 8 sorted_ft.py --model meta-llama/Llama-2-13b-hf --dataset tatsu-lab/alpaca \
        --exits paper --exit_threshold paper --dtype bfloat16 --lr 2e-5 --batch_size 256 --steps 400
    # --exits paper = 12,16,...,40 of 40 layers (30% of the depth, then every 10%); --exit_threshold paper = 0.95-0.7
    # a sub-model is an ordinary model: AutoModelForCausalLM.from_pretrained("runs/sorted_ft/final", num_hidden_layers=n)
"""
import contextlib
import copy
import dataclasses
import inspect
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
    output_dir: str = "runs/sorted_ft"
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

    # METHOD: SoFT
    exits: str = ""
    """comma-separated depths n of the exits (the last layer L is always one), or `paper`: B at 30%, 40%, ..., 100% of the depth (Sec. 3: 12,16,...,40 of L = 40); empty = --exit_every"""
    exit_every: int = 0
    """with --exits empty: an exit after every k layers; 0 = every quarter of the depth (our default, not the paper's)"""
    eval_exits: str = ""
    """comma-separated depths (or `paper`) evaluated as sub-models; empty = the training exits (set it to read an SFT model's layers)"""
    exit_threshold: str = "0.9"
    """early exit at the final evaluation: emit at the first exit n whose max softmax prob >= tau_n; one number for all, one per exit n < L, or `paper` (App. A.1: 0.95 down to 0.7 by depth)"""
    early_exit_prompts: int = 50
    """target-set prompts decoded one at a time (batch 1) for the early-exit and sub-model speed test (0 = off)"""


# METHOD: the exits, their early-exit thresholds and the SoFT loss (Eq. 1)
def paper_exits(num_layers):
    """The paper's exit set B at any depth L (Kavehzadeh et al. 2024, Sec. 3: B = {12, 16, ..., 40} of L = 40, i.e.
    the first exit at 30% of the depth, then a stride of 10%): n_k = round(k L / 10), k = 3..10, halves rounded up,
    duplicates merged (fewer than 8 exits below L = 10). The paper gives no rule for other depths; this keeps B's
    depth fractions and its size |B| = 8, so the full model's share of the loss stays 1/8."""
    return sorted({max(1, (2 * k * num_layers + 10) // 20) for k in range(3, 11)})


def paper_threshold(n, num_layers):
    """tau_n of the paper's instance-aware early exit at any depth (App. A.1, L = 40: layers 12, 16 -> 0.95; 20, 24
    -> 0.9; 28, 32 -> 0.8; 36 -> 0.7), by the exit's depth in tenths t = round(10 n / L), halves up: t <= 4 -> 0.95,
    t <= 6 -> 0.9, t <= 8 -> 0.8, else 0.7. So the k-th exit of paper_exits(L) gets the paper's k-th threshold at
    every L >= 10; exits below 30% of the depth (the paper has none) get 0.95."""
    tenths = (20 * n + num_layers) // (2 * num_layers)
    return next(tau for top, tau in ((4, 0.95), (6, 0.9), (8, 0.8), (10, 0.7)) if tenths <= top)


def parse_depths(flag, spec):
    """--exits / --eval_exits as a set of layer numbers (None for `paper`); one clear line if malformed."""
    if spec == "paper":
        return None
    try:
        return {int(x) for x in spec.split(",")}
    except ValueError:
        raise common.UsageError(f"--{flag} must be comma-separated layer numbers or `paper`, got {spec!r}") from None


def parse_thresholds(spec):
    """--exit_threshold as a list of numbers >= 0 (None for `paper`); one clear line if malformed."""
    if spec == "paper":
        return None
    try:
        values = [float(x) for x in spec.split(",")]
    except ValueError:
        values = [float("nan")]
    if not all(v >= 0 for v in values):  # also refuses nan, which would never fire
        raise common.UsageError(f"--exit_threshold must be a number >= 0, a comma list of them (one per exit below "
                                f"the last layer) or `paper`, got {spec!r}")
    return values


def exit_thresholds(spec, depths, num_layers):
    """{n: tau_n} for the exits n < L of `depths` (which ends with L): `paper` (paper_threshold), one number for every
    exit, or one per exit in order. A list of another length is refused, naming the exits."""
    inner, values = depths[:-1], parse_thresholds(spec)
    if values is None:
        return {n: paper_threshold(n, num_layers) for n in inner}
    if len(values) == 1:
        values = values * len(inner)
    if len(values) != len(inner):
        raise common.UsageError(f"--exit_threshold {spec!r}: {len(values)} thresholds for the {len(inner)} exits "
                                f"{inner} below the last layer; give one number, one per exit, or `paper`")
    return dict(zip(inner, values))


def exit_depths(args, num_layers, spec=None):
    """Sorted, unique exit depths in 1..L (from --exits, or `spec`: a comma list or `paper`), always ending with L."""
    spec = args.exits if spec is None else spec
    if spec:
        given = parse_depths("exits", spec)
        depths = sorted((set(paper_exits(num_layers)) if given is None else given) | {num_layers})
    else:
        k = args.exit_every or max(1, num_layers // 4)
        depths = sorted(set(range(k, num_layers + 1, k)) | {num_layers})
    if depths[0] < 1 or depths[-1] > num_layers:
        raise common.UsageError(f"exits {spec!r}: depths must be in 1..{num_layers} (the model's layers)")
    return depths


def sorted_loss(exit_hidden, head, labels, logit_map=(1.0, 0.0), chunk_size=None, compile=True):
    """L_SoFT = (1/|B|) sum_{n in B} CE(W N(h_n), y) (Kavehzadeh et al. 2024, Eq. 1; the text says "sum", the
    equation divides by |B|: we use the mean).

    exit_hidden = [N(h_n) for n in B], each already through the final norm N exactly once; head = W, the shared
    LM head [V, H]; labels = y. Each exit's summed token cross-entropy comes from the fused loss, so no exit's
    [tokens x V] logits exist; logit_map is the model's own logit post-processing (common.logit_map), the same at
    every exit. Returns (mean over exits of the summed losses, [per-exit summed loss])."""
    per_exit = [common.fused_linear_cross_entropy(h, head, labels, logit_map=logit_map, chunk_size=chunk_size,
                                                  compile=compile)[0]
                for h in exit_hidden]
    return torch.stack(per_exit).mean(), per_exit


# METHOD: what the exits read (the decoder's blocks and final norm), the n-block sub-model, early exit
FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")


def exit_parts(model):
    """(attribute name of the decoder's list of its L blocks, its final norm N): what every exit reads. Llama-style
    decoders call them `layers` and `norm`, GPT-2 `h` and `ln_f`; a decoder without both is refused."""
    decoder, num_layers = model.get_decoder(), model.config.num_hidden_layers
    lists = [name for name, child in decoder.named_children() if isinstance(child, torch.nn.ModuleList) and len(child) == num_layers]
    norm = next((getattr(decoder, n) for n in FINAL_NORMS if isinstance(getattr(decoder, n, None), torch.nn.Module)), None)
    if len(lists) != 1 or norm is None:
        missing = f"single list of its {num_layers} blocks" if len(lists) != 1 else f"final norm (one of {', '.join(FINAL_NORMS)})"
        raise common.UsageError(f"sorted_ft.py reads exits from the decoder's blocks and final norm, but this "
                                f"{model.config.model_type} model's {type(decoder).__name__} has no {missing}; its modules: "
                                f"{', '.join(name for name, _ in decoder.named_children())}")
    return lists[0], norm


@contextlib.contextmanager
def truncated(model, n):
    """The model cut to its first n blocks, in place: the block list sliced (GPT-2 runs its whole list) and
    config.num_hidden_layers = n (Llama-style decoders run that many; caches are sized by it). A forward is then
    exactly exit n, the model that from_pretrained(..., num_hidden_layers=n) builds."""
    name, _ = exit_parts(model)
    decoder, full = model.get_decoder(), model.config.num_hidden_layers
    blocks = getattr(decoder, name)
    setattr(decoder, name, blocks[:n])
    model.config.num_hidden_layers = n
    try:
        yield model
    finally:
        setattr(decoder, name, blocks)
        model.config.num_hidden_layers = full


class Resume(torch.nn.Module):
    """Stands in for each of the blocks before a span that starts deeper: hands on their output, computed earlier."""

    def __init__(self):
        super().__init__()
        self.hidden = None

    def forward(self, *args, **kwargs):
        return self.hidden


@torch.no_grad()
def early_exit_decode(model, prompt_ids, thresholds: dict, max_new_tokens: int, stop_ids):
    """Greedy decoding of one prompt with confidence-threshold early exit (the paper's "instance-aware dynamic
    inference", Sec. 4.3): per token, run the spans of blocks between the exits in order; at exit n emit the argmax
    of the logits from N(h_n) if its softmax probability is >= thresholds[n], else go on; the last block always
    emits. KV cache (our choice; the paper's "adaptive caching" is not described): a token that exits at n has no
    keys and values in blocks > n yet. They are computed exactly, later, when a token goes deeper: each span keeps
    the inputs it has not processed and runs them together with the new one (lazy catch-up). So thresholds > 1 give
    the full model's greedy tokens and threshold 0 at exit n gives the n-block sub-model's.
    Each span runs through the model's own forward, so its masks (sliding windows, per-layer `layer_types`), rotary,
    final norm, LM head and logit post-processing (softcap, scaling) are the model's: span s is the model cut to
    its first ends[s] blocks, of which the first starts[s] are a `Resume` handing on their earlier output.
    Returns (token ids, exit depth of each, block-token forwards run)."""
    from transformers import DynamicCache
    name, norm = exit_parts(model)
    decoder, last = model.get_decoder(), model.config.num_hidden_layers
    blocks, cache = getattr(decoder, name), DynamicCache(config=model.config)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x
    ends = sorted({n for n in thresholds if 0 < n < last} | {last})  # span s runs blocks starts[s]+1..ends[s]
    starts, resume = [0] + ends[:-1], [Resume() for _ in ends]
    lists = [torch.nn.ModuleList([resume[s]] * a + list(blocks[a:b])) for s, (a, b) in enumerate(zip(starts, ends))]
    views = []  # the cache as span s sees it: layers outside the span alias its first, so the model sizes its
    for a, b in zip(starts, ends):  # masks and positions by the span's own layers, which have all seen the same tokens
        views.append(copy.copy(cache))
        views[-1].layers = [cache.layers[j if a <= j < b else a] for j in range(len(cache.layers))]
    done = [0] * len(ends)        # positions whose keys/values the blocks of span s have
    pending = [None] * len(ends)  # pending[s]: span s's input (span s-1's output) at positions done[s]..
    ids, tokens, depths, work, seen = prompt_ids, [], [], 0, []
    hook = norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))  # a span's output before N
    try:
        for _ in range(max_new_tokens):
            for s, stop in enumerate(ends):
                setattr(decoder, name, lists[s])
                resume[s].hidden, new = pending[s], ids[done[s]:]
                positions = torch.arange(done[s], len(ids), device=ids.device)[None]
                logits = model(input_ids=new[None], position_ids=positions, use_cache=True, logits_to_keep=1,
                               **{cache_arg: views[s]}).logits[:, -1]
                work += len(new) * (stop - starts[s])
                done[s], pending[s], hidden = len(ids), None, seen.pop()
                if stop < last:
                    pending[s + 1] = hidden if pending[s + 1] is None else torch.cat([pending[s + 1], hidden], 1)
                prob, token = logits.float().softmax(-1).max(-1)
                if stop == last or prob.item() >= thresholds[stop]:
                    break
            tokens.append(token.item())
            depths.append(stop)
            if token.item() in stop_ids:
                break
            ids = torch.cat([ids, token])
    finally:
        setattr(decoder, name, blocks)
        hook.remove()
    return tokens, depths, work


@torch.no_grad()
def check_exits(model, depths, ids, decoding=True, new_tokens=4):
    """Start-up guard (before training), on the tokens `ids`: each exit n < L as compute_loss reads it, N(h_n), equals
    the model truncated to n blocks, and, with `decoding`, early_exit_decode with thresholds that never fire (always
    fire at the first exit) generates what greedy decoding of the full (the truncated) model generates. An
    architecture where either fails is refused with one line, not after training."""
    name, norm = exit_parts(model)
    decoder, what = model.get_decoder(), f"this {model.config.model_type} model ({type(model).__name__})"
    was_training = model.training
    model.eval()
    try:
        states = decoder(input_ids=ids[None], output_hidden_states=True).hidden_states
        for n in depths[:-1]:
            with truncated(model, n):
                want = decoder(input_ids=ids[None]).last_hidden_state
            diff = (norm(states[n]) - want).abs().max().item()
            if not diff <= 1e-3 * want.abs().max().item():
                raise common.UsageError(f"sorted_ft.py: on {what}, exit {n} as the loss reads it ({name}[:{n}], then the "
                                        f"final norm) differs from the model truncated to {n} blocks by {diff:.2e}: its "
                                        f"decoder is not its blocks followed by that norm")
        if not decoding:
            return
        greedy = lambda: common.decode(model, ids[None], torch.ones_like(ids)[None], new_tokens, torch.tensor([-1]))[0].tolist()
        want = greedy()
        with truncated(model, depths[0]):
            want_first = greedy()
        try:
            full = early_exit_decode(model, ids, {n: 2.0 for n in depths[:-1]}, new_tokens, set())[0]
            first = early_exit_decode(model, ids, {depths[0]: 0.0}, new_tokens, set())[0]
        except Exception as err:  # e.g. a decoder loop that reads attributes of its blocks
            full = first = f"{type(err).__name__}: {err}"
        if full != want or first != want_first:
            raise common.UsageError(f"sorted_ft.py: the early-exit decoder does not reproduce greedy decoding on {what} "
                                    f"(full depth: {full} vs {want}; exit {depths[0]}: {first} vs {want_first}); "
                                    f"train without the early-exit test: --early_exit_prompts 0")
    finally:
        model.train(was_training)


def early_exit_report(model, tokenizer, examples, depths, args, rt):
    """Accuracy, tokens/s and mean exit depth of batch-1 greedy decoding on this rank's share of the prompts:
    the full model, each sub-model alone and the confidence-threshold exit, all through early_exit_decode."""
    stops = model.generation_config.eos_token_id or tokenizer.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    mine = examples[: args.early_exit_prompts][rt.rank::rt.world_size]
    settings = {"full": {}, **{f"exit{n}": {n: 0.0} for n in depths[:-1]}, "threshold": exit_thresholds(args.exit_threshold, depths, model.config.num_hidden_layers)}
    results = {}
    was_training = model.training
    model.eval()
    for name, thresholds in settings.items():
        passed = tokens = exit_sum = 0
        t0 = time.time()
        for e in mine:
            ids = tokenizer.apply_chat_template(e["messages"][:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
            with common.precision(rt):  # the compute dtype, as in the rest of the evaluation
                out, exits, _ = early_exit_decode(model, torch.tensor(ids, device=rt.device), thresholds, args.max_new_tokens, stops)
            text = tokenizer.decode([t for t in out if t not in stops], skip_special_tokens=True)
            passed += common.JUDGES[e["task"]](text, e["reference"])[0]
            tokens, exit_sum = tokens + len(out), exit_sum + sum(exits)
        t = common.all_reduce_sum(torch.tensor([float(passed), float(len(mine)), float(tokens), float(exit_sum), time.time() - t0]))
        results.update({f"method/{name}/accuracy": t[0].item() / max(t[1].item(), 1), f"method/{name}/tokens_per_s": t[2].item() / t[4].item(),
                        f"method/{name}/mean_exit_layer": t[3].item() / max(t[2].item(), 1)})
    for name in settings:
        results[f"method/{name}/speedup"] = results[f"method/{name}/tokens_per_s"] / results["method/full/tokens_per_s"]
    model.train(was_training)
    return results


# COMMON: the loss on one micro-batch. Methods change this (and only this) when their objective differs.
def compute_loss(model, batch, args, depths=()):
    """Summed SoFT loss of a micro-batch (mean over exits of each exit's summed token cross-entropy); the caller
    normalises by the global token count. The held-out loss (no grad) is the current model's plain cross-entropy."""
    states, router_loss, metrics = common.decoder_forward(model, batch, hidden_states=True)  # router_loss: MoE, else 0
    # METHOD: states[n] is block n's output before the final norm, except the last entry, which is already
    # normalised (= last_hidden_state): norm exits n < L once, and never renorm the last one
    last, norm = model.config.num_hidden_layers, exit_parts(model)[1]  # norm: the decoder's own (GPT-2: ln_f)
    exits = [n for n in depths if n < last] if torch.is_grad_enabled() else []
    exit_hidden = [norm(states[n]) for n in exits] + [states[-1]]
    loss_sum, per_exit = sorted_loss(exit_hidden, model.get_output_embeddings().weight, batch["targets"],
                                     logit_map=common.logit_map(model), chunk_size=args.chunk_size or None,
                                     compile=args.compile)
    n = (batch["targets"] != common.IGNORE_INDEX).sum().clamp(min=1)
    return loss_sum + router_loss, metrics | {f"exit{d}/ce": (x.detach() / n).item() for d, x in zip(exits + [last], per_exit)}


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
    # METHOD: every exit n < L on the target set (loss and accuracy of the model truncated to n layers)
    depths = exit_depths(args, model.config.num_hidden_layers, args.eval_exits or None)
    for n in depths[:-1]:
        with truncated(model, n):
            results[f"eval/{target}/exit{n}/loss"] = common.evaluate_loss(loss_model, eval_sets[target], rt, tokenizer.pad_token_id)["loss"]
            with common.unsharded(loss_model):
                acc = common.evaluate_accuracy(model, tokenizer, eval_sets[target], rt, args.max_new_tokens,
                                               batch_size=args.eval_batch_size, synced=args.fsdp)
                results[f"eval/{target}/exit{n}/accuracy"], results[f"eval/{target}/exit{n}/correct"] = acc["accuracy"], acc["correct"]
    if step == args.steps and args.early_exit_prompts and not args.fsdp:  # FSDP: batch-1 decoding per rank is not synced
        results.update(early_exit_report(model, tokenizer, eval_sets[target], depths, args, rt))
    return results


def main(args):
    # METHOD: bad flags fail before anything loads (the threshold count once the depth is known, before training)
    for flag in ("exits", "eval_exits"):
        if getattr(args, flag):
            parse_depths(flag, getattr(args, flag))
    if args.exit_every < 0 or (args.exit_every and args.exits):
        raise common.UsageError(f"--exit_every {args.exit_every}: must be >= 0, and applies only with --exits empty "
                                f"(got --exits {args.exits!r})")
    parse_thresholds(args.exit_threshold)

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

    # METHOD: the exits
    depths = exit_depths(args, model.config.num_hidden_layers)
    eval_depths = exit_depths(args, model.config.num_hidden_layers, args.eval_exits or None)
    thresholds = exit_thresholds(args.exit_threshold, eval_depths, model.config.num_hidden_layers)
    print0(f"SoFT: exits after layers {depths} of {model.config.num_hidden_layers}, all every step"
           + (f"; early exit thresholds {thresholds}" if args.early_exit_prompts else ""))
    check_exits(model, depths, torch.tensor(train[0]["input_ids"][:32], device=rt.device),
                decoding=bool(args.early_exit_prompts) and not args.fsdp)  # refuse now, not after training

    # COMMON: optimizer and schedule
    loss_model = common.wrap_model(model, lambda m, b: compute_loss(m, b, args, depths), rt, args.fsdp, args.gradient_checkpointing)
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
