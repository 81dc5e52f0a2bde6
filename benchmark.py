"""Benchmarks: ratios measured side by side in one run (never timed tests).

    python benchmark.py loss     # fused loss vs naive / torch's chunked F.linear_cross_entropy / Cut Cross-Entropy
    python benchmark.py train    # sft.py vs TRL SFTTrainer: peak memory and tokens/s, fp32 and bf16, checkpointing off/on
    python benchmark.py train --device cuda --layers 24   # on a GPU, adding TRL with use_liger_kernel=True
    python benchmark.py train --scale world --steps 40 --warmup 5 --batch_size 16   # the embedded world's model
    python benchmark.py loss --shapes 2048x256x32000 --reps 3
    python benchmark.py generate # common.generate batched vs one prompt at a time, and the judges' cost per sample
    python benchmark.py objectives  # step time of DFT / ASFT / OTR / DRIFT / SoFT relative to sft.py on the same batch
    python benchmark.py merge    # merge.py's peak memory (anonymous, file-backed, RSS) in units of one input model
    python benchmark.py tokenize --procs 1 2  # load_sft_data's samples/s: datasets.map in N processes, its cache
    python benchmark.py mfu --device cuda    # the GPU check: sft/asft/drift in bf16, DDP and FSDP2, tokens/s and MFU
    python benchmark.py mfu --layers 1 --steps 3 --warmup 1 --batch_size 4 --max_length 64  # its CPU rehearsal

Loss: every implementation runs in a fresh subprocess (fp32, or bf16 autocast over fp32 weights with --loss_dtype
bfloat16; `torch.set_num_threads` = --threads). Time is the median fwd+bwd of --reps calls after one warm-up (which
holds any compile). Peak extra memory is the process's
RSS high-water mark during one measured call (reset through /proc/self/clear_refs) minus the RSS before it, so
it counts everything the call allocates, including the gradients dX and dW ("floor" = their bytes).
Train: a model with Qwen2.5-0.5B's width and vocabulary (H 896, 14 heads, 2 KV heads, V 151,936, tied) but
--layers decoder layers, random init, saved with the embedded world's tokenizer (2,044 tokens: the ids stay below
2,044, the head still scores 151,936 logits per token); samples of exactly --max_length tokens (a math question,
then a response of chained worked problems, truncated by both trainers), so there is no padding. sft.py and TRL
SFTTrainer each run in a fresh subprocess per (precision, gradient checkpointing), same batch, max length, lr,
steps and optimizer (torch AdamW, fused, betas (0.9, 0.95)); TRL otherwise with its defaults (its own chunked
LM head, completion-only loss, no packing, padding to the longest, use_liger_kernel off; bf16 = `bf16=True` over
fp32 weights). On CUDA a third trainer: TRL with `use_liger_kernel=True`, which in TRL 1.16 patches Liger's layer
kernels but keeps TRL's own LM head (not Liger's fused linear cross-entropy). Peak memory on CPU = the process's
peak RSS (ru_maxrss) at the last step minus its RSS once the model is loaded and resident; on CUDA the allocator's
peak minus the allocation once the model is on the GPU. tokens/s = input tokens of the steps after --warmup over
their step-end to step-end time; on CPU also per CPU-second of the process (all its threads), a ratio a busy
shared machine disturbs less than wall time.
Merge: --merge_models + 1 random-init Llama checkpoints (hidden 1024, 8 layers, intermediate 768, vocabulary 2,044,
fp32, 212 MB each; the fine-tuned ones are the base plus 0.01 N(0, 1) per entry), merged by merge.py in a fresh
subprocess per method with evaluation off; /proc/PID/status sampled every 10 ms for the peak RssAnon (private
memory) and RssFile (mapped file pages), and the peak RSS as the last VmHWM read (the high-water mark of this
process image; a forked child's ru_maxrss would include this script's own RSS at the fork, VmHWM starts afresh
at exec; from a shell the two agree, and ru_maxrss is what merge.py logs as peak_memory_gib). The row "imports" is
merge.py stopped at an unknown --method: the interpreter and libraries.
Optional peers, installed only for this script: `pip install cut-cross-entropy trl` (and `liger-kernel` on a GPU).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
IMPLS = ["naive", "torch_chunked", "cce_torch_compile", "ours", "ours_eager"]


def rss_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024


def loss_worker(impl, n, h, v, reps, threads, dtype="float32"):
    """Runs inside the subprocess: prints one JSON line with the measurements of `impl` (fp32 weights; bfloat16 =
    under autocast, as the training scripts' mixed precision)."""
    import contextlib
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    sys.path.insert(0, ROOT)
    import common
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, h, generator=g) / h**0.5).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.02).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    if impl == "naive":
        fn = lambda: F.cross_entropy((x @ w.t()).float(), y)
    elif impl == "torch_chunked":
        fn = lambda: F.linear_cross_entropy(x, w, y, options=torch.nn.LinearCrossEntropyOptions())
    elif impl == "cce_torch_compile":
        from cut_cross_entropy import linear_cross_entropy
        fn = lambda: linear_cross_entropy(x, w, y, impl="torch_compile")
    elif impl.startswith("ours"):  # ours, ours_eager, ours:<chunk rows>
        chunk = int(impl.split(":")[1]) if ":" in impl else None
        fn = lambda: common.fused_linear_cross_entropy(x, w, y, chunk_size=chunk, compile=impl != "ours_eager")[0] / n

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext():
            loss = fn()
        loss.backward()
    t0 = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t0
    times = []
    for rep in range(reps):
        x.grad = w.grad = None
        if rep == 0:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = rss_mib("VmRSS")
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if rep == 0:
            peak = rss_mib("VmHWM") - before
    floor = (x.numel() + w.numel()) * 4 / 2**20
    print(json.dumps({"impl": impl, "time_s": statistics.median(times), "min_s": min(times), "peak_mib": peak,
                      "floor_mib": floor, "first_call_s": compile_s}))


