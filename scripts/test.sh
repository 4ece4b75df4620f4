#!/usr/bin/env bash
# Everything the test suite needs on a fresh machine, then the whole suite (arguments go to pytest).
# On top of scripts/setup.sh --services: the dev tools (pytest, ruff, mypy), ForgeFlow's own test
# plugins (tests/plugin_packages/forgeflow-testplugins: testkit, broken-import, needs-weights) and the
# worker image with them (forgeflow-worker:cpu-test), which the docker-runner tests use. None of these
# reach a user's set-up or the production image.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --services

PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
CONSTRAINTS=${FORGEFLOW_CONSTRAINTS-constraints/this-machine.txt}
if [ -n "$CONSTRAINTS" ]; then PIP+=(-c "$CONSTRAINTS"); fi
if ! .venv/bin/python -c "import forgeflow_testplugins, pytest, pytest_timeout, xdist, ruff, mypy, importlinter, schemathesis, playwright, polars, duckdb, pyarrow" 2>/dev/null; then
  printf '\033[1m[test]\033[0m %s\n' "installing the dev tools and the test plugins"
  "${PIP[@]}" -e '.[api,postgres,docker,vision,dev]' -e tests/plugin_packages/forgeflow-testplugins
fi

# The web page's tests drive Debian's chromium through Playwright (executable_path: Playwright's own
# browser download is never used).
if ! command -v chromium >/dev/null 2>&1; then
  printf '\033[1m[test]\033[0m %s\n' "apt-get install chromium"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

# The gates: lint, format, types and layers (configured in pyproject.toml), before any test runs.
printf '\033[1m[test]\033[0m %s\n' "ruff check, ruff format --check, mypy, lint-imports"
.venv/bin/ruff check forgeflow tests bench
.venv/bin/ruff format --check forgeflow tests bench
.venv/bin/mypy
.venv/bin/lint-imports

# The docker runner's tests call the test plugins inside containers: a test image, not the real one.
export FORGEFLOW_DOCKER_IMAGE=forgeflow-worker:cpu-test
bash deployments/build_image.sh cpu --test-plugins
# The suite starts hundreds of Python processes (APIs, engines, workers, CLIs): each keeps the
# bytecode of what it compiled (the tests as pytest rewrites them too) even where the environment says
# not to (PYTHONDONTWRITEBYTECODE), so that no module is compiled twice. __pycache__ is ignored by git
# and left out of the worker images.
unset PYTHONDONTWRITEBYTECODE
# One pytest-xdist worker more than the cores by default (FORGEFLOW_TEST_WORKERS=0 runs in one
# process): the suite's tests wait on the processes they start part of the time, and with one worker
# per core the CPU sat idle ~14 % of a run (2 cores: 180 of 1,330 core-s); a third worker fills that
# (44 idle). A test group (the vision tests' shared fixtures, the deployment stacks) stays in one worker.
exec .venv/bin/python -m pytest -n "${FORGEFLOW_TEST_WORKERS:-$(($(nproc) + 1))}" --dist loadgroup "$@"
