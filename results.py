"""Results: every method on the embedded world, same model, data, judge and budget, side by side in RESULTS.md.

    python results.py --suite full          # 5 seeds x every method + a soup grid: RESULTS.md, results/*.png, results/records
    python results.py --suite quick         # 1 seed, 8 steps on a data subset, < 10 min: runs/results/quick/RESULTS.md
    python results.py --suite full --report # rewrite RESULTS.md from the records only (no training)
    python results.py runs/study/code30_*   # any finished runs as a table: one row per name, `<name>_s<seed>` are seeds
    python results.py runs/my_* --plot my.png  # and their curves, the suite's plots for your own runs

The suite runs each method script as its own process (`python <script>.py ...`, the same command a user types; each
run's command is in its metrics.jsonl config and in <run>/suite.json) into runs/results/<suite>/<run>_s<seed>, one at a
time so that timings are not shared. As each run ends its numbers, with per-item results, go to a record
(results/records/<run>_s<seed>.json for the full suite, committed): the suite skips runs that have one, so a suite
killed or cut by the end of a session resumes where it stopped, on this machine or another (a run whose input model is
gone retrains that model first). Then it reads the records and writes the tables, each paper claim as a paired
difference with a bootstrap interval over seeds and items and a verdict from that interval, and plots (matplotlib,
optional). Generated data (S3FT's targets, FAIT's variants) is cached inside the suite's directory.
"""
import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "world", "data")


# ============================================================ TABLE OF FINISHED RUNS (python results.py <runs>)
def read_metrics(run_dir: str) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_records(run_dir: str) -> tuple:
    """(eval_before or None, eval_after) of one run; raises if the run has not finished."""
    before = after = None
    for record in read_metrics(run_dir):
        before = record if record.get("event") == "eval_before" else before
        after = record if record.get("event") == "eval_after" else after
    if after is None:
        raise SystemExit(f"error: {run_dir}: no eval_after record (the run has not finished)")
    return before, after


def cell(values: list) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def print_table(runs: list, metrics: list):
    groups = {}
    for run in sorted(runs):
        name = re.sub(r"_s\d+$", "", os.path.basename(os.path.normpath(run)))
        groups.setdefault(name, []).append(final_records(run))
    first = next(iter(groups.values()))[0][1]
    metrics = metrics or ([k for k in first if k.endswith("/accuracy")] + [k for k in first if k.endswith("/loss")])
    print("| run | seeds | " + " | ".join(m.replace("eval/", "").replace("/accuracy", "") for m in metrics) + " |")
    print("|---|---|" + "---|" * len(metrics))
    starts = [before for records in groups.values() for before, _ in records if before is not None]
    if starts:  # the starting model, from the first run that evaluated it (eval_before)
        print("| starting model | - | " + " | ".join(f"{starts[0][m]:.3f}" if m in starts[0] else "" for m in metrics) + " |")
    for name, records in groups.items():
        values = [cell([after[m] for _, after in records]) if m in records[0][1] else "" for m in metrics]
        print(f"| {name} | {len(records)} | " + " | ".join(values) + " |")


# ============================================================ THE SUITE: which runs, with which budget
SUITES = {  # equal budget: every training run of a group has the same steps x batch (32), data, lr and schedule
    "full": dict(seeds=5, steps=100, code_steps=0, eval_every=25, code_eval_every=4, eval_every_samples=200, code_curve_samples=50,
                 eval_samples=0, eval_batch_size=200, train_samples=0, search_samples=128, early_exit_prompts=50,
                 grid_lrs=(5e-4, 1e-3, 2e-3), grid_steps=(50, 100), grid_seeds=(0, 1), select_samples=0),
    "quick": dict(seeds=1, steps=8, code_steps=4, eval_every=4, code_eval_every=2, eval_every_samples=5, code_curve_samples=5,
                  eval_samples=10, eval_batch_size=50, train_samples=160, search_samples=16, early_exit_prompts=5,
                  grid_lrs=(1e-3, 2e-3), grid_steps=(8,), grid_seeds=(0,), select_samples=10),
}  # code_steps 0: one epoch (FAIT's paper trains one), floor(534 / 32) = 16 steps
CODE_EVALS = ",".join(f"{n}={os.path.join(DATA, t, s + '.jsonl')}" for n, t, s in [
    ("code", "code", "test"), ("code_ood", "code", "test_ood"), ("math", "math", "test"), ("rc", "rc", "test"),
    ("knowledge", "knowledge", "test")])
# group: target task, its OOD split, the held-out tasks (forgetting), the run whose eval_before is the starting model
GROUPS = {"math": ("math", "math_ood", ["code", "rc", "knowledge"], "sft"),
          "verbose": ("math", "math_ood", ["code", "rc", "knowledge"], "sft"),
          "code": ("code", "code_ood", ["math", "rc", "knowledge"], "sft_code"),
          "drift": ("math", "math_ood", ["code", "rc", "knowledge"], "drift_sft")}
# row: (label, group, script); rows without a script are read from another run's records
ROWS = {
    "sft": ("SFT", "math", "sft.py"), "s3ft": ("S3FT", "math", "s3ft.py"), "dft": ("DFT", "math", "asft.py"),
    "asft": ("ASFT", "math", "asft.py"), "otr": ("OTR", "math", "otr.py"), "soft": ("SoFT (full depth)", "math", "sorted_ft.py"),
    "roste": ("RoSTE, W4A4KV4 quantized", "math", "roste.py"),
    "sft_rtn": ("SFT then RTN W4A4KV4 (eval only)", "math", "roste.py"),
    "sft_exits": ("SFT, its layers read as exits (eval only)", "math", "sorted_ft.py"),
    "soup_uniform": ("uniform soup of the grid", "math", "merge.py"),
    "soup_greedy": ("greedy soup of the grid", "math", "merge.py"),
    "lines": ("LiNeS (alpha 0.25) of each SFT run", "math", "merge.py"),
    "grid": ("a grid ingredient (lr x steps x seed)", "grid", "sft.py"),
    "sft_verbose": ("SFT on verbose gold", "verbose", "sft.py"), "s3ft_verbose": ("S3FT on verbose gold", "verbose", "s3ft.py"),
    "sft_code": ("SFT", "code", "sft.py"), "fait": ("FAIT (variants from the model itself)", "code", "fait.py"),
    "fait_teacher": ("FAIT (variants from the code SFT model)", "code", "fait.py"),
    "drift_merge": ("naive merge theta_T + 0.5 Delta", "drift", None),
    "drift_sft": ("SFT from theta_T (`--alpha 0`)", "drift", "drift.py"), "drift": ("DRIFT", "drift", "drift.py"),
}


