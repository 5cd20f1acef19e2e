#!/bin/sh
# A base image for deploy/Dockerfile made from Debian's packages, for machines that reach Debian's
# archive but no container registry (python:3.11-slim cannot be pulled there):
#   sh deploy/debian-base.sh [TAG]          (root; default TAG adamd-base:bookworm)
#   docker build --build-arg BASE_IMAGE=adamd-base:bookworm ...
# Debian 12's python3 is 3.11, as in the official image. Skips when TAG exists already.
set -eu
TAG=${1:-adamd-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "$TAG exists"
    exit 0
fi
command -v debootstrap >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}
ROOT=$(mktemp -d /tmp/adamd-base.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 || { tail -20 "$ROOT.log" >&2; exit 1; }
rm -f "$ROOT.log"
# What a container image needs no copy of: apt's lists and caches, docs, man pages, locales.
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/apt/archives/*.deb \
    "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/usr/share/locale/*
tar -C "$ROOT" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    -c 'CMD ["python3"]' - "$TAG" >/dev/null
echo "$TAG built"
