#!/usr/bin/env bash
# Prepare what a lent GPU machine needs for a job, in folders that git ignores here (.git/info/exclude), one for
# each call that carries them: the machine reaches no package registry and a call carries at most 64 MiB.
#
#   PATH=$PWD/.venv/bin:$PATH bash scripts/gpu_kit.sh demo    # for scripts/gpu_demo_v2.sh (the demo's v2)
#   PATH=$PWD/.venv/bin:$PATH bash scripts/gpu_kit.sh speed   # for scripts/gpu_speed.sh (the GPU speed rows)
#
# demo: the demo decoder's GGUF file alone is 94 MiB, so it travels in two halves:
#   .dev1: the wheels the GPU image lacks (transformers, gguf, easy-vqa at constraints.txt's versions, for its
#          Python 3.12) and the GGUF file's first 38 MiB
#   .dev2: the rest of the GGUF file and its SHA-256 (the build call joins and checks them)
# speed: .dev3: the transformers wheel (the image has an older one).
# It then prints what each call would carry: the tree (tracked and untracked files git does not ignore) plus that
# call's folder, which must stay under 64 MiB. For the demo the shipped v1 parts (43 MB) do not fit beside a half of
# the GGUF file: move them out of the tree for the calls (`mv twigvlm/demo/assets /tmp/demo-assets-v1`, and back
# after), then run this again to see the sizes.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
JOB=${1:-demo}
for folder in /.dev1/ /.dev2/ /.dev3/ /.site/; do
  grep -qxF "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >> .git/info/exclude
done
wheels() { # the given packages' wheels, at constraints.txt's versions, for the GPU image's Python 3.12
  local pins
  pins=$(grep -E "^($1)==" constraints.txt)
  # shellcheck disable=SC2086  # pins is a list of requirements
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$2" $pins
}
case $JOB in
  demo)
    rm -rf .dev1 .dev2
    mkdir -p .dev1 .dev2
    gguf=$(python3 -c "from twigvlm.demo.decoder import gguf_path; print(gguf_path())")
    half=$((38 * 1024 * 1024))
    head -c "$half" "$gguf" > .dev1/gguf.part1
    tail -c +$((half + 1)) "$gguf" > .dev2/gguf.part2
    sha256sum "$gguf" | cut -d' ' -f1 > .dev2/gguf.sha256
    cat .dev1/gguf.part1 .dev2/gguf.part2 | sha256sum -c <(echo "$(cat .dev2/gguf.sha256)  -") > /dev/null
    wheels "transformers|gguf|easy-vqa" .dev1
    kits=(.dev1 .dev2)
    calls='  1. carry [".dev1"], timeout 300: bash scripts/gpu_demo_v2.sh prep
  2. carry [".dev2"], timeout 600: OUT=$OUT bash scripts/gpu_demo_v2.sh build
  3. (if the build call left some of the bench out) timeout 300: OUT=$OUT bash scripts/gpu_demo_v2.sh bench
then here: bash scripts/gpu_demo_v2.sh unpack <the folder the files came back in>'
    ;;
  speed)
    rm -rf .dev3
    mkdir -p .dev3
    wheels transformers .dev3
    kits=(.dev3)
    calls='  carry [".dev3"], timeout 540: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir
    --target /tmp/site .dev3/*.whl && export PYTHONPATH=/tmp/site:$PWD && OUT=$OUT BUDGET_S=300 bash scripts/gpu_speed.sh'
    ;;
  *)
    echo "gpu_kit.sh: unknown job $JOB (demo or speed)" >&2
    exit 2
    ;;
esac
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2> /dev/null | tail -n 1 | cut -f1)
mib() { echo "$(($1 / 1024 / 1024)) MiB"; }
for kit in "${kits[@]}"; do
  size=$(du -sb "$kit" | cut -f1)
  verdict=fits
  if [ $((tree + size)) -ge $((64 * 1024 * 1024)) ]; then verdict="TOO LARGE: move twigvlm/demo/assets out first"; fi
  echo "$kit: $(mib "$size") + the tree $(mib "$tree") = $(mib $((tree + size))) of 64 MiB ($verdict)"
done
echo "The calls (the device tool's run; each timeout leaves room for one rerun):"
echo "$calls"
