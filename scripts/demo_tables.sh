#!/usr/bin/env bash
# Re-run the demo's published tables (README's headline and speed, docs/results.md's peers and head at 3M/9 too,
# the budget, wipe and source ablations, and the FinalWipe layer's sweep: one run per K_f in $WIPE_LAYERS) on one
# demo base, with the commands those pages give: test split, CPU, fp32, the first 100 questions of each short-answer
# set and 10 descriptions. Each table goes to $WORK/<table>/ (the bench's results.json and table.md); a table whose
# results.json exists is skipped, so a re-run after an interruption goes on with the next.
#
#   TWIGVLM_DEMO_ASSETS=runs/demo-v2/assets WORK=runs/tables-v2 bash scripts/demo_tables.sh
#   TABLES="headline speed" bash scripts/demo_tables.sh        # some of them (default: all, in the order below)
#
# The base is $TWIGVLM_DEMO_ASSETS (default: the shipped parts); $WORK/machine.txt records the CPU and its flags,
# which every speed figure must be read beside. Do not run it while anything else loads the cores.
# SPLIT, DEVICE and DTYPE (default test, cpu, float32) run the same tables elsewhere: `scripts/gpu_demo_v2.sh`
# measures a new base on val on a GPU with them.
# Needs twigvlm's virtual environment first on PATH (`make install`).
set -euo pipefail
WORK=$(realpath -m "${WORK:-runs/tables}")
LIMIT=${LIMIT:-100}
WIPE_LAYERS=${WIPE_LAYERS:-23 26 28 30}
DESCRIBE=${DESCRIBE:-10}
SPLIT=${SPLIT:-test}
DEVICE=${DEVICE:-cpu}
DTYPE=${DTYPE:-float32}
declare -A ARGS=(
  [headline]="--tasks easyvqa,scenes --limit $LIMIT --methods hf,fastv,visionzip,cdpruner,dart,twig"
  [speed]="--tasks describe --limit $DESCRIBE --methods hf,fastv,visionzip,cdpruner,dart,ssd,twig+ssd"
  [head]="--tasks easyvqa,scenes --limit $LIMIT --ablation head"
  [budget]="--tasks easyvqa,scenes --limit $LIMIT --ablation budget"
  [wipe]="--tasks easyvqa,scenes --limit $LIMIT --ablation wipe"
  [source]="--tasks easyvqa,scenes --limit $LIMIT --ablation source"
  [headline-3]="--tasks easyvqa,scenes --limit $LIMIT --methods hf,fastv,visionzip,cdpruner,dart,twig --keep-ratio 0.3333"
  [head-3]="--tasks easyvqa,scenes --limit $LIMIT --ablation head --keep-ratio 0.3333"
)
sweep=""
for layer in $WIPE_LAYERS; do
  ARGS[wipe-at-$layer]="--tasks easyvqa,scenes --limit $LIMIT --methods hf,fastv,twig --wipe-layer $layer"
  sweep="$sweep wipe-at-$layer"
done
TABLES=${TABLES:-headline speed head budget wipe source headline-3 head-3$sweep}
for table in $TABLES; do
  if [ -z "${ARGS[$table]:-}" ]; then
    echo "demo_tables.sh: unknown table $table (${!ARGS[*]})" >&2
    exit 2
  fi
done
mkdir -p "$WORK"
{
  echo "base: ${TWIGVLM_DEMO_ASSETS:-the shipped parts}; $SPLIT split; $DEVICE, $DTYPE"
  grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-
  grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|avx512f|avx512_vnni|avx512_bf16|amx_bf16)$' \
    | tr '\n' ' '
  echo "($(nproc) cores)"
} > "$WORK/machine.txt"
cat "$WORK/machine.txt"
for table in $TABLES; do
  if [ -f "$WORK/$table/results.json" ]; then
    echo "$table: done already ($WORK/$table)"
    continue
  fi
  start=$(date +%s)
  # shellcheck disable=SC2086  # each table's options are a list
  python3 -m twigvlm bench --model demo --twig demo --split "$SPLIT" --device "$DEVICE" --dtype "$DTYPE" \
    ${ARGS[$table]} --out "$WORK/$table"
  echo "$table: $(($(date +%s) - start)) s"
done
