"""Shared core of every method script: what must be done identically for comparisons to be fair.

Sections: DISTRIBUTED, MODEL, DATA, FUSED LOSS, JUDGES AND EVALUATION, CHECKPOINTS AND LOGGING.
Nothing here is method-specific: a method changes the per-token objective handed to
`fused_linear_cross_entropy`, the training targets, or the gradients, inside its own script.
"""
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import time
import types
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import sandbox
from sandbox import judge_code, run_sandboxed  # noqa: F401  (common.judge_code, common.run_sandboxed)

IGNORE_INDEX = -100


class UsageError(ValueError):
    """Bad input or flags: scripts print `error: <message>` (naming the file, line, field or flag) and exit 1;
    an unknown flag gets argparse's usage line and exit 2."""


class TrainingError(UsageError):
    """The run cannot go on correctly (a non-finite loss or gradient, a full disk): one line, exit 1, nothing bad saved."""
WORLD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "world")


# ============================================================ DISTRIBUTED
@dataclasses.dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool
    dtype: torch.dtype = torch.float32  # compute dtype: bf16 = autocast over fp32 master weights (see `precision`)


# What a checkpoint records of its run (parse_args fills it) and compares on --resume; these flags may differ.
RUN_SETTINGS = {}
RESUME_MAY_CHANGE = {"output_dir", "resume", "overwrite", "save_every", "keep_checkpoints", "eval_datasets", "eval_samples",
                     "eval_batch_size", "eval_every", "eval_every_samples", "eval_before", "eval_split", "max_new_tokens",
                     "compile", "device", "micro_batch_size", "gradient_checkpointing", "save_dtype", "cache_dir", "fsdp",
                     "chunk_size", "report_to", "merge_lora", "dataset_num_proc"}
RUN_FILES = ("metrics.jsonl", "final")  # with checkpoint-N: what marks a directory as holding a run


