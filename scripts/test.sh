#!/usr/bin/env bash
# Sets up .venv-test (gdino plus the test-only reference, transformers) and runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-test
.venv-test/bin/pip install -q --upgrade pip
.venv-test/bin/pip install -q -c constraints.txt -e ".[test]"
exec .venv-test/bin/python -m pytest "$@"
