#!/usr/bin/env bash
# Sets up .venv and runs detection on an example image with the published weights
# (downloaded from the Hugging Face Hub on first use; pass a local checkpoint with MODEL=...).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -c constraints.txt -e .
.venv/bin/gdino detect examples/chelsea.png --prompt "a cat. a remote control." \
    ${MODEL:+--model "$MODEL"} --annotate out/
echo "annotated image written to out/chelsea.png" >&2
