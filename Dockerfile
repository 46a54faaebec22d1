# pgsidecar: the PostgreSQL proxy (port 6432) and its HTTP agent (port 9930: /metrics, /healthz, /readyz).
#
#   docker build -t pgsidecar .
#   docker run -e DATABASE_URL=postgresql://app:secret@db:5432/app -p 6432:6432 -p 9930:9930 pgsidecar
#
# Any setting can be given as PGSIDECAR_<SECTION>__<KEY> (e.g. PGSIDECAR_POOL__SIZE=5), see
# config/sidecar.yaml. Without DATABASE_URL it would start an embedded PostgreSQL: set it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what `pip install .` needs (see .dockerignore); the sources are removed once installed.
COPY setup.py /tmp/pgsidecar/
COPY agent /tmp/pgsidecar/agent
COPY config /tmp/pgsidecar/config
COPY proxy /tmp/pgsidecar/proxy
COPY graphql_gateway /tmp/pgsidecar/graphql_gateway
COPY migrations /tmp/pgsidecar/migrations
# gcc builds proxy/_speedups.c (the relay's framing loops); it goes once the package is installed.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install /tmp/pgsidecar \
    && python -c "import proxy._speedups" \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* /tmp/pgsidecar \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /home/pgsidecar pgsidecar

USER pgsidecar
WORKDIR /home/pgsidecar
EXPOSE 6432 9930

# Ready = accepting clients and the upstream reachable (GET /readyz answers 503 otherwise, and
# urlopen raises on it). python -c, so the image needs no curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; r = urllib.request.urlopen('http://127.0.0.1:9930/readyz', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

CMD ["pgsidecar", "run", "--listen", "0.0.0.0:6432", "--http", "0.0.0.0:9930"]
