#!/usr/bin/env bash
set -euo pipefail
# S3FT (Gupta et al., NAACL Findings 2025, arXiv 2502.08130): train on the model's own correct answers, else its
# accepted rewrite of the gold, else the gold. Claim (Table 2 and abstract): in-domain accuracy at least SFT's
# (GSM8K 56.9 vs 53.4 on Mistral-7B-Instruct-v0.2) with a smaller drop on held-out tasks (2.5 vs 4.4 points).
# Here: S3FT vs SFT on GSM8K with sft.sh's budget and evaluation (MBPP, SQuAD, TriviaQA held out), and the share of
# own / rewrite / gold targets (the paper's Table 3). The paper fine-tunes with LoRA rank 8 (lr, epochs unknown);
# every script here trains all weights with the same budget.
# Hardware: 8x H100 80GB (NPROC=8, default) or NPROC=1 on one H100/H200 (the same numbers). bf16.
# Time: not measured. The rebuild greedily answers the 7,000 training problems and rewrites the rejected ones (up to
#   512 new tokens each, once: cached in $OUT/cache and shared by all seeds), then sft.sh's training per seed.
# Models and datasets download from the Hugging Face hub. The SFT baseline is sft.sh's runs (trained first if missing).
# Env: NPROC (8), MODEL (Qwen/Qwen2.5-0.5B-Instruct), SEEDS ("0 1 2"), OUT (runs/paper); see benchmark/common.sh.
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
prepare_data
need_sft

for seed in $SEEDS; do
  launch "$OUT/s3ft_s$seed" torchrun --standalone --nproc_per_node "$NPROC" s3ft.py --model "$MODEL" "${MATH[@]}" \
    --seed "$seed" --eval_before "$(first "$seed")" --own_answers true --gen_max_new_tokens "$NEW_TOKENS" \
    --gen_temperature 0 --gen_batch_size 64 --gen_seed 0 --leak_filter true --cache_dir "$OUT/cache"
done

python results.py "$OUT"/sft_s[0-9]* "$OUT"/s3ft_s[0-9]* --metrics "${MATH_METRICS[@]}"
python - "$OUT"/s3ft_s[0-9]*/metrics.jsonl <<'EOF'
import json
import sys

for path in sys.argv[1:]:  # where the targets came from (the config record; the paper's Table 3)
    config = next(r for r in map(json.loads, open(path)) if r.get("event") == "config")
    print(path, {k[7:]: round(config[k], 3) for k in ("method/own", "method/rewrite", "method/gold") if k in config})
EOF
