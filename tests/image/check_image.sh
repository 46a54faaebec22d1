#!/usr/bin/env bash
# Build the Dockerfile and check the image works: it serves queries through the proxy, answers
# /readyz and /metrics, reports healthy, runs as its own non-root user, carries the compiled
# extension and no compiler. Run by hand (not by pytest, not by CI: CI machines reach package
# registries only, not Docker Hub). Exits non-zero on the first failure.
#
#   tests/image/check_image.sh [DSN]      # DSN: a PostgreSQL the container reaches over the
#                                         # host's network (default postgresql://postgres@127.0.0.1:5432/postgres)
#
# Needs a running Docker daemon. When python:3.11-slim can be neither found nor pulled, it builds
# a stand-in under that tag from Debian 12 with debootstrap (python3 3.11 as /usr/local/bin/python,
# pip, Python's headers, the host's CA bundle: the same contract as the official image, not the
# same build), so the Dockerfile's own steps are what is checked. The container uses the host's
# network (--network host) and the ports 6432 and 9930, which must be free.
set -euo pipefail

DSN="${1:-postgresql://postgres@127.0.0.1:5432/postgres}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
TAG="pgsidecar:check"
NAME="pgsidecar-check-$$"

fail() { echo "FAIL: $*" >&2; exit 1; }
step() { echo "==> $*"; }

docker info >/dev/null 2>&1 || fail "no Docker daemon (start dockerd first)"
for port in 6432 9930; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then fail "port $port is taken on this host"; fi
done

if ! docker image inspect python:3.11-slim >/dev/null 2>&1 && ! docker pull -q python:3.11-slim >/dev/null 2>&1; then
    step "python:3.11-slim cannot be pulled: building a stand-in from Debian 12 (debootstrap)"
    command -v debootstrap >/dev/null || fail "debootstrap missing (apt-get install debootstrap)"
    rootfs="$(mktemp -d)"
    trap 'rm -rf "$rootfs"' EXIT
    chmod 755 "$rootfs"  # it becomes the image's /: mktemp's 0700 would lock out the non-root user
    debootstrap --variant=minbase --include=python3,python3-pip,python3-dev,ca-certificates \
        bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
    rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED
    # the host's CA bundle: a registry reached through a TLS-inspecting proxy stays trusted
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' - python:3.11-slim >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
fi

step "docker build"
docker build --network host -q -t "$TAG" "$ROOT" >/dev/null

cleanup() { docker rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
step "docker run (upstream $DSN)"
docker run -d --name "$NAME" --network host -e DATABASE_URL="$DSN" "$TAG" >/dev/null

step "waiting for the HEALTHCHECK (GET /readyz) to say healthy"
status=""
for _ in $(seq 1 60); do
    status="$(docker inspect -f '{{.State.Health.Status}}' "$NAME" 2>/dev/null || echo gone)"
    [ "$status" = healthy ] && break
    [ "$status" = gone ] && break
    sleep 1
done
if [ "$status" != healthy ]; then
    docker logs "$NAME" 2>&1 | tail -20 >&2
    fail "container not healthy after 60 s (status: $status)"
fi

step "a query through the proxy (psycopg, from the host)"
python3 - "$DSN" <<'PY' || fail "query through the container's proxy"
import sys
from urllib.parse import urlsplit, urlunsplit
import psycopg
u = urlsplit(sys.argv[1])
netloc = (u.netloc.rsplit("@", 1)[0] + "@" if "@" in u.netloc else "") + "127.0.0.1:6432"
with psycopg.connect(urlunsplit(u._replace(netloc=netloc)), connect_timeout=10) as conn:
    assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
    assert conn.execute("SELECT %s::text", ("through the image",)).fetchone() == ("through the image",)
PY

step "/readyz and /metrics"
python3 - <<'PY' || fail "agent endpoints"
import json, urllib.request
ready = json.load(urllib.request.urlopen("http://127.0.0.1:9930/readyz", timeout=5))
assert ready["status"] == "ready", ready
metrics = urllib.request.urlopen("http://127.0.0.1:9930/metrics", timeout=5).read().decode()
assert 'pgsidecar_queries_total{' in metrics, "no pgsidecar_queries_total sample after a query"
PY

step "inside: non-root user, compiled extension, no compiler left"
uid="$(docker exec "$NAME" id -u)"
[ "$uid" != 0 ] || fail "the container runs as root"
docker exec "$NAME" python -c "import proxy._speedups" || fail "proxy._speedups missing in the image"
if docker exec "$NAME" sh -c 'command -v gcc' >/dev/null; then fail "gcc left in the image"; fi

echo "OK: $TAG built and checked (uid $uid, healthy, proxy and agent answering)"