def prepare_output_dir(output_dir: str, resume: str, overwrite: bool, rt: "Runtime"):
    """Before anything is loaded: the directory can be written, and a fresh run does not mix with another run's
    checkpoints (refused unless --overwrite, which removes them). --resume continues what is there."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output_dir {output_dir!r} is a file")
    parent = os.path.dirname(os.path.abspath(output_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {output_dir!r}: {parent!r} is not a writable directory")
    if os.path.isdir(output_dir) and not os.access(output_dir, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {output_dir!r} is not writable")
    found = sorted(n for n in os.listdir(output_dir) if n in RUN_FILES or re.fullmatch(r"checkpoint-\d+(\.tmp)?", n)) \
        if os.path.isdir(output_dir) else []
    if found and not resume:
        if not overwrite:
            raise UsageError(f"--output_dir {output_dir!r} holds another run ({', '.join(found[:4])}); continue it with "
                             f"--resume auto, replace it with --overwrite true, or choose another --output_dir")
        if rt.is_main:
            for name in found:
                path = os.path.join(output_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if dist.is_initialized():
            dist.barrier()


# Flag ranges every script shares: (test, what the flag must be).
FLAG_RULES = {
    "batch_size": (lambda v: v >= 1, "at least 1"), "micro_batch_size": (lambda v: v >= 0, "0 (auto) or more"),
    "steps": (lambda v: v >= 0, "0 or more"), "lr": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"), "keep_checkpoints": (lambda v: v >= 0, "0 (all) or more"),
    "save_every": (lambda v: v >= 0, "0 (off) or more"), "eval_every": (lambda v: v >= 0, "0 (off) or more"),
    "eval_every_samples": (lambda v: v >= 0, "0 (all) or more"),
    "max_grad_norm": (lambda v: math.isfinite(v) and v >= 0, "0 (off) or a finite positive number"),
    "max_length": (lambda v: v >= 2, "at least 2"), "eval_samples": (lambda v: v >= 0, "0 (all) or more"),
    "eval_batch_size": (lambda v: v >= 1, "at least 1"), "max_new_tokens": (lambda v: v >= 1, "at least 1"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"), "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"), "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "finite, >= 0"),
    "dataset_num_proc": (lambda v: v >= 1, "at least 1"),
}


def check_args(args):
    """Every shared flag in range, and --device one that exists, before anything is loaded or written."""
    for name, (ok, what) in FLAG_RULES.items():
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            raise UsageError(f"--{name} must be {what}, got {value!r}")
    if getattr(args, "report_to", None) is not None:
        check_report_to(args.report_to)
    if getattr(args, "dataset_weights", None) is not None:
        dataset_sources(args.dataset, args.dataset_weights)  # the mixture's flags, before anything is loaded
    if hasattr(args, "lora_r"):
        check_lora(args)
    device = getattr(args, "device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (use --device cpu or auto)")


def config_file_flags(path: str, args_class) -> list:
    """A .yaml/.yml/.json config file (`python sft.py run.yaml --seed 1`, as TRL's scripts take one) as
    command-line flags, to be placed before the real ones so that those override it. Every key must be a field
    of the script's Args and every value of that field's type: one error naming the file and the key."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise UsageError(f"{path}: cannot be read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 (byte offset {err.start})") from None
    def unique(pairs, line=None):  # a repeated key is refused, not silently last-wins
        keys = [k for k, _ in pairs]
        for i, k in enumerate(keys):
            if k in keys[:i]:
                raise UsageError(f"{path}{f':{line(i)}' if line else ''}: duplicate field {k!r}")
        return dict(pairs)

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            unique([(self.construct_object(k, deep=deep), None) for k, _ in node.value],
                   lambda i: node.value[i][0].start_mark.line + 1)
            return super().construct_mapping(node, deep)
    try:
        data = json.loads(text, object_pairs_hook=unique) if path.endswith(".json") else yaml.load(text, Loader)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise UsageError(f"{path}{f':{mark.line + 1}' if mark else ''}: malformed YAML "
                         f"({getattr(err, 'problem', None) or type(err).__name__})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(args_class)}
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
    flags = []
    for key, value in data.items():
        if key not in fields:
            raise UsageError(f"{path}: unknown field {key!r} (not a flag of this script; see --help)")
        kind = {"bool": bool, "int": int, "float": float, "str": str}[getattr(fields[key].type, "__name__", fields[key].type)]
        if value is None and kind is str:
            value = ""
        if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if not isinstance(value, kinds[kind]) or (kind is not bool and isinstance(value, bool)):
            raise UsageError(f"{path}: field {key!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")
        flags += [f"--{key}", str(value).lower() if kind is bool else repr(value) if kind is float else str(value)]
    return flags


def parse_args(args_class, argv=None):
    """Parse the command line into a script's `Args` dataclass (HfArgumentParser), with each field's
    docstring (the string literal under it) as its --help text. A first argument ending in .yaml, .yml or
    .json is a config file of the same flags; the command line's own flags override it."""
    import ast
    import inspect
    import types
    from transformers import HfArgumentParser
    body = ast.parse(inspect.getsource(args_class)).body[0].body
    docs = {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}
    for f in dataclasses.fields(args_class):
        f.metadata = types.MappingProxyType({**f.metadata, "help": docs.get(f.name, "").replace("%", "%%")})
    parser = HfArgumentParser(args_class)
    for action in parser._actions:  # HfArgumentParser gives --no_x the help of --x
        if any(o.startswith("--no_") for o in action.option_strings):
            action.help = f"turn off --{action.dest}"
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        argv = config_file_flags(argv[0], args_class) + argv[1:]
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")  # the usage line and exit 2, as argparse does
    check_args(args)
    RUN_SETTINGS.clear()
    RUN_SETTINGS.update({k: v for k, v in dataclasses.asdict(args).items() if k not in RESUME_MAY_CHANGE})
    if getattr(args, "save_dtype", "") and args.save_dtype not in DTYPES:  # checked now, not after training
        raise UsageError(f"--save_dtype must be empty or one of {sorted(DTYPES)}, got {args.save_dtype!r}")
    return args


def setup_distributed(device: str = "auto", dtype: str = "float32") -> Runtime:
    """Read torchrun's environment; init gloo on CPU, nccl (+ gloo for CPU tensors) on GPU, also for one torchrun
    process (FSDP needs a group). Single process needs no torchrun. `dtype` is the compute dtype (--dtype)."""
    compute = compute_dtype(dtype)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local_rank}") if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if (world > 1 or "TORCHELASTIC_RUN_ID" in os.environ) and not dist.is_initialized():
        # on GPU: nccl for CUDA tensors and gloo for the few CPU ones (log statistics, gathered eval shards)
        dist.init_process_group("cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    if dev.type == "cpu" and compute == torch.bfloat16 and not cpu_has_bf16_matmuls():
        emulate_bf16_matmuls()
    return Runtime(rank, local_rank, world, dev, rank == 0, compute)


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


class LogProgress:
    """progress() in a log file: plain lines, the first once the phase has run `delay` s, then one every
    `every` s, and the last; a phase shorter than `delay` prints nothing."""

    def __init__(self, desc: str, total: int, unit: str, delay: float = 10, every: float = 30):
        self.desc, self.total, self.unit, self.delay, self.every = desc, total, unit, delay, every
        self.n, self.start, self.shown, self.shown_n = 0, time.time(), None, None

    def update(self, n: int = 1):
        self.n += n
        now = time.time()
        if now - self.start >= self.delay and (self.shown is None or now - self.shown >= self.every):
            self.show(now)

    def show(self, now):
        self.shown, self.shown_n, elapsed = now, self.n, now - self.start
        eta = elapsed / self.n * (self.total - self.n) if self.n else float("nan")
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}s ({100 * self.n / max(self.total, 1):.0f}%) | "
              f"{elapsed:.0f}s elapsed | eta {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self):
        if self.total is not None and (self.shown is not None or time.time() - self.start >= self.delay) \
                and self.shown_n != self.n:  # the last count not shown yet
            self.show(time.time())
        self.total = None  # closed: a second close prints nothing

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(desc: str, total: int, unit: str = "sample"):
    """A progress bar with rate and ETA on stderr, rank 0 only: tqdm's, redrawn, on a terminal; LogProgress's
    plain lines in a log file. TQDM_DISABLE=1 turns both off."""
    off = (dist.is_initialized() and dist.get_rank() != 0) or os.environ.get("TQDM_DISABLE", "") in ("1", "true", "True")
    if off or not sys.stderr.isatty():
        return LogProgress(desc, total, unit, delay=float("inf") if off else 10)
    from tqdm import tqdm
    return tqdm(desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def all_reduce_sum(value: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=op)
    return value


def gather_shards(mine: list, rt: Runtime) -> list:
    """Inverse of sharding with `items[rank::world_size]`: every rank gets the whole list, in order."""
    if not dist.is_initialized():
        return list(mine)
    shards = [None] * rt.world_size
    dist.all_gather_object(shards, mine)
    return [shards[i % rt.world_size][i // rt.world_size] for i in range(sum(len(s) for s in shards))]


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class LossModule(torch.nn.Module):
    """Wraps model + loss function so DDP/FSDP hooks see the whole step (the loss reads lm_head's weight
    directly, outside lm_head.forward), run in the compute precision. `loss_fn(model, batch)` returns
    (summed loss, metrics dict)."""

    def __init__(self, model, loss_fn, rt: Runtime = None):
        super().__init__()
        self.model, self.loss_fn, self.rt = model, loss_fn, rt

    def forward(self, batch):
        with precision(self.rt) if self.rt else contextlib.nullcontext():
            return self.loss_fn(self.model, batch)


def wrap_model(model, loss_fn, rt: Runtime, fsdp: bool = False, gradient_checkpointing: bool = False):
    """DDP by default, FSDP2 (`fully_shard` per decoder layer, then the root) with fsdp=True. In bf16, DDP keeps
    fp32 parameters and autocasts; FSDP2 gathers bf16 copies of the fp32 shards (MixedPrecisionPolicy) and reduces
    gradients in fp32. gradient_checkpointing: recompute each decoder layer in the backward (non-reentrant)."""
    if gradient_checkpointing:  # transformers 5.x renamed it; 4.x has the old name only
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = LossModule(model, loss_fn, rt)
    if rt.world_size == 1 and not fsdp:
        return module
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mixed = rt.dtype != torch.float32  # bf16: bf16 copies, fp32 reduction; else the parameters' own dtype
        policy = MixedPrecisionPolicy(param_dtype=rt.dtype if mixed else None, reduce_dtype=torch.float32 if mixed else None)
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=policy)
        return fully_shard(module, mp_policy=policy)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


@contextlib.contextmanager
def unsharded(wrapped):
    """FSDP2: gather the root's parameters (embeddings, final norm, LM head) for calls that bypass the
    root's forward, such as generation; the layers gather their own. A no-op otherwise."""
    if hasattr(wrapped, "unshard"):
        wrapped.unshard()
        yield
        wrapped.reshard()
    else:
        yield


def gradient_sync(wrapped, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


# ============================================================ MODEL
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(dtype: str) -> torch.dtype:
    """--dtype as the compute dtype of training: float32, or bfloat16 mixed precision (fp32 master weights and
    optimizer state, bf16 matmuls). float16 would need a loss scaler, which no script has: refused."""
    if dtype not in ("float32", "bfloat16"):
        hint = " (float16 training needs a gradient scaler, not implemented here; use bfloat16)" if dtype == "float16" else ""
        raise UsageError(f"--dtype must be float32 or bfloat16, got {dtype!r}{hint}")
    return DTYPES[dtype]


class EmulatedBf16Matmuls(TorchDispatchMode):
    """bf16 matmuls as bf16 hardware computes them: bf16 operands, fp32 products and sums, a bf16 result. For CPUs
    without bf16 matmul support (AVX2: oneDNN refuses bf16), where PyTorch falls back to a single-threaded loop,
    15-60x slower than fp32 (384x256 @ 256x512: 75 ms vs 1.2 ms). Same numbers up to summation order; every other
    op runs as is. While it is on, torch.compile skips frames (dynamo does not trace under a dispatch mode)."""
    MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket not in self.MATMULS or not all(  # mixed dtypes (out= included): the native error
                a.dtype == torch.bfloat16 for a in (*args, *kwargs.values()) if torch.is_tensor(a)):
            return func(*args, **kwargs)
        kwargs = dict(kwargs)
        out = kwargs.pop("out", None)
        product = func.overloadpacket.default(*[a.float() if torch.is_tensor(a) else a for a in args], **kwargs)
        return product.to(torch.bfloat16) if out is None else out.copy_(product)


def cpu_has_bf16_matmuls() -> bool:
    """Whether PyTorch's CPU matmuls have a bf16 kernel here (oneDNN's, on AVX-512 or AMX or Arm's bf16)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def emulate_bf16_matmuls():
    """Turn `EmulatedBf16Matmuls` on for the rest of this process (forward, backward and generation); once."""
    if not EMULATION:
        EMULATION.append(EmulatedBf16Matmuls().__enter__())
        print0("bf16: this CPU has no bf16 matmul support; matmuls run on bf16 operands with fp32 sums (as bf16 "
               "hardware does) instead of PyTorch's slow fallback, and torch.compile is off")


EMULATION = []


def precision(rt: Runtime):
    """The compute precision of forward passes: autocast to rt.dtype (bf16 matmuls over fp32 weights), else nothing.
    The fused loss runs its chunks in the autocast dtype and its softmax math in fp32."""
    return torch.autocast(rt.device.type, dtype=rt.dtype, enabled=rt.dtype != torch.float32)


def read_chat_template(source: str, tokenizer) -> str:
    """--chat_template: a Jinja file, or a local tokenizer directory or hub id whose template to use (for a base
    model without one). Refused unless an assistant turn it renders ends with this tokenizer's eos token, since
    generation stops only there."""
    from transformers import AutoTokenizer
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            template = f.read()
    else:
        try:
            template = AutoTokenizer.from_pretrained(source).chat_template
        except Exception as err:
            raise UsageError(f"--chat_template {source!r}: neither a file nor a loadable tokenizer "
                             f"({type(err).__name__}: {str(err).strip()[:200]})") from None
        if not isinstance(template, str):
            raise UsageError(f"--chat_template {source!r}: that tokenizer has no (single) chat template")
    try:
        turn = tokenizer.apply_chat_template([{"role": "user", "content": "u"}, {"role": "assistant", "content": "THE-END"}],
                                             chat_template=template, tokenize=False)
    except Exception as err:
        raise UsageError(f"--chat_template {source!r}: does not render ({type(err).__name__}: {str(err)[:200]})") from None
    if tokenizer.eos_token is None or tokenizer.eos_token not in turn.split("THE-END")[-1]:
        raise UsageError(f"--chat_template {source!r}: an assistant turn does not end with the tokenizer's eos token "
                         f"{tokenizer.eos_token!r}, so generation would not stop; use a template that ends turns with it")
    return template


def load_model(path: str, dtype: str = "float32", device="cpu", trust_remote_code: bool = False, chat_template: str = "",
               load_in_4bit: bool = False):
    """Model and tokenizer by hub id or local directory (safetensors only), parameters in `dtype`: float32 for the
    trained model (master weights; --dtype is then the compute dtype), --dtype for frozen ones (references,
    teachers). `model.source_dtype` records the checkpoint's own dtype, the default dtype of the saved model.
    `chat_template` replaces the tokenizer's (read_chat_template); final/ saves it with the tokenizer.
    load_in_4bit: QLoRA's frozen NF4 base (bitsandbytes, CUDA only), placed on `device` as it loads."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    transformers.utils.logging.disable_progress_bar()
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.exists(path)
    if looks_local and not os.path.isdir(path):
        raise UsageError(f"--model {path!r}: no such directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        source = getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), "dtype", None)
        quantized = {"quantization_config": quantization_4bit(dtype), "device_map": {"": device}} if load_in_4bit else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], use_safetensors=True,
                                                     trust_remote_code=trust_remote_code, **quantized)
    except Exception as err:  # OSError, ValueError, SafetensorError, the tokenizers' plain Exception
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise UsageError(f"--model {path!r} could not be loaded as a local directory or hub id (safetensors weights, "
                         f"config and tokenizer needed): {type(err).__name__}: {first}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template, tokenizer)
    if tokenizer.chat_template is None:
        raise UsageError(f"--model {path!r}: the tokenizer has no chat template; use an instruct model, or give one "
                         f"with --chat_template (a Jinja file, or a tokenizer whose template to use)")
    model.source_dtype = source if isinstance(source, torch.dtype) else DTYPES.get(str(source), torch.float32)
    return (model if load_in_4bit else model.to(device)), tokenizer


# ============================================================ LORA (optional: pip install peft)
def check_lora(args):
    """The LoRA flags, before anything is loaded: in range, peft installed, QLoRA only where it can run."""
    if args.lora_r < 0 or args.lora_alpha < 0 or not 0 <= args.lora_dropout < 1:
        raise UsageError(f"--lora_r and --lora_alpha must be >= 0 and --lora_dropout in [0, 1), got {args.lora_r}, "
                         f"{args.lora_alpha}, {args.lora_dropout}")
    if not args.lora_r:
        for flag in ("merge_lora", "load_in_4bit"):
            if getattr(args, flag):
                raise UsageError(f"--{flag} needs LoRA: set --lora_r (e.g. 16)")
        return
    if importlib.util.find_spec("peft") is None:
        raise UsageError("--lora_r: LoRA needs the optional package peft (pip install peft, or requirements-extras.txt)")
    if not [t for t in args.lora_targets.split(",") if t.strip()]:
        raise UsageError("--lora_targets: give module names (e.g. q_proj,v_proj) or all-linear")
    if args.load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
            raise UsageError("--load_in_4bit: QLoRA's 4-bit base needs a CUDA GPU and the package bitsandbytes")
        if getattr(args, "fsdp", False) or args.merge_lora:
            raise UsageError("--load_in_4bit: not with --fsdp (4-bit shards are not supported here) or --merge_lora "
                             "(merge the adapter into the unquantized base: rerun without --load_in_4bit)")


def weights_dtype(args) -> str:
    """dtype of the trained model's parameters as loaded: fp32 master weights; with LoRA the frozen base in
    --dtype (the adapters, the only trained weights, stay fp32: peft's autocast_adapter_dtype)."""
    return args.dtype if getattr(args, "lora_r", 0) else "float32"


def quantization_4bit(dtype: str):
    """QLoRA (Dettmers et al. 2023): NF4 weights, double quantisation, matmuls in the compute dtype."""
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=DTYPES[dtype])


def add_lora(model, args):
    """LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685, eq. 3): each target linear computes
    W x + (alpha / r) B A x with W frozen, A [r, in] random, B [out, r] zero, so training starts at the base model.
    r = --lora_r, alpha = --lora_alpha (0: 2 r), targets = --lora_targets (module names, or peft's all-linear:
    every linear but the LM head), dropout on the adapter's input = --lora_dropout. peft injects the adapters in
    place: the returned model is the same transformers model, its adapters the only parameters that need grad.
    A target on the LM head is refused: the fused loss reads the head's weight, not its forward."""
    if not getattr(args, "lora_r", 0):
        return model
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer
    if args.load_in_4bit:
        peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = "all-linear" if args.lora_targets.strip() == "all-linear" else [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    config = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r, lora_dropout=args.lora_dropout,
                             target_modules=targets, task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft asks transformers 5.x a deprecated question; nothing for the user
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            peft.get_peft_model(model, config)
    except ValueError as err:
        raise UsageError(f"--lora_targets {args.lora_targets!r}: {str(err).splitlines()[0][:300]}") from None
    if isinstance(model.get_output_embeddings(), BaseTunerLayer) or isinstance(model.get_input_embeddings(), BaseTunerLayer):
        raise UsageError(f"--lora_targets {args.lora_targets!r} reaches the LM head or the embeddings: the fused loss "
                         f"reads their weight directly, so an adapter there would not train; target other modules")
    stored = next(p.dtype for p in model.parameters() if not p.requires_grad)
    if stored.itemsize < model.source_dtype.itemsize:  # announced, not silent: what is trained is what gets merged
        print0(f"LoRA: the frozen base is kept in {stored} (the checkpoint is {model.source_dtype}): the adapters train "
               f"on that rounded base, and final/merged is it plus (alpha / r) B A, the model evaluated")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"LoRA r={args.lora_r} alpha={config.lora_alpha:g} on {len(lora_layers(model))} modules: {trained:,} of "
           f"{sum(p.numel() for p in model.parameters()):,} parameters train")
    return model


def lora_layers(model) -> dict:
    """{module name: peft LoRA layer} of a model with adapters ({} without)."""
    if not hasattr(model, "peft_config"):
        return {}
    from peft.tuners.lora import LoraLayer
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def adapter_keys(model) -> dict:
    """{parameter name in the model: its key in peft's adapter file}: peft's PeftModel prefix, no adapter name."""
    return {n: "base_model.model." + n.replace(".default.", ".") for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model, adapters bypassed (what peft's disable_adapter does, without touching requires_grad, which
    DDP and FSDP track): ASFT's frozen reference at no second copy."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


def merged_state(model, state: dict) -> dict:
    """A full state dict (module names, as `_full_state` gives) with every adapter merged into its base weight,
    W' = W + (alpha / r) B A in float32, under the plain model's names: what from_pretrained loads without peft."""
    merged = {k: v for k, v in state.items() if ".lora_" not in k}
    for name, layer in lora_layers(model).items():
        a, b = state[f"{name}.lora_A.default.weight"].float(), state[f"{name}.lora_B.default.weight"].float()
        w = state[f"{name}.base_layer.weight"]
        merged[f"{name}.base_layer.weight"] = w.float() + layer.scaling["default"] * (b @ a)  # save_checkpoint casts
    return {k.replace(".base_layer.", "."): v for k, v in merged.items()}


def decoder_layers(model) -> list:
    """The decoder's block list, whatever its attribute name (`layers`; GPT-2's `h`)."""
    decoder = model.get_decoder()
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(decoder, name, None), torch.nn.ModuleList):
            return list(getattr(decoder, name))
    raise UsageError(f"{type(model).__name__}: no decoder layer list found (expected decoder.layers or decoder.h)")


def decoder_forward(model, batch, hidden_states: bool = False) -> tuple:
    """The decoder's final hidden states (after the final norm, before the LM head) and, for a mixture of experts,
    the model's own router load-balancing loss times its config's `router_aux_loss_coef`, in summed-loss units
    (times the micro-batch's loss tokens, so the global token normalisation turns it into the token-weighted mean
    of the per-micro-batch losses; one micro-batch gives exactly the model's own `loss + coef * aux_loss`).
    Returns (hidden [B, T, H], router loss (0-d), metrics: {"moe/router_aux_loss": aux} for MoE, else {}).
    hidden_states=True: the first value is every block's output instead (the embeddings first; the last entry is
    the final hidden state, through the final norm), for methods that read intermediate layers."""
    decoder = model.get_decoder()
    coef = getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0
    balance = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
    moe = bool(coef) and balance is not None
    out = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  **({"output_hidden_states": True} if hidden_states else {}), **({"output_router_logits": True} if moe else {}))
    hidden = (*out.hidden_states[:-1], out.last_hidden_state) if hidden_states else out.last_hidden_state
    if not moe:
        return hidden, out.last_hidden_state.new_zeros((), dtype=torch.float32), {}
    experts = getattr(model, "num_experts", None) or model.config.num_experts
    top_k = getattr(model, "num_experts_per_tok", None) or model.config.num_experts_per_tok
    aux = balance(out.router_logits, experts, top_k, batch["attention_mask"]).float()
    tokens = (batch["targets"] != IGNORE_INDEX).sum()
    return hidden, coef * aux * tokens, {"moe/router_aux_loss": aux.item()}


def logit_map(model) -> tuple:
    """(scale, softcap) of the model's own logit post-processing after the LM head: logits = scale * (h @ W^T),
    then softcap * tanh(logits / softcap) when softcap > 0. Gemma 2/3: final_logit_softcapping; Cohere: logit_scale;
    Granite: 1 / logits_scaling. Any other post-processing is caught by `check_objective` at start-up."""
    config = getattr(model.config, "text_config", None) or model.config
    scale = float(getattr(model, "logit_scale", None) or getattr(config, "logit_scale", None) or 1.0)
    scale /= float(getattr(config, "logits_scaling", None) or 1.0)
    return scale, float(getattr(config, "final_logit_softcapping", None) or 0.0)


@torch.no_grad()
def check_objective(model, batch, rt: Runtime, what: str = "--model", rows: int = 2, length: int = 128):
    """Start-up guard against a silently wrong objective: the token-mean cross-entropy that training computes
    (decoder_forward, then the fused loss with logit_map) must equal the one from the model's own
    `forward(...).logits`, on a small slice of a real batch, in the training precision. A mismatch (an
    architecture whose logits get a treatment nobody listed) stops the run before training."""
    part = {k: v[:rows, :length] for k, v in batch.items() if torch.is_tensor(v) and v.dim() == 2}
    tokens = (part["targets"] != IGNORE_INDEX).sum().clamp(min=1)
    was_training = model.training
    model.eval()
    with precision(rt):
        hidden, _, _ = decoder_forward(model, part)
        ours, _ = fused_linear_cross_entropy(hidden, model.get_output_embeddings().weight, part["targets"],
                                             logit_map=logit_map(model), compile=False)
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits.float()
    model.train(was_training)
    theirs = torch.nn.functional.cross_entropy(logits.flatten(0, 1), part["targets"].flatten(), reduction="sum")
    ours, theirs = (ours.float() / tokens).item(), (theirs / tokens).item()
    tolerance = 1e-3 if rt.dtype == torch.float32 else 3e-2
    if not abs(ours - theirs) <= tolerance * max(1.0, abs(theirs)):
        raise UsageError(f"{what}: the training loss on this {model.config.model_type} model ({type(model).__name__}) "
                         f"is {ours:.4f} per token but its own forward's logits give {theirs:.4f}: its logits get a "
                         f"treatment the fused loss does not apply, so training would optimise the wrong objective")
    return ours, theirs


# ============================================================ DATA
def read_records(source: str, split: str = "train") -> list:
    """Rows of a local .jsonl/.json/.csv/.parquet file (UTF-8), or of a hub dataset (`id` or `id:config`)."""
    local = source.endswith((".jsonl", ".json", ".csv", ".parquet"))
    if local and not os.path.isfile(source):
        raise UsageError(f"{source}: no such file")
    if source.endswith(".jsonl"):
        rows = []
        with open(source, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise UsageError(f"{source}:{line_no}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UsageError(f"{source}:{line_no}: malformed JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise UsageError(f"{source}:{line_no}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        return rows
    if source.endswith(".json"):
        try:
            with open(source, encoding="utf-8") as f:
                data = json.load(f)
        except UnicodeDecodeError as err:
            raise UsageError(f"{source}: not UTF-8 (byte offset {err.start})") from None
        except json.JSONDecodeError as err:
            raise UsageError(f"{source}:{err.lineno}: malformed JSON ({err.msg})") from None
        data = data["data"] if isinstance(data, dict) and "data" in data else data
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UsageError(f"{source}: expected a JSON list of objects (or {{\"data\": [...]}}), got "
                             f"{type(data).__name__}" + (" of other things" if isinstance(data, list) else ""))
        return data
    import datasets
    if os.path.isdir(source) and any(os.path.exists(os.path.join(source, f)) for f in ("state.json", "dataset_dict.json")):
        data = datasets.load_from_disk(source)  # Dataset.save_to_disk / DatasetDict.save_to_disk
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise UsageError(f"{source}: no split {split!r} (it has {', '.join(data)})")
            data = data[split]
        return list(data)
    if source.endswith((".parquet", ".csv")):
        try:
            return list(datasets.load_dataset(source.rsplit(".", 1)[1], data_files=source, split="train"))
        except Exception as err:  # the builders' parse errors (pyarrow, pandas) name no line
            raise UsageError(f"{source}: cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    name, _, config = source.partition(":")
    return list(datasets.load_dataset(name, config or None, split=split))


# Each adapter maps a public schema to chat messages, a task name (picks the judge) and a reference.
SCHEMAS = {
    "messages": ("messages",),
    "gsm8k": ("question", "answer"),
    "mbpp": ("text", "code", "test_list"),
    "squad": ("context", "question", "answers"),
    "prompt_response": ("prompt", "response"),
    "prompt_completion (TRL, text or conversational)": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                  "system": "system"}


def _text(row: dict, key: str, where: str) -> str:
    if not isinstance(row[key], str):
        raise UsageError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
    return row[key]


def _texts(value, key: str, where: str) -> list:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where}: field {key!r} must be a list of strings, got {type(value).__name__}")
    return value


def _messages(value, key: str, where: str, end_with_assistant: bool = True) -> list:
    if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                              and isinstance(m.get("content"), str) for m in value):
        raise UsageError(f"{where}: field {key!r} must be a list of {{\"role\": str, \"content\": str}} objects")
    if end_with_assistant and (not value or value[-1]["role"] != "assistant"):
        raise UsageError(f"{where}: {key!r} must end with an assistant turn")
    return value


def to_example(row: dict, where: str) -> dict:
    """{"messages": [...ending with the assistant target], "task": judge name, "reference": for the judge}.
    Every field the schema reads is type-checked: one error naming the file, line and field."""
    keys = set(row)
    if "messages" in keys:
        msgs = _messages(row["messages"], "messages", where)
        return {"messages": msgs, "task": row.get("task", "exact"), "reference": row.get("reference", msgs[-1]["content"])}
    if {"prompt", "completion"} <= keys and isinstance(row["prompt"], list):  # TRL's conversational prompt-completion
        msgs = _messages(row["prompt"], "prompt", where, False) + _messages(row["completion"], "completion", where)
        return {"messages": msgs, "task": row.get("task", "exact"), "reference": row.get("reference", msgs[-1]["content"])}
    if {"instruction", "output"} <= keys:  # Alpaca (and LLaMA-Factory's alpaca format with its optional system)
        user = _text(row, "instruction", where)
        if row.get("input"):
            user += "\n\n" + _text(row, "input", where)
        system = [{"role": "system", "content": _text(row, "system", where)}] if row.get("system") else []
        history = row.get("history") or []  # LLaMA-Factory: earlier [instruction, response] pairs, context only
        if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
            raise UsageError(f"{where}: field 'history' must be a list of [instruction, response] pairs")
        for pair in history:
            system += [{"role": r, "content": t} for r, t in zip(("user", "assistant"), _texts(pair, "history", where))]
        output = _text(row, "output", where)
        return {"messages": system + [{"role": "user", "content": user}, {"role": "assistant", "content": output}],
                "task": row.get("task", "exact"), "reference": row.get("reference", output)}
    if "conversations" in keys:  # ShareGPT: {"from": human|gpt|system, "value": ...}
        turns = row["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
            raise UsageError(f"{where}: field 'conversations' must be a list of {{\"from\": str, \"value\": str}} objects")
        msgs = []
        for t in turns:
            if t.get("from") not in SHAREGPT_ROLES:
                raise UsageError(f"{where}: 'conversations' role {t.get('from')!r} is not one of {', '.join(SHAREGPT_ROLES)}"
                                 " (tool and function turns are not supported)")
            msgs.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
        if not msgs or msgs[-1]["role"] != "assistant":
            raise UsageError(f"{where}: 'conversations' must end with a gpt (assistant) turn")
        return {"messages": msgs, "task": row.get("task", "exact"), "reference": row.get("reference", msgs[-1]["content"])}
    if {"question", "answer"} <= keys:
        question, answer = _text(row, "question", where), _text(row, "answer", where)
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                "task": "math", "reference": answer.split("####")[-1].strip()}
    if {"text", "code", "test_list"} <= keys:
        tests = _texts(row["test_list"], "test_list", where)
        prompt = _text(row, "text", where) + "\nYour code should pass these tests:\n" + "\n".join(tests)
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "code", where)}],
                "task": "code", "reference": tests}
    if {"context", "question", "answers"} <= keys:
        if not isinstance(row["answers"], dict) or "text" not in row["answers"]:
            raise UsageError(f"{where}: field 'answers' must be an object with a 'text' list (the SQuAD schema)")
        texts = _texts(row["answers"]["text"], "answers.text", where)
        prompt = f"{_text(row, 'context', where)}\n\nQuestion: {_text(row, 'question', where)}"
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": texts[0] if texts else ""}],
                "task": "rc", "reference": list(texts)}
    if {"prompt", "response"} <= keys or {"prompt", "completion"} <= keys:
        response = _text(row, "response" if "response" in keys else "completion", where)
        return {"messages": [{"role": "user", "content": _text(row, "prompt", where)}, {"role": "assistant", "content": response}],
                "task": row.get("task", "exact"), "reference": row.get("reference", response)}
    expected = "; ".join(f"{name}: {', '.join(fields)}" for name, fields in SCHEMAS.items())
    raise UsageError(f"{where}: unknown schema. Found fields {sorted(keys)}; expected one of [{expected}]")


