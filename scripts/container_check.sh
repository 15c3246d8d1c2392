#!/usr/bin/env bash
# Build the project's Dockerfile with podman on this machine, start the image,
# and get a real embedding from it over HTTP; then play the Kubernetes Deployment
# with `podman kube play` on that image and check what the manifest promises
# (scripts/kube_play_check.py).
#
#   scripts/container_check.sh            build (cached after the first run), run, play, check, clean up
#   scripts/container_check.sh --clean    also delete the cache folder afterwards
#
# These machines have no Docker engine and cannot pull base images, so:
# - python:3.11-slim is replaced by a stand-in built from Debian's own packages
#   (debootstrap + Debian's python3, pip and venv, plus the host's locally added
#   CA certificates, since HTTPS to the package registries is intercepted here);
# - podman keeps its storage and settings in a folder of its own (WORK below),
#   with cgroups off, and builds with --isolation=chroot so RUN steps share the
#   host's network (that is how pip reaches PyPI during the build);
# - the container runs in a private mount namespace where the cgroup2 mount is
#   hidden, on slirp4netns with its port published on 127.0.0.1 only: the
#   default bridge network would change the machine's firewall.
# - podman 4.3's kube play cannot run with cgroups disabled (its containers ask
#   for their pod's cgroup, which a pod made without cgroups lacks: "pod ...
#   cgroup is not set"), so the kube phase lets podman make cgroups, but only
#   below the check's own: in its private mount namespace every cgroup v1
#   hierarchy is replaced by a new child of the cgroup the check runs in, which
#   is removed afterwards.
# The image is built with EMBEDDING_MODEL=all-MiniLM-L6-v2 (the model an
# installed package carries; the model hub is unreachable here) and torch from
# a local wheel folder (the CPU wheel pip finds on this machine).
#
# Environment: VECTOR_EMBEDDER_API_KEY (the key the container accepts; a random
# one when unset), CONTAINER_CHECK_DIR, CONTAINER_CHECK_PORT, PYTHON (a Python
# with pip, for fetching the torch wheel, and PyYAML, for the kube phase;
# default .venv/bin/python).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${CONTAINER_CHECK_DIR:-/var/tmp/vector-embedder-container-check}
PORT=${CONTAINER_CHECK_PORT:-18501}
READY_TIMEOUT_SECONDS=${CONTAINER_CHECK_READY_TIMEOUT:-300}
BASE_IMAGE=localhost/python-standin:3.11-slim-bookworm
# auto (the default image: OpenVINO, no torch) or torch (--build-arg ENGINE=torch, checked by hand:
# CONTAINER_CHECK_ENGINE=torch scripts/container_check.sh).
ENGINE=${CONTAINER_CHECK_ENGINE:-auto}
IMAGE=localhost/vector-embedder:container-check-$ENGINE
# Named once by the first process, so the run phase (a separate process) and the leftover check agree.
export CONTAINER_CHECK_NAME=${CONTAINER_CHECK_NAME:-vector-embedder-check-$$}
CONTAINER=$CONTAINER_CHECK_NAME
# The cgroup the kube phase nests podman's cgroups in, below the check's own in every hierarchy.
export KUBE_CGROUP=${KUBE_CGROUP:-vector-embedder-kube-check-$$}
# The Deployment to play (another one, e.g. a changed copy: CONTAINER_CHECK_KUBE_MANIFEST).
KUBE_MANIFEST=${CONTAINER_CHECK_KUBE_MANIFEST:-$ROOT/deploy/kubernetes/deployment.yaml}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
EMBEDDING_MODEL=all-MiniLM-L6-v2
TOKENIZER_MODEL=sentence-transformers/all-MiniLM-L6-v2
EXPECTED_DIMENSION=384
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
REQUIRED_COMMANDS=(podman buildah debootstrap slirp4netns newuidmap fuse-overlayfs unshare)

export CONTAINERS_STORAGE_CONF=$WORK/config/storage.conf
export CONTAINERS_CONF=$WORK/config/containers.conf
# The same settings with cgroups on, for the kube phase only (see the top).
KUBE_CONTAINERS_CONF=$WORK/config/containers-kube.conf

log() { printf '\n== %s\n' "$*"; }

