"""RoSTE, Rotated Straight-Through Estimator: sft.py trained through a W4A4KV4 quantizer, with adaptive rotations.

Paper: Wei et al. 2025, "RoSTE: An Efficient Quantization-Aware Supervised Fine-Tuning Approach for Large Language
Models" (ICML 2025), https://arxiv.org/abs/2502.09003.

Method:
  Every attention/MLP linear fake-quantizes its weight (per output channel) and input (per token), and attention its
  keys and values (per token and head), round-to-nearest; the backward pass is the identity (straight-through), so
  the full-precision latent weights are trained on the quantized network's loss (QA-SFT). Before training, norms are
  folded into the linears and a random Hadamard R1 is fused into the residual stream; per layer, the online Hadamards
  R2 (V/O heads), R3 (Q/K) and R4 (down_proj input) are switched on where they lower the measured quantization error.

Usage:
    python roste.py                                 # embedded world: RoSTE, W4A4KV4, adaptive rotations
    python roste.py --rotation none                 # QA-SFT with the plain STE (the paper's "STE" baseline)
    python roste.py --qat false --rotation none     # SFT, then round-to-nearest quantization (the "RTN" baseline)
    python roste.py --qat false                     # SFT, then rotation + RTN (QuaRot-style post-training quantization)
    python roste.py --model runs/sft/final --steps 0 --qat false   # quantize and evaluate an existing model
    torchrun --nproc_per_node 8 roste.py --model Qwen/Qwen2.5-0.5B --dataset trl-lib/tldr --dtype bfloat16 \
        --eval_datasets tldr=trl-lib/tldr --lr 5e-5 --batch_size 128 --warmup_ratio 0 --min_lr_ratio 0 \
        --adam_beta2 0.999 --max_length 2048 --steps <rows / 128>   # the official Qwen2.5-0.5B recipe, 1 epoch
    # the saved model is the latent full-precision one (R1 and norms folded, loads with from_pretrained);
    # roste.load_quantized(dir) adds the quantizers and rotations recorded in its config.json ("roste").
"""
import collections
import contextlib
import dataclasses
import functools
import math
import os
import random
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
    output_dir: str = "runs/roste"
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

    # METHOD: RoSTE (where the paper gives no value, the official code's: Hong-Lab-UMN-ECE/RoSTE @055f255)
    qat: bool = True
    """quantization-aware SFT (quantize from step 0); false = train in full precision, then quantize (the PTQ baselines)"""
    rotation: str = "adaptive"
    """adaptive (R1 + the per-layer R2/R3/R4 search) | all (R1-R4 everywhere) | r1 (R1 only) | none (no rotation: plain STE / RTN)"""
    w_bits: int = 4
    """weight bits, per output channel (16 = off)"""
    a_bits: int = 4
    """activation bits at every linear's input, per token (16 = off)"""
    kv_bits: int = 4
    """key/value cache bits, per token and head (16 = off)"""
    w_sym: bool = False
    """symmetric weight grid (-2^(b-1)..2^(b-1)-1); false = asymmetric min/max (the official code's default)"""
    a_sym: bool = False
    """symmetric activation grid"""
    kv_sym: bool = False
    """symmetric key/value grid"""
    w_clip: float = 0.95
    """weight clip ratio c in (0, 1], the range is c * [min, max]; 0.95 as the official *_qa_sft_roste.yaml recipes"""
    a_clip: float = 0.95
    """activation clip ratio (0.95, the official recipes)"""
    kv_clip: float = 0.95
    """key/value clip ratio (0.95, the official recipes)"""
    search_quantizer: str = "symmetric"
    """rotation search's quantizer: symmetric (symmetric, clip 1, training bits: the official search) | train (training's)"""
    search_batches: str = "random"
    """search input: random (random training samples, prompt + response) | official (first prompts, eos-padded to 512)"""
    search_samples: int = 128
    """samples of the rotation search (one forward with R2-R4 off, one with them on; official: 128)"""
    search_decimals: int = -1
    """round the search's errors to this many decimals before comparing (official script: 4); -1 = exact numbers"""
    rotation_seed: int = 42
    """seed of R1's random signs (the official code's 42)"""
    eval_full_precision: bool = True
    """also evaluate the model with the quantizers off (logged as fp/eval/...)"""


# METHOD: the quantizer (round-to-nearest, dynamic min/max scales) and the straight-through estimator
@dataclasses.dataclass(frozen=True)
class Quantizer:
    bits: int = 16
    symmetric: bool = False
    clip: float = 1.0