def tokenize_example(tokenizer, messages: list, max_length: int, overlong: str, mask_history: bool = False):
    """input_ids and labels, or (None, reason) when skipped. Every assistant turn is trained (labels -100 elsewhere),
    as TRL's assistant_only_loss; mask_history=True trains the final one only (LLaMA-Factory's mask_history). Each
    turn's tokens are those the template adds for it, so the template must render earlier turns the same in context."""
    if not str(messages[-1]["content"]).strip():
        return None, "empty"
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=False)
    full_ids = render(messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"] if not mask_history else [len(messages) - 1]
    labels = [IGNORE_INDEX] * len(full_ids)
    for i in turns:
        start, end = render(messages[:i], True), render(messages[:i + 1]) if i + 1 < len(messages) else full_ids
        if full_ids[:len(start)] != start or full_ids[:len(end)] != end:
            raise UsageError("chat template: the prompt is not a prefix of the full conversation" if i == turns[-1] else
                             "chat template: it renders an earlier assistant turn differently in context (e.g. drops "
                             "its reasoning), so its tokens cannot be trained; use --mask_history to train the last turn only")
        labels[len(start):len(end)] = full_ids[len(start):len(end)]
    prompt_len = len(render(messages[:-1], True))
    if len(full_ids) > max_length:
        if overlong == "drop" or prompt_len >= max_length:
            return None, "dropped"
        full_ids, labels = full_ids[:max_length], labels[:max_length]
        return (full_ids, labels), "truncated"
    return (full_ids, labels), "ok"


def _tokenize_row(row: dict, tokenizer, max_length: int, overlong: str, mask_history: bool) -> dict:
    """datasets.map's function: tokenize_example on one conversation (JSON text). A UsageError becomes the row's
    status, so that the caller raises the first one in file order whatever the number of processes."""
    try:
        tokens, status = tokenize_example(tokenizer, json.loads(row["messages"]), max_length, overlong, mask_history)
    except UsageError as err:
        tokens, status = None, f"error: {err}"
    return {"input_ids": tokens[0] if tokens else [], "labels": tokens[1] if tokens else [], "status": status}


def tokenize_examples(examples: list, tokenizer, max_length: int, overlong: str, mask_history: bool = False,
                      num_proc: int = 1, desc: str = "tokenise", cache: bool = True) -> list:
    """(input_ids, labels, status) of each example's messages: tokenize_example through datasets.map in num_proc
    processes (contiguous shards, results in order: the same as one process). Cached in
    HF_DATASETS_CACHE/sft_tokenized/<key>*.arrow, the key a hash of the messages, the tokenizer (tokenizer.json,
    special tokens, chat template), max_length, overlong, mask_history and the code of tokenize_example: a second
    call with all of these equal reads the file (for any num_proc), any change tokenises again."""
    import datasets
    from unittest import mock
    if not examples:
        return []
    texts = [json.dumps(ex["messages"]) for ex in examples]
    vocab = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else \
        datasets.fingerprint.Hasher.hash(tokenizer)
    key = content_hash(texts, vocab, tokenizer.special_tokens_map, tokenizer.chat_template, max_length, overlong,
                       mask_history, tokenize_example, _tokenize_row)[:32]
    folder = os.path.join(datasets.config.HF_DATASETS_CACHE, "sft_tokenized")
    with contextlib.suppress(OSError):
        os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{key}.arrow") if cache and os.access(folder, os.W_OK) else None  # else in memory
    num_proc = min(num_proc, len(texts))
    bar = lambda total, **_: progress(desc, total)  # ours instead of datasets' bar: plain lines in a log file
    with mock.patch.object(datasets.arrow_dataset, "hf_tqdm", bar, create=True):  # (its name since datasets 2.14)
        out = datasets.Dataset.from_dict({"messages": texts}).map(
            _tokenize_row, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "overlong": overlong,
                                      "mask_history": mask_history}, remove_columns=["messages"],
            num_proc=num_proc if num_proc > 1 else None, cache_file_name=path, new_fingerprint=key)
    out = out.to_dict()  # whole columns at once: far quicker than iterating rows
    return list(zip(out["input_ids"], out["labels"], out["status"]))


