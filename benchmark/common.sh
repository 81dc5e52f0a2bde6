# Sourced by every benchmark/<method>.sh, never run on its own: the defaults, the local data files, the equal
# training budget, the evaluation sets and the helpers. Every UPPER_CASE setting can be overridden from the
# environment, e.g. `NPROC=1 MODEL=Qwen/Qwen2.5-1.5B-Instruct OUT=runs/paper-1.5b bash benchmark/sft.sh`.
# REHEARSAL=1 runs a script's whole command sequence on CPU in a few minutes, with nothing downloaded: every hub
# model and dataset is replaced by a tiny local stand-in (benchmark/rehearsal.py: a random 2-layer Qwen2 per model
# id, a few rows per dataset in its hub schema), 2 steps of batch 4, 8 new tokens, one process, one seed, into
# runs/rehearsal. It checks the commands, flags, data plumbing and bf16 code paths, not any number.
# shellcheck shell=bash

cd "$(dirname "${BASH_SOURCE[0]}")/.."    # the repository root: every command runs here; a relative OUT is below it

REHEARSAL=${REHEARSAL:-0}     # 1 = the CPU rehearsal above; its defaults below, any variable set explicitly still wins
if [ "$REHEARSAL" = 1 ]; then
  NPROC=${NPROC:-1} SEEDS=${SEEDS:-0} OUT=${OUT:-runs/rehearsal} MICRO=${MICRO:-2} DEVICE=${DEVICE:-cpu}
  MATH_STEPS=${MATH_STEPS:-2} CODE_STEPS=${CODE_STEPS:-2} MATH_BATCH=${MATH_BATCH:-4} CODE_BATCH=${CODE_BATCH:-4}
  NEW_TOKENS=${NEW_TOKENS:-8} SAVE_EVERY=${SAVE_EVERY:-1} COMPILE=${COMPILE:-false}
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # a hub id that slipped past the stand-ins fails instead of downloading
fi
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}  # the starting model (each script sets its own default before sourcing)
NPROC=${NPROC:-8}             # GPUs (torchrun processes) per run: 8 = one 8x H100 node; 1 = one GPU, the same numbers
SEEDS=${SEEDS:-"0 1 2"}       # one run per seed; the tables are mean ± std over them
OUT=${OUT:-runs/paper}        # run names do not contain the model: use one OUT per MODEL
MICRO=${MICRO:-8}             # at most this many samples per forward pass per GPU; accumulation fills the global batch
LR=${LR:-1e-5}                # peak AdamW learning rate of every training run (5% warm-up, cosine to 0)
MATH_STEPS=${MATH_STEPS:-330} # 3 epochs of the 7,000 GSM8K training problems at batch 64 (110 steps per epoch)
CODE_STEPS=${CODE_STEPS:-36}  # 3 epochs of MBPP's 374 training problems at batch 32 (12 steps per epoch)
ABLATIONS=${ABLATIONS:-0}     # 1 = also the ablation rows (FAIT granularities, RoSTE's plain STE, extra LiNeS/TA scales)
DATA=${DATA:-$OUT/data}       # the local data files written by prepare_data
MATH_BATCH=${MATH_BATCH:-64}  # global batch of the GSM8K runs
CODE_BATCH=${CODE_BATCH:-32}  # global batch of the MBPP runs
NEW_TOKENS=${NEW_TOKENS:-512} # greedy decoding budget of every evaluation and of the methods' own generation
SAVE_EVERY=${SAVE_EVERY:-100} # checkpoint every N steps of the GSM8K runs (--resume auto continues the latest)
DEVICE=${DEVICE:-auto}        # auto = cuda when there is one
COMPILE=${COMPILE:-true}      # torch.compile the fused loss's chunk function (~30 s per run on CPU: the rehearsal skips it)
HUB=$OUT/hub                  # REHEARSAL=1: the stand-ins of the hub's models and datasets (benchmark/rehearsal.py)
export REHEARSAL NPROC SEEDS OUT MICRO LR MATH_STEPS CODE_STEPS ABLATIONS DATA MATH_BATCH CODE_BATCH NEW_TOKENS
export SAVE_EVERY DEVICE COMPILE
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
FIRST_SEED=${SEEDS%% *}

hub_model() {  # hub_model <hub id>: the id itself; with REHEARSAL=1 its tiny stand-in in $HUB (made on first use)
  if [ "$REHEARSAL" != 1 ] || [ -z "$1" ] || [ -d "$1" ]; then
    echo "$1"
    return 0
  fi
  if [ ! -d "$HUB/$1" ]; then python benchmark/rehearsal.py model "$1" "$HUB/$1" >&2; fi
  echo "$HUB/$1"
}

