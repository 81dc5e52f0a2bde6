"""Model merging: uniform and greedy soups, task arithmetic, TIES, DARE, SLERP and LiNeS, streamed tensor by tensor.

Papers: model soups, Wortsman et al. 2022, https://arxiv.org/abs/2203.05482 (uniform, greedy); task arithmetic,
Ilharco et al. 2023, https://arxiv.org/abs/2212.04089; TIES, Yadav et al. 2023, https://arxiv.org/abs/2306.01708;
DARE, Yu et al. 2024, https://arxiv.org/abs/2311.03099; SLERP (Shoemake 1985, as in mergekit); LiNeS, Wang et al.
2025, https://arxiv.org/abs/2410.17146.

Method:
  Models fine-tuned from one base sit in one basin: average them (soups), or add their task vectors tau_i = theta_i -
  theta_0 to the base, trimmed and sign-elected (TIES), randomly dropped and rescaled (DARE) or scaled per layer,
  little at shallow layers and fully at the last (LiNeS, against forgetting). The merge is then evaluated like a run.
  Tensors are merged as stored on disk (MoE: one expert at a time, as mergekit) and saved in that form.

Usage (after fine-tuning, e.g. `for s in 0 1 2; do python sft.py --seed $s --output_dir runs/sft_s$s; done`):
    python merge.py --method uniform --models runs/sft_s0/final,runs/sft_s1/final,runs/sft_s2/final
    python merge.py --method greedy --models runs/sft_s0/final,runs/sft_s1/final,runs/sft_s2/final   # held-out: math validation
    python merge.py --method ties --base world/base --models runs/a/final,runs/b/final --density 0.2
    python merge.py --method dare_ties --base world/base --models runs/a/final,runs/b/final --density 0.1 --seed 0
    python merge.py --method slerp --models runs/a/final,runs/b/final --t 0.5
    python merge.py --method lines --base world/base --models runs/sft_s0/final --alpha 0.3   # beta = 1 - alpha
    python merge.py --method task_arithmetic --base Qwen/Qwen2.5-0.5B --models Qwen/Qwen2.5-0.5B-Instruct,<math-ft> \
        --eval_datasets gsm8k=openai/gsm8k:main --dtype bfloat16
"""
import dataclasses
import hashlib
import json
import math
import os
import re

import torch

import common
from common import print0


@dataclasses.dataclass
class Args:
    # COMMON: the evaluation block of every script
    eval_datasets: str = ",".join(f"{name}={os.path.join(common.WORLD_DIR, 'data', task, split + '.jsonl')}" for name, task, split in [
        ("math", "math", "test"), ("math_ood", "math", "test_ood"), ("code", "code", "test"), ("rc", "rc", "test"),
        ("knowledge", "knowledge", "test")])
    """comma-separated name=source pairs scored by the task judges; the first is the target task"""
    eval_split: str = "test"
    """split of hub eval datasets"""
    output_dir: str = "runs/merge"
    """where the merged model (final/) and metrics.jsonl go"""
    overwrite: bool = False
    """replace what a previous merge left in output_dir (refused otherwise)"""
    report_to: str = "none"
    """mirror metrics.jsonl to a tracker: none | tensorboard | wandb | trackio (optional extras: requirements-extras.txt)"""
    seed: int = 0
    """seed of DARE's masks and of evaluation"""
    dtype: str = "float32"
    """float32 | bfloat16 | float16: dtype of the saved model (merging itself is always float32)"""
    device: str = "auto"
    """auto | cpu | cuda (evaluation; merging streams tensors on the CPU)"""
    max_length: int = 512
    """tokens per held-out sample"""
    eval_samples: int = 100
    """prompts per eval dataset (0 = all)"""
    max_new_tokens: int = 64
    """generation budget per eval answer"""
    eval_batch_size: int = 50
    """prompts per generation batch"""
    trust_remote_code: bool = False
    """allow model code from the hub (off unless asked)"""

    # METHOD: merging
    method: str = "uniform"
    """uniform | greedy | linear | task_arithmetic | ties | dare_linear | dare_ties | slerp | lines"""
    models: str = ""
    """comma-separated fine-tuned models (local dirs or hub ids) with the same architecture and tokenizer"""
    base: str = ""
    """the common pre-trained model theta_0 (task_arithmetic, ties, dare_*, lines)"""
    weights: str = ""
    """comma-separated weight per model (default 1 each)"""
    normalize: str = "auto"
    """divide by the summed weights: true | false | auto (mergekit's defaults: linear and ties true, task_arithmetic and dare false)"""
    scaling: float = 1.0
    """lambda, the task vector's scale (task_arithmetic, ties, dare_*)"""
    density: float = -1.0
    """fraction of each task vector kept (ties: top magnitudes, dare: random); -1 = the papers' 0.2 (TIES) and 0.1 (DARE, p = 0.9)"""
    ties_trim: str = "tensor"
    """tensor (mergekit: top-k per tensor) | global (TIES reference code: one threshold over the whole model)"""
    dare_rescale: str = "inv_p"
    """inv_p (paper: divide the kept entries by 1 - p) | l1 (mergekit since 2025: match each tensor's L1 norm)"""
    t: float = 0.5
    """SLERP position: 0 = the first model, 1 = the second"""
    alpha: float = -1.0
    """LiNeS alpha, the first block's (and the non-block tensors') scale; -1 = 0.5 for one model (the paper sweeps 0..1), (||sum_t tau_t||_1 / ||sum_t w_t tau_t||_1) / T for T models (paper and code: 1/T with unit weights)"""
    beta: float = -1.0
    """LiNeS beta, added scale at the last block, lambda(l) = alpha + beta (l - 1)/(L - 1); -1 = 1 - alpha (single task: the last block keeps its update; multi-task: the paper tunes beta)"""
    select_dataset: str = os.path.join(common.WORLD_DIR, "data", "math", "validation.jsonl")
    """greedy soup: the held-out data that orders the ingredients and accepts them (not the test set)"""
    select_samples: int = 0
    """greedy soup: held-out prompts (0 = all)"""
    greedy_metric: str = "accuracy"
    """greedy soup: accuracy (judge, higher is better) | loss (held-out token loss, lower is better)"""


