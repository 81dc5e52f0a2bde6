"""sft.py end to end in subprocesses: golden losses, split/process invariance, resume, round trip, bad flags."""
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from scripts import ROOT, free_port, losses, records, run_script

QUICK = ["--steps", "6", "--batch_size", "8", "--eval_datasets", "", "--save_every", "0", "--lr", "1e-3"]
# sft.py's first 6 losses on the embedded world with QUICK (recorded with torch 2.13 CPU; a change in the
# data pipeline, loss, normalisation or optimizer moves them).
GOLDEN = [0.318173, 0.214918, 0.190686, 0.110975, 0.043838, 0.065957]


def run(out, *extra, nproc=1, check=True, in_process=False):
    return run_script("sft.py", out, *QUICK, *extra, nproc=nproc, check=check, in_process=in_process)


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def assert_same_weights(a, b, atol):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run(out)
    return out


def test_golden_losses(reference):
    assert losses(reference) == pytest.approx(GOLDEN, abs=1e-4)


def test_loss_is_global_token_mean_whatever_the_split(reference, tmp_path):
    """micro 8 x accumulation 1 == micro 2 x accumulation 4 == 2 processes x micro 4: the same losses (1e-5) and
    gradient norms, end to end. The weights themselves are compared through the gradients in float64 (below): after
    AdamW, summation-order noise in near-zero gradients becomes lr-sized steps on another CPU."""
    run(tmp_path / "accum", "--micro_batch_size", "2")
    run(tmp_path / "ddp", nproc=2)
    norms = lambda out: [r["grad_norm"] for r in records(out) if "loss" in r]
    for other in ("accum", "ddp"):
        assert losses(tmp_path / other) == pytest.approx(losses(reference), abs=1e-5)
        assert norms(tmp_path / other) == pytest.approx(norms(reference), rel=1e-4)
    tokens = lambda out: [r["loss_tokens"] for r in records(out) if "loss" in r]
    assert records(tmp_path / "ddp")[0]["world_size"] == 2 and tokens(tmp_path / "ddp") == tokens(reference)


def test_the_frameworks_optimizer_is_two_flags_away(reference, tmp_path):
    """Default: cosine to a 10% floor (checked against the formula on the reference run). --adam_beta2 0.999
    --min_lr_ratio 0 --warmup_ratio 0 (Hugging Face Trainer, so TRL and LLaMA-Factory) gives transformers' own
    cosine schedule step for step, and beta2 reaches AdamW: the first step (sign-like, beta2-free) is the golden
    one, the later ones are not."""
    import math
    from transformers import get_cosine_schedule_with_warmup
    lrs = lambda out: [r["lr"] for r in records(out) if "loss" in r]
    floor = [min((s + 1) / 1, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 6))) * 1e-3 for s in range(6)]
    assert lrs(reference) == pytest.approx(floor, rel=1e-6)
    tensorboard = importlib.util.find_spec("tensorboard") is not None  # and --report_to end to end, where installed
    run(tmp_path / "hf", "--adam_beta2", "0.999", "--min_lr_ratio", "0", "--warmup_ratio", "0",
        *(["--report_to", "tensorboard"] if tensorboard else []))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=6)
    hf = []
    for _ in range(6):
        hf.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs(tmp_path / "hf") == pytest.approx(hf, rel=1e-6)
    got = losses(tmp_path / "hf")
    ref = losses(reference)  # the same machine's run: only AdamW's beta2 differs from here on
    assert got[0] == pytest.approx(ref[0], abs=1e-6) and abs(got[2] - ref[2]) > 1e-4
    if tensorboard:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(str(tmp_path / "hf" / "tensorboard"))
        events.Reload()
        assert [e.value for e in events.Scalars("loss")] == pytest.approx(got)
        assert [e.step for e in events.Scalars("lr")] == [1, 2, 3, 4, 5, 6]


def step_gradients(out, micro, nproc=1, *extra):
    cmd = [sys.executable, "tests/grad_step.py", str(out), str(micro), *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), *cmd[1:]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out)


def test_gradients_are_the_same_for_any_split_in_float64(tmp_path):
    """sft.py's loss and normalisation on one global batch of 8, in float64: micro 2 x accumulation 4, 2 DDP
    processes x micro 4 and 2 FSDP2 processes give one process's gradients to 1e-12 (seen: 1e-16), on any CPU."""
    reference = step_gradients(tmp_path / "one.safetensors", 8)
    for name, micro, nproc, extra in [("accum", 2, 1, ()), ("ddp", 4, 2, ()), ("fsdp", 4, 2, ("fsdp",))]:
        other = step_gradients(tmp_path / f"{name}.safetensors", micro, nproc, *extra)
        assert other.keys() == reference.keys()
        for k in reference:
            assert reference[k].dtype == torch.float64
            torch.testing.assert_close(other[k], reference[k], atol=1e-12, rtol=1e-10, msg=f"{name}: {k}")


