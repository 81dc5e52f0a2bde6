# Sourced by every benchmark/<method>.sh, never run on its own: the defaults, the local data files, the equal
# training budget, the evaluation sets and the helpers. Every UPPER_CASE setting can be overridden from the
# environment, e.g. `NPROC=1 MODEL=Qwen/Qwen2.5-1.5B-Instruct OUT=runs/paper-1.5b bash benchmark/sft.sh`.
# shellcheck shell=bash

cd "$(dirname "${BASH_SOURCE[0]}")/.."    # the repository root: every command runs here; a relative OUT is below it

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}  # the starting model (each script sets its own default before sourcing)
NPROC=${NPROC:-8}             # GPUs (torchrun processes) per run: 8 = one 8x H100 node; 1 = one GPU, the same numbers
SEEDS=${SEEDS:-"0 1 2"}       # one run per seed; the tables are mean ± std over them
OUT=${OUT:-runs/paper}        # run names do not contain the model: use one OUT per MODEL
MICRO=${MICRO:-8}             # at most this many samples per forward pass per GPU; accumulation fills the global batch
LR=${LR:-1e-5}                # peak AdamW learning rate of every training run (5% warm-up, cosine to 10%)
MATH_STEPS=${MATH_STEPS:-330} # 3 epochs of the 7,000 GSM8K training problems at batch 64 (110 steps per epoch)
CODE_STEPS=${CODE_STEPS:-36}  # 3 epochs of MBPP's 374 training problems at batch 32 (12 steps per epoch)
ABLATIONS=${ABLATIONS:-0}     # 1 = also the ablation rows (FAIT granularities, RoSTE's plain STE, extra LiNeS/TA scales)
DATA=${DATA:-$OUT/data}       # the local data files written by prepare_data
export MODEL NPROC SEEDS OUT MICRO LR MATH_STEPS CODE_STEPS ABLATIONS DATA
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
FIRST_SEED=${SEEDS%% *}

micro() {  # micro <global batch>: samples per forward pass per GPU, at most MICRO (results do not depend on it)
  local m=$(( $1 / NPROC ))
  if [ "$m" -gt "$MICRO" ]; then m=$MICRO; fi
  echo "$m"
}

first() {  # first <seed>: true for the first seed (it also scores the starting model: the table's first row)
  if [ "$1" = "$FIRST_SEED" ]; then echo true; else echo false; fi
}

launch() {  # launch <run dir> <command...>: run it with --output_dir <run dir>, unless that run has finished
  local dir=$1
  shift
  if [ -d "$dir/final" ]; then  # final/ is written after the last evaluation
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
    if [ ! -d "$OUT/sft_s$seed/final" ]; then
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
  if [ -s "$DATA/gsm8k_train.jsonl" ] && [ -s "$DATA/gsm8k_val.jsonl" ] && [ -s "$DATA/squad.jsonl" ] \
      && [ -s "$DATA/triviaqa.jsonl" ]; then
    return 0
  fi
  mkdir -p "$DATA"
  python - "$DATA" <<'EOF'
import json
import os
import sys

import datasets

out = sys.argv[1]


def write(name, rows):
    path = os.path.join(out, name)
    with open(path + ".tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)
    print(f"wrote {path}: {len(rows)} rows")


# GSM8K has no validation split: the last 473 training problems are held out (the greedy soup selects on them),
# the other 7,000 are every method's training set. The test split (1,319) is read from the hub by the scripts.
gsm8k = [{"question": r["question"], "answer": r["answer"]} for r in datasets.load_dataset("openai/gsm8k", "main", split="train")]
write("gsm8k_train.jsonl", gsm8k[:7000])
write("gsm8k_val.jsonl", gsm8k[7000:])
# Held-out tasks (forgetting), 1,000 random questions each, in the prompt/response schema with the judge named:
# SQuAD v1.1 validation, reading comprehension, judge rc (SQuAD exact match against any gold span);
squad = datasets.load_dataset("rajpurkar/squad", split="validation").shuffle(seed=0).select(range(1000))
write("squad.jsonl", [{"prompt": f"{r['context']}\n\nQuestion: {r['question']}\n"
                                 "Answer with a short span copied from the text, and nothing else.",
                       "response": r["answers"]["text"][0], "task": "rc", "reference": list(r["answers"]["text"])}
                      for r in squad])
# TriviaQA (rc.nocontext) validation, closed-book knowledge, judge exact (normalised match with any alias).
trivia = datasets.load_dataset("mandarjoshi/trivia_qa", "rc.nocontext", split="validation").shuffle(seed=0).select(range(1000))
write("triviaqa.jsonl", [{"prompt": f"{r['question']}\nAnswer with the name or short phrase only, and nothing else.",
                          "response": r["answer"]["value"], "task": "exact",
                          "reference": sorted({r["answer"]["value"], *r["answer"]["aliases"]})}
                         for r in trivia])
EOF
}

# Evaluation: the first set is the target (accuracy and held-out loss), the others measure forgetting. Hub sets are
# read at --eval_split test (GSM8K 1,319 problems, MBPP 500 with its 3 asserts run in the sandbox).
MATH_EVALS="gsm8k=openai/gsm8k:main,mbpp=google-research-datasets/mbpp:full,squad=$DATA/squad.jsonl,triviaqa=$DATA/triviaqa.jsonl"
CODE_EVALS="mbpp=google-research-datasets/mbpp:full,gsm8k=openai/gsm8k:main,squad=$DATA/squad.jsonl,triviaqa=$DATA/triviaqa.jsonl"
MATH_METRICS=(eval/gsm8k/accuracy eval/mbpp/accuracy eval/squad/accuracy eval/triviaqa/accuracy eval/gsm8k/loss)
CODE_METRICS=(eval/mbpp/accuracy eval/gsm8k/accuracy eval/squad/accuracy eval/triviaqa/accuracy eval/mbpp/loss)
MATH_MICRO=$(micro 64)
CODE_MICRO=$(micro 32)

# The equal budget of every GSM8K run (every method, baseline and seed: the same data, steps x batch, lr, schedule,
# length and evaluation), the paper-scale counterpart of the embedded world's sft.py budget.
MATH=(--dataset "$DATA/gsm8k_train.jsonl" --eval_datasets "$MATH_EVALS" --eval_split test --dtype bfloat16
      --max_length 1024 --lr "$LR" --batch_size 64 --micro_batch_size "$MATH_MICRO" --steps "$MATH_STEPS"
      --max_new_tokens 512 --eval_samples 0 --eval_batch_size 64 --save_every 100 --resume auto)
# The equal budget of every MBPP run (FAIT and its SFT baseline): MBPP's train split (374 problems) from the hub.
CODE=(--dataset google-research-datasets/mbpp:full --eval_datasets "$CODE_EVALS" --eval_split test --dtype bfloat16
      --max_length 1024 --lr "$LR" --batch_size 32 --micro_batch_size "$CODE_MICRO" --steps "$CODE_STEPS"
      --max_new_tokens 512 --eval_samples 0 --eval_batch_size 64 --save_every 0 --resume auto)
# merge.py's evaluation (one process, no training flags): the same sets and decoding as the training runs.
MERGE_EVAL=(--eval_datasets "$MATH_EVALS" --eval_split test --dtype bfloat16 --max_length 1024 --max_new_tokens 512
            --eval_samples 0 --eval_batch_size 64)
