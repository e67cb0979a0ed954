#!/usr/bin/env bash
# One short GPU session, in priority order, each step under its own time limit so a slow or
# failing step cannot eat the next one's time:
#   1. gpu_smoke.py  every CUDA-only path once (about 2-3 minutes)
#   2. bench_fit.py  ViT-S/16 compiled at 384 px: hiercls fit / predict against raw timm
#   3. bench_cv.py   the paper's grid for ViT-S/16 at 3 epochs, extrapolated to 80: grid / bound
#                    (2 of the 5 folds, to fit the call: compilation then weighs more than in the
#                    whole grid, so the ratio errs high)
# Logs and JSON go to OUT; the end prints the docs/performance.md rows.
#
#   bash benchmarks/device_session.sh local-data/all-subtypes "$OUT" 540
#
# DATA is a copy of one shared dataset inside the repository (name it in the device tool's
# carry); SECONDS is the whole session's budget (default 540).
set -u
if [ "$#" -lt 2 ]; then
  sed -n '2,14p' "$0"; exit 2
fi
data=$1; out=$2; budget=${3:-540}
if [ ! -e "$data" ]; then echo "$data: not found (copy a dataset into the repository and name it in carry)"; exit 2; fi
mkdir -p "$out"
start=$(date +%s)

step() {  # step NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds (less if the budget is short)
  local name=$1 limit=$2; shift 2
  local left=$(( budget - ($(date +%s) - start) ))
  if [ "$left" -lt 45 ]; then echo "== skip $name: ${left}s left"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name: exit $? after $(( $(date +%s) - start ))s"
  tail -25 "$out/$name.log"
}

if ! pip install --no-deps -q -e . -e plugins/hiercls-hxe > "$out/install.log" 2>&1; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  echo "pip install failed (see install.log): using PYTHONPATH; the hxe plugin check will fail"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

step smoke 240 python benchmarks/gpu_smoke.py --json "$out/smoke.json"
step fit_vit 240 python benchmarks/bench_fit.py --backbone vit_small_patch16_384 --img-size 384 \
  --batch-size 64 --infer-batch-size 256 --steps 60 --warmup 15 --compile --data "$data" \
  --taxonomy taxonomy/leukemia.yaml --cycle-labels --json "$out/vit_small_patch16_384_compiled.json"
step cv_vit 400 python benchmarks/bench_cv.py --backbones vit_small_patch16_384 --img-size 384 \
  --batch-size 64 --compile --raw-warmup 15 --raw-steps 40 --folds 2 --epochs 3 --data "$data" \
  --cycle-labels --json "$out/cv_vit_s16.json"
ls "$out"/*_compiled.json > /dev/null 2>&1 && python benchmarks/table.py "$out"/*_compiled.json
