# syntax=docker/dockerfile:1
# The RadFed coordinator. `radfed coordinator serve` runs the API over TLS (8443) and
# supervises the federation's Flower SuperLink (9093), so the SuperLink runs inside
# this container. Build from the repository root:
#   docker build -f compose/coordinator.Dockerfile -t radfed-coordinator .
# State (federation CA, registry when on SQLite, object store, runs) lives in the
# coordinator home, a volume; the image holds no secret: `radfed coordinator init`
# makes the CA on the first start, in the volume.

# Pinned by tag and by the digest of its multi-architecture index; bump both together
# (`docker buildx imagetools inspect python:3.11.x-slim-bookworm` gives the digest).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# ---- build: a virtual environment with RadFed in it ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/radfed/venv
ENV PATH=/opt/radfed/venv/bin:$PATH
# torch first, the CPU-only wheel from the CPU index (DESIGN): resolved from PyPI it
# would be a CUDA build several GiB larger. The ServerApp aggregates on the CPU.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocols/ protocols/
COPY node/ node/
COPY coordinator/ coordinator/
COPY radfed/ radfed/
RUN pip install --no-cache-dir .

# ---- runtime: the virtual environment, the Flower apps, a non-root user ----
FROM ${PYTHON_IMAGE} AS coordinator
COPY --from=build /opt/radfed/venv /opt/radfed/venv
# The Flower apps researchers may run (`flwr run` submits apps/<name>); read-only.
COPY apps/ /opt/radfed/apps/
COPY compose/coordinator-entrypoint.sh /usr/local/bin/radfed-coordinator-entrypoint
COPY compose/healthcheck.py /usr/local/bin/radfed-healthcheck
# /var/lib/radfed/enrollment: where the demo's first start leaves enrollment tokens.
RUN chmod 0755 /usr/local/bin/radfed-coordinator-entrypoint /usr/local/bin/radfed-healthcheck \
    && groupadd --system --gid 10001 radfed \
    && useradd --system --uid 10001 --gid radfed --home-dir /var/lib/radfed \
        --no-create-home --shell /usr/sbin/nologin radfed \
    && install -d -o radfed -g radfed -m 0700 \
        /var/lib/radfed /var/lib/radfed/coordinator /var/lib/radfed/enrollment
# Listen on every interface inside the container; compose decides what the host
# publishes (the SuperLink on loopback: only its /v1/fleet/ paths are for nodes).
ENV PATH=/opt/radfed/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/radfed \
    RADFED_COORDINATOR_HOME=/var/lib/radfed/coordinator \
    RADFED_COORDINATOR_APPS_DIR=/opt/radfed/apps \
    RADFED_COORDINATOR_API_HOST=0.0.0.0 \
    RADFED_COORDINATOR_SUPERLINK_HOST=0.0.0.0
USER 10001:10001
WORKDIR /var/lib/radfed
VOLUME ["/var/lib/radfed/coordinator"]
EXPOSE 8443 9093
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["radfed-healthcheck", "coordinator"]
ENTRYPOINT ["radfed-coordinator-entrypoint"]
CMD ["serve"]
