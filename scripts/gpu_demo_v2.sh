#!/usr/bin/env bash
# Build the demo's v2 on one lent CUDA GPU in three calls of the device tool: the whole base (vision tower,
# projector, LoRA), its twig and the twig's pruning head, then how prunable it is on val (TTP beside FastV,
# VisionZip, CDPruner and DART at R̄ = M/9; the head, wipe and budget ablations; a second twig from the paper's
# initialisation, layers K+1..K+T, trained as the built one from the last T layers, beside it). The GPU machine
# reaches nothing outside, and one call carries at most 64 MiB, so the decoder's GGUF file (94 MiB) travels in two
# halves, in the kit that `scripts/gpu_kit.sh` prepares (.dev1: wheels and the first half; .dev2: the second half).
#
#   bash scripts/gpu_demo_v2.sh prep    # call 1, carry .dev1: install the wheels (.site), write the twig's and
#                                       #   the head's data sets (they do not depend on the base)
#   bash scripts/gpu_demo_v2.sh build   # call 2, carry .dev2: join the GGUF, build v2 (BUDGET minutes for the
#                                       #   vision stages; the twig and the head after them), pack the parts into
#                                       #   $OUT, then measure on val while CALL_S seconds allow
#   bash scripts/gpu_demo_v2.sh bench   # call 3, if the build call had no time left: measure on val (on the
#                                       #   machine still warm from the build call: its .site and GGUF file)
#   bash scripts/gpu_demo_v2.sh unpack DIR   # here, afterwards: the returned parts into runs/demo-v2/assets
#
# $OUT (default runs/gpu-v2) receives at most 8 files, each under 16 MiB: train.log, bench.log, bench.tar (each
# ablation's results.json and table.md) and v2-assets.tar.part-aa, -ab, … (runs/demo-v2/assets: vision.safetensors,
# decoder_lora.safetensors, twig/). Every stage is resumable: a call cut short leaves its checkpoints in
# runs/demo-v2/work on the warm machine, and the same call again continues. A smoke run of all of it on a CPU:
#   DEVICE=cpu LIMIT=2 CALL_S=100000 INIT_STEPS=2 OUT=/tmp/smoke/out EXTRA="--pretrain-steps 2 \
#   --pretrain-batch 4 --align-steps 3 --align-batch 2 --eval-n 2 --eval-describe 1 --twig-examples 16 \
#   --head-examples 8" bash scripts/gpu_demo_v2.sh build
# (on a CPU the wheels are not needed: run it with twigvlm's virtual environment first on PATH).
set -euo pipefail
PHASE=${1:?"usage: gpu_demo_v2.sh prep|build|bench|unpack DIR"}
case $PHASE in
  prep | build | bench | unpack) ;;
  *)
    echo "gpu_demo_v2.sh: unknown phase $PHASE (prep, build, bench or unpack DIR)" >&2
    exit 2
    ;;
esac
OUT=$(realpath -m "${OUT:-runs/gpu-v2}")
BUDGET=${BUDGET:-4.5}     # minutes for the vision stages (alignment fits its schedule to them)
CALL_S=${CALL_S:-540}     # the build call's own limit: the bench runs in it only while this leaves room
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-60}
WORKERS=${WORKERS:-$(($(nproc) > 2 ? $(nproc) - 2 : 1))}
ROOT=runs/demo-v2
ASSETS=$ROOT/assets
WORK=$ROOT/work
start=$(date +%s)
if [ "$PHASE" != unpack ]; then mkdir -p "$OUT" "$ASSETS"; fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TWIGVLM_DEMO_ASSETS=$PWD/$ASSETS
if [ -d .site ]; then export PYTHONPATH=$PWD/.site:$PWD; fi
if [ "$DEVICE" = cuda ] && [ "$PHASE" != prep ] && [ "$PHASE" != unpack ] && [ ! -d .site ]; then
  echo "gpu_demo_v2.sh: no .site here: run the prep call first (a machine given back between calls starts bare)" >&2
  exit 2
fi
quiet() { sed -u 's/\r/\n/g' | { grep --line-buffered -v -E "[0-9.?]+(s/[a-z]+|[a-z]+/s)[],]" || true; }; }
elapsed() { echo $(($(date +%s) - start)); }

table() { # one table on val in dtype $2: a published one (scripts/demo_tables.sh), or init (the two twigs)
  if [ "$1" = init ]; then
    python3 -m twigvlm bench --model demo --twig "demo,$ROOT/ablate/T3-next" --wipe-layer 23 --ablation twig \
      --device "$DEVICE" --dtype "$2" --split val --tasks easyvqa,scenes --limit "$LIMIT" --out "$ROOT/bench/init"
  else
    WORK=$ROOT/bench TABLES=$1 SPLIT=val DEVICE=$DEVICE DTYPE=$2 LIMIT=$LIMIT bash scripts/demo_tables.sh
  fi
}

