#!/usr/bin/env bash
# CI container stage: build the itk_infer image on a Debian bookworm base made with debootstrap,
# then check it for real: `itk_infer` in a container writes the host run's label maps, the
# Dagster code server in a container serves the definitions over gRPC to `dagster` on the host,
# and one run launched through DockerRunLauncher succeeds and writes the same label maps.
# Everything it starts is stopped and removed at the end, also on failure.
#
# Usage: bash .ci/docker.sh   (as root: it may install docker.io/debootstrap and start dockerd)
# Environment, all optional:
#   ITK_DOCKER_CI_CACHE       cache folder (default ${XDG_CACHE_HOME:-$HOME/.cache}/itk_infer-ci)
#   ITK_DOCKER_CI_IMAGE       tag of the project image (default itk_infer:ci)
#   ITK_DOCKER_CI_TORCH       torch requirement of the image (default torch==2.13.0+cpu); its
#                             wheel is found with pip, as the host's pip configuration finds it
#   ITK_DOCKER_CI_PIN_HOST    1 (default): the image gets the host's package versions, so both
#                             runs use the same numerical stack; 0: the newest the index offers
#   ITK_DOCKER_CI_DEMO        folder with model.onnx and images/ (default examples/demo)
#   ITK_DOCKER_CI_REFRESH_BASE=1   debootstrap the base again even when it is cached
#   ITK_DOCKER_CI_REMOVE_IMAGES=1  remove the images at the end (default: keep them as cache)
#   ITK_DOCKER_CI_RUN_TIMEOUT seconds allowed for the Dagster run (default 600)
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${ITK_DOCKER_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/itk_infer-ci}
IMAGE=${ITK_DOCKER_CI_IMAGE:-itk_infer:ci}
TORCH_REQ=${ITK_DOCKER_CI_TORCH:-torch==2.13.0+cpu}
PIN_HOST=${ITK_DOCKER_CI_PIN_HOST:-1}
DEMO=${ITK_DOCKER_CI_DEMO:-$REPO/examples/demo}
RUN_TIMEOUT=${ITK_DOCKER_CI_RUN_TIMEOUT:-600}
# Bump the suffix when the base's package list changes: the cached tarball and image follow.
BASE_VERSION=bookworm-py311-v1
ROOTFS_IMAGE=itk_infer-ci/debian:$BASE_VERSION
BASE_IMAGE=itk_infer-ci/base:$BASE_VERSION
BASE_TARBALL=$CACHE/debian-$BASE_VERSION.tar
BASE_PACKAGES=python3,python3-venv,python3-pip,ca-certificates
LOCATION=itk_infer  # the location_name of deploy/workspace.docker.yaml
JOB=itk_infer_inference_job
PY=${PYTHON:-python3}
# Docker's own builder: Debian's docker.io has no buildx, and the Dockerfile needs nothing more.
export DOCKER_BUILDKIT=0

CI_ID=itk_infer-ci-$$-$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/itk_infer-docker-ci.XXXXXX")
DOCKERD_PID=""
STAGE_START=$SECONDS
STEP_START=$SECONDS
STEP_NAME=""

log() { printf '[docker.sh %4ds] %s\n' "$((SECONDS - STAGE_START))" "$*"; }
fail() {
    printf '[docker.sh] FAILED (%s): %s\n' "${STEP_NAME:-setup}" "$*" >&2
    exit 1
}
step() {
    if [ -n "$STEP_NAME" ]; then log "done: $STEP_NAME ($((SECONDS - STEP_START)) s)"; fi
    STEP_NAME=$1
    STEP_START=$SECONDS
    log "== $STEP_NAME"
}
show_tail() {  # show_tail FILE LINES: the end of a log, for a failure message
    [ -f "$1" ] && { echo "--- last $2 lines of $1:" >&2; tail -n "$2" "$1" >&2; echo "---" >&2; }
    return 0
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ -n "$STEP_NAME" ] && [ "$rc" -ne 0 ]; then
        log "stopped in step '$STEP_NAME' (exit $rc)"
    fi
    if docker info >/dev/null 2>&1; then
        # Every container of this stage carries the label, the run container included (set in
        # the CI dagster.yaml), so nothing of another user of the daemon is touched.
        local ids
        ids=$(docker ps -aq --filter "label=itk_infer-ci=$CI_ID")
        if [ -n "$ids" ]; then
            [ "$rc" -ne 0 ] && for id in $ids; do
                echo "--- logs of container $id:" >&2
                docker logs --tail 40 "$id" >&2 2>&1
            done
            # shellcheck disable=SC2086  # ids are words
            docker rm -f $ids >/dev/null
        fi
        if [ "${ITK_DOCKER_CI_REMOVE_IMAGES:-0}" = 1 ]; then
            docker rmi -f "$IMAGE" "$BASE_IMAGE" "$ROOTFS_IMAGE" >/dev/null 2>&1
            rm -f "$BASE_TARBALL"
        fi
    fi
    if [ -n "$DOCKERD_PID" ]; then
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            echo "[docker.sh] dockerd ($DOCKERD_PID) did not stop; killing it" >&2
            kill -9 "$DOCKERD_PID" 2>/dev/null
        fi
    fi
    rm -rf "$WORK"
    if [ "$rc" -eq 0 ]; then
        log "container stage passed in $((SECONDS - STAGE_START)) s"
    else
        echo "[docker.sh] container stage FAILED (exit $rc)" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. Docker engine ---------------------------------------------------------------------
