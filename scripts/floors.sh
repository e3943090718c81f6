#!/usr/bin/env bash
# Prove the dependency floors pyproject.toml declares: install each direct
# dependency at its floor in a throwaway venv (.floors-venv, kept and reused
# while the pins are unchanged), then import every module, run every
# `vmplug ... --help` and the unit tier there.  See tools/floors.py.
#   bash scripts/floors.sh [--fresh] [--floor NAME=VERSION]... [-- PYTEST_ARGS]
set -euo pipefail
cd "$(dirname "$0")/.."
py=/usr/bin/python3
[ -x "$py" ] || py=python3
exec "$py" tools/floors.py "$@"
