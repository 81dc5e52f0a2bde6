"""Results table: the final evaluation of finished runs, mean +- std over seeds, as a markdown table.

    python results.py runs/study/code30_*           # one row per run name; `<name>_s<seed>` directories are seeds
    python results.py runs/sft runs/s3ft --metrics eval/math/accuracy eval/code/accuracy

Reads each run's metrics.jsonl (the `eval_after` record, and `eval_before` for the starting model's row).
"""
import argparse
import json
import os
import re
import statistics


def final_records(run_dir: str) -> tuple:
    """(eval_before or None, eval_after) of one run; raises if the run has not finished."""
    before = after = None
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            before = record if record.get("event") == "eval_before" else before
            after = record if record.get("event") == "eval_after" else after
    if after is None:
        raise SystemExit(f"error: {run_dir}: no eval_after record (the run has not finished)")
    return before, after


def cell(values: list) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (output_dir of a finished run)")
    parser.add_argument("--metrics", nargs="*", help="columns (default: every eval/<set>/accuracy, then the target loss)")
    args = parser.parse_args()
    groups = {}
    for run in sorted(args.runs):
        name = re.sub(r"_s\d+$", "", os.path.basename(os.path.normpath(run)))
        groups.setdefault(name, []).append(final_records(run))
    first = next(iter(groups.values()))[0][1]
    metrics = args.metrics or ([k for k in first if k.endswith("/accuracy")] + [k for k in first if k.endswith("/loss")])
    print("| run | seeds | " + " | ".join(m.replace("eval/", "").replace("/accuracy", "") for m in metrics) + " |")
    print("|---|---|" + "---|" * len(metrics))
    starts = [before for records in groups.values() for before, _ in records if before is not None]
    if starts:  # the starting model, from the first run that evaluated it (eval_before)
        print("| starting model | - | " + " | ".join(f"{starts[0][m]:.3f}" if m in starts[0] else "" for m in metrics) + " |")
    for name, records in groups.items():
        values = [cell([after[m] for _, after in records]) if m in records[0][1] else "" for m in metrics]
        print(f"| {name} | {len(records)} | " + " | ".join(values) + " |")

if __name__ == "__main__":
    main()