@dataclasses.dataclass
class Run:
    name: str  # ROWS key, or grid_lr<lr>_st<steps> for a soup ingredient
    seed: int
    args: list
    root: str
    records: str = ""  # where its record goes once finished (default <root>/records)

    @property
    def id(self) -> str:
        return f"{self.name}_s{self.seed}"

    @property
    def dir(self) -> str:
        return os.path.join(self.root, self.id)

    @property
    def row(self) -> str:
        return "grid" if self.name.startswith("grid_") else self.name

    @property
    def script(self) -> str:
        return ROWS[self.row][2]

    @property
    def record(self) -> str:
        return os.path.join(self.records or os.path.join(self.root, "records"), self.id + ".json")

    def finished(self) -> bool:
        path = os.path.join(self.dir, "metrics.jsonl")
        return os.path.exists(path) and any(r.get("event") == "eval_after" for r in read_metrics(self.dir))

    def done(self) -> bool:
        return os.path.exists(self.record) or self.finished()

    def producers(self) -> list:
        """Run ids whose final/ model this run reads (DRIFT's theta_T and theta_R, the merges' ingredients, ...)."""
        found = re.findall(re.escape(self.root + os.sep) + r"([^/,]+)" + re.escape(os.sep) + "final", " ".join(self.args))
        return list(dict.fromkeys(found))


