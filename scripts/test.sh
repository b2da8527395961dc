#!/usr/bin/env bash
# Sets up .venv-test (gdino plus the test-only reference, transformers) and runs the tests.
#   bash scripts/test.sh           everything (what CI runs)
#   bash scripts/test.sh --fast    without the tests marked slow (859 tests, about 100 s on 2 cores)
# Other arguments go to pytest: bash scripts/test.sh --fast -k detect
set -euo pipefail
cd "$(dirname "$0")/.."
select=()
if [ "${1:-}" = "--fast" ]; then
  shift
  select=(-m "not slow")
fi
python3 -m venv .venv-test
.venv-test/bin/pip install -q --upgrade pip
.venv-test/bin/pip install -q -c constraints.txt -e ".[test]"
# FiftyOne pins opencv-python-headless < 5: its own venv for tests/integrations/test_fiftyone.py (slow tier only)
if [ ${#select[@]} -eq 0 ]; then bash scripts/fiftyone_venv.sh; fi
# The real Label Studio for tests/integrations/test_label_studio_e2e.py (slow tier only): its own venv too
if [ ${#select[@]} -eq 0 ]; then bash scripts/label_studio_venv.sh; fi
exec .venv-test/bin/python -m pytest ${select[@]+"${select[@]}"} "$@"
