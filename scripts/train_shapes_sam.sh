#!/usr/bin/env bash
# Trains gdino-shapes-sam, the shapes segmenter (Sam2Config.shapes(): a 2.2M-parameter SAM 2.1 at a
# 384 px input), from scratch on freshly rendered shapes images (box prompts in, masks out), on 2
# CPU threads within 20 minutes, then scores the mean mask IoU of ground-truth box prompts on 100
# never-seen val and held_out images each. Writes the packaged model, src/gdino/data/gdino-shapes-sam/
# (config.json, model.safetensors, preprocessor_config.json, training.json, metrics.json), unless
# OUT names another folder (a folder that already holds a model is refused there).
# Usage: scripts/train_shapes_sam.sh [OUT_DIR] [extra gdino train-sam arguments...]
set -euo pipefail
PACKAGED="$(cd "$(dirname "$0")/.." && pwd)/src/gdino/data/gdino-shapes-sam"
OUT=${1:-$PACKAGED}
shift || true
GDINO=${GDINO:-gdino}
REPLACE=()
if [ "$OUT" = "$PACKAGED" ]; then REPLACE=(--overwrite); fi  # the packaged model is ours to replace
start=$(date +%s)
$GDINO train-sam --out "$OUT" --threads "${THREADS:-2}" --steps "${STEPS:-2000}" --max-minutes "${MAX_MINUTES:-17}" \
  "${REPLACE[@]}" "$@"
echo "train_shapes_sam: training and scoring took $(( $(date +%s) - start )) s" >&2
