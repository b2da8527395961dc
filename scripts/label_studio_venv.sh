#!/usr/bin/env bash
# Makes .venv-label-studio for tests/integrations/test_label_studio_e2e.py: the real Label Studio from PyPI
# (Django and about 160 packages, 1 GB, no torch; about 1.5 minutes to install), which the test starts
# on loopback. It is kept apart from .venv-test: gdino never imports it, and its pins (Django, numpy,
# pandas, opencv) are not gdino's.
#   bash scripts/label_studio_venv.sh      (scripts/test.sh runs it; it does nothing once the venv is there)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-label-studio
version=1.23.2  # the version tests/integrations/test_label_studio_e2e.py was written against
if [ -x "$venv/bin/label-studio" ] && "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('label-studio') != '$version')" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "label-studio==$version"