step "docker engine"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || fail "needs ${missing[*]} and root to install them"
    log "installing ${missing[*]} from Debian's packages"
    apt-get update -qq >"$WORK/apt.log" 2>&1 || { show_tail "$WORK/apt.log" 20; fail "apt-get update"; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >>"$WORK/apt.log" 2>&1 \
        || { show_tail "$WORK/apt.log" 30; fail "apt-get install ${missing[*]}"; }
fi
command -v docker >/dev/null || fail "no docker client after installing docker.io"
if docker info >/dev/null 2>&1; then
    log "using the Docker daemon that is already running (it is left running)"
    if docker network ls --format '{{.Name}}' | grep -qx bridge; then
        log "note: that daemon has a bridge network; this stage still uses --network host only"
    fi
else
    # No bridge and no iptables rules: every build and container uses the host's network
    # stack (--network host), and the daemon creates no network of its own.
    dockerd --bridge=none --iptables=false >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 120); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || { show_tail "$WORK/dockerd.log" 30; fail "dockerd exited"; }
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { show_tail "$WORK/dockerd.log" 30; fail "dockerd did not answer in 60 s"; }
    log "started dockerd (pid $DOCKERD_PID)"
fi
docker version --format 'client {{.Client.Version}}, server {{.Server.Version}}'

# --- 2. base image: Debian bookworm from debootstrap ----------------------------------------
step "base image"
mkdir -p "$CACHE"
if [ "${ITK_DOCKER_CI_REFRESH_BASE:-0}" = 1 ]; then
    docker rmi -f "$BASE_IMAGE" "$ROOTFS_IMAGE" >/dev/null 2>&1 || true
    rm -f "$BASE_TARBALL"
fi
if docker image inspect "$ROOTFS_IMAGE" >/dev/null 2>&1; then
    log "cached: $ROOTFS_IMAGE"
else
    if [ ! -s "$BASE_TARBALL" ]; then
        # The Debian mirror the host's apt uses (never named here: read from its sources).
        mirror=$("$PY" - <<'EOF'
import glob, re
entries = []
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for block in re.split(r"\n\s*\n", open(path).read()):
        fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", block, re.M))
        if fields.get("Enabled", "yes").lower() != "no" and "deb" in fields.get("Types", "").split():
            entries += [(uri, fields.get("Suites", "").split()) for uri in fields.get("URIs", "").split()]
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        m = re.match(r"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
        if m:
            entries.append((m.group(1), [m.group(2)]))
for uri, suites in entries:
    if "bookworm" in suites and uri.startswith(("http://", "https://")):
        print(uri)
        break
EOF
)
        [ -n "$mirror" ] || fail "no Debian bookworm mirror in the host's apt sources"
        log "debootstrap bookworm ($BASE_PACKAGES); takes a few minutes"
        rootfs=$WORK/rootfs
        debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "$mirror" \
            >"$WORK/debootstrap.log" 2>&1 || { show_tail "$WORK/debootstrap.log" 30; fail "debootstrap"; }
        # Downloaded packages, package lists and the host's resolver and name do not belong
        # in an image (Docker provides the latter two to each container).
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
            "$rootfs"/etc/resolv.conf "$rootfs"/etc/hostname
        tar --numeric-owner -C "$rootfs" -cf "$BASE_TARBALL.tmp" .
        mv "$BASE_TARBALL.tmp" "$BASE_TARBALL"
        rm -rf "$rootfs"
    else
        log "cached tarball: $BASE_TARBALL"
    fi
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        "$BASE_TARBALL" "$ROOTFS_IMAGE" >/dev/null || fail "docker import"
    log "imported $ROOTFS_IMAGE"
fi

# The host's CA bundle, so that pip in the build trusts what the host's pip trusts. It goes to
# Debian's bundle path inside the image (a path of the image, not of this machine).
ca=$("$PY" - <<'EOF'
import os, re, ssl, subprocess, sys
candidates = [os.environ.get("PIP_CERT")]
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                     text=True).stdout
candidates += re.findall(r"^\S*\.cert='(.*)'$", out, re.M)
candidates += [os.environ.get("SSL_CERT_FILE"), os.environ.get("REQUESTS_CA_BUNDLE"),
               ssl.get_default_verify_paths().cafile]
print(next((c for c in candidates if c and os.path.isfile(c)), ""))
EOF
)
basectx=$WORK/base-context
mkdir -p "$basectx"
{
    echo "FROM $ROOTFS_IMAGE"
    if [ -n "$ca" ]; then
        cp "$ca" "$basectx/ca-bundle.crt"
        echo "COPY ca-bundle.crt /etc/ssl/certs/ca-certificates.crt"
        echo "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
    fi
} >"$basectx/Dockerfile"
[ -n "$ca" ] && log "host CA bundle: $(grep -c 'BEGIN CERTIFICATE' "$ca") certificates" \
    || log "no host CA bundle found; the base keeps Debian's"
