"""Benchmarks: ratios measured side by side in one run (never timed tests).

    python benchmark.py loss     # fused loss vs naive / torch's chunked F.linear_cross_entropy / Cut Cross-Entropy
    python benchmark.py train    # sft.py tokens/s vs TRL SFTTrainer, same model, data and batch
    python benchmark.py loss --shapes 2048x256x32000 --reps 3
    python benchmark.py generate # common.generate batched vs one prompt at a time, and the judges' cost per sample
    python benchmark.py objectives  # step time of DFT / ASFT / OTR / DRIFT / SoFT relative to sft.py on the same batch

Loss: every implementation runs in a fresh subprocess (fp32, `torch.set_num_threads` = --threads). Time is the
median fwd+bwd of --reps calls after one warm-up (which holds any compile). Peak extra memory is the process's
RSS high-water mark during one measured call (reset through /proc/self/clear_refs) minus the RSS before it, so
it counts everything the call allocates, including the gradients dX and dW ("floor" = their bytes).
Optional peers, installed only for this script: `pip install cut-cross-entropy trl`.
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


def loss_worker(impl, n, h, v, reps, threads):
    """Runs inside the subprocess: prints one JSON line with the measurements of `impl`."""
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
    t0 = time.perf_counter()
    fn().backward()
    compile_s = time.perf_counter() - t0
    times = []
    for rep in range(reps):
        x.grad = w.grad = None
        if rep == 0:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = rss_mib("VmRSS")
        t0 = time.perf_counter()
        fn().backward()
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
            cmd = [sys.executable, __file__, "_loss_worker", impl, str(n), str(h), str(v), str(args.reps), str(args.threads)]
            # glibc: return freed memory to the OS, so the RSS high-water mark sees every allocation
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"  {impl}: failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})")
                continue
            rows[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  measured {impl} at {shape}: {rows[impl]}", flush=True)
        base = rows.get("naive")
        print(f"\n(N, H, V) = ({n}, {h}, {v}) fp32, fwd+bwd, {args.threads} threads, median of {args.reps}; "
              f"floor (dX + dW) = {next(iter(rows.values()))['floor_mib']:.0f} MiB")
        print("| implementation | time (s) | time / naive | peak extra (MiB) | memory / naive | first call (s) |")
        print("|---|---|---|---|---|---|")
        for impl, r in rows.items():
            rt = f"{r['time_s'] / base['time_s']:.2f}x" if base else "-"
            rm = f"{r['peak_mib'] / base['peak_mib']:.3f}x" if base else "-"
            print(f"| {impl} | {r['time_s']:.2f} | {rt} | {r['peak_mib']:.0f} | {rm} | {r['first_call_s']:.1f} |")
        print(flush=True)


def sft_tokens_per_s(out, args):
    cmd = [sys.executable, os.path.join(ROOT, "sft.py"), "--output_dir", out, "--steps", str(args.steps),
           "--batch_size", str(args.batch_size), "--eval_datasets", "", "--save_every", "0"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"loss"' in line]
    steady = steps[args.warmup:]
    dt = steady[-1]["time"] - steps[args.warmup - 1]["time"]  # step-end times, as TRL's callback measures
    return {"tokens_per_s": sum(r["tokens"] for r in steady) / dt, "wall_s": dt}


def trl_tokens_per_s(out, args, gradient_checkpointing):
    """TRL SFTTrainer on the same model, data (as chat messages, completion-only loss) and batch size."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    sys.path.insert(0, ROOT)
    import common
    torch.set_num_threads(args.threads)
    rows = [common.to_example(r, "")["messages"] for r in common.read_records(os.path.join(common.WORLD_DIR, "data", "math", "train.jsonl"))]
    data = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in rows])
    model = AutoModelForCausalLM.from_pretrained(os.path.join(common.WORLD_DIR, "base"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(common.WORLD_DIR, "base"))
    marks, counted = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    config = SFTConfig(output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=2e-3,
                       logging_steps=1000, save_strategy="no", report_to=[], gradient_checkpointing=gradient_checkpointing,
                       use_cpu=True, bf16=False, dataloader_num_workers=0,  # fp32 like sft.py (TRL defaults to bf16 autocast)
                       max_length=512, seed=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[Clock()])
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        counted.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel())
        return batch
    trainer.data_collator = counting
    trainer.train()
    k = args.warmup
    return {"tokens_per_s": sum(counted[k:len(marks)]) / (marks[-1] - marks[k - 1]), "wall_s": marks[-1] - marks[k - 1]}


def bench_train(args):
    with tempfile.TemporaryDirectory() as tmp:
        ours = sft_tokens_per_s(os.path.join(tmp, "ours"), args)
        print(f"sft.py: {ours}", flush=True)
        rows = [("sft.py (this repo)", ours["tokens_per_s"])]
        for gc in (True, False):
            try:
                r = trl_tokens_per_s(os.path.join(tmp, f"trl{gc}"), args, gc)
            except ImportError as err:
                print(f"TRL not installed ({err}); pip install trl")
                break
            print(f"TRL gradient_checkpointing={gc}: {r}", flush=True)
            rows.append((f"TRL SFTTrainer (gradient_checkpointing={gc})", r["tokens_per_s"]))
    print(f"\nTraining throughput, embedded world, batch {args.batch_size}, steps {args.warmup + 1}-{args.steps}, "
          f"{args.threads} threads (tokens = non-padding input tokens)")
    print("| trainer | tokens/s | sft.py / this |")
    print("|---|---|---|")
    for name, tps in rows:
        print(f"| {name} | {tps:.0f} | {rows[0][1] / tps:.2f}x |")


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


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_loss_worker":
        impl, n, h, v, reps, threads = sys.argv[2:8]
        loss_worker(impl, int(n), int(h), int(v), int(reps), int(threads))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["loss", "train", "generate", "objectives"])
    parser.add_argument("--shapes", nargs="+", default=["2048x256x32000", "4096x896x151936"], help="NxHxV")
    parser.add_argument("--impls", nargs="+", default=IMPLS, help=f"of {IMPLS}, or ours:<chunk rows>")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="train: optimizer steps per trainer")
    parser.add_argument("--warmup", type=int, default=5, help="train: steps excluded from the rate")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=256, help="generate: prompts per task, batched")
    parser.add_argument("--one_at_a_time", type=int, default=32, help="generate: prompts per task, one at a time")
    parser.add_argument("--gen_batch_size", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--loss_shape", default="512x896x151936", help="objectives: NxHxV of the loss-alone timing")
    parser.add_argument("--device", default="cpu", help="objectives: cpu | cuda")
    a = parser.parse_args()
    {"loss": bench_loss, "train": bench_train, "generate": bench_generate, "objectives": bench_objectives}[a.what](a)