def load_source(source: str, tokenizer, max_length: int, overlong: str = "truncate", split: str = "train",
                limit: int = 0, mask_history: bool = False, num_proc: int = 1) -> tuple:
    """One source read, adapted and tokenized: (examples, stats). The first bad row raises, naming its line."""
    rows = read_records(source, split)
    if limit:
        rows = rows[:limit]
    examples, bad = [], None
    for i, row in enumerate(rows):
        try:
            examples.append(to_example(row, f"{source}:{i + 1}"))
        except UsageError as err:  # raised once the rows before it are tokenised: one of those may fail first
            bad = err
            break
    stats = {"rows": len(rows), "ok": 0, "truncated": 0, "dropped": 0, "empty": 0}
    tokens = tokenize_examples(examples, tokenizer, max_length, overlong, mask_history, num_proc,
                               f"tokenise {os.path.basename(source)}", cache=bad is None)
    kept = []
    for i, (ex, (input_ids, labels, status)) in enumerate(zip(examples, tokens)):
        if status.startswith("error: "):
            raise UsageError(f"{source}:{i + 1}: {status[len('error: '):]}")
        stats[status] += 1
        if status in ("ok", "truncated"):
            kept.append({**ex, "input_ids": input_ids, "labels": labels})
    if bad:
        raise bad
    examples = kept
    if not examples:
        raise UsageError(f"{source}: no usable samples ({stats})")
    if any(ex["task"] == "code" for ex in examples):
        require_sandbox(source)  # refused here, before anything is written, where the jail is incomplete
    return examples, stats


def dataset_sources(dataset: str, weights: str = "") -> tuple:
    """--dataset's comma-separated sources (so a comma cannot occur in a source name) and --dataset_weights'
    numbers, None when empty (the sources are then concatenated). Checked before anything is loaded."""
    sources = [s.strip() for s in dataset.split(",")]
    if not all(sources):
        raise UsageError(f"--dataset {dataset!r}: an empty source name (sources are separated by single commas)")
    if len(set(sources)) < len(sources):
        raise UsageError(f"--dataset {dataset!r}: a source is named twice (weight it with --dataset_weights instead)")
    if not weights:
        return sources, None
    try:
        values = [float(w) for w in weights.split(",")]
    except ValueError:
        raise UsageError(f"--dataset_weights {weights!r}: expected comma-separated numbers") from None
    if len(values) != len(sources):
        raise UsageError(f"--dataset_weights has {len(values)} values for {len(sources)} --dataset sources")
    if not all(math.isfinite(w) and w >= 0 for w in values):
        raise UsageError(f"--dataset_weights {weights!r}: every weight must be finite and >= 0")
    if not sum(values):
        raise UsageError(f"--dataset_weights {weights!r}: the weights are all 0")
    return sources, values