install_tools() {
    local missing=()
    for command in "${REQUIRED_COMMANDS[@]}"; do
        command -v "$command" >/dev/null || missing+=("$command")
    done
    [ ${#missing[@]} -eq 0 ] && return
    log "Installing podman and friends (missing: ${missing[*]})"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        podman buildah debootstrap slirp4netns uidmap fuse-overlayfs crun catatonit \
        containernetworking-plugins golang-github-containers-common
}

write_podman_config() {
    mkdir -p "$WORK/config" "$WORK/storage" "$WORK/run" "$WORK/tmp"
    cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "overlay"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
EOF
    cat >"$CONTAINERS_CONF" <<EOF
[containers]
cgroups = "disabled"
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$WORK/tmp"
EOF
    sed 's/^cgroups = "disabled"$/cgroups = "enabled"/' "$CONTAINERS_CONF" >"$KUBE_CONTAINERS_CONF"
}

build_base_image() {
    if podman image exists "$BASE_IMAGE"; then
        log "Base image $BASE_IMAGE is cached"
        return
    fi
    log "Building the python:3.11-slim stand-in $BASE_IMAGE from Debian packages"
    local rootfs=$WORK/rootfs context=$WORK/base-context
    rm -rf "$rootfs" "$context"
    debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR"
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE-debootstrap"
    rm -rf "$rootfs"

    mkdir -p "$context/local-ca"
    # The certificates update-ca-certificates adds on the host (registry HTTPS is intercepted here).
    cp -r /usr/local/share/ca-certificates/. "$context/local-ca/"
    cat >"$context/Containerfile" <<EOF
FROM $BASE_IMAGE-debootstrap
COPY local-ca/ /usr/local/share/ca-certificates/
RUN apt-get update -q \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \\
    python3 python3-pip python3-venv ca-certificates \\
 && update-ca-certificates \\
 && rm -rf /var/lib/apt/lists/*
ENV LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
EOF
    podman build --isolation=chroot --pull=never -t "$BASE_IMAGE" "$context"
    podman untag "$BASE_IMAGE-debootstrap" || true
    rm -rf "$context"
}

fetch_torch_wheel() {
    local wheels=$ROOT/wheels python=$PYTHON
    if compgen -G "$wheels/torch-2.13.0+cpu-cp311-*.whl" >/dev/null; then
        log "CPU torch wheel already in wheels/"
        return
    fi
    [ -x "$python" ] || python=python3
    log "Fetching the CPU torch 2.13.0 wheel into wheels/ with $python -m pip"
    # The stand-in's Python is Debian's 3.11, whatever Python runs pip here.
    "$python" -m pip download torch==2.13.0 --no-deps --only-binary=:all: \
        --python-version 3.11 --platform manylinux_2_28_x86_64 -d "$wheels"
    if ! compgen -G "$wheels/torch-2.13.0+cpu-cp311-*.whl" >/dev/null; then
        echo "pip did not fetch a CPU build of torch 2.13.0 (see wheels/); refusing to build with a CUDA one" >&2
        exit 1
    fi
}

build_image() {
    log "Building $IMAGE from $ROOT/Dockerfile"
    local started=$SECONDS
    podman build --isolation=chroot --pull=never --format docker --force-rm \
        --build-arg PYTHON_IMAGE="$BASE_IMAGE" \
        --build-arg TORCH_INDEX_URL= \
        --build-arg EMBEDDING_MODEL="$EMBEDDING_MODEL" \
        --build-arg TOKENIZER_MODEL="$TOKENIZER_MODEL" \
        --build-arg ENGINE="$ENGINE" \
        -t "$IMAGE" "$ROOT"
    BUILD_SECONDS=$((SECONDS - started))
    local size
    size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
    log "Built $IMAGE in ${BUILD_SECONDS}s; image size $((size / 1000000)) MB"
}

# --- run phase: executed in a private mount namespace (see the bottom) ------

hide_cgroup2_mount() {
    # Only inside this namespace: the host keeps its cgroup mounts.
    if mountpoint -q /sys/fs/cgroup/unified; then
        umount /sys/fs/cgroup/unified
    fi
}

remove_container() {
    podman rm --force --ignore "$CONTAINER" >/dev/null || true
}

start_container() {
    log "Starting $CONTAINER on 127.0.0.1:$PORT (slirp4netns)"
    trap remove_container EXIT
    # --read-only as in the Kubernetes Deployment (podman mounts a tmpfs on /tmp);
    # the image's HEALTHCHECK needs systemd timers under podman, which this machine lacks.
    podman run --detach --name "$CONTAINER" --read-only --no-healthcheck \
        --network=slirp4netns -p "127.0.0.1:$PORT:$PORT" \
        -e PORT="$PORT" -e VECTOR_EMBEDDER_API_KEY \
        "$IMAGE" >/dev/null
}

check_container() {
    local started=$SECONDS
    if ! python3 - "$PORT" "$READY_TIMEOUT_SECONDS" "$EXPECTED_DIMENSION" "$CONTAINER" <<'EOF'
import json, math, os, subprocess, sys, time, urllib.error, urllib.request

port, timeout, dimension, container = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + timeout
while True:
    try:
        with urllib.request.urlopen(f"{base}/health/ready", timeout=5) as response:
            print("ready:", response.read().decode())
            break
    except urllib.error.HTTPError as error:
        body = error.read().decode(errors="replace")
        if '"error"' in body:
            sys.exit(f"the model failed to load: {body}")
        failure = f"{error.code} {body}"
    except (urllib.error.URLError, ConnectionError, OSError) as error:
        failure = str(error)
    running = subprocess.run(["podman", "container", "inspect", "--format", "{{.State.Running}}", container],
                             capture_output=True, text=True).stdout.strip()
    if running != "true":
        sys.exit(f"the container stopped before it was ready (last answer: {failure})")
    if time.monotonic() > deadline:
        sys.exit(f"/health/ready did not answer 200 within {timeout:.0f}s: {failure}")
    time.sleep(2)

request = urllib.request.Request(
    f"{base}/embeddings", data=json.dumps({"text": "A container that really embeds."}).encode(),
    headers={"Content-Type": "application/json", "X-API-Key": os.environ["VECTOR_EMBEDDER_API_KEY"]})
with urllib.request.urlopen(request, timeout=30) as response:
    vector = json.load(response)["embeddings"][0]
norm = math.sqrt(sum(value * value for value in vector))
if len(vector) != dimension or not all(isinstance(value, float) for value in vector) or abs(norm - 1) > 1e-3:
    sys.exit(f"bad vector: {len(vector)} values, norm {norm}")
print(f"embedding: {len(vector)} floats, norm {norm:.6f}")

wrong_key = urllib.request.Request(f"{base}/embeddings", data=b'{"text": "x"}',
                                   headers={"Content-Type": "application/json", "X-API-Key": "wrong"})
try:
    urllib.request.urlopen(wrong_key, timeout=10)
    sys.exit("a wrong API key was accepted")
except urllib.error.HTTPError as error:
    if error.code != 401:
        sys.exit(f"a wrong API key got {error.code}, expected 401")
print("wrong API key: 401")
EOF
    then
        log "Container logs"
        podman logs "$CONTAINER" || true
        return 1
    fi
    log "Container answered in $((SECONDS - started))s after start"
    report_container
}

report_container() {
    local logs memory_kb
    logs=$(podman logs "$CONTAINER" 2>&1)
    printf '%s\n' "$logs" | grep -E "Listening at|Booting worker|ready in" || true
    if printf '%s\n' "$logs" | grep -E "Traceback|Failed to start control socket|ERROR"; then
        echo "the container logged errors (above)" >&2
        return 1
    fi
    if podman exec "$CONTAINER" ls /app | grep -E '^(test_.*|conftest|testkit|benchmark_.*|soak_.*|tiny_clip|download_models|model_export)\.py$'; then
        echo "modules that are not the service's were copied into the image (above): check the Dockerfile" >&2
        return 1
    fi
    if [ "$ENGINE" = torch ]; then
        podman exec "$CONTAINER" python -c "import torch; print('torch', torch.__version__, 'in the image (ENGINE=torch)')"
    elif podman exec "$CONTAINER" python -c "import torch" 2>/dev/null; then
        echo "torch is importable in the image: the OpenVINO image must not carry it" >&2
        return 1
    else
        echo "import torch in the image: fails, as it should"
    fi
    podman exec "$CONTAINER" python -c "import urllib.request, json; print('readiness:', urllib.request.urlopen('http://127.0.0.1:$PORT/health/ready').read().decode())"
    memory_kb=$(podman exec "$CONTAINER" sh -c 'cat /proc/[0-9]*/status' | awk '/^VmRSS:/ {sum += $2} END {print sum}')
    echo "user $(podman exec "$CONTAINER" id -u), resident memory of all processes $((memory_kb / 1024)) MB"
}

run_phase() {
    write_podman_config
    hide_cgroup2_mount
    start_container
    check_container
}

# --- kube phase: executed in a private mount namespace of its own -------------

# Each cgroup v1 hierarchy, as "mount point<TAB>the check's own cgroup in it", from /proc/self/cgroup.
cgroup_hierarchies() {
    local controllers path
    while IFS=: read -r _ controllers path; do
        [ -n "$controllers" ] || continue  # the cgroup2 line: its mount is hidden (hide_cgroup2_mount)
        printf '/sys/fs/cgroup/%s\t%s\n' "${controllers#name=}" "${path%/}"
    done </proc/self/cgroup
}

nest_cgroups() {
    if [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]; then
        echo "the kube phase is written for cgroup v1 hierarchies; /sys/fs/cgroup is cgroup2 here" >&2
        return 1
    fi
    local hierarchy own nested
    while IFS=$'\t' read -r hierarchy own; do
        mountpoint -q "$hierarchy" || { echo "no cgroup hierarchy mounted at $hierarchy" >&2; return 1; }
        nested=$hierarchy$own/$KUBE_CGROUP
        mkdir "$nested"
        if [ -f "$nested/cpuset.cpus" ]; then  # a new cpuset has no CPUs until it is given its parent's
            cat "$hierarchy$own/cpuset.cpus" >"$nested/cpuset.cpus"
            cat "$hierarchy$own/cpuset.mems" >"$nested/cpuset.mems"
        fi
        mount --bind "$nested" "$hierarchy"
    done < <(cgroup_hierarchies)
}

kube_phase() {
    if ! "$PYTHON" -c 'import yaml' 2>/dev/null; then
        echo "the kube phase needs a Python with PyYAML: set PYTHON (make install puts one in .venv)" >&2
        return 1
    fi
    write_podman_config
    export CONTAINERS_CONF=$KUBE_CONTAINERS_CONF
    hide_cgroup2_mount
    nest_cgroups
    "$PYTHON" "$ROOT/scripts/kube_play_check.py" "$IMAGE" "$KUBE_MANIFEST"
}

# After the kube phase, outside its namespace: the nested cgroups go (podman leaves its parents behind).
remove_nested_cgroups() {
    local hierarchy own nested left=0
    while IFS=$'\t' read -r hierarchy own; do
        nested=$hierarchy$own/$KUBE_CGROUP
        [ -d "$nested" ] || continue
        find "$nested" -depth -type d -exec rmdir {} + || left=1
    done < <(cgroup_hierarchies)
    if [ "$left" = 1 ]; then
        echo "cgroups below $KUBE_CGROUP still hold processes (above): something of the kube phase runs on" >&2
        return 1
    fi
}

# The storage is the check's own, and only the kube phase makes pods, secrets and volumes in it.
check_kube_leftovers() {
    if [ -n "$(podman pod ps --quiet)$(podman secret ls --quiet)$(podman volume ls --quiet)" ]; then
        echo "the kube phase left pods, secrets or volumes behind:" >&2
        podman pod ps
        podman secret ls
        podman volume ls
        return 1
    fi
}

main() {
    case "${1:-}" in
        --run-phase) run_phase; return ;;
        --kube-phase) kube_phase; return ;;
    esac
    local clean=no
    [ "${1:-}" = "--clean" ] && clean=yes
    if [ -z "${VECTOR_EMBEDDER_API_KEY:-}" ]; then
        VECTOR_EMBEDDER_API_KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
    fi
    export VECTOR_EMBEDDER_API_KEY
    local started=$SECONDS phase_started
    install_tools
    write_podman_config
    phase_started=$SECONDS
    build_base_image
    local base_seconds=$((SECONDS - phase_started))
    fetch_torch_wheel
    build_image
    unshare -m --propagation private "$BASH" "${BASH_SOURCE[0]}" --run-phase
    if [ -n "$(podman ps --all --quiet --filter "name=^$CONTAINER\$")" ]; then
        echo "container $CONTAINER was left behind" >&2
        exit 1
    fi
    log "Playing $KUBE_MANIFEST with podman kube play"
    phase_started=$SECONDS
    local kube_status=0
    unshare -m --propagation private "$BASH" "${BASH_SOURCE[0]}" --kube-phase || kube_status=$?
    remove_nested_cgroups
    check_kube_leftovers
    [ "$kube_status" = 0 ] || exit "$kube_status"
    local kube_seconds=$((SECONDS - phase_started))
    log "Container check passed in $((SECONDS - started))s (base image ${base_seconds}s, image build ${BUILD_SECONDS}s, kube play ${kube_seconds}s)"
    if [ "$clean" = yes ]; then
        podman system reset --force
        rm -rf "$WORK"
    fi
}

main "$@"