def fake_quantize(x, q: Quantizer, eps: float = 1e-8):
    """Round-to-nearest fake quantization over the last dimension (RoSTE Sec. 2, official quant_utils/quant_linear.py):
    every row (a weight's output channel, an activation's token, a key's or value's token and head) has its own
    dynamic scale s, recomputed at every call; b = q.bits (>= 16: identity), c = q.clip.
      symmetric:  s = c max|x| / (2^(b-1) - 1),        Q(x) = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1) s
      asymmetric: s = c (max x - min x) / (2^b - 1),  z = round(-c min x / s),  Q(x) = (clamp(round(x / s) + z, 0, 2^b - 1) - z) s
    The same operations in the same order as the official QuantizePerChannel / QuantizePerToken / Quantize_K /
    Quantize_V (quant_utils/quant_linear.py l.39-171), so bit for bit equal in float32 and float64, but for two things:
    s is clamped to >= eps (our guard: the official code gives NaN on an all-zero or asymmetric constant row), and
    the arithmetic is at least float32 (x's dtype out), where the official works in x's dtype, so in bf16 runs its
    scale, zero point and rounding are bf16 and ours float32."""
    if q.bits >= 16:
        return x
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    if q.symmetric:
        top = 2 ** (q.bits - 1) - 1
        scale = (q.clip * xf.abs().amax(-1, keepdim=True) / top).clamp_min(eps)
        return ((xf / scale).round().clamp(-top - 1, top) * scale).to(x.dtype)
    top = 2 ** q.bits - 1
    low, high = q.clip * xf.amin(-1, keepdim=True), q.clip * xf.amax(-1, keepdim=True)
    scale = ((high - low) / top).clamp_min(eps)
    zero = (-low / scale).round()
    return ((((xf / scale).round() + zero).clamp(0, top) - zero) * scale).to(x.dtype)


class StraightThrough(torch.autograd.Function):
    """Forward Q(x), backward the identity: dL/dx = dL/dQ(x) everywhere, also where the clip ratio cut x, and no
    gradient to the scale (the paper's STE; so the optimizer updates the full-precision latent weights)."""

    @staticmethod
    def forward(ctx, x, q):
        return fake_quantize(x, q)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def quantize(x, q: Quantizer):
    return x if q.bits >= 16 else StraightThrough.apply(x, q)


def mse(a, b):
    return (a.float() - b.float()).pow(2).mean().item()


# METHOD: Hadamard matrices of order 2^k (Sylvester) times a Paley order (so 896 = 28 x 32, 4864 = 76 x 64 work)
def _is_prime(n):
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _paley(q: int, doubled: bool):
    """+-1 Hadamard matrix from the quadratic residues mod a prime q: Paley I (q = 3 mod 4) of order q + 1, Paley II
    (q = 1 mod 4) of order 2(q + 1)."""
    squares = {i * i % q for i in range(1, q)}
    jacobsthal = torch.tensor([[0 if i == j else (1 if (j - i) % q in squares else -1) for j in range(q)]
                               for i in range(q)], dtype=torch.float64)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1 if doubled else -1, jacobsthal
    if not doubled:
        return c + torch.eye(q + 1, dtype=torch.float64)
    pair, diag = torch.tensor([[1., 1.], [1., -1.]]), torch.tensor([[1., -1.], [-1., -1.]])
    return torch.kron(c, pair.double()) + torch.kron(torch.eye(q + 1, dtype=torch.float64), diag.double())


