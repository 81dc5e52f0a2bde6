"""results.py: the suite's arithmetic (forgetting, throughput, mean +- std, verdicts) on hand-written metrics files."""
import json
import os
import statistics
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import results  # noqa: E402

HELD = ["code", "rc", "knowledge"]


def write_run(root, name, seed, target_acc, held_acc, before=None, steps=((1, 100, 10.0), (2, 300, 100.0), (3, 300, 150.0)),
              resumed_step=None, wall=12.0):
    """A finished run: step records (step, tokens, tokens_per_s), an eval curve, eval_after; optional eval_before."""
    run = results.Run(name, seed, [], str(root))
    os.makedirs(run.dir)
    records = [{"event": "config"}]
    if before:
        records.append({"event": "eval_before", "step": 0, **before})
    for step, tokens, tps in steps:
        records.append({"step": step, "loss": 1.0 / step, "tokens": tokens, "tokens_per_s": tps})
    if resumed_step:  # a resumed run logs a step again: the later record wins
        records.append({"step": resumed_step[0], "loss": 9.0, "tokens": resumed_step[1], "tokens_per_s": resumed_step[2]})
    records.append({"event": "eval", "step": 2, "eval/math/accuracy": target_acc / 2})
    records.append({"event": "eval_after", "step": 3, "eval/math/accuracy": target_acc, "eval/math_ood/accuracy": 0.01,
                    **{f"eval/{t}/accuracy": a for t, a in zip(HELD, held_acc)}, "peak_memory_gib": 1.5})
    with open(os.path.join(run.dir, "metrics.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n")
    with open(os.path.join(run.dir, "suite.json"), "w") as f:
        json.dump({"wall_s": wall, "command": []}, f)
    return run


BASE = {"eval/math/accuracy": 0.1, "eval/math_ood/accuracy": 0.0, "eval/code/accuracy": 0.3, "eval/rc/accuracy": 0.2,
        "eval/knowledge/accuracy": 0.1}


def test_summary_throughput_curve_and_resume(tmp_path):
    run = write_run(tmp_path, "sft", 0, 0.4, [0.1, 0.1, 0.1], before=BASE, resumed_step=(3, 600, 200.0))
    s = results.summarize(run)
    assert s["loss"] == {1: 1.0, 2: 0.5, 3: 9.0}  # step 3's second record replaces the first
    assert s["train_s"] == pytest.approx(100 / 10 + 300 / 100 + 600 / 200)
    assert s["tokens_per_s"] == pytest.approx((300 + 600) / (3 + 3))  # step 1 (compilation) left out
    assert s["curve"] == {0: 0.1, 2: 0.2, 3: 0.4} and s["wall_s"] == 12.0 and s["peak_gib"] == 1.5
    assert run.done()
    unfinished = results.Run("dft", 0, [], str(tmp_path))
    os.makedirs(unfinished.dir)
    open(os.path.join(unfinished.dir, "metrics.jsonl"), "w").write(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert not unfinished.done()


def test_forgetting_accuracy_and_verdicts(tmp_path):
    runs = [write_run(tmp_path, "sft", 0, 0.40, [0.10, 0.00, 0.05], before=BASE),
            write_run(tmp_path, "sft", 1, 0.36, [0.20, 0.10, 0.05]),
            write_run(tmp_path, "dft", 0, 0.45, [0.30, 0.20, 0.10]),
            write_run(tmp_path, "dft", 1, 0.47, [0.30, 0.20, 0.10])]
    rows = results.collect(runs)
    # forgetting: mean over held-out tasks of (after - the base model's eval_before), per seed
    direct = [statistics.mean([0.10 - 0.3, 0.00 - 0.2, 0.05 - 0.1]), statistics.mean([0.20 - 0.3, 0.10 - 0.2, 0.05 - 0.1])]
    assert results.forgetting(rows, "sft") == pytest.approx(direct)
    assert results.forgetting(rows, "dft") == pytest.approx([0.0, 0.0])
    d, se = results.difference(results.accuracy(rows, "dft", "math"), results.accuracy(rows, "sft", "math"))
    assert d == pytest.approx(0.46 - 0.38)
    assert se == pytest.approx((statistics.variance([0.45, 0.47]) / 2 + statistics.variance([0.40, 0.36]) / 2) ** 0.5)
    assert results.verdict([(d, se, True)]) == "reproduced in direction"
    assert results.verdict([(-d, se, True)]) == "not reproduced"
    assert results.verdict([(0.0, 0.0, False)]) == "reproduced in direction"  # a >= claim holds at a tie
    assert results.verdict([(0.0, 0.0, True)]) == "not reproduced"  # a > claim does not
    assert results.verdict([(0.01, 0.02, True)]).endswith("(a difference within 2 SE of seed noise)")
    assert results.verdict([(d, se, True), (None, None, True)]) == "not run"
    table = {m: (t, v) for m, _, t, v in results.claims(rows)}
    assert table["DFT"][1] == "reproduced in direction" and "DFT 46.0 ± 1.4 vs SFT 38.0 ± 2.8" in table["DFT"][0]
    assert table["OTR"][1] == "not run"  # a method without finished runs is reported, not guessed


def test_report_writes_every_group_row(tmp_path):
    runs = [write_run(tmp_path, "sft", 0, 0.40, [0.1, 0.0, 0.05], before=BASE), write_run(tmp_path, "s3ft", 0, 0.42, [0.3, 0.2, 0.1])]
    rows = results.collect(runs)
    out = str(tmp_path / "RESULTS.md")
    results.write_report("quick", rows, out, str(tmp_path / "plots"), 60.0)
    text = open(out).read()
    assert "| starting model | 10.0 | 0.0 | 0 |" in text
    assert "| S3FT | 42.0 | 1.0 | 0.0 | 15.0 | 120 | 1.50 | 12 |" in text  # train 10+3+2 s, tokens/s (300+300)/(3+2)
    assert "| S3FT | smaller generalization drop than SFT" in text and "| FAIT | higher pass@1 than SFT |" in text


def test_suite_order_and_budgets(tmp_path):
    runs = results.suite_runs("full", str(tmp_path))
    names = [(r.name, r.seed) for r in runs]
    assert len(set(names)) == len(names)
    position = {n: i for i, n in enumerate(names)}
    # models are trained before the runs that read them (DRIFT's theta_T and theta_R, merges, evaluation-only runs)
    assert position[("sft", 0)] < position[("drift", 0)] and position[("sft_code", 0)] < position[("drift_sft", 0)]
    assert position[("sft", 2)] < min(position[(n, 0)] for n in ("soup_uniform", "soup_greedy", "sft_rtn", "lines"))
    steps = {r.args[r.args.index("--steps") + 1] for r in runs if r.script != "merge.py" and r.name not in ("sft_rtn", "sft_exits")}
    assert steps == {"100", "30"}  # math and DRIFT groups 100 steps, code group 30
    assert all(r.args[r.args.index("--eval_samples") + 1] == "0" for r in runs)


@pytest.mark.skipif(not results.matplotlib_available(), reason="matplotlib is optional")
def test_plot_writes_png(tmp_path):
    rows = results.collect([write_run(tmp_path, "sft", 0, 0.4, [0.1, 0.0, 0.05], before=BASE)])
    path = str(tmp_path / "sft.png")
    assert results.plot(rows, ["sft"], path, "t")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_any_runs_give_the_suites_curves_and_a_plot(tmp_path):
    """python results.py <run dirs> --plot: a user's own runs, grouped by name, curves on the first eval set."""
    runs = [write_run(tmp_path, "mine", s, 0.4 + s / 10, [0.1, 0.0, 0.05], before=BASE, resumed_step=(3, 600, 200.0))
            for s in (0, 1)]
    for run in runs:  # the first --eval_datasets entry is the target, as in every script
        path = os.path.join(run.dir, "metrics.jsonl")
        records = [json.loads(line) for line in open(path)]
        records[0] = {"event": "config", "eval_datasets": "math=m.jsonl,code=c.jsonl"}
        open(path, "w").write("".join(json.dumps(r) + "\n" for r in records))
    loss, curve, target = results.run_curves(runs[1].dir)
    assert target == "math" and loss == {1: 1.0, 2: 0.5, 3: 9.0} and curve == {0: 0.1, 2: 0.25, 3: 0.5}
    if results.matplotlib_available():
        out = str(tmp_path / "plots" / "mine.png")
        assert results.plot_runs([r.dir for r in runs], out)
        assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        results.plot_runs([str(tmp_path)], str(tmp_path / "x.png"))


def test_greedy_soup_claim_compares_the_single_model_chosen_on_validation(tmp_path):
    runs = [write_run(tmp_path, "sft", 0, 0.40, [0.1, 0.0, 0.05], before=BASE), write_run(tmp_path, "sft", 1, 0.30, [0.1, 0.0, 0.05]),
            write_run(tmp_path, "soup_greedy", 0, 0.30, [0.1, 0.0, 0.05]), write_run(tmp_path, "soup_uniform", 0, 0.35, [0.1, 0.0, 0.05])]
    for run in runs:  # the runs' own output_dir, as the scripts log it
        with open(os.path.join(run.dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        records[0]["output_dir"] = run.dir
        if run.name == "soup_greedy":  # seed 1 is better on the selection set, seed 0 on test
            records[1:1] = [{"event": "ingredient", "model": os.path.join(runs[i].dir, "final"), "select/accuracy": a}
                            for i, a in ((0, 0.36), (1, 0.38))]
        with open(os.path.join(run.dir, "metrics.jsonl"), "w") as f:
            f.write("\n".join(json.dumps(r) for r in records) + "\n")
    table = {m: (t, v) for m, _, t, v in results.claims(results.collect(runs))}
    assert "greedy 30.0, best single by validation 30.0 (best on test 40.0), uniform 35.0" in table["Greedy soup"][0]
    assert table["Greedy soup"][1] == "not reproduced"  # greedy >= chosen single holds, chosen single > uniform does not
