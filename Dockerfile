# qwen-refresher as a sidecar container beside an OpenClaw gateway.
#
#   docker build -t qwen-refresher .                      # uid/gid 1000, like the OpenClaw image
#   docker build --build-arg APP_UID=1001 --build-arg APP_GID=1001 -t qwen-refresher .
#
# APP_UID/APP_GID must own the OpenClaw state volume, i.e. match the gateway's user: the
# refresher rewrites auth-profiles.json there, and OpenClaw's lock check (process.kill(pid, 0))
# treats a lock held by a pid it may not signal, a different uid, as stale.
# deploy/docker-compose.yml and deploy/kubernetes/ show it running; docs/running.md explains.
ARG PYTHON_IMAGE=python:3.12-slim

# --- build: resolve and install the package and its dependencies into a venv ----------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# A venv without pip: the outer pip installs into it (--python), so neither pip nor setuptools
# ends up in the final image. Every dependency ships manylinux wheels: no compiler needed here
# either, and none can reach the final stage, which copies only /opt/qwen-refresher.
RUN python -m venv --without-pip /opt/qwen-refresher
# Dependencies first, exactly as locked (versions and hashes: scripts/lock-image-deps.sh), then
# the package without resolving anything again: a rebuild gets the same bytes, and a wheel that
# does not match its hash fails the build.
COPY deploy/requirements.lock ./
RUN pip --python /opt/qwen-refresher/bin/python install --no-cache-dir --compile \
        --require-hashes --only-binary :all: -r requirements.lock
COPY pyproject.toml README.md LICENSE ./
COPY qwen_refresher ./qwen_refresher
RUN pip --python /opt/qwen-refresher/bin/python install --no-cache-dir --compile --no-deps . \
    && find /opt/qwen-refresher -depth -type d -name tests -path "*/site-packages/*" -exec rm -rf {} +

# --- final: the slim Python runtime, the venv, an unprivileged user --------------------------
FROM ${PYTHON_IMAGE}
ARG APP_UID=1000
ARG APP_GID=1000
# VERSION must equal qwen_refresher/__init__.py's (a test checks); SOURCE is where the image
# was built from: pass --build-arg SOURCE=<repository URL> in your build pipeline.
ARG VERSION=0.1.0
ARG SOURCE=""
LABEL org.opencontainers.image.title="qwen-refresher" \
      org.opencontainers.image.description="Keeps OpenClaw's qwen-portal OAuth tokens fresh: refresh before expiry, write back atomically, tell the gateway." \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}"

# --non-unique: the ids must equal the gateway's, whatever the base image already uses them for.
# The mount points are created owned by that user so that an empty named volume mounted there
# is initialised with the right owner (Docker copies the directory's ownership into it).
RUN groupadd --non-unique --gid "${APP_GID}" refresher \
    && useradd --non-unique --uid "${APP_UID}" --gid "${APP_GID}" --home-dir /home/refresher \
       --create-home --shell /usr/sbin/nologin refresher \
    && install -d -o "${APP_UID}" -g "${APP_GID}" -m 0700 /var/lib/qwen-refresher /home/node/.openclaw

COPY --from=build /opt/qwen-refresher /opt/qwen-refresher

# Container defaults; any QWEN_REFRESHER_* variable or a mounted config.toml overrides them.
# LOG_FORMAT json: one JSON object per line on stdout, for `docker logs` and log shippers.
# LISTEN 0.0.0.0: probes (Kubernetes kubelet) arrive on the pod IP, not on loopback.
# OPENCLAW_STATE_DIR: the same path as in the OpenClaw image, so both containers name the same
# files the same way. No Qwen Code and no desktop in a container: those two are off.
ENV PATH=/opt/qwen-refresher/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/refresher \
    OPENCLAW_STATE_DIR=/home/node/.openclaw \
    QWEN_REFRESHER_STATE_DIR=/var/lib/qwen-refresher \
    QWEN_REFRESHER_LOG_FORMAT=json \
    QWEN_REFRESHER_LISTEN=0.0.0.0:9464 \
    QWEN_REFRESHER_QWEN_CODE=false \
    QWEN_REFRESHER_NOTIFY_DESKTOP=false

USER ${APP_UID}:${APP_GID}
WORKDIR /home/refresher
EXPOSE 9464

# Healthy = the daemon runs and every profile holds a token that is valid now (what
# `qwen-refresher status` exits 0 for). A profile that needs a new login makes the container
# "unhealthy" in `docker ps`, which is where an operator looks; nothing here restarts it.
# status reads files only (stdlib, ~40 ms), so a 30 s interval costs nothing.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["qwen-refresher", "status", "--quiet"]

# SIGTERM (docker stop, kubelet) makes the daemon finish an in-flight write and exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["qwen-refresher"]
CMD ["run"]
