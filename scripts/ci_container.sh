#!/usr/bin/env bash
# The container and deployment checks CI runs after the unit tests:
#   1. hadolint on the Dockerfile (any finding fails),
#   2. both GitHub workflows against the GitHub workflow schema,
#   3. the Cloud Run and Kubernetes manifests against the app's routes and the image's port,
#   4. the real image built, started and asked for an embedding, then the Kubernetes Deployment
#      played on it with podman kube play and checked (scripts/container_check.sh).
# Works on a fresh machine: the tools come from requirements-dev.txt (make install)
# and apt-get (podman and friends, installed by container_check.sh when missing).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
cd "$ROOT"

step() {
    local name=$1 started=$SECONDS
    shift
    printf '\n=== %s\n' "$name"
    "$@"
    printf '=== %s: passed in %ds\n' "$name" $((SECONDS - started))
}

if [ ! -x "$VENV/bin/hadolint" ] || [ ! -x "$VENV/bin/check-jsonschema" ]; then
    make install VENV="$VENV"
fi

step "hadolint Dockerfile" "$VENV/bin/hadolint" Dockerfile
step "GitHub workflow schema" "$VENV/bin/check-jsonschema" --builtin-schema vendor.github-workflows \
    .github/workflows/tests.yml .github/workflows/image.yml
step "deployment manifests" "$VENV/bin/python" scripts/check_manifests.py
# Arguments go to container_check.sh (--clean deletes its cache afterwards).
step "container build and run" env PYTHON="$VENV/bin/python" scripts/container_check.sh "$@"