docker build --network host -t "$BASE_IMAGE" "$basectx" >"$WORK/base-build.log" 2>&1 \
    || { show_tail "$WORK/base-build.log" 20; fail "base image build"; }
docker run --rm --network host "$BASE_IMAGE" python3 -c 'import sys, venv; print("base:", sys.version.split()[0])' \
    || fail "the base image has no working python3"

# --- 3. project image -----------------------------------------------------------------------
step "project image"
ctx=$WORK/context
mkdir -p "$ctx"
# The files git knows (tracked, or new and not ignored): what a clean clone has. The
# Dockerfile's .dockerignore then picks what the image needs.
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
        | tar --null -T - -cf -) | tar -C "$ctx" -xf - || fail "could not copy the sources"
else
    tar -C "$REPO" --exclude=.git -cf - . | tar -C "$ctx" -xf - || fail "could not copy the sources"
fi
mkdir -p "$ctx/deploy/wheels"
log "torch wheel for $TORCH_REQ"
"$PY" -m pip download --no-deps --only-binary :all: -d "$ctx/deploy/wheels" "$TORCH_REQ" \
    >"$WORK/pip-download.log" 2>&1 || { show_tail "$WORK/pip-download.log" 20; fail "no wheel for $TORCH_REQ"; }
if [ "$PIN_HOST" = 1 ]; then
    # The host's versions of what the image installs, as constraints: the same numpy,
    # onnxruntime, SimpleITK and dagster inside and outside the container.
    "$PY" "$REPO/tests/container/ci_helper.py" host-constraints "$REPO/pyproject.toml" \
        "$TORCH_REQ" mmengine >"$ctx/deploy/wheels/constraints.txt" \
        || fail "could not list the host's package versions"
    log "$(wc -l <"$ctx/deploy/wheels/constraints.txt") host versions pinned, e.g. $(grep -i -E \
        '^(torch|onnxruntime-gpu|numpy|simpleitk)==' "$ctx/deploy/wheels/constraints.txt" | tr '\n' ' ')"
fi
# The index the host's pip uses, when it is not PyPI's default (local file indexes are not
# reachable from the build and are left out).
mapfile -t pip_index < <("$PY" - <<'EOF'
import os, re, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                     text=True).stdout
def setting(env, key):
    value = os.environ.get(env)
    if value is None:
        found = re.findall(rf"^\S*\.{key}='(.*)'$", out, re.M)
        value = found[-1] if found else ""
    return " ".join(u for u in value.split() if u.startswith(("http://", "https://")))
print(setting("PIP_INDEX_URL", "index-url"))
print(setting("PIP_EXTRA_INDEX_URL", "extra-index-url"))
EOF
)
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_SPEC=$TORCH_REQ")
[ -n "${pip_index[0]:-}" ] && build_args+=(--build-arg "PIP_INDEX_URL=${pip_index[0]}")
[ -n "${pip_index[1]:-}" ] && build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=${pip_index[1]}")
log "docker build $IMAGE (output in the build log; shown on failure)"
if ! docker build --network host -t "$IMAGE" "${build_args[@]}" --label "itk_infer-ci.base=$BASE_VERSION" \
        "$ctx" >"$WORK/build.log" 2>&1; then
    show_tail "$WORK/build.log" 60
    fail "docker build of $IMAGE"
