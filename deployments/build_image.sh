#!/usr/bin/env bash
# Build the docker runner's worker image with no container registry:
#   1. a Debian bookworm base image from debootstrap (once; reused while it exists),
#   2. deployments/Dockerfile.cpu (default) or Dockerfile.cuda on top of it.
#
# Usage: deployments/build_image.sh [cpu|cuda] [--test-plugins]
#   --test-plugins          the test image: the same image plus ForgeFlow's own test plugins
#                           (tests/plugin_packages/forgeflow-testplugins: testkit, broken-import,
#                           needs-weights), tagged forgeflow-worker:<flavour>-test. scripts/test.sh
#                           builds it for the docker-runner tests; never deploy it.
#   FORGEFLOW_DOCKER_IMAGE  tag to build (default forgeflow-worker:cpu / forgeflow-worker:cuda, with
#                           -test appended for --test-plugins)
#   FORGEFLOW_BASE_IMAGE    base tag (default forgeflow-base:bookworm)
#   DEBIAN_MIRROR           debootstrap mirror (default http://deb.debian.org/debian)
#
# The machine's CA certificates (an intercepting TLS proxy's) are copied into a temporary build
# context so pip works during the build, and removed from the image at the end of the build.
# They are never written into the repository. Without --test-plugins the build context holds no
# test code at all.
set -euo pipefail

FLAVOUR=cpu
TEST_PLUGINS=0
for arg in "$@"; do
  case "$arg" in
    cpu|cuda) FLAVOUR=$arg ;;
    --test-plugins) TEST_PLUGINS=1 ;;
    *) echo "usage: $0 [cpu|cuda] [--test-plugins]" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ "$TEST_PLUGINS" = 1 ]; then
  IMAGE=${FORGEFLOW_DOCKER_IMAGE:-forgeflow-worker:$FLAVOUR-test}
else
  IMAGE=${FORGEFLOW_DOCKER_IMAGE:-forgeflow-worker:$FLAVOUR}
fi
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
# The project's sources only: no virtualenv, caches or state; the test plugins only for the test image.
sources=(pyproject.toml LICENSE constraints forgeflow)
if [ "$TEST_PLUGINS" = 1 ]; then sources+=(tests/plugin_packages/forgeflow-testplugins); fi
tar -C "$ROOT" --exclude=__pycache__ --exclude='*.egg-info' --exclude='*.pyc' \
  -c "${sources[@]}" | tar -C "$ctx/src" -x
if [ -f "$ROOT/README.md" ]; then cp "$ROOT/README.md" "$ctx/src/"; else echo "# ForgeFlow" >"$ctx/src/README.md"; fi
cp "$ROOT/deployments/Dockerfile.$FLAVOUR" "$ctx/Dockerfile"

echo "==> docker build $IMAGE (from $BASE; test plugins: $([ "$TEST_PLUGINS" = 1 ] && echo yes || echo no))"
docker build --build-arg "BASE=$BASE" --build-arg "TEST_PLUGINS=$TEST_PLUGINS" -t "$IMAGE" "$ctx"
echo "==> built $IMAGE"
