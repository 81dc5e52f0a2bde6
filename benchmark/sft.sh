#!/usr/bin/env bash
set -euo pipefail
# SFT, the baseline of every comparison (the paper-scale counterpart of the embedded world's `sft.py` rows): full
# fine-tuning of an instruct model on GSM8K (target), scored on GSM8K test and on tasks it is not trained on, which
# measure forgetting: MBPP (code, the asserts run in the sandbox), SQuAD v1.1 (reading comprehension, exact match)
# and TriviaQA (closed-book knowledge, exact match). The other GSM8K scripts read these runs ($OUT/sft_s<seed>).
# Hardware: one node of 8x H100 80GB (NPROC=8, the default); NPROC=1 runs on one H100/H200 with the same numbers
#   (fixed global batch of 64; micro-batches of at most MICRO=8 accumulate). bf16 weights and compute.
# Time: not measured (no GPU run of these scripts yet). Per run: 330 steps x 64 samples (21k sequences of a few
#   hundred tokens), then greedy decoding of 3,819 evaluation prompts with up to 512 new tokens.
# Models and datasets download from the Hugging Face hub (the model, openai/gsm8k, google-research-datasets/mbpp,
#   rajpurkar/squad, mandarjoshi/trivia_qa); prepare_data (benchmark/common.sh) first writes the local files in $OUT/data.
# Env: NPROC (8), MODEL (Qwen/Qwen2.5-0.5B-Instruct; Qwen/Qwen2.5-1.5B-Instruct fits too), SEEDS ("0 1 2"),
#   OUT (runs/paper); LR (1e-5), MATH_STEPS (330 = 3 epochs at batch 64), MICRO, DATA: see benchmark/common.sh.
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
prepare_data

for seed in $SEEDS; do
  launch "$OUT/sft_s$seed" torchrun --standalone --nproc_per_node "$NPROC" sft.py --model "$MODEL" "${MATH[@]}" \
    --seed "$seed" --eval_before "$(first "$seed")"
done

python results.py "$OUT"/sft_s[0-9]* --metrics "${MATH_METRICS[@]}"