def mix_sources(sizes: list, weights, seed: int) -> list:
    """Which samples of each source (sizes[i] usable ones) make the training list, in file order. No weights: all.
    Weights: source i (n samples) gives share = round(w_i / sum(w) x N) samples, N = sum(sizes): each of its samples
    share // n times, plus share % n of them drawn without replacement (a subset when share < n). The draws use
    np.random.default_rng(seed) alone, so every process builds the same list."""
    if weights is None:
        return [list(range(n)) for n in sizes]
    rng, picks = np.random.default_rng(seed), []
    for n, w in zip(sizes, weights):
        share = round(w / sum(weights) * sum(sizes))
        picks.append(sorted(list(range(n)) * (share // n) + rng.choice(n, share % n, replace=False).tolist()))
    return picks


def load_sft_data(source: str, tokenizer, max_length: int, overlong: str = "truncate", split: str = "train",
                  limit: int = 0, mask_history: bool = False, weights: str = "", seed: int = 0,
                  num_proc: int = 1) -> tuple:
    """Read, adapt, tokenize (every assistant turn trained, or the last only with mask_history). Returns
    (examples, stats); skips are counted, never silent. Comma-separated sources are concatenated in order, or
    mixed by `weights` with `seed` (mix_sources); their stats are summed, plus `from <source>: k of n` (k samples
    in the list of its n usable ones). num_proc: processes tokenising (tokenize_examples, which caches)."""
    if overlong not in ("truncate", "drop"):
        raise UsageError(f"--overlong must be 'truncate' or 'drop', got {overlong!r}")
    sources, weights = dataset_sources(source, weights)
    if len(sources) == 1:
        return load_source(sources[0], tokenizer, max_length, overlong, split, limit, mask_history, num_proc)
    loaded = [load_source(s, tokenizer, max_length, overlong, split, limit, mask_history, num_proc) for s in sources]
    picks = mix_sources([len(examples) for examples, _ in loaded], weights, seed)
    stats = {k: sum(s[k] for _, s in loaded) for k in loaded[0][1]}
    stats.update({f"from {s}": f"{len(p)} of {len(ex)}" for s, (ex, _), p in zip(sources, loaded, picks)})
    return [dict(examples[i]) for (examples, _), p in zip(loaded, picks) for i in p], stats


def batch_schedule(lengths: list, batch_size: int, steps: int, seed: int, group: int = 64) -> list:
    """Global batches of sample indices for every step, independent of world size and micro-batching.
    Each epoch: shuffle, sort windows of `group` batches by length, cut into batches, shuffle batches."""
    rng, schedule, n = np.random.default_rng(seed), [], len(lengths)
    if n < batch_size:
        raise UsageError(f"--batch_size {batch_size} exceeds the {n} training samples")
    while len(schedule) < steps:
        order = rng.permutation(n)[: n - n % batch_size]
        window = group * batch_size
        batches = []
        for s in range(0, len(order), window):
            chunk = sorted(order[s:s + window], key=lambda i: lengths[i])
            batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
        schedule += [batches[i] for i in rng.permutation(len(batches))]
    return schedule[:steps]


def collate(examples: list, indices, pad_id: int, device, token_keys=()) -> dict:
    """Right-padded batch; `targets[t]` is the label predicted at position t (already shifted).
    Each of `token_keys` names a per-position list in the examples (aligned with input_ids, like labels);
    it is shifted the same way into a float tensor, 0 at padding."""
    longest = max(len(examples[i]["input_ids"]) for i in indices)
    ids = torch.full((len(indices), longest), pad_id, dtype=torch.long)
    targets = torch.full((len(indices), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(indices), longest), dtype=torch.long)
    for row, i in enumerate(indices):
        x, y = examples[i]["input_ids"], examples[i]["labels"]
        ids[row, :len(x)] = torch.tensor(x)
        targets[row, :len(y) - 1] = torch.tensor(y[1:])
        mask[row, :len(x)] = 1
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "targets": targets.to(device)}
    for key in token_keys:
        values = torch.zeros((len(indices), longest))
        for row, i in enumerate(indices):
            values[row, :len(examples[i][key]) - 1] = torch.tensor(examples[i][key][1:], dtype=torch.float)
        batch[key] = values.to(device)
    return batch


def micro_batches(global_batch: list, rt: Runtime, micro_batch_size: int) -> list:
    """This rank's micro-batches of a global batch: the batch (sorted) is cut into micro-batches of
    `micro_batch_size` and rank r takes micro-batches r, r + world_size, ... So the set of micro-batches is the
    same for any split into processes x accumulation steps (methods with a per-micro-batch nonlinearity, such
    as DRIFT's gradient bias, then give the same result with 2 processes as with 1 process accumulating 2)."""
    ordered = sorted(global_batch)
    chunks = [ordered[i:i + micro_batch_size] for i in range(0, len(ordered), micro_batch_size)]
    return chunks[rt.rank::rt.world_size]


# ============================================================ FUSED LOSS
def label_logit(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits[i, labels[i]] through a one-hot mask, so its gradient fuses into one pointwise kernel."""
    columns = torch.arange(logits.shape[-1], device=logits.device)
    return torch.where(columns == labels[:, None], logits, 0.0).sum(-1)


def cross_entropy_objective(logits, labels, weights):
    """Weighted token cross-entropy: loss_i = -w_i * log softmax(z_i)[y_i]. Returns (loss_i, log p(y_i)).

    Contract for every objective (methods pass their own): fp32 logits [C, V], labels [C], weights [C],
    then the chunk's rows of each `token_inputs` tensor and the `constants`; returns per-token loss
    (zero where weight is zero), the label's log-probability, and optional extra per-token metrics."""
    logp = label_logit(logits, labels) - logits.logsumexp(-1)
    return -weights.to(logp.dtype) * logp, logp


def _chunk_step(objective, logits, labels, weights, scale, softcap, *inputs):
    """Per-chunk loss and gradient: overwrites `logits` with d(sum of losses)/d(logits). The model's own logit
    post-processing (`logit_map`: scale, then softcap * tanh(. / softcap)) is applied in fp32 before the objective."""
    def total(z):
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        if scale != 1.0:
            z = z * scale
        if softcap > 0:
            z = softcap * torch.tanh(z / softcap)
        out = objective(z, labels, weights, *inputs)
        return out[0].sum(), tuple(o.detach() for o in out)
    dz, out = torch.func.grad(total, has_aux=True)(logits)
    logits.copy_(dz)
    return out


_COMPILED, _EAGER = {}, set()


COMPILE_SECONDS = [0.0]  # wall time of the fused loss's calls that compiled a graph: scripts leave it out of tok/s and ETA


def compile_seconds() -> float:
    """Seconds this process has spent in calls of the fused loss that compiled (torch.compile's first call per
    objective and shape); a step's tok/s and the ETA subtract what a step added to it."""
    return COMPILE_SECONDS[0]


def _chunk_fn(objective, compile: bool):
    if not compile:
        return lambda *a: _chunk_step(objective, *a)
    if objective not in _COMPILED:
        # a code object of its own per objective: dynamo's recompile limit counts per code object, and objectives
        # sharing one wrapper would push each other past it into a silent eager fallback
        step = lambda *a: _chunk_step(objective, *a)
        code = step.__code__.replace(co_name=f"chunk_step_{getattr(objective, '__name__', 'objective')}")
        compiled = torch.compile(types.FunctionType(code, step.__globals__, closure=step.__closure__), dynamic=False)

        def run(*a):
            # a compiler bug must not stop training: warn once and run this objective eagerly (an error of the
            # objective itself is raised again by the eager call). Seen: Inductor on CUDA, OTR's sampler in fp32
            if objective in _EAGER:
                return _chunk_step(objective, *a)
            try:
                graphs, start = torch._dynamo.utils.counters["stats"]["unique_graphs"], time.perf_counter()
                out = compiled(*a)
                if torch._dynamo.utils.counters["stats"]["unique_graphs"] != graphs:  # this call compiled
                    COMPILE_SECONDS[0] += time.perf_counter() - start
                return out
            except Exception as err:
                _EAGER.add(objective)
                lines = str(err).strip().splitlines() or [""]
                reason = next((line for line in lines if "Error" in line), lines[0])[:200]
                warnings.warn(f"torch.compile failed for {code.co_name} ({type(err).__name__}: {reason}); running it eagerly")
                return _chunk_step(objective, *a)
        _COMPILED[objective] = run
    return _COMPILED[objective]


def _gradients_in_forward(h, weight, labels, weights, objective, logit_map, chunk_size, compile, need_dh, need_dw,
                          inputs, constants):
    """Chunked pass over the compacted rows: loss and label log-prob per row, dh and dW (fp32) for loss.sum().
    h and weight arrive in the compute dtype; the chunk's logits are formed in it."""
    n, vocab = h.shape[0], weight.shape[0]
    fn = _chunk_fn(objective, compile)
    dh = torch.empty_like(h) if need_dh else None
    accumulate = torch.promote_types(weight.dtype, torch.float32)  # fp32 (or fp64) dW whatever the weight dtype
    dw = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_dw else None
    buffer = torch.empty(min(chunk_size, n), vocab, dtype=h.dtype, device=h.device)
    block = dw_block_rows(h.shape[1], h.dtype)
    outs = []
    if n == 0:  # all tokens ignored: one empty eager step gives correctly shaped (empty) outputs
        fn = _chunk_fn(objective, False)
    for s in range(0, max(n, 1), chunk_size):
        e = min(s + chunk_size, n)
        logits = buffer[: e - s]
        torch.mm(h[s:e], weight.t(), out=logits)
        args = [logits, labels[s:e], weights[s:e], *logit_map] + [t[s:e] for t in inputs]
        if compile:
            for t in args:
                if torch.is_tensor(t):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
        outs.append(fn(*args, *constants))  # logits now holds dlogits
        if need_dh:
            torch.mm(logits, weight, out=dh[s:e])
        if need_dw:
            if dw.dtype == h.dtype:
                dw.addmm_(logits.t(), h[s:e])
            else:  # bf16 product, fp32 sum, a vocabulary block at a time: no whole [V x H] bf16 temporary
                for v in range(0, vocab, block):
                    dw[v:v + block] += torch.mm(logits[:, v:v + block].t(), h[s:e])
    return [torch.cat(parts) for parts in zip(*outs)], dh, dw


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Gradient-in-forward: forward computes dh and dW chunk by chunk, backward only scales them.
    A second backward (retain_graph) recomputes instead of reusing the consumed buffers. Runs with autocast off:
    h and W are cast to `compute` explicitly, dh is returned in hidden's dtype and dW (accumulated in fp32) in W's."""

    @staticmethod
    def forward(ctx, hidden, weight, index, labels, weights, objective, logit_map, compute, chunk_size, compile, inputs, constants):
        need_dh, need_dw = hidden.requires_grad, weight.requires_grad
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.index_select(0, index).to(compute)
            per_token, dh, dw = _gradients_in_forward(h, weight.to(compute), labels, weights, objective, logit_map,
                                                      chunk_size, compile, need_dh, need_dw, inputs, constants)
        ctx.save_for_backward(h, weight, index, labels, weights, *inputs, *constants)
        ctx.meta = (objective, logit_map, compute, chunk_size, compile, len(inputs), hidden.shape, hidden.dtype, need_dh, need_dw)
        ctx.grads = (dh, dw)
        full = []
        for t in per_token:  # scatter back to all N positions (0 at ignored ones)
            out = torch.zeros(hidden.shape[0], dtype=t.dtype, device=t.device)
            full.append(out.index_copy_(0, index, t))
        ctx.mark_non_differentiable(*full)
        return (per_token[0].sum(), *full[1:])

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        h, weight, index, labels, weights, *rest = ctx.saved_tensors
        objective, logit_map, compute, chunk_size, compile, n_inputs, shape, hidden_dtype, need_dh, need_dw = ctx.meta
        dh, dw = ctx.grads
        if dh is None and dw is None:  # already consumed by an earlier backward: recompute
            with torch.autocast(h.device.type, enabled=False):
                _, dh, dw = _gradients_in_forward(h, weight.to(compute), labels, weights, objective, logit_map, chunk_size,
                                                  compile, need_dh, need_dw, rest[:n_inputs], rest[n_inputs:])
        ctx.grads = (None, None)
        grad_hidden = grad_weight = None
        if need_dh:
            grad_hidden = torch.zeros(shape, dtype=hidden_dtype, device=dh.device).index_copy_(
                0, index, (dh * grad_loss.to(dh.dtype)).to(hidden_dtype))
        if need_dw:
            grad_weight = dw.mul_(grad_loss).to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None, None


def default_chunk_size(vocab: int, dtype: torch.dtype, budget_mib: int = 150) -> int:
    """Rows per chunk so one [rows x vocab] logits buffer fits the budget (a multiple of 16, >= 16), counted in
    the softmax's dtype (fp32 at least: a bf16 chunk's math runs on fp32 copies, so bf16 gets the same rows).
    150 MiB gives 256 rows at V=151,936: ~0.1x the naive loss's peak memory (benchmark.py loss)."""
    rows = budget_mib * 2**20 // (vocab * torch.finfo(torch.promote_types(dtype, torch.float32)).bits // 8)
    return max(16, rows // 16 * 16)


def dw_block_rows(width: int, dtype: torch.dtype, budget_mib: int = 32) -> int:
    """Vocabulary rows of dW formed at once when the chunk's dtype is lower than dW's fp32 (bf16 mixed precision):
    the bf16 [rows x H] product then goes into fp32 dW, and a whole [V x H] product would be a second copy of the
    head (272 MiB at Qwen2.5-0.5B's size)."""
    return max(16, budget_mib * 2**20 // (width * torch.finfo(dtype).bits // 8))


def fused_linear_cross_entropy(hidden, weight, labels, weights=None, *, objective=cross_entropy_objective,
                               token_inputs=(), constants=(), logit_map=(1.0, 0.0), chunk_size=None, compile=True):
    """Summed linear + cross-entropy loss without materialising the [tokens x vocab] logits.

    hidden [..., H], weight [V, H] (the LM head), labels [...] with -100 = ignored, dropped before the
    projection. `weights` are optional per-token loss weights (no gradient). `objective` replaces the
    per-token loss (see `cross_entropy_objective` for its contract); `token_inputs` are per-token tensors
    [..., *] handed to it chunk by chunk, `constants` whole. Returns (summed loss, log p(label) per token,
    *extra per-token outputs), per-token outputs shaped like labels and 0 at ignored positions.
    `logit_map` = (scale, softcap), the model's own logit post-processing (see `logit_map`), applied inside each
    chunk. The chunks' matmuls run in the autocast dtype when autocast is on (bf16 mixed precision), else in the
    weight's dtype; the softmax math is fp32 either way. The caller normalises the summed loss (see `normalized_loss`)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute = torch.get_autocast_dtype(device_type)
    elif hidden.dtype != weight.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} != weight dtype {weight.dtype}")
    else:
        compute = weight.dtype
    if hidden.shape[:-1] != labels.shape or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"shapes: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels {tuple(labels.shape)}")
    flat_labels = labels.reshape(-1)
    index = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    if weights is None:
        weights = torch.ones(flat_labels.shape, dtype=torch.promote_types(hidden.dtype, torch.float32), device=labels.device)
    gathered = [t.reshape(flat_labels.shape[0], *t.shape[labels.dim():]).index_select(0, index) for t in token_inputs]
    chunk_size = chunk_size or default_chunk_size(weight.shape[0], compute)
    logit_map = (float(logit_map[0]), float(logit_map[1]))
    outs = FusedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, index, flat_labels[index],
                                         weights.reshape(-1)[index], objective, logit_map, compute, chunk_size, compile,
                                         tuple(gathered), tuple(constants))
    return (outs[0], *[o.view(labels.shape) for o in outs[1:]])


def count_loss_tokens(batches: list) -> torch.Tensor:
    """Global number of loss tokens in this step across micro-batches and ranks (one all-reduce)."""
    local = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches)
    return all_reduce_sum(torch.tensor(float(local), device=batches[0]["targets"].device))


def normalized_loss(loss_sum: torch.Tensor, global_tokens: torch.Tensor, world_size: int) -> torch.Tensor:
    """Summed micro-batch loss -> its share of the global token mean. DDP/FSDP average gradients over
    ranks, hence the world_size factor; the result is identical for any micro x accumulation x ranks."""
    return loss_sum * (world_size / global_tokens.clamp(min=1))


def check_finite(loss_sum: torch.Tensor, grad_norm, step: int):
    """Before the optimizer step: a non-finite loss or gradient norm on any rank stops the run with one line, so
    the weights, the checkpoints and `final/` never see it. The flags are summed over ranks: all stop together."""
    norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    loss = loss_sum.detach().float().reshape(())
    flags = all_reduce_sum(torch.stack([(~torch.isfinite(loss)).float(), (~torch.isfinite(norm.detach().float())).float()]))
    if flags.sum().item() > 0:
        raise TrainingError(f"step {step}: the loss ({loss.item():.4g}) or the gradient norm ({norm.item():.4g}) is not "
                            f"finite; stopped before the optimizer step, nothing saved after step {step - 1} "
                            f"(a lower --lr or --max_grad_norm may help)")


# ============================================================ JUDGES AND EVALUATION
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def extract_number(text: str):
    """Final answer of a GSM8K-style response: after the last '####', else the last number in the text."""
    tail = text.split("####")[-1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    try:
        return float(found[0 if "####" in text else -1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def judge_math(response: str, reference) -> tuple:
    """(passed, reason): final-number match."""
    got, want = extract_number(response), extract_number(str(reference))
    if got is None:
        return False, "no number in response"
    return (abs(got - want) < 1e-6, f"got {got:g}, want {want:g}")


def normalize_answer(text: str) -> str:
    text = re.sub(r"\b(a|an|the)\b", " ", re.sub(r"[^\w\s]", "", text.lower()))
    return " ".join(text.split())


def token_f1(response: str, reference: str) -> float:
    """SQuAD token F1 between normalised answers."""
    got, want = normalize_answer(response).split(), normalize_answer(reference).split()
    common_count = sum(min(got.count(t), want.count(t)) for t in set(got))
    if not got or not want:
        return float(got == want)
    if common_count == 0:
        return 0.0
    precision, recall = common_count / len(got), common_count / len(want)
    return 2 * precision * recall / (precision + recall)


def judge_rc(response: str, reference) -> tuple:
    """(passed, reason): reading comprehension; passed = SQuAD exact match with any gold answer, F1 in the reason."""
    refs = reference if isinstance(reference, list) else [reference]
    exact = any(normalize_answer(response) == normalize_answer(str(r)) for r in refs)
    return exact, f"exact {int(exact)}, f1 {max(token_f1(response, str(r)) for r in refs):.2f}"


def judge_exact(response: str, reference) -> tuple:
    """(passed, reason): normalised exact match against the reference or any of a list of references."""
    refs = reference if isinstance(reference, list) else [reference]
    ok = any(normalize_answer(response) == normalize_answer(str(r)) for r in refs)
    return ok, "exact match" if ok else "mismatch"


# Model-written code runs only in sandbox.py's jail (namespaces, read-only view, nobody, harness verdict).
SANDBOX = {}  # the jail's layers, once probed in this process; MetricsLogger adds them to the config record


def require_sandbox(where: str) -> dict:
    """Before any model code runs (data with code tasks): the jail's layers, printed once per process; a one-line
    UsageError where the kernel refuses a layer and HF_ALLOW_CODE_EVAL=1 is not set."""
    if not SANDBOX:
        try:
            found = sandbox.allowed()
        except sandbox.IsolationUnavailable as err:
            raise UsageError(f"{where}: {err}") from None
        SANDBOX.update(layers=sorted(found["layers"].values()), missing=found["missing"])
        print(f"sandbox: {'; '.join(SANDBOX['layers'])}" + (f" | MISSING: {'; '.join(SANDBOX['missing'])} (HF_ALLOW_CODE_EVAL=1)"
              if SANDBOX["missing"] else ""), flush=True)
    return SANDBOX


JUDGES = {"math": judge_math, "exact": judge_exact, "rc": judge_rc, "code": judge_code}


def kv_cache(model, capacity: int):
    """The decoding KV cache: transformers' DynamicCache whose full-attention layers write each step into buffers
    with room for `capacity` tokens (grown by doubling past it), where DynamicLayer concatenates the whole cache
    every step: a quarter of greedy decoding's time at batch 200 on CPU, the same tokens (tests/test_data.py). Other
    layer kinds (sliding window, linear attention) and versions of transformers without cache layers keep theirs."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return cache
    layers = getattr(cache, "layers", None)
    if layers and all(type(layer) is DynamicLayer for layer in layers):
        cache.layers = [_preallocated_layer(DynamicLayer)(capacity) for _ in layers]
    return cache


@functools.lru_cache(maxsize=None)
def _preallocated_layer(base):
    class PreallocatedLayer(base):
        """keys and values: views of the first `length` positions of buffers [batch, heads, capacity, head_dim]."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length, self.buffers = capacity, 0, None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = self.length + key_states.shape[-2]
            if self.buffers is None or n > self.buffers[0].shape[-2]:
                size = max(n, self.capacity, 2 * (self.buffers[0].shape[-2] if self.buffers else 0))
                grown = [x.new_empty(*x.shape[:-2], size, x.shape[-1]) for x in (key_states, value_states)]
                for new, old in zip(grown, self.buffers or []):
                    new[..., :self.length, :] = old[..., :self.length, :]
                self.buffers = grown
            self.buffers[0][..., self.length:n, :] = key_states
            self.buffers[1][..., self.length:n, :] = value_states
            self.length = n
            self.keys, self.values = self.buffers[0][..., :n, :], self.buffers[1][..., :n, :]
            return self.keys, self.values

        def batch_select_indices(self, indices):
            if self.length:
                self.buffers = [b[indices] for b in self.buffers]
                self.keys, self.values = self.buffers[0][..., :self.length, :], self.buffers[1][..., :self.length, :]

        def reset(self):
            self.length, self.buffers = 0, None
            super().reset()

    return PreallocatedLayer


@torch.no_grad()
def decode(model, input_ids, attention_mask, max_new_tokens: int, stop_ids: torch.Tensor, temperature: float = 0.0,
           generator=None, synced: bool = False, compact: float = 0.25) -> torch.Tensor:
    """Continue a left-padded batch with the KV cache: greedy (temperature 0) or plain sampling from
    softmax(logits / temperature). Returns [batch, max_new_tokens] token ids, -1 after a row's stop token.
    Once a `compact` fraction of the rows has stopped they are dropped from the batch and the cache, so one long
    answer does not keep the finished ones computing (`model.generate` runs every row until the longest
    stops; `python benchmark.py generate` compares the two). `synced`: FSDP ranks run the same number
    of forwards (a rank that is done keeps decoding a dead row until every rank is)."""
    out = torch.full((input_ids.shape[0], max_new_tokens), -1, dtype=torch.long)
    rows = torch.arange(input_ids.shape[0])                     # the sample each batch row holds
    live = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    cache, ids = kv_cache(model, input_ids.shape[1] + max_new_tokens), input_ids
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x
    position = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    stop_ids = stop_ids.to(input_ids.device)
    for t in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=position, use_cache=True,
                       logits_to_keep=1, **{cache_arg: cache}).logits[:, -1].float()
        if temperature > 0:
            token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(-1)
        out[rows[live.cpu()], t] = token[live].cpu()
        live &= ~torch.isin(token, stop_ids)
        busy = all_reduce_sum(live.any().float()).item() > 0 if synced else live.any()
        if t == max_new_tokens - 1 or not busy:
            break
        if live.any() and (~live).float().mean() >= compact:
            keep = live.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, live, token = rows[keep.cpu()], live[keep], token[keep]
            attention_mask, position = attention_mask[keep], position[keep]
        ids = token[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], 1)
        position = position[:, -1:] + 1
    return out


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int = 64, temperature: float = 0.0,
             batch_size: int = 32, seed: int = 0, synced: bool = False, return_finished: bool = False,
             desc: str = "generate") -> list:
    """Batched generation through the chat template: prompts sorted by length (little padding), `decode` per
    batch, results in the input order. temperature 0 = greedy, else plain sampling (seeded). Returns the texts
    (special tokens removed), or (texts, finished) where finished[i] says the answer ended with an end-of-turn
    token rather than running out of max_new_tokens. `desc` names the progress bar (rank 0's prompts)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = model.generation_config.eos_token_id or tokenizer.eos_token_id
    stops = torch.tensor(stops if isinstance(stops, list) else [stops])
    generator = torch.Generator(device=device).manual_seed(seed)
    encoded = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if synced:  # FSDP: every rank runs as many batches as the busiest one (extra ones on a dummy prompt)
        count = int(all_reduce_sum(torch.tensor(float(len(batches)), device=device), dist.ReduceOp.MAX).item())
        batches += [None] * (count - len(batches))
    texts, finished = [""] * len(prompts), [False] * len(prompts)
    bar = progress(desc, len(prompts), unit="prompt")
    for batch in batches:
        seqs = [encoded[i] for i in batch] if batch else [tokenizer("hi", add_special_tokens=False)["input_ids"]]
        width = max(len(q) for q in seqs)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(q)) + q for q in seqs], device=device)
        mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in seqs], device=device)
        out = decode(model, input_ids, mask, max_new_tokens, stops, temperature, generator, synced)
        for i, row in zip(batch or [], out.tolist()):
            row = row[:row.index(-1)] if -1 in row else row
            texts[i] = tokenizer.decode(row, skip_special_tokens=True)
            finished[i] = bool(row) and row[-1] in stops.tolist()
        bar.update(len(batch or []))
    bar.close()
    model.train(was_training)
    return (texts, finished) if return_finished else texts


