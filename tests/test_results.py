"""results.py: the suite's arithmetic (forgetting, throughput, paired bootstrap intervals, verdicts, records and
resuming) on hand-written metrics files."""
import json
import os
import statistics
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import results  # noqa: E402

HELD = ["code", "rc", "knowledge"]
N = 20  # items per eval set in these hand-written runs


def items(acc: float, shift: int = 0) -> str:
    """A per-item result string of N items with round(acc x N) ones, rotated by `shift`."""
    k = round(acc * N)
    s = "1" * k + "0" * (N - k)
    return s[shift:] + s[:shift]


def write_run(root, name, seed, target_acc, held_acc, before=None, steps=((1, 100, 10.0), (2, 300, 100.0), (3, 300, 150.0)),
              resumed_step=None, wall=12.0, shift=0, config=None):
    """A finished run: step records (step, tokens, tokens_per_s), an eval curve on the first 10 items, eval_after with
    per-item results; optional eval_before."""
    run = results.Run(name, seed, [], str(root))
    os.makedirs(run.dir)
    records = [{"event": "config", "seed": seed, "eval_every_samples": 10, "output_dir": run.dir, **(config or {})}]
    scored = lambda accs: {**{f"eval/{t}/accuracy": a for t, a in accs.items()},
                           **{f"eval/{t}/correct": items(a, shift) for t, a in accs.items()}}
    if before:
        records.append({"event": "eval_before", "step": 0, **scored(before)})
    for step, tokens, tps in steps:
        records.append({"step": step, "loss": 1.0 / step, "tokens": tokens, "tokens_per_s": tps})
    if resumed_step:  # a resumed run logs a step again: the later record wins
        records.append({"step": resumed_step[0], "loss": 9.0, "tokens": resumed_step[1], "tokens_per_s": resumed_step[2]})
    records.append({"event": "eval", "step": 2, "eval/math/accuracy": target_acc / 2})
    records.append({"event": "eval_after", "step": 3, **scored({"math": target_acc, "math_ood": 0.05, **dict(zip(HELD, held_acc))}),
                    "peak_memory_gib": 1.5})
    with open(os.path.join(run.dir, "metrics.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n")
    with open(os.path.join(run.dir, "suite.json"), "w") as f:
        json.dump({"wall_s": wall, "command": []}, f)
    return run


BASE = {"math": 0.1, "math_ood": 0.0, "code": 0.3, "rc": 0.2, "knowledge": 0.1}


def test_summary_throughput_curve_and_resume(tmp_path):
    run = write_run(tmp_path, "sft", 0, 0.4, [0.1, 0.1, 0.1], before=BASE, resumed_step=(3, 600, 200.0))
    s = results.summarize(run)
    assert s["loss"] == {1: 1.0, 2: 0.5, 3: 9.0}  # step 3's second record replaces the first
    assert s["train_s"] == pytest.approx(100 / 10 + 300 / 100 + 600 / 200)
    assert s["tokens_per_s"] == pytest.approx((300 + 600) / (3 + 3))  # step 1 (compilation) left out
    # the curve is on the first 10 items at every point: before and after from their per-item results
    assert s["curve"] == {0: 0.2, 2: 0.2, 3: 0.8} and s["wall_s"] == 12.0 and s["peak_gib"] == 1.5
    assert run.done() and not os.path.exists(run.record)
    unfinished = results.Run("dft", 0, [], str(tmp_path))
    os.makedirs(unfinished.dir)
    open(os.path.join(unfinished.dir, "metrics.jsonl"), "w").write(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert not unfinished.done()


def direct_bootstrap(d: np.ndarray, draws: int, rng) -> np.ndarray:
    """The slow formula: draw seeds and items with replacement, the mean of the drawn sub-matrix."""
    out = []
    for _ in range(draws):
        rows, cols = rng.integers(0, d.shape[0], d.shape[0]), rng.integers(0, d.shape[1], d.shape[1])
        out.append(d[np.ix_(rows, cols)].mean())
    return np.array(out)


def test_paired_bootstrap_matches_the_direct_resampling_and_its_limits():
    rng = np.random.default_rng(1)
    # 3 seeds x 400 items: a per-seed offset (training variance) plus per-item noise
    d = (rng.integers(-1, 2, size=(3, 400)) + np.array([[0.0], [0.3], [-0.2]])).astype(np.float64)
    ci = results.paired_bootstrap([(d, list(range(400)))], draws=4000)
    slow = direct_bootstrap(d, 4000, np.random.default_rng(2))
    assert ci["diff"] == pytest.approx(d.mean())
    assert ci["lo"] == pytest.approx(np.percentile(slow, 2.5), abs=0.03) and ci["hi"] == pytest.approx(np.percentile(slow, 97.5), abs=0.03)
    assert ci["half"] > ci["items_half"] and ci["seeds_half"] > ci["items_half"] and ci["n_seeds"] == 3 and ci["n_items"] == 400
    # one seed: only items vary; the half-width is the normal one, 1.96 sd / sqrt(n)
    one = results.paired_bootstrap([(d[:1], list(range(400)))], draws=4000)
    assert one["seeds_half"] == 0 and one["half"] == pytest.approx(1.96 * d[0].std() / 20, rel=0.1)
    # rows constant over items: only the seeds vary
    flat = results.paired_bootstrap([(np.repeat(np.array([[0.1], [0.2], [0.6]]), 50, 1), list(range(50)))])
    assert flat["items_half"] == pytest.approx(0, abs=1e-12) and flat["seeds_half"] > 0.1
    # identical models: the interval is [0, 0], within noise
    zero = results.paired_bootstrap([(np.zeros((2, 30)), list(range(30)))])
    assert (zero["lo"], zero["hi"]) == (0, 0) and results.verdict(zero) == "within noise"
    # four copies of each item are one cluster: the same interval as the items alone, not half of it
    x = rng.integers(-1, 2, size=(1, 300)).astype(np.float64)
    alone = results.paired_bootstrap([(x, list(range(300)))], draws=4000)
    copies = np.repeat(x, 4, 1)
    clustered = results.paired_bootstrap([(copies, [i // 4 for i in range(1200)])], draws=4000)
    naive = results.paired_bootstrap([(copies, list(range(1200)))], draws=4000)
    assert clustered["half"] == pytest.approx(alone["half"], rel=0.1) and naive["half"] == pytest.approx(alone["half"] / 2, rel=0.1)


def test_verdict_rule():
    ci = lambda lo, hi: {"lo": lo, "hi": hi}
    assert results.verdict(ci(0.01, 0.05)) == "reproduced" and results.verdict(ci(-0.05, -0.01)) == "opposite"
    assert results.verdict(ci(-0.01, 0.05)) == "within noise" and results.verdict(ci(0.0, 0.05)) == "within noise"
    assert results.verdict(ci(-0.05, -0.01), direction=-1) == "reproduced" and results.verdict(None) == "not run"


def test_forgetting_paired_claims_and_missing_runs(tmp_path):
    runs = [write_run(tmp_path, "sft", 0, 0.40, [0.10, 0.00, 0.05], before=BASE),
            write_run(tmp_path, "sft", 1, 0.35, [0.20, 0.10, 0.05]),
            write_run(tmp_path, "dft", 0, 0.60, [0.30, 0.20, 0.10]),
            write_run(tmp_path, "dft", 1, 0.55, [0.30, 0.20, 0.10]),
            write_run(tmp_path, "otr", 0, 0.40, [0.10, 0.00, 0.05], shift=3)]  # seed 0 only
    rows = results.collect(runs)
    direct = [statistics.mean([0.10 - 0.3, 0.00 - 0.2, 0.05 - 0.1]), statistics.mean([0.20 - 0.3, 0.10 - 0.2, 0.05 - 0.1])]
    assert results.forgetting(rows, "sft") == pytest.approx(direct)
    table = {(m, c): (t, ci, v) for m, c, t, ci, _, v in results.claims(rows)}
    text, ci, v = table[("DFT", "DFT > SFT")]
    assert "DFT 57.5 ± 3.5 vs SFT 37.5 ± 3.5" in text and ci["diff"] == pytest.approx(0.2) and ci["n_seeds"] == 2
    assert v == "reproduced" and ci["lo"] > 0  # every item of every seed: DFT right where SFT is, and 4 more
    # OTR has seed 0 only: paired with SFT's seed 0; the same items right, rotated: a difference of 0 in accuracy
    _, ci, v = table[("OTR", "OTR > SFT")]
    assert ci["n_seeds"] == 1 and ci["diff"] == pytest.approx(0) and v == "within noise (1 seed: the interval has no seed variance)"
    assert table[("ASFT", "ASFT > SFT")][2] == "not run"  # a method without finished runs is reported, not guessed


def test_report_writes_every_group_row_and_interval(tmp_path):
    runs = [write_run(tmp_path, "sft", 0, 0.40, [0.1, 0.0, 0.05], before=BASE), write_run(tmp_path, "s3ft", 0, 0.45, [0.3, 0.2, 0.1])]
    rows = results.collect(runs)
    out = str(tmp_path / "RESULTS.md")
    results.write_report("quick", rows, out, str(tmp_path / "plots"), 60.0)
    text = open(out).read()
    assert "| starting model | | 10.0 | 0.0 | 0 |" in text and "math (ID, n=20)" in text
    assert "| S3FT | 1 | 45.0 | 5.0 | 0.0 | 15.0 | 120 | 1.50 | 12 |" in text  # train 10+3+2 s, tokens/s (300+300)/(3+2)
    assert "| S3FT | in-domain accuracy at least SFT's; gold in the model's own style (control) | math: S3FT 45.0 vs SFT 40.0 | +5.0 [" in text
    assert "| 20 | 1 | within noise (1 seed: the interval has no seed variance) |" in text and "## What would change the verdict" in text
    assert "| FAIT | higher pass@1 than SFT | code: FAIT n/a vs SFT n/a | n/a |" in text


def test_records_resume_a_suite_without_its_run_directories(tmp_path, monkeypatch):
    """The committed records are what a later session resumes from: runs with a record are skipped, a run whose
    producer's model is gone retrains the producer first, and the table reads the records alone."""
    root = str(tmp_path / "suite")
    runs = results.suite_runs("quick", root)
    by_id = {r.id: r for r in runs}
    assert by_id["drift_s0"].producers() == ["sft_code_s0", "sft_s0"] and by_id["sft_s0"].producers() == []
    assert set(by_id["soup_greedy_s0"].producers()) == {"sft_s0", "grid_lr0.002_st8_s0"}
    for run in runs:  # every producer comes before the runs that read it
        assert all(list(by_id).index(p) < list(by_id).index(run.id) for p in run.producers()), run.id
    executed = []

    def fake_execute(run, log_dir):
        executed.append(run.id)
        if not os.path.isdir(run.dir):
            write_run(root, run.name, run.seed, 0.4, [0.1, 0.0, 0.05], before=BASE if run.name == "sft" else None)
        os.makedirs(os.path.join(run.dir, "final"), exist_ok=True)
        open(os.path.join(run.dir, "final", "config.json"), "w").write("{}")
        return 1.0

    monkeypatch.setattr(results, "execute", fake_execute)
    results.run_suite(runs[:3], str(tmp_path / "logs"))
    assert executed == [r.id for r in runs[:3]] and all(os.path.exists(r.record) for r in runs[:3])
    for run in runs[:3]:  # a new session: runs/ is gone, the records stay
        import shutil
        shutil.rmtree(run.dir)
    executed.clear()
    consumer = next(r for r in runs if r.name == "sft_rtn")
    results.run_suite(runs[:3] + [consumer], str(tmp_path / "logs"))
    assert executed == ["sft_s0", "sft_rtn_s0"]  # sft_s0 retrained for its model; its record is kept, not rewritten
    rows = results.collect(runs)
    # the curve on the suite's subset (quick: the first 5 prompts), whatever the run's own config said
    assert rows["sft"][0]["after"]["eval/math/accuracy"] == 0.4 and rows["sft"][0]["curve"] == {0: 0.4, 2: 0.2, 3: 1.0}


def test_suite_order_and_budgets(tmp_path):
    runs = results.suite_runs("full", str(tmp_path))
    ids = [r.id for r in runs]
    assert len(set(ids)) == len(ids) and len(ids) == 5 * 17 + 10 + 2
    position = {n: i for i, n in enumerate(ids)}
    for run in runs:  # models are trained before the runs that read them
        assert all(position[p] < position[run.id] for p in run.producers()), run.id
    steps = {r.args[r.args.index("--steps") + 1] for r in runs if r.script != "merge.py" and r.name not in ("sft_rtn", "sft_exits")}
    assert steps == {"100", "16", "50"}  # math and DRIFT 100 steps, code one epoch (534 // 32), the grid's 50
    grid = [r for r in runs if r.row == "grid"]
    assert {(r.args[r.args.index("--lr") + 1], r.args[r.args.index("--steps") + 1], r.seed) for r in grid} == {
        (lr, st, s) for lr in ("0.0005", "0.001", "0.002") for st in ("50", "100") for s in (0, 1)} - {("0.001", "100", 0), ("0.001", "100", 1)}
    soup = next(r for r in runs if r.name == "soup_greedy")
    assert len(soup.args[soup.args.index("--models") + 1].split(",")) == 12
    assert all(r.args[r.args.index("--eval_samples") + 1] == "0" for r in runs)


@pytest.mark.skipif(not results.matplotlib_available(), reason="matplotlib is optional")
def test_plot_writes_png(tmp_path):
    rows = results.collect([write_run(tmp_path, "sft", 0, 0.4, [0.1, 0.0, 0.05], before=BASE)])
    path = str(tmp_path / "sft.png")
    assert results.plot(rows, ["sft"], path, "t")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_any_runs_give_the_suites_curves_and_a_plot(tmp_path):
    """python results.py <run dirs> --plot: a user's own runs, grouped by name, curves on the first eval set."""
    runs = [write_run(tmp_path, "mine", s, 0.4 + s / 10, [0.1, 0.0, 0.05], before=BASE, resumed_step=(3, 600, 200.0),
                      config={"eval_datasets": "math=m.jsonl,code=c.jsonl"}) for s in (0, 1)]
    loss, curve, target = results.run_curves(runs[1].dir)
    assert target == "math" and loss == {1: 1.0, 2: 0.5, 3: 9.0} and curve == {0: 0.1, 2: 0.25, 3: 0.5}
    if results.matplotlib_available():
        out = str(tmp_path / "plots" / "mine.png")
        assert results.plot_runs([r.dir for r in runs], out)
        assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        results.plot_runs([str(tmp_path)], str(tmp_path / "x.png"))


def test_greedy_soup_claims_compare_the_single_model_chosen_on_validation(tmp_path):
    runs = [write_run(tmp_path, "sft", 0, 0.40, [0.1, 0.0, 0.05], before=BASE), write_run(tmp_path, "sft", 1, 0.30, [0.1, 0.0, 0.05]),
            write_run(tmp_path, "soup_greedy", 0, 0.30, [0.1, 0.0, 0.05]), write_run(tmp_path, "soup_uniform", 0, 0.35, [0.1, 0.0, 0.05])]
    with open(os.path.join(runs[2].dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    records[1:1] = [{"event": "ingredient", "model": os.path.join(runs[i].dir, "final"), "select/accuracy": a}
                    for i, a in ((0, 0.36), (1, 0.38))]  # seed 1 is better on the selection set, seed 0 on test
    with open(os.path.join(runs[2].dir, "metrics.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n")
    rows = results.collect(runs)
    table = {c: (t, ci, v) for m, c, t, ci, _, v in results.claims(rows) if m == "Greedy soup"}
    text, ci, v = table["greedy soup >= the best single model (chosen on validation)"]
    assert "greedy 30.0 vs sft_s1 30.0" in text and ci["diff"] == 0 and ci["n_seeds"] == 1 and v.startswith("within noise (1 seed")
    text, ci, v = table["the best single model > uniform soup"]
    assert ci["diff"] == pytest.approx(-0.05)
    grid = "\n".join(results.grid_table(rows))
    assert "| sft_s0 |" in grid and "| sft_s1 |" in grid and "| 38.0 | 30.0 |" in grid  # validation, test
