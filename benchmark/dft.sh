#!/usr/bin/env bash
set -euo pipefail
# DFT (Wu et al. 2025, arXiv 2508.05629), `asft.py --mode dft`: each token's cross-entropy weighted by its detached
# probability. Claim (headline table): DFT beats SFT on math, e.g. Qwen2.5-Math-1.5B trained on 100k NuminaMath-CoT
# (lr 5e-5, batch 256, 1 epoch) averages 31.58 vs SFT's 18.01 over Math500/Minerva/OlympiadBench/AIME24/AMC23.
# Here: DFT vs SFT on GSM8K with sft.sh's equal budget (lr 1e-5, batch 64, 330 steps) and held-out MBPP, SQuAD and
# TriviaQA; set LR=5e-5 for the paper's rate (it then applies to the SFT baseline too, so use another OUT).
# Hardware: 8x H100 80GB (NPROC=8, default) or NPROC=1 on one H100/H200 (the same numbers). bf16.
# Time: not measured; DFT's step costs the same as SFT's (one multiply per token).
# Models and datasets download from the Hugging Face hub. The SFT baseline is sft.sh's runs (trained first if missing).
# Env: NPROC (8), MODEL (Qwen/Qwen2.5-0.5B-Instruct), SEEDS ("0 1 2"), OUT (runs/paper); see benchmark/common.sh.
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
prepare_data
need_sft

for seed in $SEEDS; do
  launch "$OUT/dft_s$seed" torchrun --standalone --nproc_per_node "$NPROC" asft.py --model "$MODEL" "${MATH[@]}" \
    --seed "$seed" --eval_before "$(first "$seed")" --mode dft
done

python results.py "$OUT"/sft_s[0-9]* "$OUT"/dft_s[0-9]* --metrics "${MATH_METRICS[@]}"
