#!/usr/bin/env bash
set -euo pipefail
# RoSTE (Wei et al., ICML 2025, arXiv 2502.09003): quantization-aware SFT through W4A4KV4 fake quantizers with a
# straight-through estimator and Hadamard rotations (R1 fused; R2/R3/R4 chosen per layer by measured quantization
# error). Claim: RoSTE's quantized model beats SFT followed by post-training quantization (RTN, QuaRot-style
# rotation + RTN) and the plain STE (the official README figures: Pythia-6.9B and Qwen2.5-7B on TL;DR, and
# Llama-3.1-8B). Here: GSM8K on Qwen2.5-0.5B-Instruct (896 = 28 x 32 and 4864 = 76 x 64: Hadamard orders the code
# builds).
# Recipe: the official configs/recipes/<model>_qa_sft_roste.yaml (Hong-Lab-UMN-ECE/RoSTE @055f255), not sft.sh's
#   budget: 1 epoch (STEPS = floor(training rows / 128); the last partial batch is dropped, the HF Trainer keeps
#   it), global batch 128, no warm-up, cosine to 0, weight decay 0, AdamW (0.9, 0.999) (TRAINER in common.sh),
#   W4A4KV4 asymmetric with clip 0.95 for w, a and kv (roste.py's defaults, passed explicitly), lr by model:
#   Qwen2.5-0.5B 5e-5, Qwen2.5-7B 1e-5, Pythia-1B 3e-5, Pythia-6.9B 3e-6 (an -Instruct model takes its base model's
#   rate; roste.py refuses Pythia's fused GPT-NeoX attention, which the official code first converts to a Llama
#   layout). The rotation search as the official code runs it: symmetric clip-1 quantizers (--search_quantizer
#   symmetric); SEARCH_BATCHES=official feeds it the official batches (the first 128 prompts, left-padded to 512).
#   Kept from common.sh's MATH: the data, bf16, --max_length 1024 (the recipe's 2048 cuts no GSM8K sample), eval.
# Fair comparison: the SFT comparator is trained here (sft.py, $OUT/roste_recipe_sft_s<seed>) with the same RECIPE
#   flags after the same MATH flags, so it differs from RoSTE only by the quantizers and rotations (the official
#   <model>_sft.yaml recipes have the same settings too); the post-training baselines quantize that model, evaluation
#   only: SFT + RTN (`--steps 0 --qat false --rotation none`) and SFT + rotation + RTN (`--rotation adaptive`);
#   ABLATIONS=1 adds QA-SFT with the plain STE (`--qat true --rotation none`), under the same RECIPE.
# The table's last two columns: the quantized model's held-out GSM8K loss and the same weights with quantizers off.
# Fake quantization only (no integer kernels): no speed or memory claim.
# Hardware: 8x H100 80GB (NPROC=8, default) or NPROC=1 on one H100/H200 (the same numbers). bf16.
# Time: not measured (fake-quantized training and decoding are slower than SFT's; not timed at this scale).
# Models and datasets download from the Hugging Face hub.
# Env: NPROC (8), MODEL (Qwen/Qwen2.5-0.5B-Instruct), SEEDS ("0 1 2"), OUT (runs/paper), BITS (4; 3 = the W3A3KV3
#   study, where the embedded world separated the methods), ROSTE_LR (the recipe's rate for MODEL), ROSTE_BATCH
#   (128; the rehearsal's MATH_BATCH under REHEARSAL=1), SEARCH_BATCHES (random | official); see benchmark/common.sh.
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
BITS=${BITS:-4}
SEARCH_BATCHES=${SEARCH_BATCHES:-random}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
prepare_data

case "$MODEL" in  # configs/recipes/*_qa_sft_roste.yaml learning_rate
  *[Qq]wen2.5-0.5[Bb]*) RECIPE_LR=5e-5 ;;
  *[Qq]wen2.5-7[Bb]*) RECIPE_LR=1e-5 ;;
  *pythia-1[bB]*) RECIPE_LR=3e-5 ;;
  *pythia-6.9[bB]*) RECIPE_LR=3e-6 ;;
  *) RECIPE_LR= ;;