def bench_loss(args):
    for shape in args.shapes:
        n, h, v = map(int, shape.split("x"))
        rows = {}
        for impl in args.impls:
            cmd = [sys.executable, __file__, "_loss_worker", impl, str(n), str(h), str(v), str(args.reps), str(args.threads),
                   args.loss_dtype]
            # glibc: return freed memory to the OS, so the RSS high-water mark sees every allocation
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"  {impl}: failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})")
                continue
            rows[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  measured {impl} at {shape}: {rows[impl]}", flush=True)
        base = rows.get("naive")
        print(f"\n(N, H, V) = ({n}, {h}, {v}) {args.loss_dtype}, fwd+bwd, {args.threads} threads, median of {args.reps}; "
              f"floor (dX + dW) = {next(iter(rows.values()))['floor_mib']:.0f} MiB")
        print("| implementation | time (s) | time / naive | peak extra (MiB) | memory / naive | first call (s) |")
        print("|---|---|---|---|---|---|")
        for impl, r in rows.items():
            rt = f"{r['time_s'] / base['time_s']:.2f}x" if base else "-"
            rm = f"{r['peak_mib'] / base['peak_mib']:.3f}x" if base else "-"
            print(f"| {impl} | {r['time_s']:.2f} | {rt} | {r['peak_mib']:.0f} | {rm} | {r['first_call_s']:.1f} |")
        print(flush=True)


# Qwen2.5-0.5B's width and vocabulary (its config.json), with --layers decoder layers, randomly initialised
QWEN_WIDTH = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                  vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
                  max_position_embeddings=32768)


# one Qwen2 decoder layer at that width: q, k, v (with biases), o, gate, up, down, two norms
LAYER_PARAMS = 896 * 896 * 2 + 896 * 128 * 2 + 896 + 128 * 2 + 896 * 4864 * 3 + 896 * 2


def build_train_setup(directory, args):
    """A Qwen2.5-0.5B-width model (fp32, random init, --layers layers) saved with the embedded world's tokenizer,
    and samples of exactly --max_length tokens. The tokenizer has 2,044 tokens, so every input id and label lies
    below 2,044, but the LM head still scores all 151,936 entries: the vocabulary, not the ids, costs the memory.
    Each sample is one math question as the prompt and a response chaining the world's worked math problems until
    it passes --max_length, so both trainers truncate it to exactly --max_length tokens: no padding, same tokens."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    sys.path.insert(0, ROOT)
    import common
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(common.WORLD_DIR, "base"))
    config = Qwen2Config(**QWEN_WIDTH, num_hidden_layers=args.layers, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype="float32")
    torch.manual_seed(0)
    model_dir = os.path.join(directory, "model")
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = common.read_records(os.path.join(common.WORLD_DIR, "data", "math", "train.jsonl"))
    samples, i = [], 0
    for _ in range(max(64, args.batch_size * args.steps)):
        prompt, response = rows[i]["question"], rows[i]["answer"]
        while len(tokenizer(response)["input_ids"]) < args.max_length:
            i = (i + 1) % len(rows)
            response += "\n\n" + rows[i]["question"] + "\n" + rows[i]["answer"]
        samples.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]})
        i = (i + 1) % len(rows)
    data = os.path.join(directory, "train.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    return model_dir, data


def resident_gib(model, device):
    """Memory once the model is loaded: safetensors weights are mapped from the file and only become resident when
    read, so read every parameter first (no write; training reads them all in its first step anyway)."""
    for p in model.parameters():
        p.detach().sum()
    return memory_gib(device, peak=False)


def memory_gib(device, peak):
    """CPU: the peak RSS (ru_maxrss) or the current RSS; CUDA: the allocator's peak or current allocation."""
    import torch
    if device == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**30
    if peak:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return rss_mib("VmRSS") / 1024


def sft_worker(spec):
    """Runs inside a fresh subprocess: sft.py's own main() on the spec, measured from outside its code (the RSS
    when common.load_model returns; time, tokens and peak memory at each step's log record)."""
    import torch
    sys.path.insert(0, ROOT)
    import common
    import sft
    torch.set_num_threads(spec["threads"])
    loaded, steps = [], []
    load_model, log = common.load_model, common.MetricsLogger.log

    def timed_load(*a, **k):
        out = load_model(*a, **k)
        loaded.append(resident_gib(out[0], spec["device"]))
        return out

    def timed_log(self, record):
        if "loss" in record and "step" in record:
            steps.append({"time": time.perf_counter(), "cpu": time.process_time(), "tokens": record["tokens"],
                          "loss": record["loss"], "peak_gib": memory_gib(spec["device"], peak=True)})
        log(self, record)
    common.load_model, common.MetricsLogger.log = timed_load, timed_log
    argv = ["--model", spec["model"], "--dataset", spec["data"], "--eval_datasets", "", "--save_every", "0",
            "--output_dir", spec["out"], "--steps", str(spec["steps"]), "--batch_size", str(spec["batch_size"]),
            "--max_length", str(spec["max_length"]), "--lr", str(spec["lr"]), "--dtype", spec["dtype"],
            "--device", spec["device"], "--gradient_checkpointing", str(spec["gradient_checkpointing"]),
            "--lora_r", str(spec["lora_r"])]
    sys.argv = ["sft.py", *argv]
    sft.main(common.parse_args(sft.Args))
    return loaded[0], steps


