#!/usr/bin/env bash
# Build a minimal Debian bookworm base image with Python 3.11 (debootstrap --variant=minbase)
# and import it into podman. Used where no registry can be reached (the smoke test), in place
# of the official python:3.11-slim: pass it to the build as --build-arg BASE_IMAGE=<tag>.
#
#   docker/make-base.sh [TAG]          default TAG: localhost/ace-base:bookworm
#
# Env: ACE_BASE_CACHE  a directory where the rootfs tarball is kept between runs (skips
#                      debootstrap when the tarball is there)
#      DEBIAN_MIRROR   default http://deb.debian.org/debian
set -euo pipefail

tag="${1:-localhost/ace-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
cache="${ACE_BASE_CACHE:-}"
# python3-distutils provides the virtual python3.11-distutils that debootstrap cannot resolve
packages="python3.11,python3.11-venv,python3-distutils,python3-pip-whl,python3-setuptools-whl,ca-certificates"

die() { echo "make-base: $*" >&2; exit 1; }
command -v podman >/dev/null || die "podman not found (apt-get install podman)"
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"

work="$(mktemp -d /var/tmp/ace-base.XXXXXX)"
trap 'rm -rf "$work"' EXIT
tarball="$work/rootfs.tar"
if [[ -n "$cache" && -s "$cache/bookworm-rootfs.tar" ]]; then
    echo "make-base: reusing $cache/bookworm-rootfs.tar"
    tarball="$cache/bookworm-rootfs.tar"
else
    echo "make-base: debootstrap bookworm (minbase + $packages) from $mirror"
    debootstrap --variant=minbase --include="$packages" bookworm "$work/root" "$mirror" \
        >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
    # Trim what an image never needs: package lists, caches, docs, man pages.
    rm -rf "$work/root"/var/lib/apt/lists/* "$work/root"/var/cache/apt/* \
        "$work/root"/usr/share/doc/* "$work/root"/usr/share/man/* "$work/root"/usr/share/locale/*
    tar --numeric-owner -C "$work/root" -cf "$tarball" .
    if [[ -n "$cache" ]]; then
        mkdir -p "$cache"
        cp "$tarball" "$cache/bookworm-rootfs.tar.tmp" && mv "$cache/bookworm-rootfs.tar.tmp" "$cache/bookworm-rootfs.tar"
    fi
fi
podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --quiet "$tarball" "$tag" >/dev/null
echo "make-base: imported $tag ($(podman image inspect --format '{{.Size}}' "$tag") bytes)"