# METHOD: the merge rules, one tensor at a time (float32; tau_i = theta_i - theta_0)
def linear(tensors, weights, normalize=True):
    """Weighted average sum_i w_i theta_i / sum_i w_i (the uniform soup with w_i = 1; mergekit `linear`)."""
    total = sum(w * t for w, t in zip(weights, tensors))
    return total / sum(weights) if normalize else total


def task_arithmetic(base, taus, weights, scaling=1.0, normalize=False):
    """theta_0 + lambda sum_i w_i tau_i (Ilharco et al. 2023; mergekit divides by sum_i w_i when normalize)."""
    total = sum(w * t for w, t in zip(weights, taus))
    return base + scaling * (total / (sum(weights) or 1.0) if normalize else total)


def trim(tau, density, threshold=None):
    """TIES step 1: keep the top-density fraction of |tau|, or the entries with |tau| >= a given threshold (the
    reference code's one threshold over the whole model, `--ties_trim global`). Per tensor, as mergekit 0.1.5
    (sparsify.py L62-77, `magnitude`): k = int(density numel), the first k of torch's CPU argsort of |tau| in float32,
    descending. Among equal magnitudes at the threshold (common in bf16 checkpoints: norm weights near 1 move in
    steps of 2^-7) that argsort, unstable but deterministic, keeps the same entries as mergekit; topk keeps others."""
    if threshold is not None:
        return tau * (tau.abs() >= threshold)
    if density >= 1:
        return tau
    k = int(density * tau.numel())
    if k == 0:
        raise common.UsageError(f"--density {density} keeps no entry of a tensor with {tau.numel()} elements")
    keep = torch.zeros(tau.numel(), dtype=torch.bool)
    keep[torch.argsort(tau.abs().flatten().float(), descending=True)[:k]] = True
    return tau * keep.view_as(tau)


def kth_largest(chunks, k: int) -> torch.Tensor:
    """The k-th largest (k = 1: the maximum) of the non-negative float32 values in the tensors that `chunks()`
    yields, equal to torch.kthvalue(n - k + 1) of their concatenation, without concatenating them: a radix select
    over the IEEE-754 bit patterns, which order non-negative floats as their values. Pass 1 counts the high 16
    bits, pass 2 the low 16 bits inside the chosen high bucket; `chunks` is called once per pass."""
    def pick(counts, k):  # the bucket holding the k-th largest, and its rank inside that bucket
        from_top = counts.flip(0).cumsum(0)
        b = int(torch.searchsorted(from_top, torch.tensor(k)))
        return counts.numel() - 1 - b, k - (int(from_top[b - 1]) if b else 0)
    high = torch.zeros(1 << 16, dtype=torch.int64)
    for x in chunks():
        high += torch.bincount(x.flatten().view(torch.int32) >> 16, minlength=1 << 16)
    top, k = pick(high, k)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for x in chunks():
        bits = x.flatten().view(torch.int32)
        low += torch.bincount(bits[(bits >> 16) == top] & 0xFFFF, minlength=1 << 16)
    bottom, _ = pick(low, k)
    return torch.tensor([(top << 16) | bottom], dtype=torch.int32).view(torch.float32)[0]