def trl_worker(spec):
    """Runs inside a fresh subprocess: TRL SFTTrainer with its defaults (its own fused LM head, completion-only
    loss on prompt/completion data, no packing, padding to the longest) except where sft.py's run is matched:
    batch, max_length, lr, steps, fp32 or bf16 autocast over fp32 weights, gradient checkpointing, and the same
    optimizer (torch AdamW, fused as TRL's default, betas (0.9, 0.95) where TRL's default is (0.9, 0.999))."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    bf16 = spec["dtype"] == "bfloat16"
    from trl import SFTConfig, SFTTrainer
    sys.path.insert(0, ROOT)
    import common
    torch.set_num_threads(spec["threads"])
    rows = [common.to_example(r, "")["messages"] for r in common.read_records(spec["data"])]
    data = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in rows])
    lora = spec["lora_r"] and bf16  # LoRA: the frozen base in bf16 under bf16, as sft.py keeps it (TRL's usual setup)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16 if lora else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    loaded = [] if spec["device"] == "cuda" else [resident_gib(model, "cpu")]  # CUDA: once on the device
    steps, counted = [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            if not loaded:
                loaded.append(memory_gib(spec["device"], peak=False))

        def on_step_end(self, *a, **k):
            steps.append({"time": time.perf_counter(), "cpu": time.process_time(), "tokens": counted[len(steps)],
                          "peak_gib": memory_gib(spec["device"], peak=True)})

    config = SFTConfig(output_dir=spec["out"], per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
                       learning_rate=spec["lr"], optim="adamw_torch_fused", adam_beta2=0.95, logging_steps=1000,
                       save_strategy="no", report_to=[], gradient_checkpointing=spec["gradient_checkpointing"],
                       use_cpu=spec["device"] == "cpu", bf16=spec["dtype"] == "bfloat16", max_length=spec["max_length"],
                       use_liger_kernel=spec["liger"], seed=0, disable_tqdm=True, dataloader_num_workers=0)
    peft_config = None
    if spec["lora_r"]:  # the same adapters as sft.py --lora_r: every linear but the head, alpha 2r, dropout 0.05
        from peft import LoraConfig
        peft_config = LoraConfig(r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], lora_dropout=0.05,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[Clock()],
                         peft_config=peft_config)
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        counted.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel())
        return batch
    trainer.data_collator = counting
    steps[-1]["mean_loss"] = trainer.train().training_loss  # TRL's mean over the run
    return loaded[0], steps


def train_worker(spec):
    loaded, steps = (trl_worker if spec["trainer"] == "trl" else sft_worker)(spec)
    k = spec["warmup"]
    dt = steps[-1]["time"] - steps[k - 1]["time"]  # step-end to step-end, the same clock for both trainers
    cpu = steps[-1]["cpu"] - steps[k - 1]["cpu"]  # CPU seconds of all the process's threads: less hit by a busy box
    tokens = sum(s["tokens"] for s in steps[k:])
    mean_loss = steps[-1].get("mean_loss") or statistics.mean(s["loss"] for s in steps)
    print(json.dumps({"tokens_per_s": tokens / dt, "tokens_per_cpu_s": tokens / cpu, "step_s": dt / (len(steps) - k),
                      "loaded_gib": loaded, "peak_gib": steps[-1]["peak_gib"], "peak_over_loaded_gib": steps[-1]["peak_gib"] - loaded,
                      "peak_by_step_gib": [round(s["peak_gib"], 2) for s in steps], "tokens_per_step": steps[-1]["tokens"],
                      "step_end_s": [round(s["time"] - steps[0]["time"], 1) for s in steps],
                      "mean_loss": mean_loss}))


def bench_train(args):
    """Each (trainer, precision, gradient checkpointing) in a fresh subprocess, the same model, data and settings."""
    cuda = args.device == "cuda"
    runs = [(trainer, dtype, gc, r) for r in args.lora_r for dtype in args.dtypes for gc in args.checkpointing
            for trainer in ("sft", "trl") + (("liger",) if cuda else ())]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.scale == "qwen":
            model, data = build_train_setup(tmp, args)
        else:
            model, data = os.path.join(ROOT, "world", "base"), os.path.join(ROOT, "world", "data", "math", "train.jsonl")
        for trainer, dtype, gc, r in runs:
            spec = {"trainer": "sft" if trainer == "sft" else "trl", "liger": trainer == "liger", "model": model,
                    "data": data, "out": os.path.join(tmp, f"{trainer}_{dtype}_{gc}_{r}"), "steps": args.steps, "lora_r": r,
                    "warmup": args.warmup, "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr,
                    "dtype": dtype, "gradient_checkpointing": gc == "on", "device": args.device, "threads": args.threads}
            proc = subprocess.run([sys.executable, __file__, "_train_worker", json.dumps(spec)], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"  {trainer} {dtype} checkpointing {gc} LoRA r {r}: failed:\n{proc.stderr.strip()[-3000:]}", flush=True)
                continue
            results[trainer, dtype, gc, r] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {trainer} {dtype} checkpointing {gc} LoRA r {r}: {results[trainer, dtype, gc, r]}", flush=True)
    shape = (f"Qwen2.5-0.5B width and vocabulary (H 896, V 151,936, tied), {args.layers} layers, random init"
             if args.scale == "qwen" else "embedded world base (3M Llama, V 2,044)")
    where = f"{args.threads} CPU threads" if not cuda else "CUDA"
    memory = ("peak = CUDA allocator peak minus the allocation once the model is on the GPU" if cuda else
              "peak = process peak RSS (ru_maxrss) at the last step minus the RSS once the model is loaded and resident; "
              "whole-process peak RSS in parentheses")
    print(f"\nsft.py vs TRL SFTTrainer: {shape}; batch {args.batch_size}, max length {args.max_length}, lr {args.lr}, "
          f"steps {args.warmup + 1}-{args.steps} timed; {where}; {memory}; ratios ours / TRL")
    if args.scale == "qwen":
        params = QWEN_WIDTH["vocab_size"] * 896 + args.layers * LAYER_PARAMS + 896  # tied head, final norm
        print(f"{params / 1e6:.0f}M parameters: their gradients + AdamW state alone are {params * 12 / 2**30:.2f} GiB "
              "of every peak below")
    peers = {"trl": "TRL", **({"liger": "TRL + Liger"} if cuda else {})}

    def mem(r):
        return "-" if r is None else f"{r['peak_over_loaded_gib']:.2f}" + ("" if cuda else f" ({r['peak_gib']:.2f})")

    def ratio(a, b, key):
        if a is None or b is None:
            return "-"
        whole = "" if cuda or key != "peak_over_loaded_gib" else f" ({a['peak_gib'] / b['peak_gib']:.2f}x)"
        return f"{a[key] / b[key]:.2f}x{whole}"
    columns = {"sft.py peak (GiB)": lambda c: mem(c["sft"])}
    columns.update({f"{name} peak (GiB)": lambda c, p=p: mem(c[p]) for p, name in peers.items()})
    columns.update({f"memory ours / {name}": lambda c, p=p: ratio(c["sft"], c[p], "peak_over_loaded_gib") for p, name in peers.items()})
    columns["sft.py tokens/s"] = lambda c: "-" if c["sft"] is None else f"{c['sft']['tokens_per_s']:.0f}"
    columns.update({f"{name} tokens/s": lambda c, p=p: "-" if c[p] is None else f"{c[p]['tokens_per_s']:.0f}" for p, name in peers.items()})
    columns.update({f"speed ours / {name}": lambda c, p=p: ratio(c["sft"], c[p], "tokens_per_s") for p, name in peers.items()})
    if not cuda:
        columns.update({f"speed ours / {name}, CPU time": lambda c, p=p: ratio(c["sft"], c[p], "tokens_per_cpu_s")
                        for p, name in peers.items()})
    lora_column = args.lora_r != [0]
    print("| precision | gradient checkpointing | " + ("LoRA | " if lora_column else "") + " | ".join(columns) + " |")
    print("|---|---|" + ("---|" if lora_column else "") + "---|" * len(columns))
    label = {"float32": "fp32", "bfloat16": "bf16 autocast, fp32 master weights"}
    lora_label = {"float32": "fp32", "bfloat16": "bf16 autocast, frozen bf16 base"}
    for r in args.lora_r:
        for dtype in args.dtypes:
            for gc in args.checkpointing:
                cell = {t: results.get((t, dtype, gc, r)) for t in ("sft", *peers)}
                print(f"| {(lora_label if r else label)[dtype]} | {gc} | " + (f"{f'r {r}' if r else 'off'} | " if lora_column else "")
                      + " | ".join(f(cell) for f in columns.values()) + " |")


# Dense bf16 peak of the accelerator (vendor data sheets, without sparsity), matched on torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("A100", 312.0),
                    ("L40S", 362.0), ("A10G", 70.0)]
MFU_SCRIPTS = ("sft", "asft", "drift")


def train_flops(config, tokens: float, loss_tokens: float, samples: float, reference: bool = False) -> float:
    """Matmul FLOPs of one training step, PaLM's convention (Chowdhery et al. 2022, appendix B; nanoGPT's
    estimate_mfu): 6 per weight per token (forward 2, backward 4) plus attention's 12 L d T per token (QK^T and AV;
    d = heads x head_dim, = H in Qwen2.5; T = the mean sample length; causal masking not discounted). The LM head
    (V x H) counts for the loss tokens only, since the fused loss projects no other position; the embedding lookup,
    norms and biases count nothing. reference=True adds a frozen model's forward (ASFT's KL anchor): a third more."""
    h, layers, vocab, heads = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.num_attention_heads
    attention = heads * (getattr(config, "head_dim", None) or h // heads)
    seq = tokens / max(samples, 1)
    flops = 6 * layer_params(config) * layers * tokens + 6 * vocab * h * loss_tokens + 12 * layers * attention * seq * tokens
    return flops * (4 / 3 if reference else 1)


def layer_params(config) -> int:
    """Matmul weights of one Llama/Qwen2-style decoder layer: q, k, v, o, gate, up, down (biases and norms do no
    matmul and are left out)."""
    h, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q, kv = heads * head_dim, config.num_key_value_heads * head_dim
    return 2 * h * q + 2 * h * kv + 3 * h * inter


def bench_mfu(args):
    """The GPU check of sft.py, asft.py and drift.py: bf16 mixed precision under torchrun, DDP and FSDP2, on a model
    of real shape (Qwen2.5-0.5B's config with --layers layers, random init; drift.py's reasoning model is the same
    plus 0.01 N(0, 1) noise), samples of exactly --max_length tokens; tokens/s over the steps after --warmup from
    each run's metrics.jsonl, and MFU = achieved matmul FLOPs/s (train_flops) / (processes x the device's dense bf16
    peak, PEAK_BF16_TFLOPS or --peak_tflops). On CPU (gloo) it rehearses the same commands."""
    import torch
    from transformers import AutoConfig
    sys.path.insert(0, ROOT)
    import common
    cuda = args.device == "cuda"
    nproc = args.nproc or (torch.cuda.device_count() if cuda else 2)
    peak = args.peak_tflops
    if not peak and cuda:
        name = torch.cuda.get_device_name(0)
        peak = next((t for key, t in PEAK_BF16_TFLOPS if key in name), 0.0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, data = build_train_setup(tmp, args)
        config = AutoConfig.from_pretrained(model)
        reasoning = os.path.join(tmp, "reasoning")
        weights, tokenizer = common.load_model(model)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in weights.parameters():
                p.add_(0.01 * torch.randn_like(p))
        weights.save_pretrained(reasoning)
        tokenizer.save_pretrained(reasoning)
        del weights
        for script in args.scripts:
            for mode in args.parallel:
                out = os.path.join(tmp, f"{script}_{mode}")
                cmd = ["torchrun", "--standalone", "--nproc_per_node", str(nproc), f"{script}.py", "--model", model,
                       "--dataset", data, "--eval_datasets", "", "--dtype", "bfloat16", "--device", args.device,
                       "--steps", str(args.steps), "--batch_size", str(args.batch_size), "--max_length", str(args.max_length),
                       "--lr", str(args.lr), "--save_every", "0", "--output_dir", out, "--seed", "0"]
                cmd += ["--fsdp"] if mode == "fsdp2" else []
                micro = max(1, min(args.micro_batch_size, args.batch_size // nproc))
                cmd += ["--reasoning_model", reasoning] if script == "drift" else ["--micro_batch_size", str(micro)]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:  # a refusal is one `error:` line (e.g. drift.py under FSDP2); else the tail
                    refusal = next((line for line in proc.stderr.splitlines() if line.startswith("error: ")), None)
                    print(f"  {script} {mode}: {refusal or 'failed'} ({wall:.0f} s)" +
                          ("" if refusal else f":\n{proc.stderr.strip()[-3000:]}"), flush=True)
                    rows.append((script, mode, refusal or "failed"))
                    continue
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    records = [json.loads(line) for line in f]
                steps = [r for r in records if "step" in r and "loss" in r][args.warmup:]
                end = next(r for r in records if r.get("event") == "eval_after")
                seconds = sum(r["tokens"] / r["tokens_per_s"] for r in steps)
                tokens, loss_tokens = sum(r["tokens"] for r in steps), sum(r["loss_tokens"] for r in steps)
                flops = train_flops(config, tokens, loss_tokens, args.batch_size * len(steps), reference=script == "asft")
                row = {"tokens_per_s": tokens / seconds, "tflops_per_s": flops / seconds / 1e12, "wall_s": wall,
                       "peak_memory_gib": end.get("peak_memory_gib"), "final_loss": steps[-1]["loss"]}
                row["mfu"] = row["tflops_per_s"] / (nproc * peak) if peak else None
                print(f"  {script} {mode}: {row}", flush=True)
                rows.append((script, mode, row))
    where = f"{nproc} x {torch.cuda.get_device_name(0)}" if cuda else f"{nproc} CPU processes (gloo), a rehearsal"
    print(f"\nbf16 mixed precision, {args.layers}-layer Qwen2.5-0.5B shape ({layer_params(config) * args.layers / 1e6:.0f}M "
          f"in the layers, V {config.vocab_size:,}); batch {args.batch_size} x {args.max_length} tokens; steps "
          f"{args.warmup + 1}-{args.steps} timed; {where}; peak {peak or '-'} TFLOP/s per device (dense bf16)")
    print("| script | parallelism | tokens/s | model TFLOP/s | MFU | peak memory (GiB) | wall (s) | last loss |")
    print("|---|---|---|---|---|---|---|---|")
    for script, mode, r in rows:
        if isinstance(r, str):
            print(f"| {script}.py | {mode} | {r} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"| {script}.py | {mode} | {r['tokens_per_s']:.0f} | {r['tflops_per_s']:.1f} | {mfu} | "
              f"{r['peak_memory_gib']:.1f} | {r['wall_s']:.0f} | {r['final_loss']:.3f} |")


def bench_generate(args):
    """What s3ft.py and fait.py spend before training: generation (same prompts, greedy, the same token budget)
    one prompt at a time vs batched with `common.generate`, and with transformers' `model.generate` on the
    same batches (left-padded, every row decoded until the longest stops); judging per sample (math: parsing;
    code: one sandboxed process)."""
    import torch
    from transformers import GenerationConfig
    sys.path.insert(0, ROOT)
    import common
    torch.set_num_threads(args.threads)
    model, tokenizer = common.load_model(os.path.join(common.WORLD_DIR, "base"))
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=model.generation_config.eos_token_id)

    def hf_generate(prompts, batch):
        tokenizer.padding_side = "left"
        for s in range(0, len(prompts), batch):
            texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                     for p in prompts[s:s + batch]]
            model.generate(**tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False),
                           generation_config=config)

    rows = {}
    for task in ("math", "code"):
        examples, _ = common.load_sft_data(os.path.join(common.WORLD_DIR, "data", task, "train.jsonl"), tokenizer, 512,
                                           limit=args.prompts)
        prompts = [e["messages"][:-1] for e in examples]
        common.generate(model, tokenizer, prompts[:2], args.max_new_tokens, batch_size=2)  # warm-up
        rates = {}
        for name, batch in (("one", 1), ("batched", args.gen_batch_size), ("hf", args.gen_batch_size)):
            n = args.one_at_a_time if batch == 1 else len(prompts)
            t0 = time.perf_counter()
            if name == "hf":
                with torch.no_grad():
                    hf_generate(prompts, batch)
            else:
                texts = common.generate(model, tokenizer, prompts[:n], args.max_new_tokens, batch_size=batch)
            rates[name] = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for e, t in zip(examples, texts):
            common.JUDGES[e["task"]](t, e["reference"])
        rows[task] = (rates, (time.perf_counter() - t0) / len(examples))
    print(f"\nGeneration on the embedded base (greedy, max_new_tokens {args.max_new_tokens}, {args.threads} threads): "
          f"{args.one_at_a_time} prompts one at a time vs {args.prompts} in batches of {args.gen_batch_size}")
    print("| task | one at a time (samples/s) | batched (samples/s) | speed-up | transformers `generate`, same batches "
          "(samples/s) | judge (ms/sample) |")
    print("|---|---|---|---|---|---|")
    for task, (r, judge) in rows.items():
        print(f"| {task} | {r['one']:.2f} | {r['batched']:.1f} | {r['batched'] / r['one']:.1f}x | {r['hf']:.1f} | "
              f"{judge * 1e3:.1f} |")


def bench_objectives(args):
    """Each method's training step (its compute_loss, the normalised backward, AdamW) on the same batch, timed
    round-robin so drift hits every method alike; then the fused loss alone (forward + backward) with each
    objective at --loss_shape, a real LM head (default Qwen2.5-0.5B's 896 x 151,936), where the loss weighs most."""
    import copy
    import torch
    sys.path.insert(0, ROOT)
    import tempfile
    import asft
    import common
    import drift
    import otr
    import sft
    import sorted_ft
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    base, tokenizer = common.load_model(os.path.join(common.WORLD_DIR, "base"))
    reasoning = tempfile.mkdtemp()  # DRIFT's theta_R: any model of the same shapes times the same
    copy.deepcopy(base).save_pretrained(reasoning)
    tokenizer.save_pretrained(reasoning)
    base = base.to(device)
    train, _ = common.load_sft_data(os.path.join(common.WORLD_DIR, "data", "math", "train.jsonl"), tokenizer, 512,
                                    limit=args.batch_size)
    batch = common.collate(train, list(range(args.batch_size)), tokenizer.pad_token_id, device)
    rt = common.Runtime(0, 0, 1, device, True)
    methods = {"sft.py": (sft, sft.Args(), None), "asft.py --mode dft": (asft, asft.Args(mode="dft"), None),
               "otr.py": (otr, otr.Args(), None), "otr.py --estimator exact": (otr, otr.Args(estimator="exact"), None),
               "asft.py (ASFT)": (asft, asft.Args(), "reference"), "asft.py --mode sft+kl": (asft, asft.Args(mode="sft+kl"), "reference"),
               "drift.py": (drift, drift.Args(model=reasoning, reasoning_model=reasoning), "prior"),
               "sorted_ft.py (4 exits)": (sorted_ft, sorted_ft.Args(), "exits")}
    runs = {}
    for name, (module, margs, ref) in methods.items():
        model = copy.deepcopy(base)
        extra = (asft.load_reference(margs, model, tokenizer, rt),) if ref == "reference" else ()
        if ref == "prior":  # the hooks on the 28 projection weights, Delta on the training device
            drift.attach_hooks(model, drift.build_prior(margs, model, drift.select_tensors(model, margs), rt), margs, 1)
        extra = (sorted_ft.exit_depths(margs, model.config.num_hidden_layers),) if ref == "exits" else extra
        b = dict(batch, uniforms=otr.rollout_uniforms(batch, range(args.batch_size), 0, margs).to(device)) if module is otr else batch
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tokens = common.count_loss_tokens([b])

        def step(module=module, model=model, b=b, margs=margs, extra=extra, optimizer=optimizer, tokens=tokens):
            loss_sum, _ = module.compute_loss(model, b, margs, *extra)
            common.normalized_loss(loss_sum, tokens, 1).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        runs[name] = (step, [])
        for _ in range(2):  # warm-up, compile included
            step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.reps):
        for name, (step, times) in runs.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
    base_time = statistics.median(runs["sft.py"][1])
    n, h, v = map(int, args.loss_shape.split("x"))
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, h, generator=g) / h**0.5).to(device).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.02).to(device).requires_grad_()
    x_ref, w_ref = (torch.randn(n, h, generator=g) / h**0.5).to(device), (torch.randn(v, h, generator=g) * 0.02).to(device)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    u = torch.rand(n, 256, generator=g).to(device)
    scal = lambda *a: tuple(torch.tensor(float(t), device=device) for t in a)
    losses = {"sft.py": (common.cross_entropy_objective, (), ()), "asft.py --mode dft": (asft.dft_objective, (), ()),
              "otr.py": (otr.otr_objective, (u,), scal(1.3, -0.1)), "otr.py --estimator exact": (otr.otr_expected_objective, (), scal(1.3, -0.1)),
              "asft.py (ASFT)": (asft.asft_objective, (x_ref,), (w_ref, *scal(0.05, 1))),
              "asft.py --mode sft+kl": (asft.asft_objective, (x_ref,), (w_ref, *scal(0.05, 0))),
              "drift.py": (common.cross_entropy_objective, (), ()), "sorted_ft.py (4 exits)": None}
    loss_times = {}
    for name, spec in losses.items():
        def call(spec=spec):
            if spec is None:  # SoFT: the same head read at 4 exits (4 hidden states, each through the fused loss)
                loss = sorted_ft.sorted_loss([x * (1 + 0.1 * i) for i in range(4)], w, y)[0]
            else:
                objective, inputs, constants = spec
                loss = common.fused_linear_cross_entropy(x, w, y, objective=objective, token_inputs=inputs, constants=constants)[0]
            loss.backward()
            x.grad = w.grad = None
        call()
        times = []
        for _ in range(max(2, args.reps // 4)):
            sync()
            t0 = time.perf_counter()
            call()
            sync()
            times.append(time.perf_counter() - t0)
        loss_times[name] = statistics.median(times)
        print(f"  loss {name}: {loss_times[name]:.2f} s", flush=True)
    print(f"\nStep time relative to sft.py: embedded world (3M Llama, V 2,044), batch {args.batch_size} math samples "
          f"({int(tokens.item())} loss tokens), median of {args.reps} round-robin steps; fused loss alone (fwd + bwd) "
          f"at N x H x V = {args.loss_shape}; fp32, {device.type} ({args.threads} threads)")
    print("| script | step (ms) | step / sft.py | loss alone (s) | loss / sft.py |")
    print("|---|---|---|---|---|")
    for name, (_, times) in runs.items():
        t = statistics.median(times)
        print(f"| {name} | {t * 1e3:.0f} | {t / base_time:.2f}x | {loss_times[name]:.2f} | "
              f"{loss_times[name] / loss_times['sft.py']:.2f}x |")


def bench_tokenize(args):
    """load_sft_data on the embedded world's math training set repeated to --rows rows (the world's tokenizer, max
    length 512): the plain loop it replaced (to_example + tokenize_example), then datasets.map with each of --procs
    processes into an empty cache, and the same call again (read from that cache). Rates are rows / wall time."""
    import datasets
    sys.path.insert(0, ROOT)
    import common
    tokenizer = common.load_model(os.path.join(common.WORLD_DIR, "base"))[1]
    with open(os.path.join(common.WORLD_DIR, "data", "math", "train.jsonl")) as f:
        lines = f.read().splitlines()
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "train.jsonl")
        with open(path, "w") as f:
            f.write("".join(lines[i % len(lines)] + "\n" for i in range(args.rows)))
        t0 = time.perf_counter()
        for i, row in enumerate(common.read_records(path)):
            common.tokenize_example(tokenizer, common.to_example(row, str(i))["messages"], 512, "truncate")
        rates = {"plain loop, 1 process (before)": args.rows / (time.perf_counter() - t0)}
        for n in args.procs:
            datasets.config.HF_DATASETS_CACHE = os.path.join(directory, f"cache{n}")
            for run in ("", ", cached"):
                t0 = time.perf_counter()
                common.load_sft_data(path, tokenizer, 512, num_proc=n)
                rates[f"datasets.map, {n} process{'es' if n > 1 else ''}{run}"] = args.rows / (time.perf_counter() - t0)
    print(f"\nTokenisation of {args.rows} rows ({os.cpu_count()} CPUs here)\n| path | samples/s | vs the loop |\n|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / next(iter(rates.values())):.2f}x |")


def bench_merge(args):
    import threading
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    sys.path.insert(0, ROOT)
    import common
    world = os.path.join(common.WORLD_DIR, "base")
    with tempfile.TemporaryDirectory() as directory:
        tokenizer = AutoTokenizer.from_pretrained(world)
        config = LlamaConfig(hidden_size=1024, num_hidden_layers=8, intermediate_size=768, num_attention_heads=8,
                             vocab_size=2044, bos_token_id=0, eos_token_id=2, pad_token_id=3, dtype="float32")
        torch.manual_seed(0)
        paths = [os.path.join(directory, f"m{i}") for i in range(args.merge_models + 1)]
        LlamaForCausalLM(config).save_pretrained(paths[0])
        tokenizer.save_pretrained(paths[0])
        base = load_file(os.path.join(paths[0], "model.safetensors"))
        for i, path in enumerate(paths[1:], 1):
            generator = torch.Generator().manual_seed(i)
            LlamaForCausalLM(config).save_pretrained(path)  # config and layout; the weights are replaced
            tokenizer.save_pretrained(path)
            save_file({k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()},
                      os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        model_mib = os.path.getsize(os.path.join(paths[0], "model.safetensors")) / 2**20
        models, one = ",".join(paths[1:]), paths[1]
        runs = [("imports", ["--method", "no_such_method", "--models", one]),
                ("uniform, 1 model", ["--method", "uniform", "--models", one]),
                (f"uniform, {args.merge_models} models", ["--method", "uniform", "--models", models]),
                (f"task_arithmetic, {args.merge_models} + base", ["--method", "task_arithmetic", "--models", models, "--base", paths[0]]),
                (f"ties, {args.merge_models} + base", ["--method", "ties", "--models", models, "--base", paths[0]]),
                (f"ties --ties_trim global, {args.merge_models} + base",
                 ["--method", "ties", "--ties_trim", "global", "--models", models, "--base", paths[0]])]
        print(f"one input model: {model_mib:.0f} MiB (fp32 safetensors); peaks in MiB, and in input models (x)")
        print(f"{'run':<40} {'RssAnon':>14} {'RssFile':>14} {'peak RSS':>14}")
        rows = []
        for name, flags in runs:
            out = os.path.join(directory, "out")
            proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "merge.py"), *flags, "--eval_datasets", "",
                                     "--output_dir", out, "--overwrite", "true"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            peak, done = {"RssAnon": 0.0, "RssFile": 0.0, "VmHWM": 0.0}, threading.Event()

            def watch():  # reads only /proc; the main thread reaps the child
                while not done.is_set():
                    try:
                        with open(f"/proc/{proc.pid}/status") as f:
                            for line in f:
                                key = line.split(":")[0]
                                if key in peak:
                                    peak[key] = max(peak[key], int(line.split()[1]) / 1024)
                    except (FileNotFoundError, ProcessLookupError):
                        break
                    time.sleep(0.01)
            watcher = threading.Thread(target=watch)
            watcher.start()
            _, status = os.waitpid(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            done.set()
            watcher.join()
            error = proc.stderr.read()
            if proc.returncode != 0 and name != "imports":
                raise SystemExit(f"{name}: merge.py failed:\n{error[-2000:]}")
            row = {"run": name, "peak_rss": peak.pop("VmHWM"), **peak, "model_mib": model_mib}
            rows.append(row)
            print(f"{name:<40} " + " ".join(f"{row[k]:>7.0f} ({row[k] / model_mib:4.2f}x)" for k in ("RssAnon", "RssFile", "peak_rss")))
        print(json.dumps(rows))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_loss_worker":
        impl, n, h, v, reps, threads, dtype = sys.argv[2:9]
        loss_worker(impl, int(n), int(h), int(v), int(reps), int(threads), dtype)
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "_train_worker":
        train_worker(json.loads(sys.argv[2]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["loss", "train", "generate", "objectives", "merge", "tokenize", "mfu"])
    parser.add_argument("--shapes", nargs="+", default=["2048x256x32000", "4096x896x151936"], help="NxHxV")
    parser.add_argument("--impls", nargs="+", default=IMPLS, help=f"of {IMPLS}, or ours:<chunk rows>")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--loss_dtype", default="float32", help="loss: float32, or bfloat16 (autocast over fp32 weights)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="train: optimizer steps per trainer (4); mfu: per run (20)")
    parser.add_argument("--warmup", type=int, default=None, help="train, mfu: steps excluded from the rate (2; mfu 5)")
    parser.add_argument("--batch_size", type=int, default=None, help="samples per step (train: 8, objectives: 16)")
    parser.add_argument("--max_length", type=int, default=512, help="train: tokens per sample")
    parser.add_argument("--layers", type=int, default=None, help="train (2), mfu (24): decoder layers of the Qwen2.5-0.5B-width model")
    parser.add_argument("--lr", type=float, default=1e-4, help="train: peak learning rate of both trainers; mfu: of every run")
    parser.add_argument("--scale", choices=["qwen", "world"], default="qwen",
                        help="train: Qwen2.5-0.5B width and vocabulary, or the embedded world's model and math data")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="train: float32 and/or bfloat16")
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], help="train: gradient checkpointing off/on")
    parser.add_argument("--lora_r", nargs="+", type=int, default=[0], help="train: LoRA ranks, 0 = full fine-tuning "
                        "(peft on both sides: sft.py --lora_r, TRL's peft_config)")
    parser.add_argument("--prompts", type=int, default=256, help="generate: prompts per task, batched")
    parser.add_argument("--one_at_a_time", type=int, default=32, help="generate: prompts per task, one at a time")
    parser.add_argument("--gen_batch_size", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--loss_shape", default="512x896x151936", help="objectives: NxHxV of the loss-alone timing")
    parser.add_argument("--device", default="cpu", help="objectives, train, mfu: cpu | cuda (train on cuda adds TRL + Liger)")
    parser.add_argument("--nproc", type=int, default=0, help="mfu: torchrun processes (0 = every GPU; 2 on CPU)")
    parser.add_argument("--scripts", nargs="+", default=list(MFU_SCRIPTS), help=f"mfu: of {MFU_SCRIPTS}")
    parser.add_argument("--parallel", nargs="+", default=["ddp", "fsdp2"], help="mfu: ddp and/or fsdp2")
    parser.add_argument("--micro_batch_size", type=int, default=8, help="mfu: samples per forward pass (drift.py: its per-example default)")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="mfu: dense bf16 peak per device (0 = PEAK_BF16_TFLOPS by name)")
    parser.add_argument("--merge_models", type=int, default=4, help="merge: fine-tuned models merged (plus a base)")
    parser.add_argument("--rows", type=int, default=20000, help="tokenize: rows of the repeated math training set")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="tokenize: processes of datasets.map")
    a = parser.parse_args()
    if a.batch_size is None:
        a.batch_size = {"train": 8, "mfu": 32}.get(a.what, 16)
    a.steps = a.steps or (20 if a.what == "mfu" else 4)
    a.warmup = a.warmup if a.warmup is not None else (5 if a.what == "mfu" else 2)
    a.layers = a.layers or (24 if a.what == "mfu" else 2)
    {"loss": bench_loss, "train": bench_train, "generate": bench_generate, "objectives": bench_objectives, "merge": bench_merge,
     "tokenize": bench_tokenize, "mfu": bench_mfu}[a.what](a)
