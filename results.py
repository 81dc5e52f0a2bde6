"""Results: every method on the embedded world, same model, data, judge and budget, side by side in RESULTS.md.

    python results.py --suite full          # 3 seeds x every method, 90 min on 2 CPU cores: RESULTS.md and results/*.png
    python results.py --suite quick         # 1 seed, 8 steps on a data subset, ~7 min: runs/results/quick/RESULTS.md
    python results.py --suite full --report # rewrite RESULTS.md from the finished runs only (no training)
    python results.py runs/study/code30_*   # any finished runs as a table: one row per name, `<name>_s<seed>` are seeds
    python results.py runs/my_* --plot my.png  # and their curves, the suite's plots for your own runs

The suite runs each method script as its own process (`python <script>.py ...`, the same command a user types; each
run's command is in its metrics.jsonl config and in <run>/suite.json) into runs/results/<suite>/<run>_s<seed>, one at a
time so that timings are not shared, and skips runs that have finished: a killed suite resumes where it stopped
(training runs with --resume auto). Generated data (S3FT's targets, FAIT's variants) is cached inside the suite's
directory, so a fresh suite pays for it. Then it reads every metrics.jsonl and writes the table, the paper claims with
a verdict computed from the numbers, and plots (matplotlib, optional: without it the table has no plots).
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
    "full": dict(seeds=3, steps=100, code_steps=30, eval_every=25, code_eval_every=10, eval_samples=0, train_samples=0,
                 search_samples=128, early_exit_prompts=50),
    "quick": dict(seeds=1, steps=8, code_steps=4, eval_every=4, code_eval_every=2, eval_samples=10, train_samples=160,
                  search_samples=16, early_exit_prompts=5),
}
CODE_EVALS = ",".join(f"{n}={os.path.join(DATA, t, s + '.jsonl')}" for n, t, s in [
    ("code", "code", "test"), ("code_ood", "code", "test_ood"), ("math", "math", "test"), ("rc", "rc", "test"),
    ("knowledge", "knowledge", "test")])
# group: target task, its OOD split, the held-out tasks (forgetting), the run whose eval_before is the starting model
GROUPS = {"math": ("math", "math_ood", ["code", "rc", "knowledge"], "sft"),
          "code": ("code", "code_ood", ["math", "rc", "knowledge"], "sft_code"),
          "drift": ("math", "math_ood", ["code", "rc", "knowledge"], "drift_sft")}
# row: (label, group, script); rows without a script are read from another run's records
ROWS = {
    "sft": ("SFT", "math", "sft.py"), "s3ft": ("S3FT", "math", "s3ft.py"), "dft": ("DFT", "math", "asft.py"),
    "asft": ("ASFT", "math", "asft.py"), "otr": ("OTR", "math", "otr.py"), "soft": ("SoFT (full depth)", "math", "sorted_ft.py"),
    "roste": ("RoSTE, W4A4KV4 quantized", "math", "roste.py"),
    "sft_rtn": ("SFT then RTN W4A4KV4 (eval only)", "math", "roste.py"),
    "sft_exits": ("SFT, its layers read as exits (eval only)", "math", "sorted_ft.py"),
    "soup_uniform": ("uniform soup of the SFT runs", "math", "merge.py"),
    "soup_greedy": ("greedy soup of the SFT runs", "math", "merge.py"),
    "lines": ("LiNeS (alpha 0.25) of each SFT run", "math", "merge.py"),
    "sft_code": ("SFT", "code", "sft.py"), "fait": ("FAIT (self-mined variants)", "code", "fait.py"),
    "drift_merge": ("naive merge theta_T + 0.5 Delta", "drift", None),
    "drift_sft": ("SFT from theta_T (`--alpha 0`)", "drift", "drift.py"), "drift": ("DRIFT", "drift", "drift.py"),
}


@dataclasses.dataclass
class Run:
    name: str
    seed: int
    args: list
    root: str

    @property
    def dir(self) -> str:
        return os.path.join(self.root, f"{self.name}_s{self.seed}")

    @property
    def script(self) -> str:
        return ROWS[self.name][2]

    def done(self) -> bool:
        path = os.path.join(self.dir, "metrics.jsonl")
        return os.path.exists(path) and any(r.get("event") == "eval_after" for r in read_metrics(self.dir))


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


def suite_runs(suite: str, root: str) -> list:
    """Every run of a suite in the order they must happen (the merges and DRIFT read earlier runs' models)."""
    b = SUITES[suite]
    seeds = range(b["seeds"])
    math_data = subset(os.path.join(DATA, "math", "train.jsonl"), b["train_samples"], root)
    code_data = subset(os.path.join(DATA, "code", "train.jsonl"), b["train_samples"] // 2, root)
    cache = ["--cache_dir", os.path.join(root, "cache")]
    final = lambda name, seed: os.path.join(root, f"{name}_s{seed}", "final")

    def train(steps, every, seed, first=False):
        return ["--steps", str(steps), "--seed", str(seed), "--eval_samples", str(b["eval_samples"]),
                "--eval_every", str(every), "--eval_before", str(first).lower()]

    math = lambda s, first=False: train(b["steps"], b["eval_every"], s, first) + ["--dataset", math_data]
    code = lambda s, first=False: (train(b["code_steps"], b["code_eval_every"], s, first)
                                   + ["--dataset", code_data, "--eval_datasets", CODE_EVALS])
    evaluate = lambda s: ["--steps", "0", "--seed", str(s), "--eval_samples", str(b["eval_samples"]), "--eval_before", "false"]
    runs = []
    add = lambda name, seed, args: runs.append(Run(name, seed, args, root))
    for s in seeds:
        add("sft", s, math(s, first=s == 0))  # seed 0 also scores the base model: the starting row
        add("sft_code", s, code(s, first=s == 0))
    for s in seeds:
        add("s3ft", s, math(s) + cache)
        add("dft", s, math(s) + ["--mode", "dft"])
        add("asft", s, math(s) + ["--mode", "asft"])
        add("otr", s, math(s))
        add("soft", s, math(s) + ["--early_exit_prompts", str(b["early_exit_prompts"])])
        add("roste", s, math(s) + ["--search_samples", str(b["search_samples"])])
        add("fait", s, code(s) + cache)
        drift = ["--model", final("sft_code", 0), "--reasoning_model", final("sft", 0)]  # theta_T: code, theta_R: math
        add("drift_sft", s, math(s, first=s == 0) + drift + ["--alpha", "0", "--edit_per", "micro_batch"])  # alpha 0: no edit
        add("drift", s, math(s) + drift + (["--merge_lambdas", "0.5"] if s == 0 else []))
    for s in seeds:
        add("sft_rtn", s, evaluate(s) + ["--model", final("sft", s), "--qat", "false", "--rotation", "none",
                                          "--search_samples", str(b["search_samples"]), "--dataset", math_data])
        add("sft_exits", s, evaluate(s) + ["--model", final("sft", s), "--exits", "4", "--eval_exits", "1,2,3",
                                            "--early_exit_prompts", "0", "--dataset", math_data])
        add("lines", s, ["--method", "lines", "--alpha", "0.25", "--models", final("sft", s), "--base",
                         os.path.join(HERE, "world", "base"), "--eval_samples", str(b["eval_samples"])])
    # soups need several models fine-tuned from one start: the SFT seeds (quick suite: SFT, DFT and OTR of seed 0)
    ingredients = [final("sft", s) for s in seeds] if len(seeds) > 1 else [final(n, 0) for n in ("sft", "dft", "otr")]
    for method in ("uniform", "greedy"):
        add(f"soup_{method}", 0, ["--method", method, "--models", ",".join(ingredients),
                                  "--eval_samples", str(b["eval_samples"]), "--select_samples", str(b["eval_samples"])])
    return runs


def execute(run: Run, log_dir: str) -> float:
    """Run one script to completion (resuming its checkpoint if any); returns the wall time in seconds."""
    command = [sys.executable, os.path.join(HERE, run.script), *run.args, "--output_dir", run.dir]
    # a killed training run continues its checkpoint; a killed merge is recomputed whole (finished runs are skipped)
    command += ["--resume", "auto"] if run.script != "merge.py" else ["--overwrite", "true"]
    os.makedirs(log_dir, exist_ok=True)
    log = os.path.join(log_dir, f"{run.name}_s{run.seed}.log")
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


def summarize(run: Run) -> dict:
    """One run's numbers: final accuracies, curves, time, throughput, memory."""
    records = read_metrics(run.dir)
    steps = {r["step"]: r for r in records if "loss" in r and "event" not in r}  # a resumed run logs some steps twice
    after = [r for r in records if r.get("event") == "eval_after"][-1]
    target = GROUPS[ROWS[run.name][1]][0]
    key = f"eval/{target}/accuracy"
    curve = {r.get("step", 0): r[key] for r in records if r.get("event") in ("eval_before", "eval", "eval_after") and key in r}
    dts = {s: r["tokens"] / r["tokens_per_s"] for s, r in steps.items() if r.get("tokens_per_s")}
    timed = [s for s in dts if s > 1]  # step 1 includes torch.compile's first compilation
    wall = None
    if os.path.exists(os.path.join(run.dir, "suite.json")):
        with open(os.path.join(run.dir, "suite.json")) as f:
            wall = json.load(f)["wall_s"]
    return {"after": after, "before": next((r for r in records if r.get("event") == "eval_before"), None),
            "config": next((r for r in records if r.get("event") == "config"), {}),
            "merges": [r for r in records if r.get("event") == "eval_merge"],
            "ingredients": [r for r in records if r.get("event") == "ingredient"],
            "loss": {s: training_ce(r) for s, r in sorted(steps.items())}, "curve": dict(sorted(curve.items())),
            "train_s": sum(dts.values()) if dts else None,
            "tokens_per_s": sum(steps[s]["tokens"] for s in timed) / sum(dts[s] for s in timed) if timed else None,
            "wall_s": wall, "peak_gib": after.get("peak_memory_gib")}


def collect(runs: list) -> dict:
    """name -> list of per-seed summaries, for the runs that have finished."""
    out = {}
    for run in runs:
        if run.done():
            out.setdefault(run.name, []).append(summarize(run))
    merges = out["drift"][0]["merges"] if "drift" in out else []
    if merges:  # the naive merge is evaluated by drift.py (seed 0) before it trains
        out["drift_merge"] = [{"after": merges[0], "before": None, "config": {}, "ingredients": [], "loss": {}, "curve": {}, "train_s": None,
                               "tokens_per_s": None, "wall_s": None, "peak_gib": None}]
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


# ============================================================ PAPER CLAIMS, JUDGED BY THE NUMBERS
def difference(a: list, b: list) -> tuple:
    """(mean(a) - mean(b), standard error of that difference over seeds) or (None, None) when a run is missing."""
    a, b = [v for v in a if v is not None], [v for v in b if v is not None]
    if not a or not b:
        return None, None
    var = lambda x: statistics.variance(x) / len(x) if len(x) > 1 else 0.0
    return statistics.mean(a) - statistics.mean(b), (var(a) + var(b)) ** 0.5


def verdict(checks: list) -> str:
    """checks: (difference, its standard error, strict). All in the claimed direction -> reproduced in direction."""
    if any(d is None for d, _, _ in checks):
        return "not run"
    held = all(d > 0 if strict else d >= 0 for d, _, strict in checks)
    noisy = any(se and abs(d) < 2 * se for d, se, _ in checks)
    return ("reproduced in direction" if held else "not reproduced") + (" (a difference within 2 SE of seed noise)" if noisy else "")


def pct(values: list) -> str:
    return fmt(values, 100) or "n/a"


def claims(rows: dict) -> list:
    """(method, the paper's headline claim, what we measured, verdict) rows."""
    acc = lambda name: accuracy(rows, name, GROUPS[ROWS[name][1]][0])  # on its group's target task
    out = []

    def pair(method, claim, a, b, label_a, label_b, strict=True):
        d, se = difference(acc(a), acc(b))
        text = f"{GROUPS[ROWS[a][1]][0]} accuracy: {label_a} {pct(acc(a))} vs {label_b} {pct(acc(b))}"
        out.append((method, claim, text, verdict([(d, se, strict)])))

    f_s3, f_sft = forgetting(rows, "s3ft"), forgetting(rows, "sft")
    out.append(("S3FT", "smaller generalization drop than SFT, at higher in-domain accuracy",
                f"math: S3FT {pct(acc('s3ft'))} vs SFT {pct(acc('sft'))}; held-out change: S3FT {pct(f_s3)} vs SFT {pct(f_sft)} points",
                verdict([(*difference(acc("s3ft"), acc("sft")), False), (*difference(f_s3, f_sft), True)])))
    pair("FAIT", "higher pass@1 than SFT", "fait", "sft_code", "FAIT", "SFT")
    pair("DFT", "DFT > SFT", "dft", "sft", "DFT", "SFT")
    pair("ASFT", "ASFT >= DFT (and > SFT)", "asft", "dft", "ASFT", "DFT", strict=False)
    pair("OTR", "OTR > SFT", "otr", "sft", "OTR", "SFT")
    merge = acc("drift_merge")
    d1, d2 = difference(acc("drift"), acc("drift_sft")), difference(acc("drift_sft"), merge)
    out.append(("DRIFT", "DRIFT > SFT > naive merge (from the same start)",
                f"math: DRIFT {pct(acc('drift'))}, SFT {pct(acc('drift_sft'))}, merge lambda 0.5 {pct(merge)}",
                verdict([(*d1, True), (*d2, True)])))
    exits = lambda name: [statistics.mean(r["after"][f"eval/math/exit{n}/accuracy"] for n in (1, 2, 3))
                          if "eval/math/exit1/accuracy" in r["after"] else None for r in rows.get(name, [])]
    out.append(("SoFT", "sub-models (the first n layers) are useful without further training",
                f"math accuracy of exits 1-3, mean: SoFT {pct(exits('soft'))} vs SFT's layers {pct(exits('sft_exits'))}",
                verdict([(*difference(exits("soft"), exits("sft_exits")), True)])))
    speed = [r["after"].get("method/threshold/speedup") for r in rows.get("soft", [])]
    thr = [r["after"].get("method/threshold/accuracy") for r in rows.get("soft", [])]
    full = [r["after"].get("method/full/accuracy") for r in rows.get("soft", [])]
    out.append(("SoFT", "early exit decodes faster than the full model",
                f"threshold 0.9: {fmt(speed, 1, 2)}x the full model's tokens/s (batch 1), accuracy {pct(thr)} vs {pct(full)}",
                verdict([(*difference(speed, [1.0] * len(speed)), True)])))
    pair("RoSTE", "RoSTE > SFT then quantization (W4A4KV4)", "roste", "sft_rtn", "RoSTE", "SFT + RTN")
    # the best single model is the one the soup paper names: best on the held-out selection set, scored on test
    ingredients = rows["soup_greedy"][0]["ingredients"] if rows.get("soup_greedy") else []
    chosen = os.path.dirname(max(ingredients, key=lambda r: r["select/accuracy"])["model"]) if ingredients else None
    single = [r["after"]["eval/math/accuracy"] for runs in rows.values() for r in runs
              if chosen and os.path.abspath(r["config"].get("output_dir", "")) == chosen]
    g, u = acc("soup_greedy"), acc("soup_uniform")
    out.append(("Greedy soup", "greedy soup >= best single model > uniform soup",
                f"math: greedy {pct(g)}, best single by validation {pct(single)} (best on test "
                f"{pct([max(acc('sft'))] if acc('sft') else [])}), uniform {pct(u)}",
                verdict([(*difference(g, single), False), (*difference(single, u), True)])))
    f_lines = forgetting(rows, "lines")
    out.append(("LiNeS", "less forgetting than fine-tuning (keeping most of the target gain)",
                f"held-out change: LiNeS {pct(f_lines)} vs SFT {pct(f_sft)} points; math {pct(acc('lines'))} vs {pct(acc('sft'))}",
                verdict([(*difference(f_lines, f_sft), True)])))
    out.append(("RoSTE", "4-bit weights, activations and KV cache cut inference memory and latency",
                "fake quantization only (no int4 kernels here)", "not testable at this scale"))
    out.append(("DRIFT", "gains on multimodal reasoning benchmarks (MathVista, MathVerse, ...)",
                "the embedded world has no images", "not testable at this scale"))
    return out


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


def group_table(rows: dict, group: str, rel, plots_dir: str) -> list:
    target, ood, held, _ = GROUPS[group]
    start = start_record(rows, group)
    lines = [f"| method | {target} (ID) | {ood} (OOD) | held-out change ({', '.join(held)}) | train time (s) | tokens/s | "
             "peak memory (GiB) | wall (s) | plot |", "|---|---|---|---|---|---|---|---|---|"]
    if start:
        lines.append(f"| starting model | {100 * start[f'eval/{target}/accuracy']:.1f} | {100 * start[f'eval/{ood}/accuracy']:.1f} | 0 | | | | | |")
    for name, (label, g, _) in ROWS.items():
        if g != group or name not in rows:
            continue
        r = rows[name]
        png = os.path.join(plots_dir, f"{name}.png")
        link = f"[png]({rel(png)})" if os.path.exists(png) else ""
        lines.append(f"| {label} | {pct(accuracy(rows, name, target))} | {pct(accuracy(rows, name, ood))} | "
                     f"{fmt(forgetting(rows, name), 100)} | {fmt([x['train_s'] for x in r], 1, 1)} | "
                     f"{fmt([x['tokens_per_s'] for x in r], 1, 0)} | {fmt([x['peak_gib'] for x in r], 1, 2)} | "
                     f"{fmt([x['wall_s'] for x in r], 1, 0)} | {link} |")
    return lines


def claims_table(rows: dict) -> list:
    return (["| method | paper's claim | measured here | verdict |", "|---|---|---|---|"]
            + [f"| {m} | {c} | {t} | {v} |" for m, c, t, v in claims(rows)])


def write_readme_block(rows: dict, suite: str, path: str):
    """Put the math table and the claims between the README's results markers (full suite only)."""
    begin, end = "<!-- results:begin (written by python results.py --suite full) -->", "<!-- results:end -->"
    with open(path) as f:
        text = f.read()
    if begin not in text or end not in text:
        return
    rel = lambda p: os.path.relpath(p, HERE)
    block = "\n".join([begin, "", f"Math, every method from the base model, {SUITES[suite]['steps']} steps x 32, "
                       f"{SUITES[suite]['seeds']} seeds (code and DRIFT groups, per-task columns and plots: [RESULTS.md](RESULTS.md)):", "",
                       *group_table(rows, "math", rel, os.path.join(HERE, "results")), "", *claims_table(rows), "", end])
    text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_report(suite: str, rows: dict, out: str, plots_dir: str, total_wall: float):
    import torch
    b = SUITES[suite]
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(out)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    lines = [f"# Results: every method on the embedded world, side by side ({suite} suite)", "",
             f"Written by `python results.py --suite {suite}` at commit `{commit or '?'}` on {time.strftime('%Y-%m-%d')}: "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, float32; "
             f"the suite's wall time {total_wall / 60:.0f} min (runs one at a time). Every number below is read from the "
             f"runs' metrics.jsonl in `{rel(os.path.join(HERE, 'runs', 'results', suite))}`; rerun the command to reproduce it.", "",
             f"**Budget, the same for every method of a group**: {b['steps']} steps x 32 samples, lr 1e-3, cosine, "
             f"seeds 0-{b['seeds'] - 1}, each script's defaults otherwise (the code group: {b['code_steps']} steps, since "
             f"the code task is learnt within ~30). Accuracy: greedy decoding judged by the task's checker, on "
             + ("the whole test splits" if not b["eval_samples"] else f"the first {b['eval_samples']} prompts of each test split")
             + "; mean ± std over seeds. **Held-out change** = accuracy after minus the group's starting model, averaged "
             "over the tasks not trained on (forgetting is negative). Train time and tokens/s: the optimizer steps only "
             "(tokens/s without step 1, which compiles); wall: the whole process (data generation, evaluations, saving); "
             "peak memory: the process's peak resident set on CPU (CUDA allocator peak on a GPU).", ""]
    for group, heading in (("math", "Math: every method from the base model on math"),
                           ("code", "Code: FAIT against SFT from the base model on code"),
                           ("drift", "DRIFT: the code model (theta_T) learns math with the math SFT model (theta_R) as the prior")):
        target, ood, held, _ = GROUPS[group]
        start = start_record(rows, group)
        lines += [f"## {heading}", "", *group_table(rows, group, rel, plots_dir)]
        overview = os.path.join(plots_dir, f"group_{group}.png")
        if os.path.exists(overview):
            lines += ["", f"All of the group's training runs in one plot: [group_{group}.png]({rel(overview)})"]
        lines += ["", "Each held-out task, accuracy %:", "", "| method | " + " | ".join(held) + " |", "|---|" + "---|" * len(held)]
        if start:
            lines.append("| starting model | " + " | ".join(f"{100 * start[f'eval/{t}/accuracy']:.1f}" for t in held) + " |")
        lines += [f"| {label} | " + " | ".join(pct(accuracy(rows, name, t)) for t in held) + " |"
                  for name, (label, g, _) in ROWS.items() if g == group and name in rows]
        lines.append("")
    lines += ["## The papers' headline claims beside our measurements", "",
              "The verdict is computed from the numbers above (the sign of the mean difference; a note where it is "
              "within 2 standard errors over seeds). One small model, one budget: reproduced in direction is not "
              "a reproduction of the paper's size of effect.", "",
              *claims_table(rows), "", "## Method-specific measurements", ""]
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
    runs = suite_runs(args.suite, root)
    t0 = time.time()
    for k, run in enumerate(runs):
        if args.report or run.done():
            continue
        print(f"[{k + 1}/{len(runs)}] {run.name} seed {run.seed}: python {run.script} ... ({(time.time() - t0) / 60:.1f} min so far)", flush=True)
        wall = execute(run, os.path.join(root, "logs"))
        print(f"[{k + 1}/{len(runs)}] {run.name} seed {run.seed}: done in {wall:.0f} s", flush=True)
    rows = collect(runs)
    total = sum(x["wall_s"] or 0 for r in rows.values() for x in r)
    drawn = [name for name, (_, _, script) in ROWS.items() if script and name in rows and rows[name][0]["loss"]]
    for name in drawn:
        group = ROWS[name][1]
        baseline = {"math": "sft", "code": "sft_code", "drift": "drift_sft"}[group]
        plot(rows, [baseline, name] if name != baseline else [name], os.path.join(plots_dir, f"{name}.png"),
             f"{ROWS[name][0]} ({group} group)")
    for group in GROUPS:
        plot(rows, [n for n in drawn if ROWS[n][1] == group], os.path.join(plots_dir, f"group_{group}.png"), f"{group} group")
    write_report(args.suite, rows, out, plots_dir, total)
    if args.suite == "full" and not args.out:
        write_readme_block(rows, args.suite, os.path.join(HERE, "README.md"))
    print(f"wrote {out} ({len(drawn)} methods plotted in {plots_dir})")


if __name__ == "__main__":
    main()