def subset(path: str, n: int, root: str) -> str:
    """The first n lines of a training file (quick suite), written once into the suite's directory."""
    if not n:
        return path
    out = os.path.join(root, "data", os.path.basename(os.path.dirname(path)) + ".jsonl")
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(path) as f:
            lines = f.readlines()[:n]
        with open(out + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(out + ".tmp", out)
    return out


def records_dir(suite: str, root: str, default_root: str) -> str:
    """The full suite's records are committed (results/records): a later session, maybe on another machine, resumes
    from them without runs/. Other suites, or a full suite in another --root, keep them in <root>/records."""
    return os.path.join(HERE, "results", "records") if suite == "full" and root == default_root else os.path.join(root, "records")


def suite_runs(suite: str, root: str, records: str = "") -> list:
    """Every run of a suite in the order they must happen, in blocks that each finish what they start: seed s's
    training runs and the runs that read their models, then the soup grid. The merges, DRIFT, FAIT's teacher and the
    eval-only rows read earlier runs' final/ models (Run.producers)."""
    b = SUITES[suite]
    seeds = range(b["seeds"])
    math_data = subset(os.path.join(DATA, "math", "train.jsonl"), b["train_samples"], root)
    verbose_data = subset(os.path.join(DATA, "math_verbose", "train.jsonl"), b["train_samples"], root)
    code_data = subset(os.path.join(DATA, "code", "train.jsonl"), b["train_samples"] // 4, root)
    with open(code_data) as f:
        code_steps = b["code_steps"] or sum(1 for line in f if line.strip()) // 32  # one epoch
    cache = ["--cache_dir", os.path.join(root, "cache")]
    final = lambda name, seed: os.path.join(root, f"{name}_s{seed}", "final")
    scoring = ["--eval_samples", str(b["eval_samples"]), "--eval_batch_size", str(b["eval_batch_size"])]

    def train(steps, every, seed, first=False, curve=b["eval_every_samples"]):
        return ["--steps", str(steps), "--seed", str(seed), *scoring, "--eval_every", str(every),
                "--eval_every_samples", str(curve), "--eval_before", str(first).lower()]

    math = lambda s, first=False, data=math_data: train(b["steps"], b["eval_every"], s, first) + ["--dataset", data]
    code = lambda s, first=False: (train(code_steps, b["code_eval_every"], s, first, b["code_curve_samples"])  # one row per function
                                   + ["--dataset", code_data, "--eval_datasets", CODE_EVALS])
    evaluate = lambda s: ["--steps", "0", "--seed", str(s), *scoring, "--eval_before", "false"]
    runs = []
    add = lambda name, seed, args: runs.append(Run(name, seed, args, root, records))
    grid = [(lr, st, s) for lr in b["grid_lrs"] for st in b["grid_steps"] for s in b["grid_seeds"]]
    grid_model = lambda lr, st, s: (final("sft", s) if (lr, st) == (1e-3, b["steps"]) and s in seeds
                                    else final(f"grid_lr{lr:g}_st{st}", s))  # the SFT runs are the grid's centre
    for s in seeds:
        add("sft", s, math(s, first=s == 0))  # seed 0 also scores the base model: the starting row
        add("sft_code", s, code(s, first=s == 0))
        add("s3ft", s, math(s) + cache)
        add("dft", s, math(s) + ["--mode", "dft"])
        add("asft", s, math(s) + ["--mode", "asft"])
        add("otr", s, math(s))
        add("soft", s, math(s) + ["--early_exit_prompts", str(b["early_exit_prompts"])])
        add("roste", s, math(s) + ["--search_samples", str(b["search_samples"])])
        add("sft_rtn", s, evaluate(s) + ["--model", final("sft", s), "--qat", "false", "--rotation", "none",
                                          "--dataset", math_data])
        add("sft_exits", s, evaluate(s) + ["--model", final("sft", s), "--exits", "4", "--eval_exits", "1,2,3",
                                            "--early_exit_prompts", "0", "--dataset", math_data])
        add("lines", s, ["--method", "lines", "--alpha", "0.25", "--seed", str(s), "--models", final("sft", s), "--base",
                         os.path.join(HERE, "world", "base"), *scoring])
        add("fait", s, code(s) + cache)
        add("fait_teacher", s, code(s) + cache + ["--teacher", final("sft_code", 0)])  # one teacher: its variants cached once
        drift = ["--model", final("sft_code", 0), "--reasoning_model", final("sft", 0)]  # theta_T: code, theta_R: math
        add("drift_sft", s, math(s, first=s == 0) + drift + ["--alpha", "0", "--edit_per", "micro_batch"])  # alpha 0: no edit
        add("drift", s, math(s) + drift + (["--merge_lambdas", "0.5"] if s == 0 else []))
        verbose = ["--max_new_tokens", "192"]  # its answers: ~3.5x the tokens of the model's own (at most 176)
        add("sft_verbose", s, math(s, data=verbose_data) + verbose)
        add("s3ft_verbose", s, math(s, data=verbose_data) + verbose + cache + ["--gen_max_new_tokens", "192"])
        if s == max(b["grid_seeds"]) or s == max(seeds):  # the grid once its SFT ingredients exist
            if any(r.name == "soup_greedy" for r in runs):
                continue
            for lr, st, gs in grid:
                if grid_model(lr, st, gs).startswith(os.path.join(root, "grid_")):
                    add(f"grid_lr{lr:g}_st{st}", gs, ["--steps", str(st), "--lr", f"{lr:g}", "--seed", str(gs), *scoring,
                                                       "--eval_before", "false", "--dataset", math_data,
                                                       "--eval_datasets", f"math={os.path.join(DATA, 'math', 'test.jsonl')}"])
            ingredients = ",".join(grid_model(*g) for g in grid)
            for method in ("uniform", "greedy"):
                add(f"soup_{method}", 0, ["--method", method, "--models", ingredients, *scoring,
                                          "--select_samples", str(b["select_samples"])])
    return runs


def execute(run: Run, log_dir: str) -> float:
    """Run one script to completion (resuming its checkpoint if any); returns the wall time in seconds."""
    command = [sys.executable, os.path.join(HERE, run.script), *run.args, "--output_dir", run.dir]
    # a killed training run continues its checkpoint; a killed merge is recomputed whole (finished runs are skipped)
    command += ["--resume", "auto"] if run.script != "merge.py" else ["--overwrite", "true"]
    os.makedirs(log_dir, exist_ok=True)
    log = os.path.join(log_dir, f"{run.id}.log")
    t0 = time.time()
    with open(log, "w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=HERE).returncode
    wall = time.time() - t0
    if code != 0:
        with open(log) as f:
            tail = "".join(f.readlines()[-15:])
        raise SystemExit(f"error: {run.name} seed {run.seed} failed (exit {code}); log {log}:\n{tail}")
    with open(os.path.join(run.dir, "suite.json"), "w") as f:
        json.dump({"wall_s": wall, "command": command[1:]}, f)
    return wall


def machine() -> str:
    import torch
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip() or "?"
    except OSError:
        return "?"


def save_record(run: Run):
    """A finished run's numbers (summarize) with the commit, machine and date: what the report reads."""
    record = {**summarize(run), "commit": commit(), "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    os.makedirs(os.path.dirname(run.record), exist_ok=True)
    with open(run.record + ".tmp", "w") as f:
        json.dump(record, f, separators=(",", ":"))
    os.replace(run.record + ".tmp", run.record)


def run_suite(runs: list, log_dir: str):
    """Execute every run without a record, in order; a run whose producers' final/ models are gone (a new session,
    runs/ lost) first retrains them (their records are kept: the table reads those)."""
    by_id, t0 = {r.id: r for r in runs}, time.time()
    for k, run in enumerate(runs):
        if run.done():
            if not os.path.exists(run.record):
                save_record(run)
            continue
        for pid in run.producers():
            producer = by_id[pid]
            if not os.path.exists(os.path.join(producer.dir, "final", "config.json")):
                print(f"[{k + 1}/{len(runs)}] retraining {pid} for its model, which {run.id} reads (its record is kept)", flush=True)
                execute(producer, log_dir)
        print(f"[{k + 1}/{len(runs)}] {run.id}: python {run.script} ... ({(time.time() - t0) / 60:.1f} min so far)", flush=True)
        wall = execute(run, log_dir)
        save_record(run)
        print(f"[{k + 1}/{len(runs)}] {run.id}: done in {wall:.0f} s", flush=True)


# ============================================================ READING THE RUNS
def mean_std(values: list) -> tuple:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list, scale: float = 1.0, digits: int = 1) -> str:
    m, s = mean_std(values)
    if m is None:
        return ""
    return f"{m * scale:.{digits}f}" + (f" ± {s * scale:.{digits}f}" if len([v for v in values if v is not None]) > 1 else "")


def training_ce(record: dict) -> float:
    """The step's cross-entropy of the full model, comparable across methods: DFT/ASFT/OTR log it as method/ce,
    SoFT per exit (the deepest is the full model); the others optimise it (FAIT: its token-weighted version)."""
    exits = sorted((int(k[len("method/exit"):-len("/ce")]), v) for k, v in record.items()
                   if k.startswith("method/exit") and k.endswith("/ce"))
    return record.get("method/ce", exits[-1][1] if exits else record["loss"])


def curve_of(records: list, key: str, n: int) -> dict:
    """Target accuracy by step on the curve's fixed subset, the first n prompts (0 = all): the --eval_every records
    score the first eval_every_samples prompts, the before and after records all of them, and their per-item results
    give the subset's accuracy, so every point of the curve is on the same prompts."""
    curve = {}
    for r in records:
        if r.get("event") not in ("eval_before", "eval", "eval_after") or key not in r:
            continue
        correct = r.get(key.replace("/accuracy", "/correct"))
        curve[r.get("step", 0)] = (correct[:n].count("1") / n if n and isinstance(correct, str) and len(correct) >= n
                                   else r[key])
    return dict(sorted(curve.items()))


def summarize(run: Run) -> dict:
    """One run's numbers: final accuracies (with per-item results), curves, time, throughput, memory."""
    records = read_metrics(run.dir)
    steps = {r["step"]: r for r in records if "loss" in r and "event" not in r}  # a resumed run logs some steps twice
    after = [r for r in records if r.get("event") == "eval_after"][-1]
    config = next((r for r in records if r.get("event") == "config"), {})
    target = GROUPS[ROWS[run.row][1]][0] if ROWS[run.row][1] in GROUPS else "math"
    dts = {s: r["tokens"] / r["tokens_per_s"] for s, r in steps.items() if r.get("tokens_per_s")}
    timed = [s for s in dts if s > 1]  # step 1 includes torch.compile's first compilation
    wall = None
    if os.path.exists(os.path.join(run.dir, "suite.json")):
        with open(os.path.join(run.dir, "suite.json")) as f:
            wall = json.load(f)["wall_s"]
    return {"id": run.id, "after": after, "before": next((r for r in records if r.get("event") == "eval_before"), None),
            "config": config, "merges": [r for r in records if r.get("event") == "eval_merge"],
            "ingredients": [r for r in records if r.get("event") == "ingredient"],
            "kept": next((r["kept"] for r in records if r.get("event") == "greedy_soup"), []),
            "loss": {s: training_ce(r) for s, r in sorted(steps.items())},
            "curve": curve_of(records, f"eval/{target}/accuracy", int(run.args[run.args.index("--eval_every_samples") + 1])
                              if "--eval_every_samples" in run.args else config.get("eval_every_samples") or 0),
            "train_s": sum(dts.values()) if dts else None,
            "tokens_per_s": sum(steps[s]["tokens"] for s in timed) / sum(dts[s] for s in timed) if timed else None,
            "wall_s": wall, "peak_gib": after.get("peak_memory_gib")}


def load_record(path: str) -> dict:
    with open(path) as f:
        record = json.load(f)
    record["loss"] = {int(k): v for k, v in record["loss"].items()}  # JSON keys are strings
    record["curve"] = {int(k): v for k, v in record["curve"].items()}
    return record


def collect(runs: list) -> dict:
    """row name -> list of per-seed records (seed order), for the runs that have finished; grid ingredients under
    "grid" (with the SFT runs at the grid's centre found through the soups' ingredient lists)."""
    out = {}
    for run in runs:
        if os.path.exists(run.record):
            out.setdefault(run.row, []).append(load_record(run.record))
        elif run.finished():
            out.setdefault(run.row, []).append(summarize(run))
    merges = out["drift"][0]["merges"] if "drift" in out else []
    if merges:  # the naive merge is evaluated by drift.py (seed 0) before it trains
        out["drift_merge"] = [{"id": "drift_merge_s0", "after": merges[0], "before": None, "config": {}, "ingredients": [],
                               "loss": {}, "curve": {}, "train_s": None, "tokens_per_s": None, "wall_s": None, "peak_gib": None}]
    return out


def accuracy(rows: dict, name: str, task: str) -> list:
    return [r["after"].get(f"eval/{task}/accuracy") for r in rows.get(name, [])]


def start_record(rows: dict, group: str) -> dict:
    starter = GROUPS[group][3]
    return next((r["before"] for r in rows.get(starter, []) if r["before"]), None) or {}


def forgetting(rows: dict, name: str) -> list:
    """Per seed: the mean over the held-out tasks of (accuracy after - the group's starting model's accuracy)."""
    group = ROWS[name][1]
    start, held = start_record(rows, group), GROUPS[group][2]
    if not start:
        return []
    return [statistics.mean(r["after"][f"eval/{t}/accuracy"] - start[f"eval/{t}/accuracy"] for t in held)
            for r in rows.get(name, [])]


# ============================================================ STATISTICS: paired differences, bootstrap intervals
def clusters_of(config: dict, task: str, n: int) -> list:
    """Cluster id per item of an eval set: items that share a reference program (the world's code test has 4 rows of
    asserts per held-out function) are one cluster and are resampled together; every other item is its own."""
    sources = dict(p.partition("=")[::2] for p in str(config.get("eval_datasets") or "").split(",") if "=" in p)
    path = sources.get(task, "")
    if "world/data/" in path:  # a record written on another machine: the same file in this checkout
        path = os.path.join(DATA, path.split("world/data/")[-1])
    rows = []
    if path.endswith(".jsonl") and os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()][:n]
    if len(rows) != n:  # items resampled one by one: too narrow if they share programs; say so
        if path:
            print(f"warning: {task}: {path} does not give its {n} items; each item is its own cluster", file=sys.stderr)
        return list(range(n))
    return [row.get("code", i) for i, row in enumerate(rows)]


def correct_matrix(records: list, key: str):
    """[seeds x items] 0/1 array of one eval key's per-item results (eval/<set>/correct), or None if any is missing."""
    import numpy as np
    strings = [r["after"].get(key) for r in records]
    if not strings or any(not isinstance(s, str) for s in strings) or len({len(s) for s in strings}) != 1:
        return None
    return np.array([[c == "1" for c in s] for s in strings], dtype=np.float64)


def paired_bootstrap(parts: list, draws: int = 2000, seed: int = 0) -> dict:
    """95% interval of a paired difference, resampling seeds and items (the "pigeonhole" bootstrap of a crossed
    seeds x items design, Owen 2007). parts: [(D, clusters)], D a [seeds x items] array of method minus baseline on
    the same seeds and items (row s: both trained with seed s), clusters one id per item; the statistic is the mean
    over parts of D's mean. Each draw resamples the seeds once for every part, and each part's clusters of items.
    Returns the difference, the interval (lo, hi) and its half-width with both sources resampled, and the half-width
    with only the items or only the seeds resampled (the variance split)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    n_seeds = parts[0][0].shape[0]
    diff = float(np.mean([d.mean() for d, _ in parts]))

    def estimates(items: bool, seeds: bool):
        v = rng.multinomial(n_seeds, [1 / n_seeds] * n_seeds, size=draws) if seeds else np.ones((draws, n_seeds))
        total = np.zeros(draws)
        for d, clusters in parts:
            ids = {c: j for j, c in enumerate(dict.fromkeys(clusters))}
            member = np.array([ids[c] for c in clusters])
            counts = rng.multinomial(len(ids), [1 / len(ids)] * len(ids), size=draws) if items else np.ones((draws, len(ids)))
            w = counts[:, member]                                  # [draws x items]: each item's weight in the draw
            per_seed = (d @ w.T) / w.sum(1)                        # [seeds x draws]
            total += (v * per_seed.T).sum(1) / v.sum(1)
        return total / len(parts)

    half = lambda est: float(np.percentile(est, 97.5) - np.percentile(est, 2.5)) / 2
    both = estimates(True, True)
    return {"diff": diff, "lo": float(np.percentile(both, 2.5)), "hi": float(np.percentile(both, 97.5)), "half": half(both),
            "items_half": half(estimates(True, False)), "seeds_half": half(estimates(False, True)) if n_seeds > 1 else 0.0,
            "n_seeds": n_seeds, "n_items": sum(d.shape[1] for d, _ in parts) // len(parts),
            "sizes": "/".join(dict.fromkeys(str(d.shape[1]) for d, _ in parts))}


def compare(rows: dict, a: str, b: str, keys: list, records: dict = None) -> dict:
    """Paired difference of rows a and b on every key (eval/<set>/correct) of `keys`, the mean over keys: seed s of a
    against seed s of b, on the seeds both have (two single models, e.g. two soups, are paired as they are);
    `records` overrides some rows' records. None where a run or a per-item result is missing."""
    records = {**rows, **(records or {})}
    ra, rb = records.get(a, []), records.get(b, [])
    if len(ra) == 1 and len(rb) == 1:
        pa, pb = ra, rb
    else:
        sa, sb = ({r["config"].get("seed"): r for r in x} for x in (ra, rb))
        seeds = sorted(set(sa) & set(sb))
        pa, pb = [sa[s] for s in seeds], [sb[s] for s in seeds]
    if not pa:
        return None
    parts = []
    for key in keys:
        ma, mb = correct_matrix(pa, key), correct_matrix(pb, key)
        if ma is None or mb is None or ma.shape != mb.shape:
            return None
        parts.append((ma - mb, clusters_of(pa[0]["config"], key.split("/")[1], ma.shape[1])))
    return paired_bootstrap(parts)


def seed_bootstrap(values: list) -> dict:
    """The same interval for a per-run number (no items): a [seeds x 1] difference, resampled over seeds."""
    import numpy as np
    values = [v for v in values if v is not None]
    if not values:
        return None
    return paired_bootstrap([(np.array(values, dtype=np.float64)[:, None], [0])])


def verdict(ci: dict, direction: int = 1) -> str:
    """The claim holds ("reproduced") only when the 95% interval excludes 0 in the claimed direction; "opposite" when
    it excludes 0 the other way; "within noise" otherwise. With one seed (or one model, a soup) the interval covers
    the items only, and the verdict says so."""
    if ci is None:
        return "not run"
    if ci.get("n_items") == 1 and ci.get("n_seeds", 0) < 2:
        return "needs 2+ seeds"  # a per-run number of one run has no interval
    lo, hi = ci["lo"] * direction, ci["hi"] * direction
    lo, hi = min(lo, hi), max(lo, hi)
    found = "reproduced" if lo > 0 else "opposite" if hi < 0 else "within noise"
    return found + (" (1 seed: the interval has no seed variance)" if ci.get("n_seeds", 2) < 2 else "")


def pct(values: list) -> str:
    return fmt(values, 100) or "n/a"


def held_keys(group: str) -> list:
    return [f"eval/{t}/correct" for t in GROUPS[group][2]]


def target_keys(group: str) -> list:
    return [f"eval/{GROUPS[group][0]}/correct"]


def soup_single(rows: dict) -> tuple:
    """The greedy soup paper's best single model: the ingredient best on the held-out selection set, its record."""
    ingredients = rows["soup_greedy"][0]["ingredients"] if rows.get("soup_greedy") else []
    if not ingredients:
        return None, None
    chosen = os.path.basename(os.path.dirname(max(ingredients, key=lambda r: r["select/accuracy"])["model"]))
    record = next((r for runs in rows.values() for r in runs if r.get("id") == chosen), None)
    return chosen, record


def claims(rows: dict) -> list:
    """(method, the paper's claim, what we measured, the interval record or None, direction, verdict) rows: one row
    per directional comparison, each a paired difference with its 95% bootstrap interval over seeds and items."""
    acc = lambda name: accuracy(rows, name, GROUPS[ROWS[name][1]][0])  # on its group's target task
    out = []

    def row(method, claim, text, ci, direction=1):
        out.append((method, claim, text, ci, direction, verdict(ci, direction)))

    for suffix, what in (("", "gold in the model's own style (control)"), ("_verbose", "verbose gold (the paper's condition)")):
        s3, sft = "s3ft" + suffix, "sft" + suffix
        group = ROWS[s3][1]
        row("S3FT", f"less forgetting than SFT; {what}",
            f"held-out change: S3FT {pct(forgetting(rows, s3))} vs SFT {pct(forgetting(rows, sft))} points",
            compare(rows, s3, sft, held_keys(group)))
        row("S3FT", f"in-domain accuracy at least SFT's; {what}", f"math: S3FT {pct(acc(s3))} vs SFT {pct(acc(sft))}",
            compare(rows, s3, sft, target_keys(group)))
    for name, label in (("fait", "FAIT"), ("fait_teacher", "FAIT, teacher variants")):
        row(label, "higher pass@1 than SFT", f"code: {label} {pct(acc(name))} vs SFT {pct(acc('sft_code'))}",
            compare(rows, name, "sft_code", target_keys("code")))
    for a, b, claim in (("dft", "sft", "DFT > SFT"), ("asft", "dft", "ASFT >= DFT"), ("asft", "sft", "ASFT > SFT"),
                        ("otr", "sft", "OTR > SFT")):
        row(a.upper(), claim, f"math: {ROWS[a][0]} {pct(acc(a))} vs {ROWS[b][0]} {pct(acc(b))}",
            compare(rows, a, b, target_keys("math")))
    row("DRIFT", "DRIFT > SFT (from the same start)", f"math: DRIFT {pct(acc('drift'))} vs SFT {pct(acc('drift_sft'))}",
        compare(rows, "drift", "drift_sft", target_keys("drift")))
    row("DRIFT", "SFT > naive merge", f"math: SFT (seed 0) {pct(acc('drift_sft')[:1])} vs merge lambda 0.5 {pct(acc('drift_merge'))}",
        compare(rows, "drift_sft", "drift_merge", target_keys("drift"), {"drift_sft": rows.get("drift_sft", [])[:1]}))
    exit_keys = [f"eval/math/exit{n}/correct" for n in (1, 2, 3)]
    exits = lambda name: [statistics.mean(r["after"][f"eval/math/exit{n}/accuracy"] for n in (1, 2, 3))
                          if "eval/math/exit1/accuracy" in r["after"] else None for r in rows.get(name, [])]
    row("SoFT", "sub-models (the first n layers) are useful without further training",
        f"math accuracy of exits 1-3, mean: SoFT {pct(exits('soft'))} vs SFT's layers {pct(exits('sft_exits'))}",
        compare(rows, "soft", "sft_exits", exit_keys))
    speed = [r["after"].get("method/threshold/speedup") for r in rows.get("soft", [])]
    ci = seed_bootstrap([s - 1 for s in speed if s is not None])
    row("SoFT", "early exit decodes faster than the full model",
        f"threshold 0.9: {fmt(speed, 1, 2)}x the full model's tokens/s (batch 1); the interval is of the speed-up - 1, in %", ci)
    row("RoSTE", "RoSTE > SFT then quantization (W4A4KV4)", f"math: RoSTE {pct(acc('roste'))} vs SFT + RTN {pct(acc('sft_rtn'))}",
        compare(rows, "roste", "sft_rtn", target_keys("math")))
    chosen, single = soup_single(rows)
    g, u = acc("soup_greedy"), acc("soup_uniform")
    single_row = {"single": [single]} if single else {}
    row("Greedy soup", "greedy soup >= the best single model (chosen on validation)",
        f"math: greedy {pct(g)} vs {chosen or 'the best single'} {pct([single['after']['eval/math/accuracy']] if single else [])}",
        compare(rows, "soup_greedy", "single", target_keys("math"), single_row) if single else None)
    row("Greedy soup", "the best single model > uniform soup", f"math: {chosen or 'best single'} vs uniform {pct(u)}",
        compare(rows, "single", "soup_uniform", target_keys("math"), single_row) if single else None)
    row("LiNeS", "less forgetting than fine-tuning", f"held-out change: LiNeS {pct(forgetting(rows, 'lines'))} vs SFT "
        f"{pct(forgetting(rows, 'sft'))} points; math {pct(acc('lines'))} vs {pct(acc('sft'))}",
        compare(rows, "lines", "sft", held_keys("math")))
    return out


NOT_TESTABLE = [("RoSTE", "4-bit weights, activations and KV cache cut inference memory and latency",
                 "fake quantization only (no int4 kernels here)"),
                ("DRIFT", "gains on multimodal reasoning benchmarks (MathVista, MathVerse, ...)", "the embedded world has no images")]


# ============================================================ RESULTS.md AND PLOTS
def matplotlib_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def plot(rows: dict, names: list, path: str, title: str) -> bool:
    """The suite's plot of some of its rows: each name's seeds, the starting model as step 0 of the accuracy."""
    series = []
    for name in names:
        seeds = rows.get(name, [])
        start = start_record(rows, ROWS[name][1]).get(f"eval/{GROUPS[ROWS[name][1]][0]}/accuracy") if seeds else None
        curves = [(r["loss"], ({0: start} if start is not None else {}) | dict(r["curve"])) for r in seeds]
        series.append((ROWS[name][0], curves))
    return draw(series, path, title)


def draw(series: list, path: str, title: str, accuracy_label: str = "target accuracy, % (greedy, judge)") -> bool:
    """Training loss and target accuracy against the step for [(label, [(loss by step, accuracy by step) per seed])],
    mean over seeds (band: min to max). False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, seeds in series:
        if not seeds:
            continue
        for ax, k in ((ax_loss, 0), (ax_acc, 1)):
            curves = [dict(seed[k]) for seed in seeds]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            if not steps:
                continue
            ys = [[c[s] * (100 if k == 1 else 1) for c in curves] for s in steps]
            if k == 0 and len(steps) > 20:  # a running mean over 5 steps: one batch's loss is noisy
                ys = [[statistics.mean(y[j] for y in ys[max(0, i - 4):i + 1]) for j in range(len(curves))] for i in range(len(ys))]
            line, = ax.plot(steps, [statistics.mean(y) for y in ys], label=label, marker="o" if k == 1 else None, ms=3)
            if len(seeds) > 1:
                ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], alpha=0.2, color=line.get_color())
    ax_loss.set(xlabel="step", ylabel="training cross-entropy (5-step mean)", yscale="log")
    ax_acc.set(xlabel="step", ylabel=accuracy_label)
    ax_acc.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path + ".tmp.png", dpi=90)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return True


def run_curves(run_dir: str) -> tuple:
    """(training cross-entropy by step, target accuracy by step, target set) of any run directory: the suite's
    curves for a user's own runs. The target is the run's first --eval_datasets entry, as in every script."""
    records = read_metrics(run_dir)
    steps = {r["step"]: r for r in records if "loss" in r and "event" not in r}  # a resumed run logs some steps twice
    config = next((r for r in records if r.get("event") == "config"), {})
    target = str(config.get("eval_datasets") or "").split(",")[0].partition("=")[0]
    key = f"eval/{target}/accuracy"
    curve = {r.get("step", 0): r[key] for r in records if r.get("event") in ("eval_before", "eval", "eval_after") and key in r}
    return {s: training_ce(r) for s, r in sorted(steps.items())}, dict(sorted(curve.items())), target


def plot_runs(runs: list, path: str) -> bool:
    """python results.py <run dirs> --plot out.png: one curve per run name, `<name>_s<seed>` directories as seeds."""
    groups, targets = {}, set()
    for run in sorted(runs):
        if not os.path.isfile(os.path.join(run, "metrics.jsonl")):
            raise SystemExit(f"error: {run}: no metrics.jsonl (not a run directory)")
        loss, curve, target = run_curves(run)
        targets.add(target)
        groups.setdefault(re.sub(r"_s\d+$", "", os.path.basename(os.path.normpath(run))), []).append((loss, curve))
    label = f"{' / '.join(sorted(t for t in targets if t)) or 'target'} accuracy, % (greedy, judge)"
    return draw(list(groups.items()), path, ", ".join(groups), label)


EXTRAS = {  # method-specific numbers: (label, record, key, scale, digits)
    "s3ft": [("targets from own answers %", "config", "method/own", 100, 1), ("from rewrites %", "config", "method/rewrite", 100, 1),
             ("gold kept %", "config", "method/gold", 100, 1), ("generation s (seed 0; cached after)", "config", "method/generate_s", 1, 0)],
    "fait": [("examples with a failing variant %", "config", "method/with_variant", 100, 1),
             ("generation + judging s (seed 0; cached after)", "config", "method/generate_s", 1, 0)],
    "soft": [(f"exit {n} accuracy %", "after", f"eval/math/exit{n}/accuracy", 100, 1) for n in (1, 2, 3)]
            + [("early exit (threshold 0.9) speed-up", "after", "method/threshold/speedup", 1, 2),
               ("its mean exit layer", "after", "method/threshold/mean_exit_layer", 1, 2),
               ("its accuracy %", "after", "method/threshold/accuracy", 100, 1), ("full model, same loop %", "after", "method/full/accuracy", 100, 1)],
    "sft_exits": [(f"exit {n} accuracy %", "after", f"eval/math/exit{n}/accuracy", 100, 1) for n in (1, 2, 3)],
    "roste": [("math loss, quantized", "after", "eval/math/loss", 1, 4), ("same weights, quantizers off", "after", "fp/eval/math/loss", 1, 4),
              ("math accuracy, quantizers off %", "after", "fp/eval/math/accuracy", 100, 1)],
    "sft_rtn": [("math loss, quantized", "after", "eval/math/loss", 1, 4), ("same weights, quantizers off", "after", "fp/eval/math/loss", 1, 4)],
    "sft": [("math held-out loss", "after", "eval/math/loss", 1, 4)],
    "drift_sft": [("cos(theta_end - theta_T, Delta)", "after", "method/param_cos", 1, 2),
                  ("distance to theta_R / |Delta|", "after", "method/distance_to_reasoning", 1, 2)],
    "drift": [("cos(theta_end - theta_T, Delta)", "after", "method/param_cos", 1, 2),
              ("distance to theta_R / |Delta|", "after", "method/distance_to_reasoning", 1, 2)],
}


def n_items(rows: dict, task: str) -> str:
    """How many prompts of an eval set the finished runs scored (from their per-item results)."""
    for runs in rows.values():
        for r in runs:
            if isinstance(r["after"].get(f"eval/{task}/correct"), str):
                return str(len(r["after"][f"eval/{task}/correct"]))
    return "?"


def group_table(rows: dict, group: str, rel, plots_dir: str) -> list:
    target, ood, held, _ = GROUPS[group]
    start = start_record(rows, group)
    lines = [f"| method | seeds | {target} (ID, n={n_items(rows, target)}) | {ood} (OOD, n={n_items(rows, ood)}) | held-out change "
             f"({', '.join(held)}) | train time (s) | tokens/s | peak memory (GiB) | wall (s) | plot |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    if start:
        lines.append(f"| starting model | | {100 * start[f'eval/{target}/accuracy']:.1f} | {100 * start[f'eval/{ood}/accuracy']:.1f} | 0 | | | | | |")
    for name, (label, g, _) in ROWS.items():
        if g != group or name not in rows:
            continue
        r = rows[name]
        png = os.path.join(plots_dir, f"{name}.png")
        link = f"[png]({rel(png)})" if os.path.exists(png) else ""
        lines.append(f"| {label} | {len(r)} | {pct(accuracy(rows, name, target))} | {pct(accuracy(rows, name, ood))} | "
                     f"{fmt(forgetting(rows, name), 100)} | {fmt([x['train_s'] for x in r], 1, 1)} | "
                     f"{fmt([x['tokens_per_s'] for x in r], 1, 0)} | {fmt([x['peak_gib'] for x in r], 1, 2)} | "
                     f"{fmt([x['wall_s'] for x in r], 1, 0)} | {link} |")
    return lines


def interval(ci: dict, scale: float = 100) -> tuple:
    if ci is None:
        return "n/a", "", "", ""
    return (f"{ci['diff'] * scale:+.1f} [{ci['lo'] * scale:+.1f}, {ci['hi'] * scale:+.1f}]", f"{ci['half'] * scale:.1f}",
            ci.get("sizes", str(ci["n_items"])) if ci["n_items"] > 1 else "-", str(ci["n_seeds"]))


def claims_table(rows: dict) -> list:
    lines = ["| method | paper's claim | measured here | difference, points [95% CI] | ± | n items | n seeds | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for m, c, t, ci, direction, v in claims(rows):
        lines.append(f"| {m} | {c} | {t} | " + " | ".join(interval(ci)) + f" | {v} |")
    return lines + [f"| {m} | {c} | {t} | | | | | not testable at this scale |" for m, c, t in NOT_TESTABLE]


def variance_table(rows: dict) -> list:
    """The 95% half-width of each accuracy difference with both sources resampled, items only, seeds only."""
    lines = ["| comparison | ± both | ± items only | ± seeds only | n items | n seeds |", "|---|---|---|---|---|---|"]
    for m, c, t, ci, _, _ in claims(rows):
        if ci and ci["n_items"] > 1:
            lines.append(f"| {m}: {c} | {100 * ci['half']:.2f} | {100 * ci['items_half']:.2f} | {100 * ci['seeds_half']:.2f} | "
                         f"{ci.get('sizes', ci['n_items'])} | {ci['n_seeds']} |")
    return lines


def grid_table(rows: dict) -> list:
    """The soup's ingredients: lr x steps x seed, validation accuracy (the soup's selection) and test accuracy."""
    soup = rows.get("soup_greedy", [{}])[0]
    select = {os.path.basename(os.path.dirname(r["model"])): r["select/accuracy"] for r in soup.get("ingredients", [])}
    lines = ["| ingredient | lr | steps | seed | validation (selection) | math test | kept by greedy |", "|---|---|---|---|---|---|---|"]
    kept = {os.path.basename(os.path.dirname(p)) for p in soup.get("kept", [])}
    for rid in select:
        r = next((x for runs in rows.values() for x in runs if x.get("id") == rid), None)
        if r:
            cfg = r["config"]
            lines.append(f"| {rid} | {cfg.get('lr', 0):g} | {cfg.get('steps')} | {cfg.get('seed')} | {100 * select[rid]:.1f} | "
                         f"{100 * r['after']['eval/math/accuracy']:.1f} | {'yes' if rid in kept else ''} |")
    return lines if len(lines) > 2 else []


WHAT_WOULD_CHANGE = [  # per claim: what the embedded world lacks, and the paper-scale recipe that tests it
    ("S3FT", "a pretrained instruct model whose own answers are correct but differ from GSM8K's gold wording, and a "
             "rewrite step that passes the judge (the world's 3M model rewrites nothing)", "benchmark/s3ft.sh"),
    ("FAIT", "a model that writes plausible wrong variants of real programs (the paper's 7B teacher), on MBPP/HumanEval",
             "benchmark/fait.sh"),
    ("DFT, ASFT, OTR", "a base model whose token probabilities on the gold are spread (here the base predicts most "
             "response tokens with p > 0.9, so the reweightings are near 1); the papers' 1-7 point gains are on "
             "Qwen2.5-Math and Llama models", "benchmark/dft.sh, benchmark/asft.sh, benchmark/otr.sh"),
    ("DRIFT", "the paper's lr (1e-6; the world trains at 1e-3, where the pull overshoots theta_R) and a reasoning "
              "model theta_R far from theta_T", "benchmark/drift.sh"),
    ("SoFT", "a deep model (24+ layers): with 4 layers every exit removes a quarter or more of the network; and "
             "for the early-exit speed-up, a timing on a quiet GPU rather than batch 1 on a shared 2-core CPU",
             "benchmark/sorted_ft.sh"),
    ("RoSTE", "real int4 kernels for the memory and latency claim; the accuracy claim is testable here, but at five "
              "seeds its interval touches 0 and is mostly the seeds' spread: more seeds, or a larger model, where "
              "RTN's W4A4KV4 loss is larger than here", "benchmark/roste.sh"),
    ("Greedy soup, LiNeS", "fine-tuned ingredients from a large pretrained model (the soup paper's CLIP/ViT), where "
                           "the loss basin is wide; here they are 3M-parameter models", "benchmark/merge.sh"),
]


def write_readme_block(rows: dict, suite: str, path: str):
    """Put the math table and the claims between the README's results markers (full suite only)."""
    begin, end = "<!-- results:begin (written by python results.py --suite full) -->", "<!-- results:end -->"
    with open(path) as f:
        text = f.read()
    if begin not in text or end not in text:
        return
    rel = lambda p: os.path.relpath(p, HERE)
    seeds = max(len(rows.get(n, [])) for n in ("sft", "s3ft", "dft"))
    block = "\n".join([begin, "", f"Math, every method from the base model, {SUITES[suite]['steps']} steps x 32, "
                       f"up to {seeds} seeds (code, DRIFT and verbose-gold groups, per-task columns and plots: [RESULTS.md](RESULTS.md)):", "",
                       *group_table(rows, "math", rel, os.path.join(HERE, "results")), "", *claims_table(rows), "", end])
    text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_report(suite: str, rows: dict, out: str, plots_dir: str, total_wall: float, planned: int = 0, records_path: str = ""):
    b = SUITES[suite]
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(out)))
    records = [r for runs in rows.values() for r in runs if r.get("commit")]
    commits = sorted({r["commit"] for r in records}) or [commit()]
    machines = sorted({r["machine"] for r in records}) or [machine()]
    dates = sorted({r["date"] for r in records}) or [time.strftime("%Y-%m-%d")]
    finished = sum(len(runs) for name, runs in rows.items() if name != "drift_merge")
    lines = [f"# Results: every method on the embedded world, side by side ({suite} suite)", "",
             f"Written by `python results.py --suite {suite}` from {finished} finished runs" + (f" of {planned}" if planned else "")
             + f" (commit {', '.join(commits)}; {'; '.join(machines)}; float32; {', '.join(dates)}); the runs' summed wall "
             f"time {total_wall / 60:.0f} min, one at a time. Every number below is read from the runs' records in "
             f"`{rel(records_path or os.path.join(HERE, 'results', 'records'))}` (written by the suite as each run ends; rerun the command "
             "to reproduce them: it skips the runs that have a record).", "",
             f"**Budget, the same for every method of a group**: {b['steps']} steps x 32 samples, lr 1e-3, cosine, "
             f"seeds 0-{b['seeds'] - 1}, each script's defaults otherwise (the code group: one epoch, as FAIT's paper). "
             "Accuracy: greedy decoding judged by the task's checker, the final evaluation on "
             + ("the whole test splits" if not b["eval_samples"] else f"the first {b['eval_samples']} prompts of each test split")
             + f" (n in each column header); the during-training curves in the plots on the first {b['eval_every_samples']} "
             "prompts of the target split only (the same prompts at every point); mean ± std over seeds. **Held-out change** = "
             "accuracy after minus the group's starting model, averaged over the tasks not trained on (forgetting is "
             "negative). Train time and tokens/s: the optimizer steps only (tokens/s without step 1, which compiles); wall: "
             "the whole process (data generation, evaluations, saving); peak memory: the process's peak resident set on CPU.", ""]
    for group, heading in (("math", "Math: every method from the base model on math"),
                           ("verbose", "S3FT's condition: math gold written in a verbose style the base model does not produce"),
                           ("code", "Code: FAIT against SFT from the base model on code, one epoch"),
                           ("drift", "DRIFT: the code model (theta_T) learns math with the math SFT model (theta_R) as the prior")):
        target, ood, held, _ = GROUPS[group]
        start = start_record(rows, group)
        lines += [f"## {heading}", "", *group_table(rows, group, rel, plots_dir)]
        overview = os.path.join(plots_dir, f"group_{group}.png")
        if os.path.exists(overview):
            lines += ["", f"All of the group's training runs in one plot: [group_{group}.png]({rel(overview)})"]
        lines += ["", "Each held-out task, accuracy %:", "", "| method | " + " | ".join(f"{t} (n={n_items(rows, t)})" for t in held)
                  + " |", "|---|" + "---|" * len(held)]
        if start:
            lines.append("| starting model | " + " | ".join(f"{100 * start[f'eval/{t}/accuracy']:.1f}" for t in held) + " |")
        lines += [f"| {label} | " + " | ".join(pct(accuracy(rows, name, t)) for t in held) + " |"
                  for name, (label, g, _) in ROWS.items() if g == group and name in rows]
        lines.append("")
    grid = grid_table(rows)
    if grid:
        lines += ["## The soup's ingredients", "", "A grid of lr x steps x seed from the base model on math (the SFT runs "
                  f"are its lr 1e-3, {b['steps']}-step points); the greedy soup orders and accepts them on the validation "
                  "split.", "", *grid, ""]
    lines += ["## The papers' claims beside our measurements", "",
              "Each row is a paired difference, method minus its comparison, on the same seeds (seed s against seed s) and "
              "the same items, in accuracy points (the speed-up row: the speed-up minus 1, in percent, over seeds). The interval is a 95% percentile bootstrap "
              "that resamples seeds and items together (2,000 draws; the world's code test has 4 rows of asserts per "
              "function, resampled as one cluster). **Verdict**: reproduced only when the interval excludes 0 in the "
              "claimed direction; opposite when it excludes 0 the other way; within noise otherwise. One small model, "
              "one budget: reproduced is not a reproduction of the paper's size of effect.", "", *claims_table(rows), "",
              "### Where the interval's width comes from", "",
              "The same bootstrap with only the items resampled (seeds fixed) and only the seeds resampled (items "
              "fixed). The target was a half-width of at most 1.5 points on the math comparisons; where the seeds' part "
              "is the larger, more items do not narrow it, only more seeds.", "", *variance_table(rows), "",
              "## What would change the verdict", "",
              "Claims this world cannot test as the papers did, and the paper-scale recipe that tests each "
              "([benchmark/README.md](benchmark/README.md); none has been run here):", ""]
    lines += [f"- **{m}**: needs {why}. Recipe: `{recipe}`." for m, why, recipe in WHAT_WOULD_CHANGE]
    lines += ["", "## Method-specific measurements", ""]
    for name, extras in EXTRAS.items():
        if name in rows:
            once = lambda key: rows[name][:1] if key.endswith("generate_s") else rows[name]  # later seeds read the cache
            values = [f"{label} {fmt([r[rec].get(key) for r in once(key)], scale, digits) or 'n/a'}"
                      for label, rec, key, scale, digits in extras]
            lines.append(f"- **{ROWS[name][0]}** ({ROWS[name][1]} group): " + "; ".join(values))
    with open(out + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(out + ".tmp", out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run directories (output_dir of a finished run) to print as a table")
    parser.add_argument("--metrics", nargs="*", help="table columns (default: every eval/<set>/accuracy, then the target loss)")
    parser.add_argument("--suite", choices=sorted(SUITES), help="run the suite (skipping finished runs) and write its report")
    parser.add_argument("--report", action="store_true", help="only write the report from the suite's finished runs")
    parser.add_argument("--root", help="where the suite's runs go (default runs/results/<suite>)")
    parser.add_argument("--out", help="the report (default: RESULTS.md for the full suite, <root>/RESULTS.md otherwise)")
    parser.add_argument("--plot", help="with run directories: also write their curves (training loss, target accuracy) to this PNG")
    args = parser.parse_args()
    if not args.suite:
        if not args.runs:
            parser.error("give run directories, or --suite full|quick")
        if args.plot:
            if not matplotlib_available():
                raise SystemExit("error: --plot needs matplotlib (pip install -r requirements-extras.txt)")
            plot_runs(args.runs, args.plot)
            print(f"wrote {args.plot}")
        return print_table(args.runs, args.metrics)
    root = os.path.abspath(args.root or os.path.join(HERE, "runs", "results", args.suite))
    out = args.out or (os.path.join(HERE, "RESULTS.md") if args.suite == "full" else os.path.join(root, "RESULTS.md"))
    plots_dir = os.path.join(os.path.dirname(os.path.abspath(out)), "results" if args.suite == "full" else "plots")
    default_root = os.path.abspath(os.path.join(HERE, "runs", "results", args.suite))
    runs = suite_runs(args.suite, root, records_dir(args.suite, root, default_root))
    if not args.report:
        run_suite(runs, os.path.join(root, "logs"))
    rows = collect(runs)
    total = sum(x["wall_s"] or 0 for r in rows.values() for x in r)
    drawn = [name for name, (_, g, script) in ROWS.items() if script and g in GROUPS and name in rows and rows[name][0]["loss"]]
    for name in drawn:
        group = ROWS[name][1]
        baseline = {"math": "sft", "verbose": "sft_verbose", "code": "sft_code", "drift": "drift_sft", "grid": "sft"}[group]
        plot(rows, [baseline, name] if name != baseline else [name], os.path.join(plots_dir, f"{name}.png"),
             f"{ROWS[name][0]} ({group} group)")
    for group in GROUPS:
        plot(rows, [n for n in drawn if ROWS[n][1] == group], os.path.join(plots_dir, f"group_{group}.png"), f"{group} group")
    write_report(args.suite, rows, out, plots_dir, total, len(runs), records_dir(args.suite, root, default_root))
    if args.suite == "full" and not args.out:
        write_readme_block(rows, args.suite, os.path.join(HERE, "README.md"))
    print(f"wrote {out} ({len(drawn)} methods plotted in {plots_dir})")


if __name__ == "__main__":
    main()