def ties(base, taus, weights, scaling=1.0, normalize=True):
    """TIES-Merging on already trimmed task vectors (Yadav et al. 2023, Sec. 3; mergekit's weighted form):
    u_i = w_i tau_i; elect gamma = sign(sum_i u_i) (mass-weighted vote; a zero sum elects +, mergekit; the paper's
    code falls back to the majority sign); keep the u_i that agree, m_i = [sign(u_i) = gamma];
    merged = sum_i u_i m_i / sum_i w_i m_i (the disjoint mean; the plain sum without normalize);
    theta = theta_0 + lambda merged. With w_i = 1 this is the paper's dis-mean."""
    u = torch.stack([w * t for w, t in zip(weights, taus)])
    gamma = torch.where(u.sum(0) >= 0, 1.0, -1.0)
    agree = u.sign() == gamma
    merged = (u * agree).sum(0)
    if normalize:
        w = torch.tensor(weights, dtype=u.dtype).view(-1, *[1] * (u.dim() - 1))
        merged = merged / (w * agree).sum(0).masked_fill((w * agree).sum(0) == 0, 1.0)
    return base + scaling * merged


def dare(tau, density, generator, rescale="inv_p"):
    """DARE (Yu et al. 2024, Eq. 1): drop each entry with probability p = 1 - density, then rescale the survivors:
    inv_p divides by 1 - p (E[result] = tau, the paper); l1 matches the L1 norm of tau (mergekit since Feb 2025)."""
    if density >= 1:
        return tau
    kept = tau * (torch.rand(tau.shape, generator=generator) < density)
    if rescale == "inv_p":
        return kept / density
    before, after = tau.abs().sum(), kept.abs().sum()
    return kept * (before / after) if before > 1e-7 and after > 1e-7 else kept


def slerp(a, b, t, eps=1e-8, colinear=0.9995):
    """Spherical interpolation of two whole tensors (Shoemake 1985; mergekit `slerp`): with d the cosine of the
    flattened a and b and Omega = arccos d, sin((1 - t) Omega)/sin Omega a + sin(t Omega)/sin Omega b; the plain
    (1 - t) a + t b when |d| > 0.9995 (near parallel or anti-parallel). The unnormalised tensors are interpolated."""
    ua = a / a.norm() if a.norm() > eps else a
    ub = b / b.norm() if b.norm() > eps else b
    d = (ua * ub).sum().clamp(-1, 1)
    if d.abs() > colinear:
        return (1 - t) * a + t * b
    omega = torch.arccos(d)
    return torch.sin((1 - t) * omega) / torch.sin(omega) * a + torch.sin(t * omega) / torch.sin(omega) * b


# The residual blocks of the common decoder layouts, and the tensors outside them, in Hugging Face names
STACK = r"(?:model\.(?:decoder\.|language_model\.)?|transformer\.|gpt_neox\.)?"  # Llama, OPT, VL, GPT-2/MPT, NeoX
BLOCK = re.compile(STACK + r"(?:layers|h|blocks)\.(\d+)\.")  # model.layers.3., transformer.h.3., transformer.blocks.3.
OUTSIDE = re.compile(STACK + r"(?:embed_tokens|embed_positions|embed_in|wte|wpe|word_embeddings"
                     r"|word_embeddings_layernorm|norm|ln_f|norm_f|final_layer_norm|final_layernorm)\.|(?:lm_head|embed_out)\.")


