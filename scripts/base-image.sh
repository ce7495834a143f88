#!/usr/bin/env bash
# Make the base image a bento's Dockerfile starts FROM (python:3.11-slim) available to buildah/podman.
#   scripts/base-image.sh [IMAGE]        (default: python:3.11-slim)
# An image already in the local store (/var/lib/containers/storage) is kept: that is the cache, so this costs
# nothing after the first run. Otherwise it is pulled; where no registry can be reached, a stand-in is built:
# Debian bookworm (minbase, via debootstrap from Debian's archive) with its Python 3.11 and pip, imported under
# IMAGE. The stand-in offers what the bento's Dockerfile uses from python:3.11-slim: `python3.11` on PATH (uv
# builds the bento's venv from it), `pip` that may install into the system Python (for uv itself), bash,
# groupadd/useradd and apt-get. `podman rmi IMAGE` forgets it.
set -euo pipefail

image=${1:-python:3.11-slim}
# a name without a registry is Docker Hub's, as a Dockerfile's FROM reads it
case "$image" in */*) ;; *) image=docker.io/library/$image ;; esac
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if podman image exists "$image"; then
    echo "base image $image: already in the local store"
    exit 0
fi
if podman pull -q "$image" 2>/dev/null; then
    echo "base image $image: pulled"
    exit 0
fi
# bookworm ships Python 3.11 only: a stand-in for another Python would fail later, inside the build
case "$image" in
    *python:3.11-slim*) ;;
    *) echo "cannot pull $image, and only python:3.11-slim can be stood in for (Debian bookworm)" >&2; exit 1 ;;
esac
for tool in debootstrap podman; do
    command -v "$tool" >/dev/null || { echo "$tool is missing: make system-deps" >&2; exit 1; }
done

echo "base image $image: no registry reachable; building a Debian bookworm stand-in with debootstrap"
rootfs=$(mktemp -d /var/tmp/reelrank-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3.11,python3-pip,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$mirror"
# the same suites as python:3.11-slim's Debian, so the build's apt-get and the upgrade below get security fixes
cat > "$rootfs/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} bookworm-security main
EOF
# CAs this machine trusts beyond Debian's bundle (a TLS-inspecting egress proxy, a company CA): the build's pip
# and uv reach PyPI through the same network as this machine
cp -r /usr/local/share/ca-certificates/. "$rootfs/usr/local/share/ca-certificates/"
# Debian's own slim images keep apt's downloads and package caches, documentation, manuals and translations out
# of every layer that installs packages (the bento's Dockerfile installs build-essential and git): the same here
cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::GzipIndexes "true";
Acquire::Languages "none";
APT
cat > "$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
DPKG
chroot "$rootfs" /bin/sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq &&
    update-ca-certificates'
# what debootstrap unpacked before the exclusions existed
find "${rootfs:?}/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
for dir in groff info lintian/overrides locale man; do
    rm -rf "${rootfs:?}/usr/share/$dir"/*
done
rm -rf "${rootfs:?}"/var/lib/apt/lists/*
# python:3.11-slim's pip installs into the system Python; the Dockerfile installs uv that way
rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED

# uv reads its CAs from SSL_CERT_FILE only (pip and apt use the system bundle anyway)
tar -C "$rootfs" -c . | podman import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'LABEL org.opencontainers.image.description="Debian bookworm + Python 3.11 (reelrank scripts/base-image.sh)"' \
    --change 'CMD ["python3"]' \
    - "$image"
podman image inspect --format "base image {{.RepoTags}}: {{.Size}} bytes" "$image"
