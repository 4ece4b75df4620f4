#!/usr/bin/env bash
# Everything the test suite needs on a fresh machine, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --services
exec .venv/bin/python -m pytest "$@"
