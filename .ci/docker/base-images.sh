#!/usr/bin/env bash
# CI only. No image registry is reachable from CI machines, so the base images that the shipped
# Dockerfile and docker-compose.yml name are stood in for by images built here from Debian
# packages (debootstrap), tagged with the exact names the files use:
#   python:3.11-slim        Debian's python3 (3.11) and pip, plus a wheelhouse of constraints.txt
#   redis:7-alpine          Debian's redis-server (7.0), user redis, WORKDIR/VOLUME /data
#   prom/prometheus:v2.53.2 Debian's prometheus, ENTRYPOINT /bin/prometheus, user nobody
# grafana/grafana has no Debian package: it is not stood in for (the CI stack runs without it).
#
# Cached between runs on one machine: debootstrap's downloads under $CACHE, and each root file
# system's image in docker's store, tagged with a hash of its definition (suite, packages, setup,
# image settings); the wheelhouse layer is rebuilt when constraints.txt or pyproject.toml changes.
# A fresh machine builds everything (about 5 minutes here).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT="$PWD"
CACHE="${LLM_PROXY_CI_CACHE:-/var/cache/llm-proxy-ci}"
SUITE=bookworm
mkdir -p "$CACHE/debs"

mirror() {  # the Debian mirror apt uses here (deb822 or one-line sources)
    local uri
    uri="$(grep -hs -E '^URIs:' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)"
    if [ -z "$uri" ]; then
        uri="$(grep -hs -E '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)"
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

# rootfs_image NAME PACKAGES SETUP CHANGES...: a debootstrap'd root file system with PACKAGES,
# SETUP run in it (chroot), imported as NAME with `docker import --change CHANGES`.
rootfs_image() {
    local name="$1" packages="$2" setup="$3"
    shift 3
    local tag
    tag="$name:$(printf '%s\n' "$SUITE" "$packages" "$setup" "$@" | sha256sum | cut -c1-12)"
    ROOTFS_TAG="$tag"
    if docker image inspect "$tag" >/dev/null 2>&1; then
        echo "$tag: cached"
        return
    fi
    local dir
    dir="$(mktemp -d /var/tmp/llm-proxy-rootfs.XXXXXX)"
    echo "$tag: debootstrap $SUITE with $packages"
    debootstrap --variant=minbase --cache-dir="$CACHE/debs" --include="$packages" \
        "$SUITE" "$dir" "$(mirror)" >"$CACHE/debootstrap-$(basename "$name").log" 2>&1 \
        || { tail -n 30 "$CACHE/debootstrap-$(basename "$name").log" >&2; rm -rf "$dir"; exit 1; }
    chroot "$dir" /bin/sh -euc "$setup"
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/usr/share/doc/* \
        "$dir"/usr/share/man/* "$dir"/usr/share/locale/*
    local args=()
    for change in "$@"; do args+=(--change "$change"); done
    tar -C "$dir" --numeric-owner -c . | docker import "${args[@]}" - "$tag" >/dev/null
    rm -rf "$dir"
    echo "$tag: built"
}

ROOTFS_TAG=""
rootfs_image llm-proxy-ci/python-rootfs "python3,python3-pip,python3-setuptools,python3-wheel" '
    rm -f /usr/lib/python3*/EXTERNALLY-MANAGED  # the official image lets pip install system-wide
    ln -sf /usr/bin/python3 /usr/local/bin/python
    ln -sf /usr/bin/pip3 /usr/local/bin/pip
' 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' 'ENV LANG=C.UTF-8' \
  'CMD ["python3"]'
PYTHON_ROOTFS="$ROOTFS_TAG"

# The official image has user redis as uid 999, gid 1000 (deploy/kubernetes runs it so), and is
# built with protected mode off (in a container every client is remote):
# the stand-in's entrypoint passes --protected-mode no first, so the command's own flags still win.
rootfs_image llm-proxy-ci/redis-rootfs "redis-server" '
    groupmod -g 1000 redis && usermod -u 999 -g 1000 redis  # the official image'"'"'s uid and gid
    mkdir -p /data && chown -R redis:redis /data /var/lib/redis /var/log/redis
    cat >/usr/local/bin/docker-entrypoint.sh <<"ENTRYPOINT"
#!/bin/sh
set -e
if [ "$1" = redis-server ]; then
    shift
    if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then  # a config file comes first
        conf="$1"; shift; set -- "$conf" --protected-mode no "$@"
    else
        set -- --protected-mode no "$@"
    fi
    exec redis-server "$@"
fi
exec "$@"
ENTRYPOINT
    chmod 755 /usr/local/bin/docker-entrypoint.sh
' 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' 'USER redis' \
  'WORKDIR /data' 'VOLUME /data' 'EXPOSE 6379' 'ENTRYPOINT ["docker-entrypoint.sh"]' 'CMD ["redis-server"]'
docker tag "$ROOTFS_TAG" redis:7-alpine
REDIS_ROOTFS="$ROOTFS_TAG"

rootfs_image llm-proxy-ci/prometheus-rootfs "prometheus,wget" '
    mkdir -p /prometheus /etc/prometheus && chown nobody:nogroup /prometheus
' 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' 'USER nobody' \
  'WORKDIR /prometheus' 'VOLUME /prometheus' 'EXPOSE 9090' 'ENTRYPOINT ["/bin/prometheus"]' \
  'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'
docker tag "$ROOTFS_TAG" prom/prometheus:v2.53.2
PROMETHEUS_ROOTFS="$ROOTFS_TAG"

# python:3.11-slim: the rootfs plus a wheelhouse of constraints.txt, so that the Dockerfile's
# `pip install` runs with no network (PIP_NO_INDEX) and proves that constraints.txt pins all.
WHEELHOUSE_FORMAT=2  # bump when the download below changes
WHEELS_HASH="$( (cat constraints.txt pyproject.toml; echo "$WHEELHOUSE_FORMAT") | sha256sum | cut -c1-12)"
PY_TAG="llm-proxy-ci/python-wheels:${PYTHON_ROOTFS##*:}-$WHEELS_HASH"
if docker image inspect "$PY_TAG" >/dev/null 2>&1; then
    echo "$PY_TAG: cached"
else
    WHEELS="$CACHE/wheels-$WHEELS_HASH"
    find "$CACHE" -maxdepth 1 -name 'wheels-*' ! -name "wheels-$WHEELS_HASH*" -exec rm -rf {} +  # older pins
    if [ ! -f "$WHEELS/.complete" ]; then
        rm -rf "$WHEELS"
        mkdir -p "$WHEELS"
        # every runtime and [examples] dependency, exactly as pinned, and the build backend; pip
        # evaluates markers for this host's Python, not the image's, so they are dropped here
        sed 's/;.*//' constraints.txt >"$WHEELS.requirements"
        python3 -m pip download --quiet --dest "$WHEELS" --only-binary=:all: \
            --python-version 3.11 --implementation cp --abi cp311 --platform manylinux2014_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
            -r "$WHEELS.requirements" 'setuptools>=68' wheel >"$CACHE/pip-download.log" 2>&1 \
            || { grep -v 'is ignored: it is neither' "$CACHE/pip-download.log" >&2; exit 1; }
        touch "$WHEELS/.complete"
    fi
    CTX="$(mktemp -d)"
    cp -a "$WHEELS" "$CTX/wheels"
    rm -f "$CTX/wheels/.complete"
    cat >"$CTX/Dockerfile" <<EOF
FROM $PYTHON_ROOTFS
COPY wheels /opt/ci-wheels
ENV PIP_NO_INDEX=1 PIP_FIND_LINKS=/opt/ci-wheels
CMD ["python3"]
EOF
    DOCKER_BUILDKIT=0 docker build --quiet -t "$PY_TAG" "$CTX" >/dev/null 2>&1 \
        || { rm -rf "$CTX"; echo "FAIL: building $PY_TAG" >&2; exit 1; }
    rm -rf "$CTX"
    echo "$PY_TAG: built"
fi
docker tag "$PY_TAG" python:3.11-slim
# stand-ins for older pins and definitions are not kept
for repo in python-wheels python-rootfs redis-rootfs prometheus-rootfs; do
    docker images "llm-proxy-ci/$repo" --format '{{.Repository}}:{{.Tag}}' \
        | { grep -v -x -e "$PY_TAG" -e "$PYTHON_ROOTFS" -e "$REDIS_ROOTFS" -e "$PROMETHEUS_ROOTFS" || true; } \
        | xargs -r docker rmi >/dev/null
done
echo "stand-ins: python:3.11-slim redis:7-alpine prom/prometheus:v2.53.2"
