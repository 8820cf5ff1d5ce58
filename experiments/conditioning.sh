#!/usr/bin/env bash
# Issue 12's vision grid: paper-faithful targets (stem + depthwise, "dw") first, then all convolutions ("all"),
# on fashion, digits and textures; LoRA vs LieRA-Taylor, LieRA-exact and LieRA-Taylor with rms scaling.
# Two processes (one thread each) share the 2 cores through --shard; every run is recorded and skipped when
# re-run, so the script resumes after an interruption. Rates: chosen at r = 4 on the 800/200 validation
# split with seeds 0 and 1, widened once where the best rate sat on the grid's edge; LieRA-exact takes
# LieRA-Taylor's rate. Test: r = 2, 4, 8, seeds 0, 1, 2, on the task's test set.
#   bash experiments/conditioning.sh [runs/vision] [dw all]
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-../runs/vision}; shift || true
TARGET_SETS=${*:-dw all}
export OMP_NUM_THREADS=1
COMMON="--out $OUT --channels-last --epochs 5"
lanes() {  # run one command as two shards side by side
  python vision.py "$@" $COMMON --shard 0/2 & a=$!
  python vision.py "$@" $COMMON --shard 1/2 & b=$!
  wait $a; wait $b
}
for targets in $TARGET_SETS; do
  for task in fashion digits textures; do
    lanes --task $task --targets $targets --stage select --ranks 4 --seeds 0,1 --widen 1 \
      --methods lora,liera-taylor,liera-rms --grid lora=1e-3/3e-3/1e-2,liera-taylor=1e-3/3e-3/1e-2/3e-2,liera-rms=1e-3/3e-3/1e-2
    python vision.py --task $task --targets $targets --stage select --summarise-only $COMMON
  done
  for task in fashion digits textures; do
    lanes --task $task --targets $targets --stage test --ranks 4,2,8 --seeds 0,1,2 \
      --methods lora,liera-taylor,liera-rms,liera-exact --rate-as liera-exact=liera-taylor
  done
done
python report.py --runs "$OUT" --out "$OUT/report.md"
