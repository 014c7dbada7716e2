#!/usr/bin/env bash
# The demo base's v2 on a CPU, for when no GPU is lent: train the vision parts (stage 1, then packed alignment),
# grow the twig and its pruning head on the new base (`python -m twigvlm.demo.build --recipe v2`), then measure how
# prunable it is (the bench's budget and wipe ablations on val, TTP beside FastV and VisionZip). Hours of work on a
# 2-core CPU: every stage checkpoints under $WORK and a re-run of this script continues where the last one stopped
# (run it in the background, across sessions). Everything goes to $WORK (default runs/v2cpu): the parts in
# $WORK/assets, the log in $WORK/route.log, the bench's results in $WORK/bench.
#
#   nohup setsid nice -n 5 bash scripts/cpu_demo_v2.sh > /dev/null 2>&1 &
#   tail -f runs/v2cpu/route.log
#
# bf16 autocast where the CPU has AVX-512 BF16 or AMX (PRECISION=fp32 to refuse it); THREADS defaults to every core;
# EXTRA adds options to the build's (a smoke run of the whole route, a few minutes:
#   WORK=/tmp/v2smoke LIMIT=2 EXTRA="--pretrain-steps 2 --pretrain-batch 4 --align-steps 3 --align-batch 2
#   --eval-every 0 --twig-examples 16 --head-examples 8" bash scripts/cpu_demo_v2.sh).
# Needs twigvlm's virtual environment first on PATH (`make install`).
# Memory: alignment's process grows to about 17 GB (6 packed pictures through 30 layers, with their gradients), so
# on a 24 GB machine a test suite beside it gets it killed (out of memory): end it just after a checkpoint
# (runs/v2cpu/vision/*.pt's time changes every 10 steps) rather than pausing it, and start it again after; or give
# it EXTRA="--align-micro 2" (each step's pictures in two parts, gradients summed: the same step, 9.4 GB at its
# peak against 12.4 over the first two steps).
set -euo pipefail
WORK=$(realpath -m "${WORK:-runs/v2cpu}")
LIMIT=${LIMIT:-60}
THREADS=${THREADS:-$(nproc)}
if [ -z "${PRECISION:-}" ]; then
  PRECISION=fp32
  if grep -q -E "avx512_bf16|amx_bf16" /proc/cpuinfo; then PRECISION=bf16; fi
fi
# tcmalloc where the machine has it (Debian's libtcmalloc-minimal4): glibc's allocator hands the step's large
# activations back to the kernel and faults them in again every step. Measured on a 2-core Xeon with AMX
# (bf16, alignment at batch 6): 11.2 s a step and 31 s of system time in a 56-s profile with glibc, 7.9 s and 7 s
# with tcmalloc (jemalloc's defaults were slower than glibc: 17.9 s). MALLOC=glibc refuses it.
if [ "${MALLOC:-tcmalloc}" = tcmalloc ]; then
  for lib in /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib/*/libtcmalloc.so.4; do
    if [ -f "$lib" ]; then export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"; break; fi
  done
fi
mkdir -p "$WORK/assets"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TWIGVLM_DEMO_ASSETS=$WORK/assets
# the log keeps every line but progress bars' redraws (a bar redraws itself after a carriage return, with no
# newline until it closes): one of those a minute, as they come (unbuffered tr, then bash reading line by line)
log() {
  local line last=-60 bar='[0-9.]+(s/[a-z]+|[a-z]+/s)[],]' now=()
  if command -v stdbuf > /dev/null; then now=(stdbuf -o0); fi
  "${now[@]}" tr '\r' '\n' | while IFS= read -r line; do
    if [[ $line =~ $bar ]]; then
      ((SECONDS - last < 60)) && continue
      last=$SECONDS
    fi
    printf '%s\n' "$line"
  done >> "$WORK/route.log"
}
echo "== $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) precision $PRECISION malloc ${LD_PRELOAD:-glibc}" | log
# shellcheck disable=SC2086  # EXTRA is a list of options
python3 -m twigvlm.demo.build --recipe v2 --device cpu --precision "$PRECISION" --work "$WORK" --workers 1 \
  --pretrain-steps 1200 --pretrain-batch 32 --align-steps 900 --align-batch 6 --pack 8 \
  --eval-every 250 --eval-n 64 --eval-describe 16 --save-every 10 --threads "$THREADS" ${EXTRA:-} 2>&1 | log
common=(--model demo --twig demo --device cpu --dtype float32 --split val --tasks scenes,easyvqa --limit "$LIMIT")
for ablation in budget wipe; do
  if [ ! -f "$WORK/bench/$ablation/results.json" ]; then
    python3 -m twigvlm bench "${common[@]}" --ablation "$ablation" --out "$WORK/bench/$ablation" 2>&1 | log
  fi
done
echo "== done $(date -u +%FT%TZ)" | log
