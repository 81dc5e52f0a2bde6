#!/usr/bin/env bash
set -euo pipefail
# RoSTE (Wei et al., ICML 2025, arXiv 2502.09003): quantization-aware SFT through W4A4KV4 fake quantizers with a
# straight-through estimator and Hadamard rotations (R1 fused; R2/R3/R4 chosen per layer by measured quantization
# error). Claim: RoSTE's quantized model beats SFT followed by post-training quantization (RTN, QuaRot-style
# rotation + RTN) and the plain STE (the paper: Qwen2.5-0.5B/7B and Pythia on TL;DR, Llama-3.1-8B on Tulu 3; recipe
# numbers not retrieved). Here: GSM8K with sft.sh's equal budget on Qwen2.5-0.5B-Instruct (896 = 28 x 32 and 4864 =
# 76 x 64: Hadamard orders the code builds). Baselines, evaluation only, on sft.sh's final models:
# SFT + RTN (`roste.py --model <sft final> --steps 0 --qat false --rotation none`) and SFT + rotation + RTN
# (`--rotation adaptive`); ABLATIONS=1 adds QA-SFT with the plain STE (`--qat true --rotation none`).
# The table's last two columns: the quantized model's held-out GSM8K loss and the same weights with quantizers off.
# Fake quantization only (no integer kernels): no speed or memory claim.
# Hardware: 8x H100 80GB (NPROC=8, default) or NPROC=1 on one H100/H200 (the same numbers). bf16.
# Time: not measured (fake-quantized training and decoding are slower than SFT's; not timed at this scale).
# Models and datasets download from the Hugging Face hub. The SFT baseline is sft.sh's runs (trained first if missing).
# Env: NPROC (8), MODEL (Qwen/Qwen2.5-0.5B-Instruct), SEEDS ("0 1 2"), OUT (runs/paper), BITS (4; 3 = the W3A3KV3
#   study, where the embedded world separated the methods); see benchmark/common.sh.
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
BITS=${BITS:-4}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
prepare_data
need_sft

QUANT=(--w_bits "$BITS" --a_bits "$BITS" --kv_bits "$BITS" --w_sym false --a_sym false --kv_sym false --w_clip 1.0
       --a_clip 1.0 --kv_clip 1.0 --search_samples 128 --rotation_seed 42)
for seed in $SEEDS; do
  launch "$OUT/roste_w${BITS}_s$seed" torchrun --standalone --nproc_per_node "$NPROC" roste.py --model "$MODEL" \
    "${MATH[@]}" "${QUANT[@]}" --seed "$seed" --eval_before "$(first "$seed")" --qat true --rotation adaptive
  launch "$OUT/sft_rtn_w${BITS}_s$seed" torchrun --standalone --nproc_per_node "$NPROC" roste.py \
    --model "$OUT/sft_s$seed/final" "${MATH[@]}" "${QUANT[@]}" --seed "$seed" --steps 0 --eval_before false \
    --qat false --rotation none --eval_full_precision false
  launch "$OUT/sft_rotrtn_w${BITS}_s$seed" torchrun --standalone --nproc_per_node "$NPROC" roste.py \
    --model "$OUT/sft_s$seed/final" "${MATH[@]}" "${QUANT[@]}" --seed "$seed" --steps 0 --eval_before false \
    --qat false --rotation adaptive --eval_full_precision false
  if [ "$ABLATIONS" = 1 ]; then
    launch "$OUT/roste_ste_w${BITS}_s$seed" torchrun --standalone --nproc_per_node "$NPROC" roste.py --model "$MODEL" \
      "${MATH[@]}" "${QUANT[@]}" --seed "$seed" --eval_before false --qat true --rotation none
  fi
done

RUNS=("$OUT"/sft_s[0-9]* "$OUT"/sft_rtn_w"$BITS"_s[0-9]* "$OUT"/sft_rotrtn_w"$BITS"_s[0-9]* "$OUT"/roste_w"$BITS"_s[0-9]*)
if [ "$ABLATIONS" = 1 ]; then RUNS+=("$OUT"/roste_ste_w"$BITS"_s[0-9]*); fi
python results.py "${RUNS[@]}" --metrics "${MATH_METRICS[@]}" fp/eval/gsm8k/loss