fi
log "build steps: $(grep -c '^Step ' "$WORK/build.log"), from cache: $(grep -c 'Using cache' "$WORK/build.log")"
# Earlier CI images that this build replaced (untagged now) would pile up, a few GB each time
# the dependencies change; only images carrying this stage's label are pruned.
docker image prune -f --filter "label=itk_infer-ci.base" >/dev/null || true
grep -E '^torch .*onnxruntime' "$WORK/build.log" | sed 's/^/  /' || true
docker image inspect "$IMAGE" --format 'image {{.Id}}: {{.Size}} bytes, user {{.Config.User}}, cmd {{.Config.Cmd}}'
[ "$(docker image inspect "$IMAGE" --format '{{.Config.User}}')" = itk ] || fail "the image does not run as the itk user"
docker run --rm --network host "$IMAGE" sh -c 'id -un; command -v itk_infer; itk_infer --version' \
    >"$WORK/image-check.log" 2>&1 || { show_tail "$WORK/image-check.log" 20; fail "itk_infer is not runnable in $IMAGE"; }
[ "$(head -n1 "$WORK/image-check.log")" = itk ] || fail "the container runs as $(head -n1 "$WORK/image-check.log"), not itk"
sed 's/^/  /' "$WORK/image-check.log"

# --- 4. the CLI in a container equals the CLI on the host -------------------------------------
step "itk_infer in a container vs on the host"
[ -f "$DEMO/model.onnx" ] && [ -d "$DEMO/images" ] || fail "no demo model/images in $DEMO"
command -v itk_infer >/dev/null || fail "itk_infer is not installed on the host (.ci/run installs it)"
# One data folder, mounted at the same path inside the containers, so that every path (the
# ones in Dagster's instance and in ITK_INFER_* variables included) means the same file on
# both sides. Output folders are writable by the image's non-root user.
DATA=$WORK/data
mkdir -p "$DATA/images" "$DATA/dagster-out"
cp "$DEMO/model.onnx" "$DATA/model.onnx"
cp -r "$DEMO/images/." "$DATA/images/"
chmod 0755 "$WORK" "$DATA"
chmod 0777 "$DATA/dagster-out"
mapfile -t names < <(cd "$DATA/images" && ls | grep -E '\.(mha|nii|nii\.gz)$' | sort)
[ "${#names[@]}" -gt 0 ] || fail "no images in $DEMO/images"
log "${#names[@]} images: ${names[*]}"
# Runs itk_infer with the given flags on the host and in the container, into $DATA/<tag>-host
# and $DATA/<tag>-container, and checks the container's label maps equal the host's.
same_on_host_and_container() {
    local tag=$1 what=$2
    shift 2
    local host_out=$DATA/$tag-host container_out=$DATA/$tag-container
    mkdir -p "$host_out" "$container_out"
    chmod 0777 "$container_out"
    itk_infer -i "$DATA/images" -o "$host_out" "$@" >"$WORK/$tag-host.log" 2>&1 \
        || { show_tail "$WORK/$tag-host.log" 30; fail "itk_infer ($what) on the host"; }
    docker run --rm --network host --label "itk_infer-ci=$CI_ID" -v "$DATA:$DATA" "$IMAGE" \
        itk_infer -i "$DATA/images" -o "$container_out" "$@" >"$WORK/$tag-container.log" 2>&1 \
        || { show_tail "$WORK/$tag-container.log" 30; fail "itk_infer ($what) in the container"; }
    tail -n 1 "$WORK/$tag-container.log" | sed "s/^/  container ($what): /"
    "$PY" "$REPO/tests/container/ci_helper.py" compare "$host_out" "$container_out" "${names[@]}" \
        || fail "the container's label maps ($what) differ from the host's"
}
same_on_host_and_container onnx onnx --onnx "$DATA/model.onnx" --device cpu --no-progress
# The MMEngine backend too (torch, mmengine and OpenCV in the image), when the demo has its
# checkpoint. Its config imports the `examples` package two folders above it.
if [ -f "$DEMO/mmengine_config.py" ] && [ -f "$DEMO/mmengine_checkpoint.pth" ] \
        && [ -f "$DEMO/../mmengine_model.py" ]; then
    mm=$DATA/mm/examples
    mkdir -p "$mm/demo"
    cp "$DEMO"/../*.py "$mm/"
    cp "$DEMO/mmengine_config.py" "$DEMO/mmengine_checkpoint.pth" "$mm/demo/"
    same_on_host_and_container mm mmengine --backend mmengine \
        -cfg "$mm/demo/mmengine_config.py" -ckpt "$mm/demo/mmengine_checkpoint.pth" \
        --device cpu --no-progress
else
    log "no MMEngine demo checkpoint in $DEMO: MMEngine backend not checked"
fi

# --- 5. Dagster: code server container, gRPC from the host, a DockerRunLauncher run ------------
step "dagster code server and DockerRunLauncher run"
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export DAGSTER_HOME=$WORK/dagster_home
mkdir -p "$DAGSTER_HOME"
sed -e "s#@DAGSTER_HOME@#$DAGSTER_HOME#g" -e "s#@DATA@#$DATA#g" -e "s#@CI_LABEL@#$CI_ID#g" \
    -e "s#@RUN_USER@#$(id -u):$(id -g)#g" \
    "$REPO/deploy/dagster.ci.yaml" >"$DAGSTER_HOME/dagster.yaml"
# What the resource and the launcher read (deploy/dagster.ci.yaml forwards these to runs).
export ITK_INFER_WATCH_ROOT=$DATA/images ITK_INFER_OUTPUT_ROOT=$DATA/dagster-out
export ITK_INFER_ONNX=$DATA/model.onnx ITK_INFER_DEVICE=cpu
export ITK_INFER_IMAGE=$IMAGE
export ITK_INFER_CODE_SERVER_HOST=127.0.0.1 ITK_INFER_CODE_SERVER_PORT=$PORT
WORKSPACE=$REPO/deploy/workspace.docker.yaml
# Loopback only: with the host's network stack, 0.0.0.0 (the image's default) would listen on
# every interface of this machine.
docker run -d --name "$CI_ID-code" --network host --label "itk_infer-ci=$CI_ID" -v "$DATA:$DATA" \
    -e ITK_INFER_WATCH_ROOT -e ITK_INFER_OUTPUT_ROOT -e ITK_INFER_ONNX -e ITK_INFER_DEVICE \
    -e "DAGSTER_CURRENT_IMAGE=$IMAGE" \
    "$IMAGE" dagster code-server start -m itk_infer_assets -h 127.0.0.1 -p "$PORT" \
    --location-name "$LOCATION" >/dev/null || fail "could not start the code server container"
for _ in $(seq 180); do
    dagster api grpc-health-check -h 127.0.0.1 -p "$PORT" >/dev/null 2>&1 && break
    [ "$(docker inspect -f '{{.State.Running}}' "$CI_ID-code")" = true ] || fail "the code server container exited"
    sleep 1
done
dagster api grpc-health-check -h 127.0.0.1 -p "$PORT" >/dev/null 2>&1 || fail "the code server did not answer on 127.0.0.1:$PORT"
log "code server serving on 127.0.0.1:$PORT"
dagster definitions validate -w "$WORKSPACE" >"$WORK/validate.log" 2>&1 \
    || { show_tail "$WORK/validate.log" 30; fail "dagster definitions validate over gRPC"; }
grep -i 'validation successful' "$WORK/validate.log" | sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^/  /'
dagster job list -w "$WORKSPACE" >"$WORK/jobs.log" 2>&1 || { show_tail "$WORK/jobs.log" 30; fail "dagster job list"; }
grep -q "$JOB" "$WORK/jobs.log" || { cat "$WORK/jobs.log" >&2; fail "job $JOB not served by the code server"; }
log "the host loads location '$LOCATION' from the container over gRPC; job $JOB is there"
"$PY" "$REPO/tests/container/ci_helper.py" add-partitions "${names[@]}" || fail "adding partitions"
run_id=$("$PY" -c 'import uuid; print(uuid.uuid4())')
tags=$(printf '{"dagster/asset_partition_range_start": "%s", "dagster/asset_partition_range_end": "%s"}' \
    "${names[0]}" "${names[${#names[@]}-1]}")
dagster job launch -w "$WORKSPACE" -l "$LOCATION" -j "$JOB" --run-id "$run_id" --tags "$tags" \
    >"$WORK/launch.log" 2>&1 || { show_tail "$WORK/launch.log" 40; fail "dagster job launch"; }
log "launched run $run_id (${#names[@]} partitions)"
"$PY" "$REPO/tests/container/ci_helper.py" wait-run "$run_id" --timeout "$RUN_TIMEOUT" \
    --materializations "$((2 * ${#names[@]}))" \
    || fail "the DockerRunLauncher run did not succeed"
"$PY" "$REPO/tests/container/ci_helper.py" compare "$DATA/onnx-host" "$DATA/dagster-out" "${names[@]}" \
    || fail "the Dagster run's label maps differ from the host's"

log "done: $STEP_NAME ($((SECONDS - STEP_START)) s)"
STEP_NAME=""
log "all checks passed"
