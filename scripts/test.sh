#!/usr/bin/env bash
# Install everything, then run every check: ruff, mypy (strict) and the whole
# pytest suite (unit, integration with real QEMU, lab guest with a real kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check src tests bench tools
ruff format --check src tests bench tools
echo "== mypy"; mypy
echo "== floors"; bash scripts/floors.sh
echo "== pytest"
set +e
pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