def block_of(name: str, num_layers: int):
    """The 0-based residual block of a tensor name (`model.layers.<i>.`, GPT-2/BLOOM/Falcon `transformer.h.<i>.`,
    MPT `transformer.blocks.<i>.`, NeoX `gpt_neox.layers.<i>.`, OPT `model.decoder.layers.<i>.`), or None for the
    tensors outside the blocks (embeddings, final norm, head). Any other name (a vision tower's layers, an extra
    MTP layer, an unknown layout) is refused: LiNeS cannot place it in depth."""
    match = BLOCK.match(name)
    if match and int(match.group(1)) < num_layers:
        return int(match.group(1))
    if OUTSIDE.match(name):
        return None
    raise common.UsageError(f"--method lines: tensor {name} is neither in one of the {num_layers} decoder blocks "
                            f"(model.layers.<i>., transformer.h.<i>., transformer.blocks.<i>.) nor an embedding, final "
                            f"norm or head, so its depth is unknown")


def lines_scale(name: str, num_layers: int, alpha: float, beta: float) -> float:
    """LiNeS (Wang et al. 2025, Eq. 1 of arXiv 2410.17146): lambda(l) = alpha + beta (l - 1)/(L - 1) for block
    l = 1..L (block_of: l - 1, by an anchored regex, where the official LiNeS_scaling in src/eval/eval.py L56-97
    tests the substring `.{i}.` and can mistake `.0.` inside `layers.11.mlp.0.`); alpha for every tensor outside the
    blocks (the official default of the lookup, L93). L = 1 gives alpha + beta."""
    block = block_of(name, num_layers)
    if block is None:
        return alpha
    return alpha + beta * (block / (num_layers - 1) if num_layers > 1 else 1.0)


def lines_alpha(summed_l1: float, merged_l1: float, num_tasks: int) -> float:
    """LiNeS multi-task alpha: (||sum_t tau_t|| / ||tau_MTL||) / T, the paper's multi-task merging section ("we tune
    beta and set alpha"; the norm is not named there) and the official code (src/eval/eval.py L119, with L1 norms
    of the flattened vectors from src/eval/aggregation.py L177-178). tau_MTL here is the weighted sum
    sum_t w_t tau_t, so with unit weights the ratio is 1 and alpha = 1/T, as the official summed (task arithmetic)
    merge gives; the shallowest block then gets the mean of the task vectors."""
    return (summed_l1 / merged_l1) * 1 / num_tasks


# METHOD: streaming: read one tensor per model at a time from safetensors (sharded or not), check compatibility
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class Checkpoint:
    """The tensors of a Hugging Face model directory (or hub id), opened lazily with safetensors."""

    def __init__(self, path: str, trust_remote_code: bool = False):
        from safetensors import safe_open
        from transformers import AutoConfig
        if not os.path.isdir(path):
            if path.startswith((".", "/", "~")) or path.count("/") > 1:
                raise common.UsageError(f"--models/--base {path!r}: no such directory")
            from huggingface_hub import snapshot_download
            try:
                path = snapshot_download(path, allow_patterns=["*.safetensors", "*.json", "*.jinja", "*.txt", "*.model"])
            except Exception as err:  # offline, unknown id, a relative path that does not exist
                raise common.UsageError(f"--models/--base {path!r}: no such directory, and it could not be fetched as a "
                                        f"hub model ({type(err).__name__})") from None
        self.path = path
        if os.path.isfile(os.path.join(path, "adapter_config.json")):  # a LoRA run's final/: adapters, not a model
            merged = os.path.join(path, "merged")
            raise common.UsageError(f"{path}: a LoRA adapter, not a model; merge its merged model ("
                                    + (f"{merged}" if os.path.isdir(merged) else "train with --merge_lora") + ")")
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise common.UsageError(f"{path}: no .safetensors files")
        try:
            self.handles = {f: safe_open(os.path.join(path, f), "pt") for f in files}
        except Exception as err:  # SafetensorError: a truncated or corrupt file
            raise common.UsageError(f"{path}: a .safetensors file is corrupt ({str(err).splitlines()[0][:200]})") from None
        self.where = {name: f for f, h in self.handles.items() for name in h.keys()}
        self.spans = {}  # name -> (file, byte offset, byte length, dtype, shape), from each file's JSON header
        for f in files:
            with open(os.path.join(path, f), "rb") as stream:
                size = int.from_bytes(stream.read(8), "little")
                header = json.loads(stream.read(size))
            for name, entry in ((k, v) for k, v in header.items() if k != "__metadata__"):
                if entry["dtype"] not in SAFETENSORS_DTYPES:
                    raise common.UsageError(f"{path}: tensor {name} has dtype {entry['dtype']}, which merge.py cannot read")
                start, end = entry["data_offsets"]
                self.spans[name] = (f, 8 + size + start, end - start, SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"])
        try:  # the config object: its attribute map reads GPT-2's n_layer as num_hidden_layers
            self.config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).get_text_config()
        except (OSError, ValueError) as err:
            raise common.UsageError(f"{path}: config.json could not be read as a transformers config: {err}") from None

    def shape(self, name):
        return tuple(self.handles[self.where[name]].get_slice(name).get_shape())

    def get(self, name):
        """The tensor as float32, read with plain file reads into a private buffer (the same bytes as safetensors'
        get_tensor): the file is not memory-mapped, so the pages read do not stay in this process's resident set."""
        file, offset, length, dtype, shape = self.spans[name]
        data = torch.empty(length, dtype=torch.uint8)
        view, done = memoryview(data.numpy()), 0
        with open(os.path.join(self.path, file), "rb", buffering=0) as stream:
            stream.seek(offset)
            while done < length:  # one read returns at most ~2 GiB
                got = stream.readinto(view[done:])
                if not got:
                    raise common.UsageError(f"{self.path}/{file}: truncated inside tensor {name}")
                done += got
        return data.view(dtype).view(shape).float()