def evaluate_accuracy(model, tokenizer, examples: list, rt: Runtime, max_new_tokens: int = 64,
                      temperature: float = 0.0, batch_size: int = 32, synced: bool = False) -> dict:
    """Generate for each prompt (sharded over ranks) and score with the task's judge.
    "correct": one '0'/'1' per example, in the order of `examples` (on every rank), for paired comparisons."""
    mine = examples[rt.rank::rt.world_size]
    with precision(rt):
        responses = generate(model, tokenizer, [e["messages"][:-1] for e in mine], max_new_tokens, temperature,
                             batch_size, seed=rt.rank, synced=synced, desc=f"evaluate ({mine[0]['task'] if mine else '-'})")
    passed = [bool(JUDGES[e["task"]](r, e["reference"])[0]) for e, r in zip(mine, responses)]
    correct = "".join("1" if ok else "0" for ok in gather_shards(passed, rt))  # every rank: all examples, in order
    return {"accuracy": correct.count("1") / max(len(correct), 1), "n": len(correct), "correct": correct}


@torch.no_grad()
def evaluate_loss(loss_model, examples: list, rt: Runtime, pad_id: int, batch_size: int = 16) -> dict:
    """Token-mean loss and perplexity of the wrapped training loss on held-out samples."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total = torch.zeros(2, device=rt.device)
    bar = progress("held-out loss", len(order))
    for s in range(0, len(order), batch_size * rt.world_size):
        mine = order[s:s + batch_size * rt.world_size][rt.rank::rt.world_size]
        # a rank without samples still runs a forward (FSDP collectives), on one sample counted with weight 0
        batch = collate(examples, mine or order[:1], pad_id, rt.device)
        loss_sum, _ = loss_model(batch)
        weight = float(bool(mine))
        total += weight * torch.stack([loss_sum.float(), (batch["targets"] != IGNORE_INDEX).sum().float()])
        bar.update(len(order[s:s + batch_size * rt.world_size]))
    bar.close()
    all_reduce_sum(total)
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}


# ============================================================ CHECKPOINTS AND LOGGING
def content_hash(*parts) -> str:
    """sha256 of JSON-able parts, modules (their parameters' bytes) and functions (their source code): the key
    of cached, rebuilt data, so a change of weights, data, settings or the code that made it rebuilds it."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.nn.Module):
            for name, tensor in sorted(part.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif callable(part):
            digest.update(inspect.getsource(part).encode())
        else:
            digest.update(json.dumps(part, sort_keys=True).encode())
    return digest.hexdigest()


def write_atomic(path: str, text: str):
    """Write a text file atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def write_jsonl(path: str, rows: list):
    """Write rows atomically, one JSON object per line."""
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))

def _full_state(model, optimizer, fsdp: bool):
    """Full (unsharded) model and optimizer state dicts; optimizer None gives None."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict() if optimizer else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    seen, tied = set(), []  # tied weights (embeddings = LM head) are gathered as copies: keep one, like save_pretrained
    for name, param in model.named_parameters(remove_duplicate=False):
        (tied.append(name) if id(param) in seen else seen.add(id(param)))
    state = {k: v for k, v in get_model_state_dict(model, options=options).items() if k not in tied}
    return (state,
            get_optimizer_state_dict(model, optimizer, options=options) if optimizer else None)


def save_dtype(model, dtype: str = "") -> torch.dtype:
    """dtype of a saved final model: --save_dtype, else the starting checkpoint's own (recorded by load_model)."""
    if dtype and dtype not in DTYPES:
        raise UsageError(f"--save_dtype must be empty or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype] if dtype else getattr(model, "source_dtype", torch.float32)


def _save_model(directory: str, model, state: dict, tokenizer, target):
    """save_pretrained of `state` (cast to `target` unless None) with its tokenizer, config.json naming the dtype."""
    if target is not None:
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    model.save_pretrained(directory, state_dict=state, safe_serialization=True)
    if target is not None:  # save_pretrained records the parameters' dtype; the file's is `target`
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
        config["dtype"] = str(target).removeprefix("torch.")
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    tokenizer.save_pretrained(directory)


def save_checkpoint(path: str, model, tokenizer, rt: Runtime, optimizer=None, scheduler=None, state=None, fsdp=False,
                    dtype: str = "", merge_lora: bool = False):
    """Hugging Face model dir (+ trainer state when an optimizer is given), written to a temporary
    directory and renamed into place, so a kill at any moment leaves either the old or the new one.
    A training checkpoint keeps the fp32 master weights (exact resume); a final model (no optimizer) is saved in
    `save_dtype(model, dtype)`, the starting model's dtype unless --save_dtype says otherwise. With LoRA adapters,
    checkpoints and final/ hold the adapter alone in peft's format (adapter_model.safetensors, adapter_config.json;
    fp32), and merge_lora adds final/merged/, the merged model in the final dtype."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    model_state, optim_state = _full_state(model, optimizer, fsdp)
    adapters = adapter_keys(model) if lora_layers(model) else {}
    merged = merged_state(model, model_state) if adapters and merge_lora and rt.is_main else None
    if adapters:
        model_state = {adapters[k]: v for k, v in model_state.items() if k in adapters}
    bad = [k for k, v in [*model_state.items(), *(merged or {}).items()] if v.is_floating_point()
           and not torch.isfinite(v).all()] if rt.is_main else []
    if all_reduce_sum(torch.tensor(float(len(bad)), device=rt.device)).item():  # every rank refuses together
        raise TrainingError(f"{path}: not saved, non-finite weights in {len(bad)} tensors ({', '.join(bad[:3])})")
    target = save_dtype(model, dtype) if optimizer is None else None
    tmp = f"{path}.tmp"
    try:
        if rt.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            if adapters:
                save_file({k: v.contiguous() for k, v in model_state.items()}, os.path.join(tmp, "adapter_model.safetensors"),
                          metadata={"format": "pt"})
                model.peft_config["default"].save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                if merged is not None:
                    _save_model(os.path.join(tmp, "merged"), model, merged, tokenizer, target)
            else:
                _save_model(tmp, model, model_state, tokenizer, target)
            if optimizer is not None:
                torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict(), "state": state},
                           os.path.join(tmp, "trainer_state.pt"))
    except (OSError, RuntimeError, SafetensorError) as err:  # a full disk: nothing half-written is left holding space
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"{path}: could not be written ({str(err).splitlines()[0][:200]}); nothing was saved") from None
    if dist.is_initialized():
        dist.barrier()
    if optimizer is not None:
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rt.rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
    if rt.is_main and optimizer is not None:  # written last: a checkpoint without it is incomplete
        files = {n: os.path.getsize(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            json.dump({"step": state.get("step"), "run": RUN_SETTINGS, "world_size": rt.world_size, "files": files}, f,
                      indent=1, default=str)
    if rt.is_main:
        old = f"{path}.old"
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    """This process's torch, numpy, Python (and CUDA) generators as tensors and numbers only, so that
    `torch.load(weights_only=True)` restores them without unpickling anything."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                      "gauss": gauss},
            "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}}


def set_rng_state(rng: dict):
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def load_tensors(path: str, what: str) -> dict:
    """torch.load with weights_only=True: tensors, numbers, strings and containers only, never a pickled object."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # UnpicklingError (a forbidden global), a truncated zip, random bytes
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UsageError(f"{path}: cannot be loaded as {what} without running code or is corrupt ({reason})") from None


COMPLETE = "checkpoint_complete.json"  # step, run settings and file sizes; written last


def checkpoint_steps(output_dir: str) -> list:
    """Steps of the complete checkpoints in output_dir (those with their marker), ascending."""
    found = [re.fullmatch(r"checkpoint-(\d+)", d) for d in os.listdir(output_dir)] if os.path.isdir(output_dir) else []
    return sorted(int(m.group(1)) for m in found if m and os.path.isfile(os.path.join(output_dir, m.group(0), COMPLETE)))


def latest_checkpoint(output_dir: str):
    """The newest complete checkpoint (--resume auto), None for none; refused when checkpoint-N folders exist but
    none is complete (made by hand or by an older version): starting afresh beside them would be silent."""
    steps = checkpoint_steps(output_dir)
    if not steps and os.path.isdir(output_dir) and any(re.fullmatch(r"checkpoint-\d+", d) for d in os.listdir(output_dir)):
        raise UsageError(f"--resume auto: {output_dir!r} holds checkpoint folders but none is complete (no {COMPLETE}); "
                         f"resume one by path to see why, or use --overwrite true without --resume")
    return os.path.join(output_dir, f"checkpoint-{steps[-1]}") if steps else None


def prune_checkpoints(output_dir: str, keep: int, rt: Runtime):
    """Delete all but the newest `keep` checkpoints (0 keeps all)."""
    if rt.is_main and keep:
        for step in checkpoint_steps(output_dir)[:-keep]:
            shutil.rmtree(os.path.join(output_dir, f"checkpoint-{step}"), ignore_errors=True)


def load_checkpoint(path: str, model, optimizer, scheduler, rt: Runtime, fsdp=False) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns the saved loop state. Refused with one
    line: an incomplete or truncated checkpoint, another run's (its recorded settings differ), a weight missing
    (only tied ones may be) or foreign, a file that is corrupt or would run code when loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    marker = os.path.join(path, COMPLETE)
    if not os.path.isfile(os.path.join(path, "trainer_state.pt")):
        raise UsageError(f"--resume {path!r}: not a training checkpoint (no trainer_state.pt)")
    if not os.path.isfile(marker):
        raise UsageError(f"--resume {path!r}: incomplete checkpoint (no {COMPLETE}, which is written last)")
    try:
        with open(marker) as f:
            record = json.load(f)
        sizes, settings = dict(record["files"]), dict(record["run"])
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{marker}: unreadable ({err})") from None
    for name, size in sizes.items():
        here = os.path.join(path, name)
        if name.startswith("rng_rank") and name != f"rng_rank{rt.rank}.pt":
            continue
        if not os.path.isfile(here) or os.path.getsize(here) != size:
            raise UsageError(f"{here}: missing or truncated ({os.path.getsize(here) if os.path.isfile(here) else 0} bytes, "
                             f"the checkpoint recorded {size})")
    changed = {k: (settings.get(k), v) for k, v in RUN_SETTINGS.items() if k in settings and settings[k] != v}
    if changed:
        raise UsageError(f"--resume {path!r}: the checkpoint's run had other settings: " +
                         ", ".join(f"--{k} {old!r} (now {new!r})" for k, (old, new) in sorted(changed.items())))
    weights = {}
    for name in sorted(n for n in os.listdir(path) if n.endswith(".safetensors")):
        try:
            weights.update(load_file(os.path.join(path, name)))
        except (SafetensorError, OSError) as err:
            raise UsageError(f"{os.path.join(path, name)}: corrupt ({err})") from None
    adapters = adapter_keys(model) if lora_layers(model) else {}
    if adapters:  # a LoRA checkpoint holds the adapters, the base comes from --model
        by_key = {v: k for k, v in adapters.items()}
        weights = {by_key.get(k, k): v for k, v in weights.items()}
    groups = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    expected = set(adapters) if adapters else set(model.state_dict())
    tied_ok = {n for names in groups.values() if any(m in weights for m in names) for n in names}
    missing = sorted(expected - set(weights) - tied_ok)
    unexpected = sorted(set(weights) - expected)
    shapes = sorted(k for k in set(weights) & expected if tuple(weights[k].shape) != tuple(model.state_dict()[k].shape))
    if missing or unexpected or shapes:
        raise UsageError(f"--resume {path!r}: its weights are not this model's (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, other shapes {shapes[:3]})")
    saved = load_tensors(os.path.join(path, "trainer_state.pt"), "a trainer state")
    try:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
            set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=saved["optimizer"],
                           options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            model.load_state_dict(weights, strict=False)  # strictness checked above: only tied copies are absent
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    except (KeyError, ValueError, RuntimeError) as err:
        raise UsageError(f"{os.path.join(path, 'trainer_state.pt')}: does not fit this run ({str(err)[:200]})") from None
    rng_file = os.path.join(path, f"rng_rank{rt.rank}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(load_tensors(rng_file, "random-generator states"))
    return saved["state"]


def peak_memory_gib(device) -> float:
    """Peak memory of this process so far, GiB: the CUDA allocator's peak on a GPU, the peak resident set on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)


# --report_to: the trackers a run can mirror metrics.jsonl to (each an optional package: requirements-extras.txt).
TRACKERS = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def check_report_to(report_to: str):
    """--report_to is a known tracker whose package is installed: checked before anything is written."""
    if report_to not in TRACKERS:
        raise UsageError(f"--report_to must be one of {', '.join(TRACKERS)}, got {report_to!r}")
    package = TRACKERS[report_to]
    if package and importlib.util.find_spec(package) is None:
        raise UsageError(f"--report_to {report_to}: the {package} package is not installed "
                         f"(pip install -r requirements-extras.txt)")


class Tracker:
    """metrics.jsonl mirrored to TensorBoard, W&B or Trackio: every numeric field of every record at its `step`,
    under the same names (loss, lr, eval/<set>/accuracy, method/...), and the config record as hyperparameters.
    TensorBoard writes <output_dir>/tensorboard; W&B and Trackio follow their own settings (WANDB_MODE=offline,
    WANDB_PROJECT, TRACKIO_DIR, ...), with the project `sft-methods` and the run named after the output
    directory. A resumed run continues the same W&B run (its id is kept in <output_dir>/wandb_run_id)."""

    def __init__(self, kind: str, output_dir: str, resume: bool):
        self.kind, self.output_dir, self.resume, self.run = kind, output_dir, resume, None

    def start(self, config: dict):
        name = os.path.basename(os.path.abspath(self.output_dir))
        hparams = {k: v for k, v in config.items() if isinstance(v, (bool, int, float, str)) and k not in ("event", "time")}
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams as hparams_summary
            self.run = SummaryWriter(os.path.join(self.output_dir, "tensorboard"))
            for summary in hparams_summary(hparams, {}):  # the HPARAMS tab, in this run's own event file
                self.run.file_writer.add_summary(summary)
            self.run.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))
        elif self.kind == "wandb":
            import wandb
            id_path = os.path.join(self.output_dir, "wandb_run_id")
            run_id = open(id_path).read().strip() if self.resume and os.path.exists(id_path) else wandb.sdk.lib.runid.generate_id()
            write_atomic(id_path, run_id)
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sft-methods"), name=name, id=run_id,
                                  resume="allow", dir=self.output_dir, config=hparams)
        elif self.kind == "trackio":
            import trackio
            self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "sft-methods"), name=name,
                                    config=hparams, resume="allow" if self.resume else "never", auto_log_cpu=False,
                                    auto_log_gpu=False)

    def log(self, record: dict):
        if record.get("event") == "config":
            return self.start(record)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in ("step", "time") and math.isfinite(v)}
        if self.run is None or "step" not in record or not scalars:
            return
        if self.kind == "tensorboard":
            for k, v in scalars.items():
                self.run.add_scalar(k, v, record["step"])
            self.run.flush()
        else:
            self.run.log(scalars, step=record["step"])

    def close(self):
        if self.run is not None:
            (self.run.close if self.kind == "tensorboard" else self.run.finish)()
            self.run = None


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def eval_before_seconds(path: str):
    """How long the run's eval_before took (its record's time minus the config record's), from a metrics.jsonl; None
    without one. The final evaluation scores the same sets, so this is its estimate in the whole-run ETA."""
    config_time = None
    with contextlib.suppress(OSError):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("event") == "config":
                        config_time = record.get("time")
                    elif record.get("event") == "eval_before" and config_time is not None:
                        return record["time"] - config_time
    return None


