#!/usr/bin/env bash
set -euo pipefail
# SoFT / Sorted LLaMA (Kavehzadeh et al. 2024, arXiv 2309.08968): exits after several depths through the shared final
# norm and head, the mean of their losses, so any prefix of the layers is a usable model. Claims (Tables 2, 4):
# SoFT's sub-models are far better than SFT's layers read the same way, the full model is about as good as SFT's,
# and confidence-threshold early exit is faster at little cost. The paper: Llama-2-13B (40 layers), exits
# 12,16,...,40, Alpaca, lr 2e-5, 2 epochs, early-exit thresholds 0.95 (layers 12, 16), 0.9 (20, 24), 0.8 (28, 32), 0.7
# (36). Here: GSM8K with sft.sh's equal budget on Qwen2.5-0.5B-Instruct (24 layers), exits 12,16,20,24 (every 4 layers
# from half the depth; the paper's schedule, 30% of the depth then every 10%, is EXITS=7,10,12,14,17,19,22,24 at 24
# layers: `sorted_ft.paper_exits(24)`, 8 exits), the paper's thresholds by depth (`--exit_threshold paper`: 0.9, 0.8,
# 0.8 at layers 12, 16, 20).
# Baseline: sft.sh's final models read as exits (`sorted_ft.py --model <sft final> --steps 0 --exits 24 --eval_exits
# 12,16,20`), evaluated the same way, early exit included (the same thresholds, 50 prompts decoded one at a time).
# Hardware: 8x H100 80GB (NPROC=8, default) or NPROC=1 on one H100/H200 (the same numbers). bf16.
# Time: not measured. With a 152k vocabulary each exit costs one LM-head loss: 4 exits cost ~4x SFT's loss.
# Models and datasets download from the Hugging Face hub. The SFT baseline is sft.sh's runs (trained first if missing).
# Env: NPROC (8), MODEL (Qwen/Qwen2.5-0.5B-Instruct), SEEDS ("0 1 2"), OUT (runs/paper), EXITS (12,16,20,24; the last
#   must be the model's depth: EXITS=12,16,20,24,28 for Qwen2.5-1.5B), EXIT_THRESHOLD (paper; or one number for every
#   exit, e.g. 0.9, or one per exit below the last); see benchmark/common.sh.
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
if [ "${REHEARSAL:-0}" = 1 ]; then EXITS=${EXITS:-1,2}; fi  # the 2 layers of the rehearsal's stand-in model
EXITS=${EXITS:-12,16,20,24}
EXIT_THRESHOLD=${EXIT_THRESHOLD:-paper}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
prepare_data
need_sft
LAST=${EXITS##*,}
INNER=${EXITS%,*}

for seed in $SEEDS; do
  launch "$OUT/soft_s$seed" torchrun --standalone --nproc_per_node "$NPROC" sorted_ft.py --model "$MODEL" "${MATH[@]}" \
    --seed "$seed" --eval_before "$(first "$seed")" --exits "$EXITS" --exit_threshold "$EXIT_THRESHOLD" --early_exit_prompts 50
  launch "$OUT/sft_exits_s$seed" torchrun --standalone --nproc_per_node "$NPROC" sorted_ft.py \
    --model "$OUT/sft_s$seed/final" "${MATH[@]}" --seed "$seed" --steps 0 --eval_before false \
    --exits "$LAST" --eval_exits "$INNER" --exit_threshold "$EXIT_THRESHOLD" --early_exit_prompts 50
done

EXIT_METRICS=(eval/gsm8k/accuracy)
for n in ${INNER//,/ }; do EXIT_METRICS+=("eval/gsm8k/exit$n/accuracy"); done
EXIT_METRICS+=(eval/gsm8k/loss)
for n in ${INNER//,/ }; do EXIT_METRICS+=("eval/gsm8k/exit$n/loss"); done
python results.py "$OUT"/sft_exits_s[0-9]* "$OUT"/soft_s[0-9]* --metrics "${EXIT_METRICS[@]}"
python results.py "$OUT"/sft_exits_s[0-9]* "$OUT"/soft_s[0-9]* --metrics method/full/accuracy method/threshold/accuracy \
  method/threshold/speedup method/threshold/mean_exit_layer
python results.py "$OUT"/sft_s[0-9]* "$OUT"/soft_s[0-9]* --metrics "${MATH_METRICS[@]}"