def check_compatible(checkpoints):
    """Same architecture, tensor names, shapes and tokenizer in every model; the first difference is an error that
    names the tensor (or file) and the two models."""
    first = checkpoints[0]
    for other in checkpoints[1:]:
        for key in ("model_type", "architectures", "vocab_size", "num_hidden_layers", "hidden_size"):
            ours, theirs = getattr(first.config, key, None), getattr(other.config, key, None)
            if ours != theirs:
                raise common.UsageError(f"config {key} differs: {ours} in {first.path}, {theirs} in {other.path}")
        for name in sorted(set(first.where) | set(other.where)):
            if name not in first.where or name not in other.where:
                raise common.UsageError(f"tensor {name} is in {first.path if name in first.where else other.path} "
                                        f"only, not in {other.path if name in first.where else first.path}")
            if first.shape(name) != other.shape(name):
                raise common.UsageError(f"tensor {name}: shape {first.shape(name)} in {first.path}, "
                                        f"{other.shape(name)} in {other.path}")
        if tokenizer_hash(first.path) != tokenizer_hash(other.path):
            raise common.UsageError(f"the tokenizers differ (vocabulary or special tokens): {first.path} vs {other.path}")


def tokenizer_hash(path):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # a corrupt tokenizer.json raises the tokenizers library's plain Exception
        raise common.UsageError(f"{path}: the tokenizer could not be loaded ({str(err).splitlines()[0][:200]})") from None
    return hashlib.sha256(json.dumps([sorted(tok.get_vocab().items()), tok.all_special_tokens]).encode()).hexdigest()


def check_depth(checkpoint):
    """LiNeS needs every tensor's block: refuse a config without depth or a tensor block_of cannot place."""
    num_layers = getattr(checkpoint.config, "num_hidden_layers", None)
    if not num_layers:
        raise common.UsageError(f"--method lines: the config of {checkpoint.path} has no num_hidden_layers (depth)")
    for name in sorted(checkpoint.where):
        block_of(name, num_layers)


