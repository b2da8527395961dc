#!/usr/bin/env bash
# Trains the shapes model from scratch: generates the synthetic data set, then `gdino train`
# with the shapes preset (random weights), validating COCO mAP after each epoch; finally scores
# the last checkpoint on held-out images (pairs never seen in training, e.g. "green triangle").
# Usage: scripts/train_shapes.sh [OUT_DIR] [extra gdino train arguments...]
set -euo pipefail
OUT=${1:-out-shapes}
shift || true
GDINO=${GDINO:-gdino}
DATA="$OUT/data"
if [ ! -f "$DATA/held_out.json" ]; then
  $GDINO shapes --out "$DATA" --train "${SHAPES_TRAIN:-400}" --val "${SHAPES_VAL:-50}" --held-out "${SHAPES_HELD_OUT:-100}"
fi
$GDINO train --data "$DATA/train.json" --val "$DATA/val.json" --model config:shapes --out "$OUT/run" \
  --epochs "${EPOCHS:-20}" --batch-size 4 --lr 5e-4 --schedule cosine --warmup 20 \
  --image-size 160 --no-augment --max-labels 10 --save-every 25 --resume "$@"
LAST=$(ls -td "$OUT"/run/epoch-* "$OUT"/run/last 2>/dev/null | head -1)  # the newest checkpoint
$GDINO eval coco --model "$LAST" \
  --images "$DATA" --annotations "$DATA/held_out.json" --out "$OUT/held_out_metrics.json"
