#!/usr/bin/env bash
# The lint, format and type gate CI runs: ruff check and ruff format --check over src/, tests/, bench/
# and scripts/, and mypy over src/, configured in pyproject.toml. Uses .venv-test (made as scripts/test.sh makes
# it, if it is not there yet).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-test/bin/ruff ] || [ ! -x .venv-test/bin/mypy ]; then
  python3 -m venv .venv-test
  .venv-test/bin/pip install -q --upgrade pip
  .venv-test/bin/pip install -q -c constraints.txt -e ".[test]"
fi
.venv-test/bin/ruff check src tests bench scripts
.venv-test/bin/ruff format --check src tests bench scripts
.venv-test/bin/mypy
