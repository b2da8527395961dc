#!/usr/bin/env bash
# Sets up .venv and runs detection on an example image with the published weights
# (downloaded from the Hugging Face Hub on first use; pass a local checkpoint with MODEL=...).
# With no network and nothing cached, it says so in one line and runs the packaged shapes model
# (gdino-shapes, trained here from scratch) on examples/shapes.png instead: real detections, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -c constraints.txt -e .
PUBLISHED=IDEA-Research/grounding-dino-tiny
if [ -z "${MODEL:-}" ] && ! .venv/bin/python -c "from gdino.utils.hub import resolve; resolve('$PUBLISHED')" 2>/dev/null; then
  echo "demo: $PUBLISHED cannot be downloaded (no network?) and is not cached; running the packaged shapes model gdino-shapes on examples/shapes.png instead" >&2
  .venv/bin/gdino detect examples/shapes.png --model gdino-shapes --annotate out/ \
      --nms 0.5 --prompt "red circle,green circle,yellow circle,orange circle,green square,red triangle,orange triangle,blue star"
  echo "annotated image written to out/shapes.png" >&2
  if .venv/bin/python -c "import av, scipy" 2>/dev/null; then  # gdino[video]
    .venv/bin/gdino track examples/shapes-video.mp4 --classes examples/shapes-video.txt --model gdino-shapes \
        --out out/track --annotate
    echo "tracks written to out/track/ (tracks.jsonl, mot/, annotations.xml, annotated.mp4)" >&2
  else
    echo "demo: pip install 'gdino[video]' to also track examples/shapes-video.mp4" >&2
  fi
  exit 0
fi
.venv/bin/gdino detect examples/chelsea.png --prompt "a cat. a remote control." \
    ${MODEL:+--model "$MODEL"} --annotate out/
echo "annotated image written to out/chelsea.png" >&2