bench() {
  local dtype=bfloat16 name
  if [ "$DEVICE" = cpu ]; then dtype=float32; fi
  # the headline's methods at M/9 first (what the base is judged on), then the ablations; last the twig's
  # initialisation: a twig from the paper's layers K+1..K+T, trained as the built one (from the last T layers) was
  for name in headline head wipe budget init; do
    if [ "$PHASE" = build ] && [ $(($(elapsed) + 75)) -gt "$CALL_S" ]; then
      echo "bench: $name and what follows left for the bench call ($(elapsed) s gone)" | tee -a "$OUT/bench.log"
      break
    fi
    if [ -f "$ROOT/bench/$name/results.json" ]; then continue; fi # measured in an earlier call
    if [ "$name" = init ]; then # (its lines filtered: none left, as on a re-run that finds the twig, is no failure)
      python3 scripts/train_ablation_twigs.py --work "$ROOT/ablate" --data-work "$WORK" --twigs 3:next \
        --steps "${INIT_STEPS:-1000}" --device "$DEVICE" 2>&1 | quiet | { grep -E "agreement|Error" || true; } \
        | tee -a "$OUT/bench.log" || echo "bench: the second twig's training failed" | tee -a "$OUT/bench.log"
    fi
    if ! table "$name" "$dtype" 2>&1 | quiet | tail -n 16 | tee -a "$OUT/bench.log"; then
      echo "bench: $name failed (its last lines above); going on with the next" | tee -a "$OUT/bench.log"
    fi
    tar -C "$ROOT" -cf "$OUT/bench.tar" --exclude='*.png' bench # after each run: a call cut short keeps the rest
  done
  echo "bench: $(elapsed) s" | tee -a "$OUT/bench.log"
}

decoder() { # the decoder's GGUF file from the two halves the calls carried (the build and bench phases read it)
  if [ -f .dev2/gguf.part2 ]; then
    if ! echo "$(cat .dev2/gguf.sha256)  /tmp/decoder.gguf" | sha256sum -c --quiet > /dev/null 2>&1; then
      cat .dev1/gguf.part1 .dev2/gguf.part2 > /tmp/decoder.gguf.part # (none yet, or not these halves' file)
      echo "$(cat .dev2/gguf.sha256)  /tmp/decoder.gguf.part" | sha256sum -c --quiet
      mv /tmp/decoder.gguf.part /tmp/decoder.gguf
    fi
    export TWIGVLM_DECODER_GGUF=/tmp/decoder.gguf
  elif [ "$DEVICE" = cuda ]; then # (a CPU smoke run reads the installed decoder)
    echo "gpu_demo_v2.sh: no .dev2/gguf.part2 here: carry .dev2 (scripts/gpu_kit.sh demo) for the $PHASE call" >&2
    exit 2
  fi
}

case $PHASE in
  prep)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site .dev1/*.whl
    export PYTHONPATH=$PWD/.site:$PWD
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/train.log"
    # shellcheck disable=SC2086  # EXTRA is a list of options (the build's: --twig-examples, --head-examples)
    python3 -m twigvlm.demo.build --recipe v2 --data-only --work "$WORK" --workers "$WORKERS" ${EXTRA:-} 2>&1 \
      | quiet | tee -a "$OUT/train.log"
    echo "prep: $(elapsed) s" | tee -a "$OUT/train.log"
    ;;
  build)
    decoder
    if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$OUT/train.log"; fi
    # the build stops in time to pack what it has (the vision parts once written, the twig once trained)
    left=$((CALL_S - $(elapsed) - 20))
    if [ "$left" -lt 60 ]; then left=60; fi  # (timeout 0 would mean no limit)
    built=yes
    # shellcheck disable=SC2086  # EXTRA is a list of options
    if ! timeout "$left" python3 -m twigvlm.demo.build --recipe v2 --device "$DEVICE" --work "$WORK" \
      --workers "$WORKERS" --budget-min "$BUDGET" --eval-every 100000 --eval-n 128 --eval-describe 32 ${EXTRA:-} \
      2>&1 | quiet | tee -a "$OUT/train.log"; then
      built=no
      echo "build: stopped or failed within its ${left} s; run the build call again to go on" | tee -a "$OUT/train.log"
    fi
    echo "build: $(elapsed) s" | tee -a "$OUT/train.log"
    rm -f "$OUT"/v2-assets.tar.part-*
    tar -C "$ROOT" -cf - assets | split -b 15M - "$OUT/v2-assets.tar.part-"
    if [ "$built" = yes ]; then bench; fi
    ;;
  bench)
    decoder
    bench
    ;;
  unpack)
    DIR=${2:?"usage: gpu_demo_v2.sh unpack DIR (the folder the build call's files came back in)"}
    mkdir -p "$ROOT"
    cat "$DIR"/v2-assets.tar.part-* | tar -C "$ROOT" -xf -
    if [ -f "$DIR/bench.tar" ]; then tar -C "$ROOT" -xf "$DIR/bench.tar"; fi
    echo "the v2 parts are in $ASSETS: use them with TWIGVLM_DEMO_ASSETS=$PWD/$ASSETS"
    ;;
esac
