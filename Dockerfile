# obs-gateway container image.
#
#   docker build -t obs-gateway:0.1.0 .
#   docker run --rm -p 8080:8080 -e OBS_INGEST_TOKEN=... -e OBS_SELFMON_TOKEN=... obs-gateway:0.1.0
#
# Config:  /etc/obs-gateway/gateway.toml (a copy of deploy/gateway.toml is
#          baked in; mount your own file over it, read-only).
# Tokens:  from the environment (token_env) or from files mounted under
#          /run/secrets/ (token_file); never baked into the image.
# Ports:   8080 public listener; 9091 admin (/metrics /livez /readyz): publish
#          it to the scraper's network only, never to the internet.
# Stop:    SIGTERM drains in-flight requests for drain_timeout_seconds (20 s
#          by default) and exits 0: give `docker stop -t` / compose
#          stop_grace_period / k8s terminationGracePeriodSeconds more than that.
#
# Every dependency has a manylinux wheel; the build stage compiles only the
# gateway's own hot path (mypyc, setup.py) and keeps the compiler, pip,
# setuptools and caches out of the image.  The listening log line says
# build=compiled; OBS_GATEWAY_PURE=1 at run time runs the Python modules.

# Pinned by version; pin by digest as well (python:3.11.14-slim-bookworm@sha256:…)
# where the registry is reachable, and let a bot bump both.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# A C compiler for the compiled hot path (without one the same source
# installs as Python: setup.py falls back, and the image still works).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# A venv without pip: the base image's pip installs into it (--python), so
# the runtime copy carries only the gateway and its dependencies.
RUN python -m venv --without-pip /opt/venv
# Dependencies first, from the hash-pinned runtime lock, wheels only: this
# layer is rebuilt only when the lock changes.
COPY requirements-runtime.lock ./
RUN pip --python /opt/venv/bin/python install --only-binary=:all: --require-hashes \
        -r requirements-runtime.lock
COPY pyproject.toml setup.py README.md ./
COPY gateway/ gateway/
RUN pip --python /opt/venv/bin/python install --no-deps . \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="obs-gateway" \
      org.opencontainers.image.description="Authenticated streaming ingest gateway for VictoriaMetrics remote-write and OTLP/HTTP traces" \
      org.opencontainers.image.licenses="Apache-2.0"
# Fixed numeric ids so Kubernetes runAsNonRoot can verify them and mounted
# secrets can be made readable to exactly this user.
RUN groupadd --system --gid 10001 obsgw \
    && useradd --system --uid 10001 --gid obsgw --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin obsgw
COPY --from=build /opt/venv /opt/venv
COPY --chown=root:root --chmod=0644 deploy/gateway.toml /etc/obs-gateway/gateway.toml
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080 9091
# Healthy: /readyz (serving and not draining; with workers, all of them
# ready) and the public port accepts a connection, so a dead listener is
# seen, not only a live admin port.  No curl in slim images: the stdlib
# exits non-zero on a refused connection or a non-2xx.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import socket, urllib.request; urllib.request.urlopen('http://127.0.0.1:9091/readyz', timeout=2); socket.create_connection(('127.0.0.1', 8080), timeout=2).close()"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["obs-gateway"]
CMD ["run", "--config", "/etc/obs-gateway/gateway.toml"]
