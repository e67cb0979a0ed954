#!/usr/bin/env bash
# The GPU table of docs/performance.md: every BACKBONE compiled and eager, 384 px, batch 64,
# bf16, joint strategy on the leukemia tree over the real images of DATA (labels cycled over
# its leaves: a speed measurement), then the markdown rows.
#
#   bash benchmarks/gpu_suite.sh local-data/all-subtypes results vit_small_patch16_384 convnext_tiny resnet50
#
# One backbone takes about 3-5 minutes on an H100 (two processes, decode, compilation); split
# the list over several calls where a call's time is limited.
set -euo pipefail
if [ "$#" -lt 3 ]; then
  sed -n '2,9p' "$0"; exit 2
fi
data=$1; out=$2; shift 2
mkdir -p "$out"
common=(--img-size 384 --batch-size 64 --infer-batch-size 256 --steps 60
        --data "$data" --taxonomy taxonomy/leukemia.yaml --cycle-labels)
for backbone in "$@"; do
  python benchmarks/bench_fit.py --backbone "$backbone" "${common[@]}" --compile --warmup 15 \
      --json "$out/${backbone}_compiled.json"
  python benchmarks/bench_fit.py --backbone "$backbone" "${common[@]}" --warmup 10 \
      --json "$out/${backbone}_eager.json"
done
python benchmarks/table.py "$out"/*.json