@functools.lru_cache(maxsize=None)
def hadamard_factor(n: int):
    """(H_m, p) with n = m p, p a power of 2 and H_m a +-1 Hadamard matrix (m = 1 or a Paley order): H_n = H_m kron H_p."""
    p = n & -n
    m = n // p
    while True:
        if m == 1:
            return torch.ones(1, 1, dtype=torch.float64), p
        if m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
            return _paley(m - 1, False), p
        if m % 4 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
            return _paley(m // 2 - 1, True), p
        if p == 1:
            raise common.UsageError(f"no Hadamard matrix of order {n} is built in (n = 2^k m needs m 2^j = q + 1 or "
                                    f"2(q + 1) for a prime q): choose another --rotation or model")
        m, p = 2 * m, p // 2


def hadamard_matrix(n: int):
    """The orthonormal H / sqrt(n), float64 (H = H_m kron Sylvester(p))."""
    hm, p = hadamard_factor(n)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.kron(torch.tensor([[1., 1.], [1., -1.]], dtype=torch.float64), h)
    return torch.kron(hm, h) / math.sqrt(n)


@functools.lru_cache(maxsize=None)
def _dense(n: int, dtype, device):
    return hadamard_matrix(n).to(dtype=dtype, device=device)


def hadamard(x, dense_up_to: int = 1024):
    """x @ hadamard_matrix(n) over the last dimension (n = x.shape[-1]). Up to n = 1024 (heads, small models) one
    product with the cached matrix; above, without the matrix: a Walsh-Hadamard butterfly over the power-of-2
    factor (n log n) and a small dense product with H_m. At least float32 inside (the official online rotations
    use float32), x's dtype out. Orthogonal, so hadamard(x) @ hadamard(w).T == x @ w.T."""
    compute = torch.promote_types(x.dtype, torch.float32)
    if x.shape[-1] <= dense_up_to:
        return (x.to(compute) @ _dense(x.shape[-1], compute, x.device)).to(x.dtype)
    hm, p = hadamard_factor(x.shape[-1])
    m = hm.shape[0]
    y, h = x.to(compute).reshape(-1, m, p), 1
    while h < p:
        y = y.view(y.shape[0], m, p // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), -2)
        h *= 2
    y = y.reshape(-1, m, p)
    if m > 1:
        y = torch.einsum("nap,ab->nbp", y, hm.to(y))
    return (y / math.sqrt(m * p)).reshape(x.shape).to(x.dtype)


# METHOD: the model surgery: norms folded, R1 fused offline (computational invariance, QuaRot/SpinQuant)
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]
ROTATIONS = ("R2", "R3", "R4")
READERS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"]  # of the stream


def blocks(model):
    """The decoder layers, checked to hold what the surgery and the quantizers touch: self_attn with separate
    q/k/v/o linears and mlp with gate/up/down linears (the norms are checked by check_layout, where R1 needs them)."""
    layers, kind = getattr(model.get_decoder(), "layers", None), model.config.model_type
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise common.UsageError(f"roste.py needs Llama-style layers ({', '.join(PROJECTIONS)}); the {kind} model's "
                                f"decoder {type(model.get_decoder()).__name__} has no `layers`")
    for name in PROJECTIONS:
        try:
            module = functools.reduce(getattr, name.split("."), layers[0])
        except AttributeError:
            module = None
        if not isinstance(module, torch.nn.Linear):
            linears = [n for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)]
            raise common.UsageError(f"roste.py needs Llama-style layers ({', '.join(PROJECTIONS)}); the {kind} model's "
                                    f"layer 0 has no {name} Linear (its linears: {', '.join(linears[:8]) or 'none'})")
    return layers