class MetricsLogger:
    """One line per step on stdout (rank 0) and one JSON object per line in <output_dir>/metrics.jsonl, mirrored
    to --report_to's tracker. A step record with `eta_s` (the training left) gains `eta_run_s`: that plus the final
    evaluation, estimated by the time eval_before took (this run's, or before a resume the first run's)."""

    def __init__(self, output_dir: str, rt: Runtime, total_steps: int, resume: bool = False, report_to: str = "none"):
        self.rt, self.total, self.start = rt, total_steps, time.time()
        self.file, self.tracker, self.eval_s, self.config_time = None, None, None, None
        if rt.is_main:
            os.makedirs(output_dir, exist_ok=True)
            if resume:
                self.eval_s = eval_before_seconds(os.path.join(output_dir, "metrics.jsonl"))
            self.file = open(os.path.join(output_dir, "metrics.jsonl"), "a" if resume else "w")
            if report_to != "none":
                check_report_to(report_to)
                self.tracker = Tracker(report_to, output_dir, resume)
                import atexit
                atexit.register(self.tracker.close)

    def log(self, record: dict):
        if not self.rt.is_main:
            return
        record = {"time": round(time.time() - self.start, 3), **record}
        if record.get("event") == "config":
            self.config_time = record["time"]
            if SANDBOX:
                record["sandbox"] = SANDBOX  # which layers guarded the model-written code of this run
        if record.get("event") == "eval_before" and self.config_time is not None:
            self.eval_s = record["time"] - self.config_time
        if "eta_s" in record and self.eval_s is not None:
            record["eta_run_s"] = record["eta_s"] + self.eval_s
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tracker is not None:
            self.tracker.log(record)
        if record.get("event") == "config":
            print(f"run: {record.get('output_dir')} | processes {record.get('world_size')} | metrics.jsonl has the full config", flush=True)
        elif "step" in record and "loss" in record:
            step = record["step"]
            eta = clock(record.get("eta_s", 0)) + (f" (run {clock(record['eta_run_s'])})" if "eta_run_s" in record else "")
            extra = " | ".join(f"{k} {v:.4g}" for k, v in record.items() if k.startswith("method/"))
            print(f"step {step}/{self.total} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                  f"grad_norm {record['grad_norm']:.3f} | tok/s {record['tokens_per_s']:.0f} | "
                  f"eta {eta}" + (f" | {extra}" if extra else ""), flush=True)
        else:  # a string over 40 characters (eval/<set>/correct) prints as its length; metrics.jsonl has it whole
            shown = lambda v: f"{v:.4g}" if isinstance(v, float) else f"<{len(v)} chars>" if isinstance(v, str) and len(v) > 40 else v
            print(" | ".join(f"{k} {shown(v)}" for k, v in record.items()), flush=True)
