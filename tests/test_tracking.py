"""--report_to: metrics.jsonl mirrored to TensorBoard, W&B (offline) and Trackio (local), read back from the files
each tracker writes. Each test skips without its package (requirements-extras.txt); nothing touches the network."""
import glob
import json
import sqlite3
import struct
import time

import pytest
import torch

import common

RECORDS = [
    {"event": "config", "model": "m", "lr": 1e-3, "steps": 2, "compile": False},
    {"event": "eval_before", "step": 0, "eval/math/accuracy": 0.25},
    {"step": 1, "loss": 0.5, "lr": 1e-3, "grad_norm": 2.0, "tokens_per_s": 10.0, "method/x": 3.0},
    {"step": 2, "loss": 0.25, "lr": 5e-4, "grad_norm": 1.0, "tokens_per_s": 11.0, "method/x": 4.0},
    {"event": "eval_after", "step": 2, "eval/math/accuracy": 0.75, "eval/math/n": 4, "eval/math/correct": "0111",
     "eval/code/correct": "01" * 30, "eval/math/loss": float("nan")},
]
# what a tracker must hold: every finite number of every record at its step (the config aside; strings, such as
# the per-item eval/<set>/correct, stay in metrics.jsonl only)
EXPECTED = {(r["step"], k): v for r in RECORDS[1:] for k, v in r.items()
            if k not in ("step", "event") and not isinstance(v, str) and v == v}
HPARAMS = {"model": "m", "lr": 1e-3, "steps": 2, "compile": False}


def log_run(out, kind, resume=False, records=RECORDS):
    rt = common.Runtime(0, 0, 1, torch.device("cpu"), True)
    logger = common.MetricsLogger(str(out), rt, 2, resume=resume, report_to=kind)
    for record in records:
        logger.log(dict(record))
    logger.tracker.close()


def test_tensorboard_holds_every_metric_and_the_config(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log_run(tmp_path, "tensorboard")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    got = {(e.step, tag): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert got == pytest.approx(EXPECTED)
    hparams = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams
    from tensorboard.plugins.hparams import plugin_data_pb2
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    values = {k: v.string_value or v.number_value or v.bool_value for k, v in start.hparams.items()}
    assert values == HPARAMS


def wandb_records(path, wait_s=0):
    """The records of an offline .wandb file (LevelDB log framing: 7-byte header, 32 KiB blocks, chunks with a
    7-byte header), decoded with wandb's own protobuf. wandb-core writes the file after wandb.finish() returns:
    wait up to wait_s for its final `exit` record."""
    deadline = time.time() + wait_s
    while True:
        try:
            records = read_wandb_file(path)
        except Exception:  # a record being written
            if time.time() > deadline:
                raise
            records = []
        if time.time() > deadline or (records and records[-1].WhichOneof("record_type") == "exit"):
            return records
        time.sleep(0.2)


def read_wandb_file(path):
    from wandb.proto import wandb_internal_pb2
    data, pos, chunks, records = open(path, "rb").read(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


def test_wandb_offline_holds_every_metric_and_the_config_and_resume_continues_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
                       "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(var, value)
    log_run(tmp_path, "wandb")
    run_id = (tmp_path / "wandb_run_id").read_text()
    got, config = {}, {}
    for record in wandb_records(glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))[0],
                                wait_s=60):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            got.update({(items["_step"], k): v for k, v in items.items() if not k.startswith("_")})
        elif kind in ("run", "config"):
            update = record.run.config.update if kind == "run" else record.config.update
            config.update({k: json.loads(i.value_json) for i in update
                           if not (k := i.key or "/".join(i.nested_key)).startswith("_")})
    assert got == pytest.approx(EXPECTED) and config == HPARAMS
    log_run(tmp_path, "wandb", resume=True, records=RECORDS[:1])
    assert (tmp_path / "wandb_run_id").read_text() == run_id
    assert len(glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}"))) == 2  # the same run id, resumed


def test_trackio_holds_every_metric_and_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "store"))  # read when trackio is first imported
    project = f"tracking-test-{tmp_path.name}"
    monkeypatch.setenv("TRACKIO_PROJECT", project)
    trackio = pytest.importorskip("trackio")
    log_run(tmp_path / "run", "trackio")
    db = sqlite3.connect(trackio.utils.TRACKIO_DIR / f"{project}.db")
    got = {}
    for step, metrics in db.execute("select step, metrics from metrics where run_name = 'run'"):
        got.update({(step, k): v for k, v in json.loads(metrics).items()})
    (config,), = db.execute("select config from configs where run_name = 'run'")
    assert got == pytest.approx(EXPECTED)
    assert {k: v for k, v in json.loads(config).items() if not k.startswith("_")} == HPARAMS


def test_report_to_is_checked_before_anything_is_written(monkeypatch):
    with pytest.raises(common.UsageError, match="--report_to must be one of none, tensorboard, wandb, trackio, got 'mlflow'"):
        common.check_report_to("mlflow")
    monkeypatch.setattr(common.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(common.UsageError, match="--report_to wandb: the wandb package is not installed"):
        common.check_report_to("wandb")
    common.check_report_to("none")


def test_the_whole_run_eta_adds_the_final_evaluation_estimated_by_eval_before(tmp_path, capsys):
    rt = common.Runtime(0, 0, 1, torch.device("cpu"), True)
    step = {"step": 1, "loss": 0.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 10.0, "eta_s": 100.0}
    logger = common.MetricsLogger(str(tmp_path), rt, 2)
    logger.log({"event": "config"})
    time.sleep(0.05)
    logger.log({"event": "eval_before", "step": 0})
    logger.log(dict(step))
    config, before, first = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert first["eta_run_s"] == pytest.approx(100 + before["time"] - config["time"]) and first["eta_run_s"] > 100.04
    assert "eta 1m40s (run 1m40s)" in capsys.readouterr().out
    resumed = common.MetricsLogger(str(tmp_path), rt, 2, resume=True)  # no eval_before now: the first run's is used
    resumed.log({"event": "config"})
    resumed.log(dict(step, step=2))
    assert json.loads(open(tmp_path / "metrics.jsonl").readlines()[-1])["eta_run_s"] == pytest.approx(first["eta_run_s"])
    fresh = common.MetricsLogger(str(tmp_path / "fresh"), rt, 2)  # no eval_before at all: no whole-run estimate
    fresh.log({"event": "config"})
    fresh.log(dict(step))
    assert "eta_run_s" not in json.loads(open(tmp_path / "fresh" / "metrics.jsonl").readlines()[-1])


def test_a_long_string_prints_as_its_length_and_metrics_jsonl_keeps_it_whole(tmp_path, capsys):
    rt = common.Runtime(0, 0, 1, torch.device("cpu"), True)
    logger = common.MetricsLogger(str(tmp_path), rt, 2)
    record = {"event": "eval_after", "step": 2, "eval/math/accuracy": 0.5, "eval/math/n": 60,
              "eval/math/correct": "01" * 30, "eval/rc/correct": "0" * 40}
    logger.log(dict(record))
    out = capsys.readouterr().out
    assert "eval/math/correct <60 chars> |" in out and "01" * 21 not in out and f"eval/rc/correct {'0' * 40}" in out
    assert "eval/math/accuracy 0.5 | eval/math/n 60" in out
    written = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert {k: v for k, v in written.items() if k != "time"} == record
