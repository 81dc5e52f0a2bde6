#!/usr/bin/env bash
set -euo pipefail
# Model merging of sft.sh's GSM8K fine-tunes (merge.py, one process, one GPU; nothing is trained here):
# - model soups (Wortsman et al. 2022, arXiv 2203.05482): the uniform soup of the SFT seeds and the greedy soup
#   selected on held-out GSM8K ($OUT/data/gsm8k_val.jsonl: the 473 training problems no run trains on). Claim:
#   greedy soup >= the best single model (by held-out score) > uniform soup, when the ingredients share one basin.
# - LiNeS (Wang et al., ICLR 2025, arXiv 2410.17146), single task: theta_0 + lambda(l) tau with lambda rising from
#   alpha at the first block to 1 at the last (beta = 1 - alpha), alpha 0.25, per SFT seed. Claim: it keeps most of
#   the target gain and forgets less than the fine-tuned model. Control: task arithmetic, the whole task vector scaled
#   by 0.4 (the embedded world found a uniform shrink as good). ABLATIONS=1 adds LiNeS alpha 0.5 and scale 0.6.
# The ingredients are $OUT/sft_s<seed>/final from benchmark/sft.sh (trained first if missing), theta_0 = MODEL.
# Hardware: one GPU (merge.py refuses torchrun); merging streams tensors on the CPU in fp32, saved in bf16.
# Time: not measured (each merge is one evaluation of 3,819 prompts on one GPU; the greedy soup scores every
#   ingredient and candidate soup on 473 held-out prompts first).
# Models and datasets download from the Hugging Face hub.
# Env: MODEL (Qwen/Qwen2.5-0.5B-Instruct, the base of the task vectors), SEEDS ("0 1 2": the soup's ingredients),
#   OUT (runs/paper); NPROC (8) only for training the SFT runs if they are missing; see benchmark/common.sh.
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
if [ "${REHEARSAL:-0}" = 1 ]; then SEEDS=${SEEDS:-"0 1"}; fi  # two ingredients, so that the soups mix something
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
prepare_data
need_sft

INGREDIENTS=""
for seed in $SEEDS; do INGREDIENTS="$INGREDIENTS${INGREDIENTS:+,}$OUT/sft_s$seed/final"; done
launch "$OUT/soup_uniform_s0" python merge.py --method uniform --models "$INGREDIENTS" "${MERGE_EVAL[@]}" --seed 0
launch "$OUT/soup_greedy_s0" python merge.py --method greedy --models "$INGREDIENTS" "${MERGE_EVAL[@]}" --seed 0 \
  --select_dataset "$DATA/gsm8k_val.jsonl" --select_samples 0 --greedy_metric accuracy
for seed in $SEEDS; do
  launch "$OUT/lines_s$seed" python merge.py --method lines --base "$MODEL" --models "$OUT/sft_s$seed/final" \
    "${MERGE_EVAL[@]}" --seed "$seed" --alpha 0.25 --beta -1
  launch "$OUT/ta_0.4_s$seed" python merge.py --method task_arithmetic --base "$MODEL" --models "$OUT/sft_s$seed/final" \
    "${MERGE_EVAL[@]}" --seed "$seed" --scaling 0.4 --normalize false
  if [ "$ABLATIONS" = 1 ]; then
    launch "$OUT/lines_a0.5_s$seed" python merge.py --method lines --base "$MODEL" --models "$OUT/sft_s$seed/final" \
      "${MERGE_EVAL[@]}" --seed "$seed" --alpha 0.5 --beta -1
    launch "$OUT/ta_0.6_s$seed" python merge.py --method task_arithmetic --base "$MODEL" \
      --models "$OUT/sft_s$seed/final" "${MERGE_EVAL[@]}" --seed "$seed" --scaling 0.6 --normalize false
  fi
done

RUNS=("$OUT"/sft_s[0-9]* "$OUT"/soup_uniform_s0 "$OUT"/soup_greedy_s0 "$OUT"/lines_s[0-9]* "$OUT"/ta_0.4_s[0-9]*)
if [ "$ABLATIONS" = 1 ]; then RUNS+=("$OUT"/lines_a0.5_s[0-9]* "$OUT"/ta_0.6_s[0-9]*); fi
python results.py "${RUNS[@]}" --metrics "${MATH_METRICS[@]}"
python - "$OUT"/soup_greedy_s0/metrics.jsonl <<'EOF'
import json
import sys

for r in map(json.loads, open(sys.argv[1])):  # the greedy soup's selection on held-out GSM8K
    if r.get("event") in ("ingredient", "greedy_step", "greedy_soup"):
        print({k: v for k, v in r.items() if k != "time"})
EOF