hub_data() {  # hub_data <id>[:config] <split>: the hub source (the runs read its <split>); REHEARSAL=1: its stand-in
  if [ "$REHEARSAL" != 1 ]; then
    echo "$1"
  else
    local name=${1%%:*} config=
    if [ "$name" != "$1" ]; then config=${1#*:}/; fi
    echo "$HUB/$name/$config$2.jsonl"
  fi
}

MODEL=$(hub_model "$MODEL")
export MODEL

micro() {  # micro <global batch>: samples per forward pass per GPU, at most MICRO (results do not depend on it but drift.py's)
  local m=$(( $1 / NPROC ))
  if [ "$m" -gt "$MICRO" ]; then m=$MICRO; fi
  echo "$m"
}

first() {  # first <seed>: true for the first seed (it also scores the starting model: the table's first row)
  if [ "$1" = "$FIRST_SEED" ]; then echo true; else echo false; fi
}

finished() {  # finished <run dir>: its final evaluation is logged (final/ is saved just before it)
  [ -d "$1/final" ] && grep -qF '"event": "eval_after"' "$1/metrics.jsonl" 2>/dev/null
}

launch() {  # launch <run dir> <command...>: run it with --output_dir <run dir>, unless that run has finished
  local dir=$1
  shift
  if finished "$dir"; then
    echo "== $dir has finished: skipped (delete it to run it again)"
    return 0
  fi
  echo "== $dir"
  echo "+ $* --output_dir $dir"
  "$@" --output_dir "$dir"
}

need_sft() {  # the SFT runs of benchmark/sft.sh ($OUT/sft_s<seed>, same MODEL): trained now if one is missing
  local seed
  for seed in $SEEDS; do
    if ! finished "$OUT/sft_s$seed"; then
      bash benchmark/sft.sh
      break
    fi
  done
  for seed in $SEEDS; do
    if ! grep -qF "\"model\": \"$MODEL\"" "$OUT/sft_s$seed/metrics.jsonl"; then
      echo "error: $OUT/sft_s$seed was not trained from $MODEL; use another OUT for this model" >&2
      exit 1
    fi
  done
}

prepare_data() {  # the local files (once): GSM8K train minus a held-out 473, and the two prompt/response eval sets
  if [ "$REHEARSAL" = 1 ] && [ ! -s "$HUB/openai/gsm8k/main/train.jsonl" ]; then
    python benchmark/rehearsal.py data "$HUB"
  fi
  if [ -s "$DATA/gsm8k_train.jsonl" ] && [ -s "$DATA/gsm8k_val.jsonl" ] && [ -s "$DATA/squad.jsonl" ] \
      && [ -s "$DATA/triviaqa.jsonl" ]; then
    return 0
  fi
  mkdir -p "$DATA"
  python - "$DATA" "$REHEARSAL" "$HUB" <<'EOF'
import json
import os
import sys

import datasets

out, rehearsal, hub = sys.argv[1:]
if rehearsal == "1":  # benchmark/rehearsal.py's stand-ins of the same hub sets and splits, all their few rows
    def load_dataset(name, config=None, split="train"):
        path = os.path.join(hub, name, config or "", split + ".jsonl")
        return datasets.load_dataset("json", data_files=path, split="train")
    datasets.disable_progress_bars()
    TRAIN, HELD_OUT = 8, 4
else:
    load_dataset = datasets.load_dataset
    TRAIN, HELD_OUT = 7000, 1000


def write(name, rows):
    path = os.path.join(out, name)
    with open(path + ".tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)
    print(f"wrote {path}: {len(rows)} rows")


# GSM8K has no validation split: the last 473 training problems are held out (the greedy soup selects on them),
# the other 7,000 are every method's training set. The test split (1,319) is read from the hub by the scripts.
gsm8k = [{"question": r["question"], "answer": r["answer"]}
         for r in load_dataset("openai/gsm8k", "main", split="train")]
write("gsm8k_train.jsonl", gsm8k[:TRAIN])
write("gsm8k_val.jsonl", gsm8k[TRAIN:])
# Held-out tasks (forgetting), 1,000 random questions each, in the prompt/response schema with the judge named:
# SQuAD v1.1 validation, reading comprehension, judge rc (SQuAD exact match against any gold span);
squad = load_dataset("rajpurkar/squad", split="validation").shuffle(seed=0).select(range(HELD_OUT))
write("squad.jsonl", [{"prompt": f"{r['context']}\n\nQuestion: {r['question']}\n"
                                 "Answer with a short span copied from the text, and nothing else.",
                       "response": r["answers"]["text"][0], "task": "rc", "reference": list(r["answers"]["text"])}
                      for r in squad])
# TriviaQA (rc.nocontext) validation, closed-book knowledge, judge exact (normalised match with any alias).
trivia = load_dataset("mandarjoshi/trivia_qa", "rc.nocontext", split="validation").shuffle(seed=0)
trivia = trivia.select(range(HELD_OUT))
write("triviaqa.jsonl", [{"prompt": f"{r['question']}\nAnswer with the name or short phrase only, and nothing else.",
                          "response": r["answer"]["value"], "task": "exact",
                          "reference": sorted({r["answer"]["value"], *r["answer"]["aliases"]})}
                         for r in trivia])
EOF
}

# Evaluation: the first set is the target (accuracy and held-out loss), the others measure forgetting. Hub sets are
# read at --eval_split test (GSM8K 1,319 problems, MBPP 500 with its 3 asserts run in the sandbox).
GSM8K_TEST=$(hub_data openai/gsm8k:main test)
MBPP_TEST=$(hub_data google-research-datasets/mbpp:full test)
MBPP_TRAIN=$(hub_data google-research-datasets/mbpp:full train)
MATH_EVALS="gsm8k=$GSM8K_TEST,mbpp=$MBPP_TEST,squad=$DATA/squad.jsonl,triviaqa=$DATA/triviaqa.jsonl"
CODE_EVALS="mbpp=$MBPP_TEST,gsm8k=$GSM8K_TEST,squad=$DATA/squad.jsonl,triviaqa=$DATA/triviaqa.jsonl"
MATH_METRICS=(eval/gsm8k/accuracy eval/mbpp/accuracy eval/squad/accuracy eval/triviaqa/accuracy eval/gsm8k/loss)
CODE_METRICS=(eval/mbpp/accuracy eval/gsm8k/accuracy eval/squad/accuracy eval/triviaqa/accuracy eval/mbpp/loss)
MATH_MICRO=$(micro "$MATH_BATCH")
CODE_MICRO=$(micro "$CODE_BATCH")

# The optimizer of the frameworks the papers' official code runs on (Hugging Face Trainer, so TRL and LLaMA-Factory):
# AdamW betas (0.9, 0.999) and cosine decay to 0. The embedded world's defaults are (0.9, 0.95) and a 10% floor.
TRAINER=(--adam_beta2 0.999 --min_lr_ratio 0)
# The equal budget of every GSM8K run (every method, baseline and seed: the same data, steps x batch, lr, schedule,
# length and evaluation), the paper-scale counterpart of the embedded world's sft.py budget.
MATH=(--dataset "$DATA/gsm8k_train.jsonl" --eval_datasets "$MATH_EVALS" --eval_split test --dtype bfloat16
      --max_length 1024 --lr "$LR" "${TRAINER[@]}" --batch_size "$MATH_BATCH" --micro_batch_size "$MATH_MICRO"
      --steps "$MATH_STEPS" --max_new_tokens "$NEW_TOKENS" --eval_samples 0 --eval_batch_size 64
      --save_every "$SAVE_EVERY" --resume auto --device "$DEVICE" --compile "$COMPILE")
# The equal budget of every MBPP run (FAIT and its SFT baseline): MBPP's train split (374 problems) from the hub.
CODE=(--dataset "$MBPP_TRAIN" --eval_datasets "$CODE_EVALS" --eval_split test --dtype bfloat16
      --max_length 1024 --lr "$LR" "${TRAINER[@]}" --batch_size "$CODE_BATCH" --micro_batch_size "$CODE_MICRO"
      --steps "$CODE_STEPS" --max_new_tokens "$NEW_TOKENS" --eval_samples 0 --eval_batch_size 64
      --save_every 0 --resume auto --device "$DEVICE" --compile "$COMPILE")
# merge.py's evaluation (one process, no training flags): the same sets and decoding as the training runs.
# --overwrite true: an unfinished merge (launch skips finished ones) is recomputed whole.
MERGE_EVAL=(--overwrite true --eval_datasets "$MATH_EVALS" --eval_split test --dtype bfloat16 --max_length 1024
            --max_new_tokens "$NEW_TOKENS" --eval_samples 0 --eval_batch_size 64 --device "$DEVICE")
