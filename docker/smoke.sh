#!/usr/bin/env bash
# Container smoke test: build the CPU image with podman (no Docker daemon, no registry), run the
# jobs and the api from it on a shared volume, and check the answers.
#
#   docker/smoke.sh                       (as root; installs podman/runc/debootstrap when missing)
#
#  1. podman set up daemon-less: runc and explicit ulimits via a CONTAINERS_CONF file
#  2. base image: Debian bookworm minbase + Python 3.11 (debootstrap, podman import), cached
#  3. wheelhouse from this machine's pip (the build itself runs with --network none)
#  4. podman build $ACE_SMOKE_DOCKERFILE (docker/Dockerfile); image size and build time are printed (and appended as a
#     JSON line to $ACE_SMOKE_REPORT when set)
#  5. jobs in the image: init-encoder, data phantoms, index build --publish  -> volume
#  6. api container: /ready, healthcheck, non-root, a real POST /match checked for correctness
#  7. index job again with new images -> the running api serves the new version (no restart)
#  8. train + export jobs (a retrained encoder), index job -> the running api serves the new
#     encoder with its index (no restart) and /match is correct again
#  9. everything created here is removed by id (trap), also on failure
#
# Env: ACE_SMOKE_CACHE   kept between runs: base rootfs tarball and wheels (/var/cache/ace-smoke)
#      ACE_SMOKE_KEEP=1  keep the built image (its tag is printed)
#      ACE_SMOKE_IMAGE   test this already built image instead of building one (not removed)
#      ACE_SMOKE_DOCKERFILE=docker/Dockerfile.cuda   build and test the CUDA image instead (without
#                        a GPU here its ACE_DEVICE=auto serves on the CPU: same code, same checks)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cache="${ACE_SMOKE_CACHE:-/var/cache/ace-smoke}"
dockerfile="${ACE_SMOKE_DOCKERFILE:-docker/Dockerfile}"
run_id="$(date +%s)-$$"
work="$(mktemp -d /var/tmp/ace-smoke.XXXXXX)"
image_tag="localhost/ace-smoke:$run_id"
base_tag="localhost/ace-smoke-base:$run_id"
containers=() volumes=() images=() linked_wheels=0

log() { echo "smoke: $*" >&2; }
die() { log "FAIL: $*"; exit 1; }

cleanup() {
    local status=$?
    set +e
    for id in "${containers[@]}"; do
        if ((status != 0)); then log "logs of $id:"; podman logs --tail 60 "$id" >&2; fi
        podman rm -f -v -t 5 "$id" >/dev/null
    done
    for id in "${volumes[@]}"; do podman volume rm -f "$id" >/dev/null; done
    local keep=""
    if [[ "${ACE_SMOKE_KEEP:-0}" == 1 ]]; then
        keep="$(podman image inspect --format '{{.Id}}' "$image_tag" 2>/dev/null)"
        log "kept image $image_tag"
    fi
    for id in "${images[@]}"; do [[ "$id" == "$keep" ]] || podman rmi -f "$id" >/dev/null 2>&1; done
    if ((linked_wheels)); then find docker/wheels -mindepth 1 ! -name README.md -delete; fi
    rm -rf "$work"
    if ((status == 0)); then log "PASSED"; else log "FAILED (exit $status)"; fi
}
trap cleanup EXIT
trap "exit 130" INT
trap "exit 143" TERM

ensure_tools() {
    local missing=()
    for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    ((${#missing[@]} == 0)) && return
    ((EUID == 0)) || die "missing ${missing[*]}; install them (apt-get install podman runc debootstrap)"
    log "installing ${missing[*]} (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        podman runc debootstrap uidmap netavark aardvark-dns iptables >/dev/null
}

configure_podman() {
    local nofile
    nofile="$(ulimit -Hn)"
    [[ "$nofile" == unlimited ]] && nofile=1048576
    ((nofile > 1048576)) && nofile=1048576
    cat >"$work/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    export CONTAINERS_CONF="$work/containers.conf"
    podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}' >/dev/null \
        || die "podman does not work here (see the error above)"
    log "podman $(podman version --format '{{.Client.Version}}'), runtime runc, nofile=$nofile"
}

snapshot_images() { podman images -a -q --no-trunc | sed 's/^sha256://' | sort -u; }

build_base() {
    ACE_BASE_CACHE="$cache" docker/make-base.sh "$base_tag"
    images+=("$(podman image inspect --format '{{.Id}}' "$base_tag")")
}

prepare_wheels() {
    [[ -f docker/wheels/requirements.txt ]] && die "docker/wheels already holds a wheelhouse; remove it first"
    local key
    # keyed by the runtime dependencies only: dev extras and tool settings do not reach the image
    key="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"])' \
        | sha256sum | cut -c1-16)"
    if [[ -f "$cache/wheels/requirements.txt" && "$(cat "$cache/wheels/.pyproject" 2>/dev/null)" == "$key" ]]; then
        log "reusing the wheelhouse in $cache/wheels (same dependencies in pyproject.toml)"
    else
        rm -rf "$cache/wheels"
        mkdir -p "$cache/wheels"
        docker/make-wheelhouse.sh "$cache/wheels"
        echo "$key" >"$cache/wheels/.pyproject"
    fi
    linked_wheels=1
    # hard links into the build context: no copy of several GB when on the same file system
    cp -al "$cache/wheels/." docker/wheels/ 2>/dev/null || cp -a "$cache/wheels/." docker/wheels/
    rm -f docker/wheels/.pyproject
}

