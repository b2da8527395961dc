#!/usr/bin/env bash
# Sets up .venv and runs detection on an example image with the published weights
# (downloaded from the Hugging Face Hub on first use; pass a local checkpoint with MODEL=...), with
# SAM 2.1 tiny's masks (SEGMENTER=... for another segmenter) when it can be had.
# With no network and nothing cached, it says so in one line and runs the packaged shapes models
# (gdino-shapes and gdino-shapes-sam, trained here from scratch) on examples/shapes.png instead, with
# masks, and tracks examples/shapes-video.mp4: real detections, masks and tracks, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -c constraints.txt -e ".[masks,video]"  # masks: RLE and contours; video: gdino track
PUBLISHED=IDEA-Research/grounding-dino-tiny
SEGMENTER=${SEGMENTER:-facebook/sam2.1-hiera-tiny}
if [ -z "${MODEL:-}" ] && ! .venv/bin/python -c "from gdino.utils.hub import resolve; resolve('$PUBLISHED')" 2>/dev/null; then
  echo "demo: $PUBLISHED cannot be downloaded (no network?) and is not cached; running the packaged shapes model gdino-shapes on examples/shapes.png instead" >&2
  .venv/bin/gdino detect examples/shapes.png --model gdino-shapes --masks gdino-shapes-sam --annotate out/ \
      --nms 0.5 --prompt "red circle,green circle,yellow circle,orange circle,green square,red triangle,orange triangle,blue star"
  echo "annotated image (boxes and masks) written to out/shapes.png" >&2
  if .venv/bin/python -c "import av, scipy" 2>/dev/null; then  # gdino[video]
    .venv/bin/gdino track examples/shapes-video.mp4 --classes examples/shapes-video.txt --model gdino-shapes \
        --out out/track --annotate
    echo "tracks written to out/track/ (tracks.jsonl, mot/, annotations.xml, annotated.mp4)" >&2
  else
    echo "demo: pip install 'gdino[video]' to also track examples/shapes-video.mp4" >&2
  fi
  exit 0
fi
MASKS=(--masks "$SEGMENTER")
if ! .venv/bin/python -c "from gdino.utils.hub import resolve; resolve('$SEGMENTER')" 2>/dev/null && [ ! -e "$SEGMENTER" ]; then
  echo "demo: $SEGMENTER cannot be downloaded and is not cached; detecting without masks" >&2
  MASKS=()
fi
.venv/bin/gdino detect examples/chelsea.png --prompt "a cat. a remote control." \
    ${MODEL:+--model "$MODEL"} ${MASKS[@]+"${MASKS[@]}"} --annotate out/
echo "annotated image written to out/chelsea.png" >&2