def merge(args, checkpoints, base, weights, out_state):
    """Write the merge of `checkpoints` (and `base`) into out_state (the output model's own tensors), one tensor
    name at a time, in the checkpoints' on-disk naming: memory is the output model plus one tensor per input.
    Returns the merged tensors that out_state has no such name (and shape) for: transformers 5's fused MoE experts."""
    method, num_layers = args.method, getattr(checkpoints[0].config, "num_hidden_layers", None)
    normalize = {"true": True, "false": False}.get(args.normalize, method in ("linear", "uniform", "ties"))
    density = args.density if args.density >= 0 else {"ties": 0.2, "dare_linear": 0.1, "dare_ties": 0.1}.get(method, 1.0)
    generator = torch.Generator().manual_seed(args.seed)
    names, thresholds, pending = sorted(checkpoints[0].where), None, {}
    if method == "ties" and args.ties_trim == "global" and density < 1:
        # the reference code's topk_values_mask (LiNeS repo src/utils/utils.py L287-309): over the model's flattened
        # |tau|, keep |tau| >= its (n - int(density n))-th smallest value, i.e. the (int(density n) + 1)-th largest;
        # found by kth_largest's two streamed passes, one tensor at a time
        thresholds = []
        for c in checkpoints:
            n = sum(math.prod(c.shape(name)) for name in names)
            thresholds.append(kth_largest(lambda: ((c.get(name) - base.get(name)).abs() for name in names), int(density * n) + 1))
    if method == "lines":
        check_depth(checkpoints[0])
        alpha, beta = args.alpha, args.beta
        if alpha < 0 and len(checkpoints) == 1:
            alpha = 0.5
        elif alpha < 0 and all(w == 1 for w in weights):
            alpha = lines_alpha(1.0, 1.0, len(checkpoints))  # the two norms are of the same sum
        elif alpha < 0:  # one streamed pass for ||sum_t tau_t||_1 and ||sum_t w_t tau_t||_1
            summed_l1 = merged_l1 = 0.0
            for name in names:
                theta0 = base.get(name)
                taus = [c.get(name) - theta0 for c in checkpoints]
                summed_l1 += sum(taus).abs().sum(dtype=torch.float64).item()
                merged_l1 += sum(w * t for w, t in zip(weights, taus)).abs().sum(dtype=torch.float64).item()
            alpha = lines_alpha(summed_l1, merged_l1, len(checkpoints))
        beta = beta if beta >= 0 else 1 - alpha
        print0(f"LiNeS: lambda from alpha {alpha:.6g} (first block, non-block tensors) to alpha + beta {alpha + beta:.6g}")
    for name in names:
        tensors = [c.get(name) for c in checkpoints]
        if method in ("uniform", "linear"):
            merged = linear(tensors, weights, normalize)
        elif method == "slerp":
            merged = slerp(tensors[0], tensors[1], args.t)
        else:
            theta0 = base.get(name)
            taus = [t - theta0 for t in tensors]
            if method == "ties":
                taus = [trim(tau, density, thresholds[i] if thresholds else None) for i, tau in enumerate(taus)]
                merged = ties(theta0, taus, weights, args.scaling, normalize)
            elif method == "dare_ties":
                merged = ties(theta0, [dare(tau, density, generator, args.dare_rescale) for tau in taus], weights,
                              args.scaling, normalize)
            elif method == "dare_linear":
                merged = task_arithmetic(theta0, [dare(tau, density, generator, args.dare_rescale) for tau in taus],
                                         weights, args.scaling, normalize)
            elif method == "lines":
                merged = theta0 + lines_scale(name, num_layers, alpha, beta) * sum(w * t for w, t in zip(weights, taus))
            else:
                merged = task_arithmetic(theta0, taus, weights, args.scaling, normalize)
        if not torch.isfinite(merged).all():
            raise common.UsageError(f"{name}: the merged tensor is not finite (an input holds NaN or inf?); nothing saved")
        if name in out_state and tuple(out_state[name].shape) == tuple(merged.shape):
            out_state[name].copy_(merged.to(out_state[name].dtype))
        else:
            pending[name] = merged
    return pending