esac
ROSTE_LR=${ROSTE_LR:-$RECIPE_LR}
if [ -z "$ROSTE_LR" ]; then
  echo "error: the official RoSTE recipes give no learning rate for $MODEL: set ROSTE_LR" >&2
  exit 1
fi
if [ "$REHEARSAL" = 1 ]; then ROSTE_BATCH=${ROSTE_BATCH:-$MATH_BATCH}; fi
ROSTE_BATCH=${ROSTE_BATCH:-128}
ROSTE_STEPS=$(( $(wc -l < "$DATA/gsm8k_train.jsonl") / ROSTE_BATCH ))  # 1 epoch: 7,000 / 128 = 54 steps

RECIPE=(--lr "$ROSTE_LR" --batch_size "$ROSTE_BATCH" --micro_batch_size "$(micro "$ROSTE_BATCH")" --steps "$ROSTE_STEPS"
        --warmup_ratio 0 --min_lr_ratio 0 --weight_decay 0 --adam_beta2 0.999)
QUANT=(--w_bits "$BITS" --a_bits "$BITS" --kv_bits "$BITS" --w_sym false --a_sym false --kv_sym false --w_clip 0.95
       --a_clip 0.95 --kv_clip 0.95 --rotation_seed 42)
SEARCH=(--search_quantizer symmetric --search_batches "$SEARCH_BATCHES" --search_samples 128)
for seed in $SEEDS; do
  launch "$OUT/roste_recipe_sft_s$seed" torchrun --standalone --nproc_per_node "$NPROC" sft.py --model "$MODEL" \
    "${MATH[@]}" "${RECIPE[@]}" --seed "$seed" --eval_before "$(first "$seed")"
  launch "$OUT/roste_recipe_w${BITS}_s$seed" torchrun --standalone --nproc_per_node "$NPROC" roste.py --model "$MODEL" \
    "${MATH[@]}" "${RECIPE[@]}" "${QUANT[@]}" "${SEARCH[@]}" --seed "$seed" --eval_before "$(first "$seed")" \
    --qat true --rotation adaptive
  launch "$OUT/roste_recipe_sft_rtn_w${BITS}_s$seed" torchrun --standalone --nproc_per_node "$NPROC" roste.py \
    --model "$OUT/roste_recipe_sft_s$seed/final" "${MATH[@]}" "${RECIPE[@]}" "${QUANT[@]}" --seed "$seed" --steps 0 \
    --eval_before false --qat false --rotation none --eval_full_precision false
  launch "$OUT/roste_recipe_sft_rotrtn_w${BITS}_s$seed" torchrun --standalone --nproc_per_node "$NPROC" roste.py \
    --model "$OUT/roste_recipe_sft_s$seed/final" "${MATH[@]}" "${RECIPE[@]}" "${QUANT[@]}" "${SEARCH[@]}" \
    --seed "$seed" --steps 0 --eval_before false --qat false --rotation adaptive --eval_full_precision false
  if [ "$ABLATIONS" = 1 ]; then
    launch "$OUT/roste_recipe_ste_w${BITS}_s$seed" torchrun --standalone --nproc_per_node "$NPROC" roste.py \
      --model "$MODEL" "${MATH[@]}" "${RECIPE[@]}" "${QUANT[@]}" --seed "$seed" --eval_before false --qat true \
      --rotation none
  fi
done

RUNS=("$OUT"/roste_recipe_sft_s[0-9]* "$OUT"/roste_recipe_sft_rtn_w"$BITS"_s[0-9]*
      "$OUT"/roste_recipe_sft_rotrtn_w"$BITS"_s[0-9]* "$OUT"/roste_recipe_w"$BITS"_s[0-9]*)
if [ "$ABLATIONS" = 1 ]; then RUNS+=("$OUT"/roste_recipe_ste_w"$BITS"_s[0-9]*); fi
python results.py "${RUNS[@]}" --metrics "${MATH_METRICS[@]}" fp/eval/gsm8k/loss