def test_resume_after_kill_reaches_the_same_weights(tmp_path):
    args = ["--steps", "20", "--save_every", "2", "--batch_size", "4"]
    run(tmp_path / "whole", *args)
    out = tmp_path / "killed"
    cmd = [sys.executable, "sft.py", "--output_dir", str(out), *QUICK, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoint-4").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "the run finished before it could be killed"
    run(out, *args, "--resume", "auto")
    assert_same_weights(tmp_path / "whole" / "final", out / "final", atol=0)
    assert losses(tmp_path / "whole")[-5:] == losses(out)[-5:]
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-18"]  # newest 2 kept


def test_final_model_round_trips_through_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import common
    test = os.path.join(common.WORLD_DIR, "data", "math", "test.jsonl")
    rc = os.path.join(common.WORLD_DIR, "data", "rc", "test.jsonl")
    run(tmp_path, "--eval_datasets", f"math={test},rc={rc}", "--eval_samples", "8", "--eval_before", "false", "--eval_every", "2",
        "--eval_every_samples", "3")
    final = [r for r in records(tmp_path) if r.get("event") == "eval_after"][0]
    during = [r for r in records(tmp_path) if r.get("event") == "eval"]  # --eval_every: the target set only, not at the end
    assert [r["step"] for r in during] == [2, 4] and all(not any("/rc/" in k for k in r) for r in during)
    assert "eval/math/accuracy" in during[0] and "eval/rc/accuracy" in final and 0.1 < final["peak_memory_gib"] < 20
    for record, name, n in [(during[0], "math", 3), (during[1], "math", 3), (final, "math", 8), (final, "rc", 8)]:
        correct = record[f"eval/{name}/correct"]  # per prompt, for paired comparisons; --eval_every: its first 3 only
        assert record[f"eval/{name}/n"] == len(correct) == n and set(correct) <= {"0", "1"}
        assert record[f"eval/{name}/accuracy"] == pytest.approx(correct.count("1") / n)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    examples = common.load_sft_data(test, tokenizer, 512)[0][:8]
    rt = common.Runtime(0, 0, 1, torch.device("cpu"), True)
    loss = common.evaluate_loss(common.LossModule(model, lambda m, b: _loss(common, m, b)), examples, rt, tokenizer.pad_token_id)
    assert loss["loss"] == pytest.approx(final["eval/math/loss"], abs=1e-5)
    responses = common.generate(model, tokenizer, [e["messages"][:-1] for e in examples], batch_size=50)  # judged here, one by one
    assert final["eval/math/correct"] == "".join(str(int(common.judge_math(r, e["reference"])[0])) for e, r in zip(examples, responses))
    assert tokenizer.chat_template and (tmp_path / "final" / "model.safetensors").exists()


def _loss(common, model, batch):
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return common.fused_linear_cross_entropy(hidden, model.get_output_embeddings().weight, batch["targets"])[0], {}


@pytest.mark.parametrize("flags,message", [
    (["--micro_batch_size", "3"], "--batch_size 8 must be a multiple of --micro_batch_size 3"),
    (["--model", "/nonexistent/model"], "--model '/nonexistent/model': no such directory"),
    (["--dataset", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--dtype", "float8"], "--dtype must be float32 or bfloat16"),
    (["--eval_datasets", "math"], "expected name=source"),
    (["--resume", "runs"], "not a training checkpoint"),
])
def test_bad_flags_fail_clearly_without_output(tmp_path, flags, message):
    proc = run(tmp_path / "out", *flags, check=False, in_process=True)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "final").exists()


def test_fsdp2_two_processes_match_and_resume(reference, tmp_path):
    """FSDP2 (fully_shard, gloo on CPU): the same losses as one process (its gradients: the float64 test above);
    resuming its sharded checkpoint reproduces its own weights exactly."""
    run(tmp_path / "fsdp", "--fsdp", "--save_every", "3", nproc=2)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(reference), abs=1e-5)
    run(tmp_path / "resumed", "--fsdp", "--resume", str(tmp_path / "fsdp" / "checkpoint-3"), nproc=2)
    assert_same_weights(tmp_path / "fsdp" / "final", tmp_path / "resumed" / "final", atol=0)


def test_fsdp2_evaluation_with_uneven_shards_matches_one_process(tmp_path):
    """Generation under FSDP: ranks hold 3 and 2 prompts (2 and 1 batches of 2), so a rank runs a padding batch
    and keeps decoding until the other is done; the scores equal one process's."""
    evals = ["--steps", "1", "--eval_datasets", "math=world/data/math/test.jsonl,code=world/data/code/test.jsonl",
             "--eval_samples", "5", "--eval_batch_size", "2", "--max_new_tokens", "48"]
    run(tmp_path / "fsdp", "--fsdp", *evals, nproc=2)
    run(tmp_path / "one", *evals)
    scores = lambda out: [{k: v for k, v in r.items() if k.endswith(("accuracy", "correct"))} for r in records(out)
                          if "event" in r and r["event"].startswith("eval")]  # correct: the ranks' shards in order
    assert scores(tmp_path / "fsdp") == scores(tmp_path / "one") and len(scores(tmp_path / "one")) == 2


class Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("victim", ["trainer_state.pt", "rng_rank0.pt"])
def test_a_pickle_in_a_checkpoint_is_refused_and_runs_nothing(checkpointed, tmp_path, victim):
    """--resume loads with weights_only=True (the RNG states are stored as tensors and numbers), so a checkpoint
    carrying a pickled object gets one error line naming the file, and its command never runs."""
    checkpoint, marker = copy_checkpoint(checkpointed, tmp_path), tmp_path / "PICKLE_RAN"
    state = torch.load(checkpoint / victim, weights_only=True)
    state["extra"] = Payload(marker)
    torch.save(state, checkpoint / victim)
    set_recorded_size(checkpoint, victim)  # a crafted checkpoint would carry a matching marker
    proc = run(tmp_path / "resumed", "--steps", "5", "--save_every", "2", "--keep_checkpoints", "0", "--resume",
               str(checkpoint), check=False, in_process=True)
    assert proc.returncode != 0 and not marker.exists() and not (tmp_path / "resumed").exists()
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {checkpoint / victim}: cannot be loaded"), proc.stderr


def test_a_non_finite_step_stops_the_run_and_keeps_the_finite_checkpoints(tmp_path):
    """--lr 1e6: the gradient norm is NaN at step 2. The run stops before that optimizer step with one line naming
    the step; checkpoint-1 (finite) survives the keep-2 pruning, and no NaN checkpoint or final/ is written."""
    out = tmp_path / "out"
    proc = run(out, "--lr", "1e6", "--steps", "10", "--save_every", "1", "--keep_checkpoints", "2", check=False, in_process=True)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("error: step ") and "not finite" in last, proc.stderr
    step = int(last.split()[2].rstrip(":"))
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert step >= 2 and kept == [f"checkpoint-{s}" for s in range(max(1, step - 2), step)] and not (out / "final").exists()
    for name in kept:
        assert all(torch.isfinite(t).all() for t in weights(out / name).values())
    assert [r["step"] for r in records(out) if "loss" in r] == list(range(1, step))


def test_a_non_finite_model_is_never_saved(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import common
    model = AutoModelForCausalLM.from_pretrained(os.path.join(common.WORLD_DIR, "base"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(common.WORLD_DIR, "base"))
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    rt = common.Runtime(0, 0, 1, torch.device("cpu"), True)
    with pytest.raises(common.TrainingError, match="not saved, non-finite weights in 1 tensors .model.norm.weight"):
        common.save_checkpoint(str(tmp_path / "final"), model, tokenizer, rt)
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpointed") / "run"
    run(out, "--steps", "5", "--save_every", "2", "--keep_checkpoints", "0")
    return out


def copy_checkpoint(checkpointed, tmp_path, step=2):
    import shutil
    target = tmp_path / f"checkpoint-{step}"
    shutil.copytree(checkpointed / f"checkpoint-{step}", target)
    return target


def set_recorded_size(checkpoint, name):
    import json
    marker = checkpoint / "checkpoint_complete.json"
    record = json.loads(marker.read_text())
    record["files"][name] = (checkpoint / name).stat().st_size
    marker.write_text(json.dumps(record))


def damage(case, checkpoint):
    """Each of the audit's silent wrong resumes, made on a copy of a good checkpoint."""
    from safetensors.torch import save_file
    st = checkpoint / "model.safetensors"
    if case == "no model.safetensors":
        st.unlink()
    elif case == "truncated trainer_state.pt":
        data = (checkpoint / "trainer_state.pt").read_bytes()
        (checkpoint / "trainer_state.pt").write_bytes(data[: len(data) // 2])
    elif case == "another model's tensors":  # a subset of the names, marker updated to match
        save_file({k: v for k, v in weights(checkpoint).items() if ".layers.3." not in k}, str(st))
        set_recorded_size(checkpoint, "model.safetensors")
    elif case == "a foreign tensor":
        save_file({**weights(checkpoint), "extra.weight": torch.zeros(2)}, str(st))
        set_recorded_size(checkpoint, "model.safetensors")
    elif case == "no completeness marker":
        (checkpoint / "checkpoint_complete.json").unlink()
    elif case == "corrupt rng file":
        (checkpoint / "rng_rank0.pt").write_bytes(b"garbage")
        set_recorded_size(checkpoint, "rng_rank0.pt")


@pytest.mark.parametrize("case,message", [
    ("no model.safetensors", "model.safetensors: missing or truncated"),
    ("truncated trainer_state.pt", "trainer_state.pt: missing or truncated"),
    ("another model's tensors", "its weights are not this model's (missing ['model.layers.3."),
    ("a foreign tensor", "unexpected ['extra.weight']"),
    ("no completeness marker", "incomplete checkpoint (no checkpoint_complete.json"),
    ("corrupt rng file", "rng_rank0.pt: cannot be loaded"),
])
def test_a_damaged_or_foreign_checkpoint_is_refused(checkpointed, tmp_path, case, message):
    checkpoint = copy_checkpoint(checkpointed, tmp_path)
    damage(case, checkpoint)
    proc = run(tmp_path / "out", "--steps", "5", "--save_every", "2", "--keep_checkpoints", "0", "--resume", str(checkpoint),
               check=False, in_process=True)
    assert proc.returncode != 0 and message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "out").exists()


def test_resume_checks_the_run_settings_and_auto_skips_incomplete_checkpoints(checkpointed, tmp_path):
    proc = run(tmp_path / "other", "--steps", "5", "--save_every", "2", "--lr", "5e-4", "--resume",
               str(checkpointed / "checkpoint-2"), check=False, in_process=True)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "other settings: --lr 0.001 (now 0.0005)" in last, proc.stderr
    out = tmp_path / "auto"
    copy_checkpoint(checkpointed, out, 2)
    damage("no completeness marker", copy_checkpoint(checkpointed, out, 4))  # the newest is incomplete
    proc = run(out, "--steps", "5", "--save_every", "2", "--keep_checkpoints", "0", "--resume", "auto")
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in proc.stdout
    assert_same_weights(checkpointed / "final", out / "final", atol=0)
    only_incomplete = tmp_path / "incomplete"
    damage("no completeness marker", copy_checkpoint(checkpointed, only_incomplete, 4))
    proc = run(only_incomplete, "--steps", "5", "--save_every", "2", "--resume", "auto", check=False, in_process=True)
    assert proc.returncode != 0 and "holds checkpoint folders but none is complete" in proc.stderr, proc.stderr


def test_a_fresh_run_into_another_runs_directory_is_refused_unless_overwrite(checkpointed, tmp_path):
    import shutil
    out = tmp_path / "reused"
    shutil.copytree(checkpointed, out)
    proc = run(out, "--steps", "3", check=False, in_process=True)
    assert proc.returncode != 0 and "holds another run (checkpoint-2, checkpoint-4, final, metrics.jsonl)" in proc.stderr
    run(out, "--steps", "3", "--save_every", "0", "--overwrite", "true")
    assert sorted(p.name for p in out.iterdir()) == ["final", "metrics.jsonl"]
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3]


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/unshare"), reason="needs root for a private tmpfs")
def test_a_full_disk_is_one_error_line_and_leaves_no_temporary_checkpoint(tmp_path):
    """A 6 MiB tmpfs (in a private mount namespace) holds no 12 MiB checkpoint: one error line naming it, and the
    half-written checkpoint-1.tmp is removed so the space is free again."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=6m tmpfs {disk} && {sys.executable} sft.py --output_dir {disk}/run "
              f"{shlex.join(QUICK)} --steps 2 --save_every 1; echo rc=$?; ls -a {disk}/run")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "rc=1" in proc.stdout and len(errors) == 1 and f"{disk}/run/checkpoint-1: could not be written" in errors[0], proc.stderr
    assert proc.stdout.split("rc=1")[1].split() == [".", "..", "metrics.jsonl"]
