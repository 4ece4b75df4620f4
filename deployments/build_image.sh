#!/usr/bin/env bash
# Build the docker runner's worker image with no container registry:
#   1. a Debian bookworm base image from debootstrap (once; reused while it exists),
#   2. deployments/Dockerfile.cpu (default) or Dockerfile.cuda on top of it.
#
# Usage: deployments/build_image.sh [cpu|cuda]
#   FORGEFLOW_DOCKER_IMAGE  tag to build (default forgeflow-worker:cpu / forgeflow-worker:cuda)
#   FORGEFLOW_BASE_IMAGE    base tag (default forgeflow-base:bookworm)
#   DEBIAN_MIRROR           debootstrap mirror (default http://deb.debian.org/debian)
#
# The machine's CA certificates (an intercepting TLS proxy's) are copied into a temporary build
# context so pip works during the build, and removed from the image at the end of the build.
# They are never written into the repository.
set -euo pipefail

FLAVOUR=${1:-cpu}
case "$FLAVOUR" in
  cpu|cuda) ;;
  *) echo "usage: $0 [cpu|cuda]" >&2; exit 2 ;;
esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${FORGEFLOW_DOCKER_IMAGE:-forgeflow-worker:$FLAVOUR}
BASE=${FORGEFLOW_BASE_IMAGE:-forgeflow-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export DOCKER_BUILDKIT=0   # the legacy builder: BuildKit would try to pull its frontend

docker info >/dev/null   # fail early and clearly when no engine answers

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  if ! command -v debootstrap >/dev/null; then
    apt-get update -q && apt-get install -y -q debootstrap
  fi
  rootfs=$(mktemp -d /tmp/forgeflow-rootfs.XXXXXX)
  echo "==> debootstrap bookworm into $rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >/tmp/forgeflow-debootstrap.log 2>&1 \
    || { tail -20 /tmp/forgeflow-debootstrap.log >&2; exit 1; }
  echo "==> docker import $BASE"
  tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
  rm -rf "$rootfs"
fi

ctx=$(mktemp -d /tmp/forgeflow-build.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/certs" "$ctx/src"
cp /usr/local/share/ca-certificates/*.crt "$ctx/certs/" 2>/dev/null || true
# The project's sources only: no virtualenv, caches or state.
tar -C "$ROOT" --exclude=__pycache__ --exclude='*.egg-info' --exclude='*.pyc' \
  -c pyproject.toml forgeflow tests/plugin_packages | tar -C "$ctx/src" -x
if [ -f "$ROOT/README.md" ]; then cp "$ROOT/README.md" "$ctx/src/"; else echo "# ForgeFlow" >"$ctx/src/README.md"; fi
cp "$ROOT/deployments/Dockerfile.$FLAVOUR" "$ctx/Dockerfile"

echo "==> docker build $IMAGE (from $BASE)"
docker build --build-arg "BASE=$BASE" -t "$IMAGE" "$ctx"
echo "==> built $IMAGE"
