#!/usr/bin/env bash
# make docker-smoke: build the Dockerfile for real and run the image, without a Docker engine or a registry.
#
#  1. installs podman, buildah and debootstrap (apt) when they are missing;
#  2. makes a Debian bookworm base image from the apt mirror this machine uses (debootstrap, imported as
#     localhost/bookworm; kept between runs, made once);
#  3. builds the image with buildah on that base (BASE_IMAGE build argument), passing the machine's CA bundle
#     as the build secret `ca` and this machine's local pip indexes (file:// URLs from `pip config`) read-only;
#  4. runs it with podman as the image's non-root user: `--help`, then
#     `fit --config configs/mlp.yaml --trainer.fast_dev_run true` on the FashionMNIST baked into the image, once
#     eager and once with the CompileModule callback (torch.compile's CPU code needs the image's g++);
#  5. removes the image (also on failure or Ctrl-C); only the base image stays.
#
# Settings (environment): SMOKE_IMAGE (default localhost/dropout-lab:smoke), SMOKE_BASE (localhost/bookworm),
# SMOKE_MIRROR (default: the first URI of /etc/apt/sources.list.d/debian.sources), SMOKE_PIP_INDEXES
# (space-separated file:// index URLs; default: pip's global.extra-index-url), SMOKE_KEEP_IMAGE=1 keeps the image.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${SMOKE_IMAGE:-localhost/dropout-lab:smoke}"
BASE="${SMOKE_BASE:-localhost/bookworm}"
CA=/etc/ssl/certs/ca-certificates.crt
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
START=$SECONDS
say() { printf '[docker-smoke %4ds] %s\n' "$((SECONDS - START))" "$*"; }
# overlay, not vfs: vfs copies every layer in full (GBs for a torch image)
podman() { ${SUDO:-command} podman --storage-driver overlay "$@"; }
buildah() { ${SUDO:-command} buildah --storage-driver overlay "$@"; }
# plain `podman run` fails on this kind of host (rlimits, cgroups); runc with explicit limits works
prun() { podman run --rm --runtime runc --ulimit nofile=1024:20000 --ulimit nproc=1024:32768 "$@"; }

# 1. tools
if ! command -v podman >/dev/null || ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null \
    || ! command -v runc >/dev/null; then
    say "installing podman, buildah, debootstrap"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends podman buildah fuse-overlayfs uidmap debootstrap crun runc \
        slirp4netns containernetworking-plugins golang-github-containers-common iptables >/dev/null
fi
say "$(podman --version), $(buildah --version | cut -d' ' -f1-3)"

storage="$(podman info --format '{{.Store.GraphRoot}}')"
$SUDO mkdir -p "$storage"
free_gb="$(df -P -BG "$storage" | awk 'NR==2 {sub("G", "", $4); print $4}')"
say "free space under $storage: ${free_gb} GB"
if [ "$free_gb" -lt 20 ]; then
    echo "docker-smoke: needs ~20 GB free under $storage (the image is ~6 GB, built once more in layers)" >&2
    exit 1
fi

cleanup() {
    status=$?
    if [ "${SMOKE_KEEP_IMAGE:-0}" != 1 ] && podman image exists "$IMAGE" 2>/dev/null; then
        podman rmi -f "$IMAGE" >/dev/null && say "removed $IMAGE"
    fi
    [ -z "${ROOTFS:-}" ] || $SUDO rm -rf "$ROOTFS"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 2. the base image
if podman image exists "$BASE"; then
    say "base image $BASE: cached"
else
    mirror="${SMOKE_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}"
    mirror="${mirror:-http://deb.debian.org/debian}"
    ROOTFS="$(mktemp -d /var/tmp/bookworm-rootfs.XXXXXX)"
    say "debootstrap bookworm from $mirror"
    $SUDO debootstrap --variant=minbase bookworm "$ROOTFS" "$mirror" >/dev/null
    # the apt settings this machine's mirror needs (a snapshot's old Release dates, a proxy) go into the base
    for conf in $(grep -l -E 'Check-Valid-Until|Acquire::https?::Proxy' /etc/apt/apt.conf.d/* 2>/dev/null || true); do
        $SUDO cp "$conf" "$ROOTFS/etc/apt/apt.conf.d/"
    done
    $SUDO rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    $SUDO tar -C "$ROOTFS" -c . | podman import - "$BASE" >/dev/null
    $SUDO rm -rf "$ROOTFS"
    ROOTFS=""
    say "base image $BASE: imported"
fi

# 3. build
# docker format: the OCI format drops the Dockerfile's SHELL (bash -o pipefail)
args=(--isolation chroot --network host --format docker --layers=false --force-rm --build-arg "BASE_IMAGE=$BASE")
[ -s "$CA" ] && args+=(--secret "id=ca,src=$CA")
indexes="${SMOKE_PIP_INDEXES-$(pip3 config get global.extra-index-url 2>/dev/null || true)}"
pip_urls=""
for url in $indexes; do
    case "$url" in
    file://*/simple | file://*/simple/)
        dir="${url#file://}"
        dir="$(dirname "${dir%/}")" # the index links ../../files next to simple/
        [ -d "$dir" ] || continue
        args+=(-v "$dir:$dir:ro")
        pip_urls="$pip_urls $url"
        ;;
    esac
done
[ -z "$pip_urls" ] || args+=(--build-arg "PIP_EXTRA_INDEX_URL=${pip_urls# }")
say "building $IMAGE on $BASE${pip_urls:+ (local pip indexes:$pip_urls)}"
build_start=$SECONDS
# each STEP and the COMMIT stamped with the elapsed time; pip's notes about packages missing from a local index dropped
buildah bud "${args[@]}" -t "$IMAGE" . 2>&1 | while IFS= read -r line; do
    case "$line" in
    STEP* | COMMIT*) say "${line:0:110}" ;;
    "WARNING: Location 'file://"*"is ignored: it is neither a file nor a directory.") ;;
    *) printf '%s\n' "$line" ;;
    esac
done
say "built in $((SECONDS - build_start)) s: $(podman image inspect --format '{{.Size}}' "$IMAGE" |
    awk '{printf "%.2f GB", $1 / 1e9}')"

# 4. run as the image's user
user="$(podman image inspect --format '{{.Config.User}}' "$IMAGE")"
uid="$(prun --entrypoint id "$IMAGE" -u)"
say "image USER=$user, runs as uid $uid"
if [ -z "$user" ] || [ "$uid" = 0 ]; then
    echo "docker-smoke: the image runs as root" >&2
    exit 1
fi
prun "$IMAGE" --help | head -n 5
prun --entrypoint tensorboard "$IMAGE" --version_tb
say "fit --config configs/mlp.yaml --trainer.fast_dev_run true"
prun "$IMAGE" fit --config configs/mlp.yaml --trainer.fast_dev_run true
say "the same, compiled (torch.compile needs the image's compiler and Python headers)"
prun "$IMAGE" fit --config configs/mlp.yaml --trainer.fast_dev_run true \
    --trainer.callbacks+=dropout_lab.speed.CompileModule
say "ok (total $((SECONDS - START)) s)"
