#!/usr/bin/env bash
# The speed checks that need a CUDA GPU, in one call: the GPU oracles (`pytest -m gpu`: engine ≡ HF generate,
# pruning ≡ the masked model, SSD ≡ AR, compiled ≡ eager, a batch of chains and trees ≡ its solo runs), then
# `scripts/bench_gpu.py` at LLaVA-1.5-7B's shape on random weights (phases A–E and D: speculation at full and
# realistic acceptance, prompts of 1–4 images, batches of 1, 4 and 16 with chains and trees, and the compiled rows
# against compiled static-cache `generate`). Writes to $OUT (default runs/gpu-speed) at most 4 files:
# pytest_gpu.log, bench_gpu.log, bench_gpu.json and env.txt.
#
#   OUT=runs/gpu-speed BUDGET_S=300 bash scripts/gpu_speed.sh
#   DEVICE=cpu SHAPE=tiny DTYPE=float32 TOKENS=16 REPEATS=1 BUDGET_S=60 bash scripts/gpu_speed.sh   # a CPU smoke run
#
# Needs twigvlm importable with transformers ≥ 5.23 (PYTHONPATH or an install); nothing is downloaded.
set -uo pipefail
OUT=${OUT:-runs/gpu-speed}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-7b}
DTYPE=${DTYPE:-bfloat16}
TOKENS=${TOKENS:-128}
REPEATS=${REPEATS:-3}
BUDGET_S=${BUDGET_S:-300}
PYTEST_S=${PYTEST_S:-150}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
{
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
} 2>&1 | tee "$OUT/env.txt"
# SIGINT at the limit: pytest then prints its summary (what passed, what was cut); the whole log is kept
timeout -s INT -k 15 "$PYTEST_S" python3 -m pytest -m gpu -q -rfEs -p no:cacheprovider tests/test_gpu.py 2>&1 \
  | tee "$OUT/pytest_gpu.log" | tail -n 40
echo "pytest -m gpu: rc ${PIPESTATUS[0]}, $(($(date +%s) - start)) s" | tee -a "$OUT/pytest_gpu.log"
python3 scripts/bench_gpu.py --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --tokens "$TOKENS" --repeats "$REPEATS" \
  --budget-s "$BUDGET_S" --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
echo "bench_gpu: rc ${PIPESTATUS[0]}; all: $(($(date +%s) - start)) s" | tee -a "$OUT/bench_gpu.log"