def load_on_disk_tensors(model, tensors):
    """Put tensors named as on disk into the model when its in-memory tensors differ: transformers 5 fuses each
    layer's MoE experts into 3-D tensors (`mlp.experts.gate_up_proj`) that save_pretrained writes back per expert
    (`mlp.experts.<e>.gate_proj.weight`). transformers' own loader converts them (from_pretrained with a state dict:
    the conversion that loading the saved model applies), into a second copy of the model; every tensor must land."""
    converted, info = type(model).from_pretrained(None, config=model.config, state_dict=tensors, dtype=model.dtype,
                                                  output_loading_info=True)
    problems = {k: sorted(info[k])[:5] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if problems:
        raise common.UsageError(f"the merged tensors do not load into {type(model).__name__}: {problems}")
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in converted.state_dict().items():
            state[name].copy_(tensor)


# COMMON: the held-out loss of a micro-batch, exactly as the training scripts compute it
def compute_loss(model, batch, args):
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    loss_sum, _ = common.fused_linear_cross_entropy(hidden, model.get_output_embeddings().weight, batch["targets"], compile=False)
    return loss_sum, {}


def evaluate(model, tokenizer, eval_sets, rt, args):
    """Judge accuracy on every eval set plus held-out loss on the target set (the training scripts' evaluate)."""
    results = {}
    if not eval_sets:
        return results
    target = next(iter(eval_sets))
    held_out = common.evaluate_loss(common.LossModule(model, lambda m, b: compute_loss(m, b, args), rt), eval_sets[target], rt, tokenizer.pad_token_id)
    results[f"eval/{target}/loss"], results[f"eval/{target}/perplexity"] = held_out["loss"], held_out["perplexity"]
    for name, examples in eval_sets.items():
        acc = common.evaluate_accuracy(model, tokenizer, examples, rt, args.max_new_tokens, batch_size=args.eval_batch_size)
        results[f"eval/{name}/accuracy"], results[f"eval/{name}/n"] = acc["accuracy"], acc["n"]
        results[f"eval/{name}/correct"] = acc["correct"]  # '0'/'1' per prompt, in eval set order (paired bootstrap)
    return results


# METHOD: greedy soup (official model-soups main.py): best first, keep an ingredient only if the soup improves
def greedy_soup(scores: list, score_of_mean) -> tuple:
    """scores[i]: ingredient i's held-out score (higher is better); score_of_mean(indices) scores their uniform
    average. Sorted by score, descending, as the official main.py L152-153 (a stable ascending sort, reversed: among
    equal scores the later ingredient comes first); a single pass; an ingredient is kept only if the soup's score
    strictly rises (L181 `>`; the paper's Algorithm 1 writes >=). Returns (kept indices, score, log)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])[::-1]  # official L152-153: among equal scores, the later first
    kept, best, log = [order[0]], scores[order[0]], []
    for i in order[1:]:
        candidate = score_of_mean(kept + [i])
        log.append({"ingredient": i, "candidate_score": candidate, "accepted": candidate > best})
        if candidate > best:
            kept, best = kept + [i], candidate
    return kept, best, log


def check_merge_args(args):
    """The method's flags, before anything is loaded or written: one error line naming the flag."""
    for flag, allowed in (("normalize", ("auto", "true", "false")), ("ties_trim", ("tensor", "global")),
                          ("dare_rescale", ("inv_p", "l1")), ("greedy_metric", ("accuracy", "loss"))):
        if getattr(args, flag) not in allowed:
            raise common.UsageError(f"--{flag} must be one of {', '.join(allowed)}, got {getattr(args, flag)!r}")
    for flag in ("alpha", "beta"):
        value = getattr(args, flag)
        if not math.isfinite(value) or value < 0 and value != -1:
            raise common.UsageError(f"--{flag} must be >= 0, or -1 for its default, got {value}")
        if value != -1 and args.method != "lines":
            raise common.UsageError(f"--{flag} is LiNeS' (--method lines), not --method {args.method}'s")
    if args.method == "lines" and (args.scaling != 1 or args.normalize != "auto"):
        raise common.UsageError("--method lines scales the summed task vector by alpha + beta (l - 1)/(L - 1) alone: "
                                "leave --scaling at 1 and --normalize at auto (LiNeS' beta takes lambda's role)")


def main(args):
    check_merge_args(args)
    # COMMON: seed, device
    rt = common.setup_distributed(args.device)
    common.prepare_output_dir(args.output_dir, "", args.overwrite, rt)  # before anything is loaded
    if rt.world_size > 1:
        raise common.UsageError("merge.py runs in one process (no torchrun)")
    common.seed_everything(args.seed)

    # METHOD: the inputs, checked before anything is merged
    paths = [p for p in args.models.split(",") if p]
    needs_base = args.method in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "lines")
    if args.method not in ("uniform", "greedy", "linear", "slerp") and not needs_base:
        raise common.UsageError(f"--method {args.method!r}: expected uniform, greedy, linear, task_arithmetic, ties, "
                                "dare_linear, dare_ties, slerp or lines")
    if not paths:
        raise common.UsageError("--models is empty: give the fine-tuned model directories, e.g. "
                                "--models runs/sft_s0/final,runs/sft_s1/final (see the usage in merge.py's docstring)")
    if args.method == "slerp" and len(paths) != 2:
        raise common.UsageError(f"--method slerp merges exactly 2 models, got {len(paths)}")
    if needs_base and not args.base:
        raise common.UsageError(f"--method {args.method} needs --base (the common pre-trained model)")
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * len(paths)
    except ValueError:
        raise common.UsageError(f"--weights {args.weights!r}: expected comma-separated numbers") from None
    if len(weights) != len(paths):
        raise common.UsageError(f"--weights has {len(weights)} values for {len(paths)} models")
    if not all(math.isfinite(w) for w in weights):
        raise common.UsageError(f"--weights {args.weights!r}: every weight must be finite")
    if abs(sum(weights)) < 1e-12 and (args.normalize == "true" or args.normalize == "auto" and args.method in ("linear", "uniform", "ties")):
        raise common.UsageError(f"--weights {args.weights!r} sum to 0, and --method {args.method} divides by their sum "
                                f"(--normalize false to add them unnormalised)")
    checkpoints = [Checkpoint(p, args.trust_remote_code) for p in paths]
    base = Checkpoint(args.base, args.trust_remote_code) if needs_base else None
    check_compatible(checkpoints + ([base] if base else []))
    if args.method == "lines":
        check_depth(checkpoints[0])

    # COMMON: the output model (the donor's config and tokenizer: the base, else the first model) and eval data
    model, tokenizer = common.load_model(base.path if base else checkpoints[0].path, args.dtype, rt.device, args.trust_remote_code)
    out_state = model.state_dict()
    eval_sets = {}
    for pair in filter(None, args.eval_datasets.split(",")):
        name, _, source = pair.partition("=")
        if not source:
            raise common.UsageError(f"--eval_datasets entry {pair!r}: expected name=source")
        examples, _ = common.load_sft_data(source, tokenizer, args.max_length, "truncate", args.eval_split)
        eval_sets[name] = examples[: args.eval_samples or None]
    logger = common.MetricsLogger(args.output_dir, rt, 0, report_to=args.report_to)
    logger.log({"event": "config", **dataclasses.asdict(args), "world_size": rt.world_size})

    # METHOD: merge (greedy: score every ingredient and each candidate soup on the held-out set first)
    def merge_into_model(merge_args, inputs, merge_base, merge_weights):
        pending = merge(merge_args, inputs, merge_base, merge_weights, out_state)
        if pending:  # fused MoE experts: the whole merged model, in on-disk names, through transformers' loader
            load_on_disk_tensors(model, {**{n: out_state[n].cpu() for n in inputs[0].where if n not in pending}, **pending})

    if args.method == "greedy":
        held_out, _ = common.load_sft_data(args.select_dataset, tokenizer, args.max_length, "truncate", "validation")
        held_out = held_out[: args.select_samples or None]
        sign = -1 if args.greedy_metric == "loss" else 1

        def score_of_mean(indices):
            merge_into_model(dataclasses.replace(args, method="uniform"), [checkpoints[i] for i in indices], None, [1.0] * len(indices))
            if args.greedy_metric == "loss":
                return sign * common.evaluate_loss(common.LossModule(model, lambda m, b: compute_loss(m, b, args), rt),
                                                   held_out, rt, tokenizer.pad_token_id)["loss"]
            return common.evaluate_accuracy(model, tokenizer, held_out, rt, args.max_new_tokens, batch_size=args.eval_batch_size)["accuracy"]

        scores = [score_of_mean([i]) for i in range(len(checkpoints))]
        for i, s in enumerate(scores):
            logger.log({"event": "ingredient", "model": paths[i], f"select/{args.greedy_metric}": sign * s})
        kept, best, log = greedy_soup(scores, score_of_mean)
        for entry in log:
            logger.log({"event": "greedy_step", "model": paths[entry["ingredient"]], "accepted": entry["accepted"],
                        f"select/{args.greedy_metric}": sign * entry["candidate_score"]})
        merge_into_model(dataclasses.replace(args, method="uniform"), [checkpoints[i] for i in kept], None, [1.0] * len(kept))
        logger.log({"event": "greedy_soup", "kept": [paths[i] for i in kept], f"select/{args.greedy_metric}": sign * best})
    else:
        merge_into_model(args, checkpoints, base, weights)

    # COMMON: evaluate and save: final/ first (the whole directory appears at once, or not at all)
    model.config.merge = {"method": args.method, "models": paths, "base": args.base, "weights": weights}
    common.save_checkpoint(os.path.join(args.output_dir, "final"), model, tokenizer, rt)
    final = evaluate(model, tokenizer, eval_sets, rt, args)  # after saving: a crash here loses nothing
    logger.log({"event": "eval_after", **final, "peak_memory_gib": common.peak_memory_gib(rt.device)})
    print0(f"saved {os.path.join(args.output_dir, 'final')}")


if __name__ == "__main__":
    try:
        main(common.parse_args(Args))
    except common.UsageError as err:
        raise SystemExit(f"error: {err}") from None
