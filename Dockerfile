# One image for the three sealstream commands; compose.yaml picks the command per service
# (sealstream-proxy, sealstream-producer, sealstream-consume). No credentials are baked in:
# they are mounted at run time (compose secrets and volumes).
#
#   docker build -t sealstream:local .
#   docker build --build-arg UID="$(id -u)" --build-arg GID="$(id -g)" -t sealstream:local .

# --- build: install the project and its dependencies into a virtual environment -------------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/sealstream

WORKDIR /src
# Only what the package build needs (never .sealstream/, .venv/ or tests).
COPY pyproject.toml README.md ./
COPY sealstream ./sealstream
COPY producers ./producers
COPY broker_proxy ./broker_proxy
COPY consumers ./consumers
COPY sealops ./sealops
RUN /opt/sealstream/bin/pip install .

# --- runtime: the virtual environment and an unprivileged user ------------------------------
FROM python:3.11-slim

# The user the commands run as. compose.yaml passes the host user's ids so that the files it
# bind-mounts from .sealstream/ (mode 0600) are readable in the container.
ARG UID=10001
ARG GID=10001

RUN set -eu; \
    if [ "$UID" -eq 0 ]; then echo "error: UID must not be 0 (the image runs as non-root)" >&2; exit 1; fi; \
    if ! getent group "$GID" >/dev/null; then groupadd --gid "$GID" sealstream; fi; \
    useradd --uid "$UID" --gid "$GID" --no-create-home --no-log-init \
        --home-dir /var/lib/sealstream --shell /usr/sbin/nologin sealstream; \
    install -d -m 0700 -o "$UID" -g "$GID" /var/lib/sealstream

COPY --from=build /opt/sealstream /opt/sealstream

ENV PATH="/opt/sealstream/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# /var/lib/sealstream: the working directory, owned by this user (credentials are mounted as
# compose secrets under /run/secrets, never stored in the image).
WORKDIR /var/lib/sealstream
USER ${UID}:${GID}

# No ENTRYPOINT: the command is the whole argv, e.g. `sealstream-proxy run`.
CMD ["sealstream", "--help"]