def gain_offset(norm, where: str, kind: str) -> float:
    """c in norm(x) = x / rms(x) * (w + c), found by feeding the norm test vectors (not by its name): c = 0 for
    Llama's RMSNorm (x w), c = 1 for Gemma's (x (1 + w)). Anything else is refused: a LayerNorm's mean subtraction
    (Cohere), a bias or a missing gain do not commute with R1."""
    w, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if not torch.is_tensor(w) or w.dim() != 1 or bias is not None:
        raise common.UsageError(f"roste.py folds RMSNorm gains into the linears; the {kind} model's {where} "
                                f"({type(norm).__name__}) has {'a bias' if bias is not None else 'no gain vector'}")
    x = torch.randn(4, w.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 4  # mean 4
    y = norm(x.to(w)).double().cpu()
    unit = x * x.pow(2).mean(-1, keepdim=True).rsqrt()  # rms ~4: the norm's eps is negligible
    tolerance = 1e-4 if w.dtype in (torch.float32, torch.float64) else 3e-2
    for c in (0.0, 1.0):
        gain = w.detach().double().cpu() + c
        if (y - unit * gain).abs().max() <= tolerance * (1 + gain.abs().max()):
            return c
    raise common.UsageError(f"roste.py folds RMSNorms x / rms(x) * w or * (1 + w); the {kind} model's {where} "
                            f"({type(norm).__name__}) is neither (a LayerNorm's mean subtraction does not commute with R1)")


@torch.no_grad()
def check_layout(model) -> list:
    """What norm folding and R1 need, read off the model's own data flow (one forward of 8 tokens with hooks, not
    names), so that it refuses before anything is changed: no norm may read the attention or MLP output (a post-norm,
    Gemma-2/3 and OLMo-2: its gain sits between a writer and the residual stream, where R1 cannot pass it); every
    reader of the stream (READERS, the LM head) must read the output of a norm of its layer (or of the decoder); and
    each such norm must be an RMSNorm (gain_offset). Returns [(norm, its readers, c)], the final norm last."""
    layers, kind, decoder, head = blocks(model), model.config.model_type, model.get_decoder(), model.get_output_embeddings()
    get = lambda layer, name: functools.reduce(getattr, name.split("."), layer)
    inputs, outputs = {}, {}  # of every watched module, in the probe forward

    def record(module, args, kwargs, out):
        inputs.setdefault(module, args[0] if args else kwargs.get("hidden_states"))
        outputs.setdefault(module, out[0] if isinstance(out, tuple) else out)
    watched = [head, *decoder.children(), *(m for layer in layers for m in [*layer.children(), *(get(layer, n) for n in READERS)])]
    handles, training = [m.register_forward_hook(record, with_kwargs=True) for m in watched], model.training
    try:
        model.eval()
        model(input_ids=torch.arange(8, device=head.weight.device)[None] % head.weight.shape[0], use_cache=False)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    same = lambda a, b: torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    read = lambda reader, parent: next((n for n, c in parent.named_children()  # the norm whose output `reader` reads
                                        if n not in ("self_attn", "mlp") and same(inputs.get(reader), outputs.get(c))), None)
    pairs = {}  # where -> (norm, its readers)
    for i, layer in enumerate(layers):
        post = [n for n, c in layer.named_children() if any(same(inputs.get(c), outputs.get(w)) for w in (layer.self_attn, layer.mlp))]
        if post:
            raise common.UsageError(f"roste.py's R1 cannot pass a post-norm; the {kind} model's layer {i} normalises "
                                    f"the attention/MLP output before the residual add ({', '.join(post)}): use "
                                    f"--rotation none (quantization-aware SFT without rotations)")
        for name in READERS:
            norm = read(get(layer, name), layer)
            if norm is None:
                raise common.UsageError(f"roste.py folds the norm each reader of the residual stream reads; the {kind} "
                                        f"model's layer {i} {name} does not read the output of a norm of its layer")
            pairs.setdefault(f"layer {i} {norm}", (getattr(layer, norm), []))[1].append(get(layer, name))
    final = read(head, decoder)
    if final is None:
        raise common.UsageError(f"roste.py folds the final norm into the LM head; the {kind} model's LM head does "
                                f"not read the output of a norm of its decoder")
    pairs[f"final {final}"] = (getattr(decoder, final), [head])
    return [(norm, readers, gain_offset(norm, where, kind)) for where, (norm, readers) in pairs.items()]


@torch.no_grad()
def fuse_norms(model):
    """Fold each RMSNorm's gain g into the linears that read its output (W <- W diag(g)) and make the norm's gain 1,
    after untying the LM head from the embeddings (the final norm's gain goes into the head only). g = w + c with
    c = 0 (Llama: w <- 1) or c = 1 (Gemma's x (1 + w): w <- 0), found by check_layout, which refuses first what
    this cannot keep exact. The function is unchanged and every norm becomes a plain RMS normalisation, which
    commutes with an orthogonal R1: rms(x R1) = rms(x)."""
    pairs = check_layout(model)
    head = model.get_output_embeddings()
    if head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    for norm, readers, c in pairs:
        for linear in readers:
            linear.weight.copy_(linear.weight.double() * (norm.weight.double() + c))
        norm.weight.fill_(1.0 - c)


def r1_matrix(d: int, seed: int):
    """R1 = diag(s) H / sqrt(d), float64, s in {-1, +1}^d from torch.randint(0, 2, (d,)) on a CPU generator seeded
    `seed`: the official draw (rotation_utils/main.py l.50 set_seed(42), then hadamard.py l.20-23 random_hadamard_matrix
    on the global generator; fuse_layer_norms draws nothing in between), so the signs are the official ones, and for a
    power-of-2 d so is R1 (for other d the Hadamard factor is Paley's here, Sloane's tables there: both orthogonal)."""
    signs = torch.randint(0, 2, (d,), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
    return signs[:, None] * hadamard_matrix(d)


@torch.no_grad()
def rotate_residual(model, seed: int):
    """R1, fused offline: the residual stream x becomes x R1 with R1 = diag(s) H / sqrt(d), s random signs (seed).
    Readers of the stream (q, k, v, gate, up, LM head): W <- W R1. Writers (embeddings E <- E R1; o_proj and
    down_proj W <- R1^T W, b <- b R1). Float64 inside. Needs fuse_norms first (a gain would not commute with R1)."""
    r1 = r1_matrix(model.config.hidden_size, seed)

    def apply(param, left):
        r = r1.to(param.device)
        param.copy_(r.T @ param.double() if left else param.double() @ r)

    apply(model.get_input_embeddings().weight, False)
    apply(model.get_output_embeddings().weight, False)
    for layer in blocks(model):
        for reader in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
            apply(reader.weight, False)
        for writer in (layer.self_attn.o_proj, layer.mlp.down_proj):
            apply(writer.weight, True)
            if writer.bias is not None:
                apply(writer.bias[None], False)


# METHOD: the quantized network: QuantLinear, the attention with R2/R3 and the KV quantizer, the per-layer switches
class QuantLinear(torch.nn.Linear):
    """An nn.Linear (same parameters, same state-dict names) computing Q_a(x R) Q_w(W R)^T + b. R is the online
    Hadamard over blocks of `rotate_block` input features (0 = none): R2 on o_proj (per head, on W only, its input
    arrives rotated from the values), R4 on down_proj (the whole input, on x and W)."""
    w_quant = a_quant = Quantizer()
    rotate_block, rotate_input, error_key, errors = 0, False, None, None

    def forward(self, x):
        w = self.weight
        if self.rotate_block:
            w = hadamard(w.unflatten(-1, (-1, self.rotate_block))).flatten(-2)
            if self.rotate_input:
                x = hadamard(x.unflatten(-1, (-1, self.rotate_block))).flatten(-2)
        xq, wq = quantize(x, self.a_quant), quantize(w, self.w_quant)
        if self.errors is not None and self.error_key:
            self.errors[self.error_key] += mse(wq, w) + mse(xq, x)
        return torch.nn.functional.linear(xq, wq, self.bias)


def roste_attention(module, query, key, value, attention_mask, **kwargs):
    """Hugging Face attention function "roste", called after RoPE and the cache update: R3 rotates queries and keys
    per head (it cancels in q k^T), R2 rotates values per head (o_proj's rotated weight undoes it), then keys and
    values are fake-quantized per token and head. Re-quantizing the whole cache at every call equals quantizing each
    token once when it is stored (per-token scales), so cached generation sees the training-time quantizer."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if kwargs.get("softcap") is not None:  # Gemma-2: tanh-capped attention scores
        kind = getattr(getattr(module, "config", None), "model_type", type(module).__name__)
        raise common.UsageError(f"roste.py's attention is SDPA, which has no attention-logit softcapping; the {kind} "
                                f"model's layer {module.layer_idx} uses softcap {kwargs['softcap']}")
    if module.rotate_qk:
        query, key = hadamard(query), hadamard(key)
    if module.rotate_v:
        value = hadamard(value)
    key_q, value_q = quantize(key, module.kv_quant), quantize(value, module.kv_quant)
    if module.errors is not None:  # the official logging sites: modeling_qwen2_rq_online.py l.295-301
        module.errors[(module.layer_idx, "R3")] += mse(key_q, key)
        module.errors[(module.layer_idx, "R2")] += mse(value_q, value)  # added to o_proj's: R2's error
    return sdpa_attention_forward(module, query, key_q, value_q, attention_mask, **kwargs)


def quantize_model(model, spec: dict):
    """In place: the attention/MLP linears become QuantLinears, attention becomes roste_attention, all online
    rotations off. spec holds w_bits, w_sym, w_clip, a_*, kv_* (embeddings and LM head stay full precision)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register("roste", roste_attention)
    AttentionMaskInterface.register("roste", sdpa_mask)
    w, a, kv = (Quantizer(spec[f"{k}_bits"], spec[f"{k}_sym"], spec[f"{k}_clip"]) for k in ("w", "a", "kv"))
    for i, layer in enumerate(blocks(model)):
        for name in PROJECTIONS:
            linear = functools.reduce(getattr, name.split("."), layer)
            linear.__class__, linear.w_quant, linear.a_quant = QuantLinear, w, a
        layer.self_attn.o_proj.error_key, layer.mlp.down_proj.error_key = (i, "R2"), (i, "R4")
        layer.mlp.down_proj.rotate_input = True
        layer.self_attn.kv_quant, layer.self_attn.errors = kv, None
    set_rotations(model, {i: dict.fromkeys(ROTATIONS, False) for i in range(len(blocks(model)))})
    model.config._attn_implementation = "roste"


def set_rotations(model, config: dict):
    """config[layer] = {"R2": bool, "R3": bool, "R4": bool}: switch the online rotations per layer."""
    for i, layer in enumerate(blocks(model)):
        attn = layer.self_attn
        attn.rotate_v, attn.rotate_qk = config[i]["R2"], config[i]["R3"]
        attn.o_proj.rotate_block = attn.head_dim if config[i]["R2"] else 0
        layer.mlp.down_proj.rotate_block = layer.mlp.down_proj.in_features if config[i]["R4"] else 0


@contextlib.contextmanager
def full_precision(model):
    """Quantizers off (bits 16), rotations kept (they do not change the full-precision function)."""
    modules = [m for m in model.modules() if isinstance(m, QuantLinear) or hasattr(m, "kv_quant")]
    saved = [(m.w_quant, m.a_quant) if isinstance(m, QuantLinear) else m.kv_quant for m in modules]
    for m in modules:
        if isinstance(m, QuantLinear):
            m.w_quant = m.a_quant = Quantizer()
        else:
            m.kv_quant = Quantizer()
    try:
        yield model
    finally:
        for m, s in zip(modules, saved):
            if isinstance(m, QuantLinear):
                m.w_quant, m.a_quant = s
            else:
                m.kv_quant = s


# METHOD: adaptive rotation, the upper level of RoSTE's bilevel problem, solved once before training (official code)
def select_rotations(errors_off: dict, errors_on: dict, decimals: int = -1) -> dict:
    """Per layer l and rotation r: on iff err_on(l, r) < err_off(l, r); a tie keeps it off. err is the quantization
    error the rotation acts on, as the official search logs it (no equation in the paper): with
    e(W, X) = mean (Q(W~) - W~)^2 + mean (Q(X~) - X~)^2 at a linear (W~, X~ its weight and input, rotated or not),
      R2: e at o_proj + the value cache's mean (Q(V~) - V~)^2 (quant_r_linear.py l.132-136 "R2, w_attn_o" and
          modeling_qwen2_rq_online.py l.299-301 "R2, value", summed per (layer, R) by
          rotate_model_r234_search_config.py l.26-29),
      R3: the key cache's mean (Q(K~) - K~)^2 (modeling_qwen2_rq_online.py l.295-297),
      R4: e at down_proj (quant_r_linear.py l.46-50).
    The official script writes each error with 6 decimals, rounds the sums to 4 and compares the formatted strings
    (rotate_model_r234_search_config.py l.36, l.96: "15.4299" <= "3.9750"), which misorders values >= 10; we compare
    numbers, rounded to `decimals` first when decimals >= 0 (a deliberate fix, not a flag)."""
    rounded = (lambda v: round(v, decimals)) if decimals >= 0 else (lambda v: v)
    config = {}
    for (layer, kind), off in sorted(errors_off.items()):
        config.setdefault(layer, {})[kind] = rounded(errors_on[(layer, kind)]) < rounded(off)
    return config


@torch.no_grad()
def search_rotations(model, batches, decimals: int = -1):
    """One forward over the search batches with R2-R4 all off and one with them all on, each logging the errors of
    select_rotations per (layer, rotation), averaged over the batches (padding positions count, as in the official
    script; with the official batches, all 512 long, this is the official one-forward mean); then each switch takes
    the better setting. Returns (config, [errors off, errors on])."""
    layers, logs = blocks(model), []
    for on in (False, True):
        set_rotations(model, {i: dict.fromkeys(ROTATIONS, on) for i in range(len(layers))})
        errors = collections.defaultdict(float)
        for layer in layers:
            layer.self_attn.errors = layer.self_attn.o_proj.errors = layer.mlp.down_proj.errors = errors
        for batch in batches:
            model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for layer in layers:
            layer.self_attn.errors = layer.self_attn.o_proj.errors = layer.mlp.down_proj.errors = None
        logs.append({key: value / len(batches) for key, value in errors.items()})
    config = select_rotations(*logs, decimals)
    set_rotations(model, config)
    return config, logs


@torch.no_grad()
def full_precision_logits(model, batch):
    """The logits at the batch's real positions, float32, in eval mode, with the quantizers off (if any)."""
    training = model.training
    model.eval()
    with full_precision(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    model.train(training)
    return logits.float()[batch["attention_mask"].bool()]


def check_invariance(want, got, model):
    """Start-up guard, run by prepare before the search and training: at 16 bits the surgery (norms folded, R1, the
    online rotations, roste_attention) must leave the model's logits unchanged, max |got - want| <= 1e-3 max |want|,
    else the architecture is refused: nothing is trained on a model that the surgery silently changed, whatever its
    layout. main() holds float32 weights; with 16-bit weights the rounding of the folded weights alone moves the
    logits of a random-init model by up to 0.2 of their scale, so the bound there is 0.25 (a wrong fold moves ~1)."""
    diff, scale = (got - want).abs().max().item(), want.abs().max().item()
    tolerance = 1e-3 if model.get_input_embeddings().weight.dtype in (torch.float32, torch.float64) else 0.25
    if not diff <= tolerance * scale:  # also NaN
        raise common.UsageError(f"roste.py's surgery moved the {model.config.model_type} model's full-precision logits "
                                f"by {diff:.3g} (max |logit| {scale:.3g}, allowed {tolerance:g} of it) where it must "
                                f"not change them: this architecture is not supported")


def make_search_batches(train, args, tokenizer, device) -> list:
    """The rotation search's input, in batches of 16. random: --search_samples training samples drawn with --seed,
    prompt and response, right-padded to each batch's longest. official (rotate_model_r234_quant_error.py l.18-45):
    the first --search_samples samples in file order (of those load_sft_data kept), the prompt's text alone (the
    turns before the response, joined by newlines) tokenized without the chat template, cut to 512 tokens and
    left-padded to 512 with eos (masked); position ids count from the first pad, as there."""
    n = min(args.search_samples, len(train))
    if args.search_batches == "random":
        ids = random.Random(args.seed).sample(range(len(train)), n)
        return [common.collate(train, ids[i:i + 16], tokenizer.pad_token_id, device) for i in range(0, n, 16)]
    if tokenizer.eos_token_id is None:
        raise common.UsageError("--search_batches official pads with eos: the tokenizer has no eos token")
    batches, length = [], 512
    for start in range(0, n, 16):
        texts = ["\n".join(m["content"] for m in train[i]["messages"][:-1]) for i in range(start, min(start + 16, n))]
        ids = torch.full((len(texts), length), tokenizer.eos_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, text in enumerate(texts):
            tokens = tokenizer(text, truncation=True, max_length=length)["input_ids"]
            ids[row, length - len(tokens):], mask[row, length - len(tokens):] = torch.tensor(tokens, dtype=torch.long), 1
        batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
    return batches


def check_method_args(args):
    """The method's flags, before anything is loaded or written (prepare checks --rotation again for direct callers)."""
    if args.lora_r:
        raise common.UsageError("--lora_r: RoSTE trains the rotated, quantised weights themselves (W x R under the "
                                "quantiser), so a frozen base with LoRA adapters beside it is not the method. Train fully")
    if args.rotation not in ("adaptive", "all", "r1", "none"):
        raise common.UsageError(f"--rotation {args.rotation!r}: expected adaptive, all, r1 or none")
    for k in ("w", "a", "kv"):
        if getattr(args, f"{k}_bits") < 2:
            raise common.UsageError(f"--{k}_bits must be >= 2 (16 or more = off), got {getattr(args, f'{k}_bits')}")
        if not 0 < getattr(args, f"{k}_clip") <= 1:
            raise common.UsageError(f"--{k}_clip must be in (0, 1], got {getattr(args, f'{k}_clip')}")
    if args.search_quantizer not in ("symmetric", "train"):
        raise common.UsageError(f"--search_quantizer must be symmetric or train, got {args.search_quantizer!r}")
    if args.search_batches not in ("random", "official"):
        raise common.UsageError(f"--search_batches must be random or official, got {args.search_batches!r}")
    if args.search_samples < 1:
        raise common.UsageError(f"--search_samples must be >= 1, got {args.search_samples}")
    if args.search_decimals < -1:
        raise common.UsageError(f"--search_decimals must be >= 0, or -1 for exact numbers, got {args.search_decimals}")
    defaults = Args()
    changed = [k for k in ("search_quantizer", "search_batches", "search_samples", "search_decimals")
               if getattr(args, k) != getattr(defaults, k)]
    if changed and args.rotation != "adaptive":
        raise common.UsageError(f"--{changed[0]} sets the rotation search, which only --rotation adaptive runs "
                                f"(got --rotation {args.rotation})")


def prepare(model, train, args, tokenizer) -> dict:
    """Rotate (unless --rotation none), quantize, check at 16 bits that nothing changed on two training sequences
    (check_invariance) and pick the online rotations (under the search's quantizer, then the training one is
    installed); record it all in model.config.roste (saved in config.json, read by load_quantized). Returns the
    per-layer rotation config."""
    if args.rotation not in ("adaptive", "all", "r1", "none"):
        raise common.UsageError(f"--rotation {args.rotation!r}: expected adaptive, all, r1 or none")
    device = model.get_input_embeddings().weight.device
    probe = common.collate(train, range(min(2, len(train))), tokenizer.pad_token_id, device)
    probe = {k: v[:, :64] for k, v in probe.items()}
    want = full_precision_logits(model, probe)
    if args.rotation != "none":
        fuse_norms(model)
        rotate_residual(model, args.rotation_seed)
    spec = {k: getattr(args, k) for k in ("w_bits", "w_sym", "w_clip", "a_bits", "a_sym", "a_clip", "kv_bits", "kv_sym", "kv_clip")}
    quantize_model(model, spec)
    set_rotations(model, {i: dict.fromkeys(ROTATIONS, args.rotation in ("adaptive", "all")) for i in range(len(blocks(model)))})
    check_invariance(want, full_precision_logits(model, probe), model)
    if args.rotation == "adaptive":
        if args.search_quantizer == "symmetric":  # official: rotate_model_r1.py l.40-45 saves sym, clip 1; the
            # search script (rotate_model_r234_quant_error.py l.66-71) sets only the bits (4/4/4, the recipes')
            quantize_model(model, {**spec, "w_sym": True, "a_sym": True, "kv_sym": True, "w_clip": 1.0, "a_clip": 1.0, "kv_clip": 1.0})
        config, logs = search_rotations(model, make_search_batches(train, args, tokenizer, device), args.search_decimals)
        quantize_model(model, spec)  # the training quantizer (this also turns the rotations off: set again below)
        set_rotations(model, config)
        print0("rotation search (error off -> on): " + " | ".join(
            f"L{layer} {kind} {logs[0][(layer, kind)]:.3g}->{logs[1][(layer, kind)]:.3g}{' ON' if config[layer][kind] else ''}"
            for layer, kind in sorted(logs[0])))
    else:
        config = {i: dict.fromkeys(ROTATIONS, args.rotation == "all") for i in range(len(blocks(model)))}
        set_rotations(model, config)
    model.config.roste = {**spec, "r1": args.rotation != "none", "rotation_seed": args.rotation_seed,
                          "layers": {str(i): c for i, c in config.items()}}
    return config


def load_quantized(path: str, dtype: str = "float32", device="cpu"):
    """A model saved by roste.py, with the quantizers and online rotations recorded in its config.json ("roste")."""
    model, tokenizer = common.load_model(path, dtype, device)
    spec = getattr(model.config, "roste", None)
    if not spec:
        raise common.UsageError(f"{path}: config.json has no 'roste' entry (not saved by roste.py)")
    quantize_model(model, spec)
    set_rotations(model, {int(i): c for i, c in spec["layers"].items()})
    return model, tokenizer


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
    check_method_args(args)  # METHOD: bad flags fail before anything loads

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

    # METHOD: QA-SFT / RoSTE: rotate, quantize and search before training (the PTQ baselines do it after training)
    if not args.qat and args.fsdp:
        raise common.UsageError("--qat false (quantize after training) rewrites the weights in place: not with --fsdp")
    if args.qat:
        prepare(model, train, args, tokenizer)

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
        before = evaluate(model, tokenizer, loss_model, eval_sets, rt, args, 0)
        if args.qat and args.eval_full_precision:  # METHOD: the same model with the quantizers off
            with full_precision(model):
                before.update({f"fp/{k}": v for k, v in evaluate(model, tokenizer, loss_model, eval_sets, rt, args, 0).items() if k != "step"})
        logger.log({"event": "eval_before", **before})

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
    fp = {}
    if not args.qat:  # METHOD: SFT then PTQ: the trained full-precision model, then rotated and quantized
        fp = evaluate(model, tokenizer, loss_model, eval_sets, rt, args, args.steps) if args.eval_full_precision else {}
        prepare(model, train, args, tokenizer)
    common.save_checkpoint(os.path.join(args.output_dir, "final"), model, tokenizer, rt, fsdp=args.fsdp, dtype=args.save_dtype,
                           merge_lora=args.merge_lora)
    final = evaluate(model, tokenizer, loss_model, eval_sets, rt, args, args.steps)  # after saving: a crash here loses nothing
    if args.qat and args.eval_full_precision:  # METHOD: the latent weights with the quantizers off
        with full_precision(model):
            fp = evaluate(model, tokenizer, loss_model, eval_sets, rt, args, args.steps)
    final.update({f"fp/{k}": v for k, v in fp.items() if k != "step"})
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