build_image() {
    local before started
    before="$(snapshot_images)"
    started=$(date +%s)
    log "building $image_tag ($dockerfile, BASE_IMAGE=$base_tag, --network none)"
    local status=0
    podman build --format docker --network none -f "$dockerfile" \
        --build-arg BASE_IMAGE="$base_tag" -t "$image_tag" . >"$work/build.log" 2>&1 || status=$?
    build_s=$(($(date +%s) - started))
    # the image and the builder stage's intermediate images, by id (also after a failed build)
    mapfile -t -O "${#images[@]}" images < <(comm -13 <(echo "$before") <(snapshot_images))
    ((status == 0)) || { tail -n 40 "$work/build.log" >&2; die "image build failed"; }
    image_bytes="$(podman image inspect --format '{{.Size}}' "$image_tag")"
    log "built in ${build_s} s; image size $((image_bytes / 1000000)) MB"
    if [[ -n "${ACE_SMOKE_REPORT:-}" ]]; then
        printf '{"date": "%s", "dockerfile": "%s", "build_s": %d, "size_bytes": %d, "podman": "%s"}\n' \
            "$(date -u +%FT%TZ)" "$dockerfile" "$build_s" "$image_bytes" "$(podman version --format '{{.Client.Version}}')" \
            >>"$ACE_SMOKE_REPORT"
    fi
}

job() {  # run one `ace` command in the image against the shared volume, no network
    log "job: ace $*"
    podman run --rm --network none --health-cmd none -v "$volume:/data" "$image_tag" "$@" >>"$work/jobs.log" 2>&1 \
        || { tail -n 30 "$work/jobs.log" >&2; die "job 'ace $*' failed"; }
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start_api() {
    port="$(free_port)"
    url="http://127.0.0.1:$port"
    # the image's default command and settings, published on a free loopback port
    api="$(podman run -d -p "127.0.0.1:$port:8000" -v "$volume:/data" \
        -e ACE_POLL_INTERVAL_S=1 -e ACE_THREADS=2 -e ACE_API_KEY=smoke-admin-key \
        "$image_tag" 2>>"$work/podman.log")"
    containers+=("$api")
    log "api container ${api:0:12} on $url"
}

check_api() {
    python3 docker/smoke_client.py ready "$url" 300 \
        || { [[ "$(podman inspect --format '{{.State.Running}}' "$api")" == true ]] || log "the api exited"; exit 1; }
    podman healthcheck run "$api" >/dev/null || die "the image's HEALTHCHECK fails on a serving api"
    local uid
    uid="$(podman exec "$api" id -u)"
    [[ "$uid" != 0 ]] || die "the api runs as root"
    log "healthcheck ok; api runs as uid $uid"
    python3 docker/smoke_client.py match "$url" "$volume_dir/phantoms"
}

refresh_index() {
    local old
    old="$(python3 docker/smoke_client.py version "$url")"
    job data phantoms --n 4 --seed 7 --start-id 100 --out /data/phantoms-new
    job index build --encoder /data/encoder --images /data/phantoms-new --out /data/index --publish
    python3 docker/smoke_client.py swapped "$url" "$old" 60
    python3 docker/smoke_client.py match "$url" "$volume_dir/phantoms-new"
}

retrain_and_refresh() {
    local old
    old="$(python3 docker/smoke_client.py version "$url")"
    job train --preset cpu --data /data/phantoms --out /data/runs/smoke --max-steps 2 \
        --train.batch_size 4 --no-progress
    job export --checkpoint /data/runs/smoke --out /data/encoder
    job index build --encoder /data/encoder --images /data/phantoms --out /data/index --publish
    python3 docker/smoke_client.py swapped "$url" "$old" 120
    python3 docker/smoke_client.py encoder "$url" "$volume_dir/encoder/encoder.json"
    python3 docker/smoke_client.py match "$url" "$volume_dir/phantoms"
}

main() {
    local started=$SECONDS
    ensure_tools
    configure_podman
    if [[ -n "${ACE_SMOKE_IMAGE:-}" ]]; then
        image_tag="$ACE_SMOKE_IMAGE" build_s=0
        image_bytes="$(podman image inspect --format '{{.Size}}' "$image_tag")" || die "no image $image_tag"
    else
        build_base
        prepare_wheels
        build_image
    fi
    volume="$(podman volume create "ace-smoke-$run_id")"
    volumes+=("$volume")
    volume_dir="$(podman volume inspect --format '{{.Mountpoint}}' "$volume")"
    job init-encoder --preset cpu --out /data/encoder
    job data phantoms --n 6 --out /data/phantoms
    job index build --encoder /data/encoder --images /data/phantoms --out /data/index --publish
    start_api
    check_api
    refresh_index
    retrain_and_refresh
    log "all checks passed in $((SECONDS - started)) s (image build ${build_s} s, $((image_bytes / 1000000)) MB)"
}

main "$@"; exit  # one line: bash has read it all, so editing this file mid-run is safe
