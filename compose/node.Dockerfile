# syntax=docker/dockerfile:1
# The RadFed node: one container per site. `radfed node serve` runs the API and web UI
# (8080), the DICOM listener (11112) and, once enrolled, supervises the site's Flower
# SuperNode, so the SuperNode runs inside this container. Build from the repository root:
#   docker build -f compose/node.Dockerfile -t radfed-node .
# State (index, de-identified store, keys, the originals vault) lives in the node home,
# a volume; the image holds no secret: keys are made at enrollment, in the volume.

# Pinned by tag and by the digest of its multi-architecture index; bump both together
# (`docker buildx imagetools inspect python:3.11.x-slim-bookworm` gives the digest).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# ---- build: a virtual environment with RadFed in it ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/radfed/venv
ENV PATH=/opt/radfed/venv/bin:$PATH
# torch first, the CPU-only wheel from the CPU index (DESIGN): resolved from PyPI it
# would be a CUDA build several GiB larger. A GPU node image may differ.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocols/ protocols/
COPY node/ node/
COPY coordinator/ coordinator/
COPY radfed/ radfed/
RUN pip install --no-cache-dir .

# ---- runtime: the virtual environment, Tesseract's data, a non-root user ----
FROM ${PYTHON_IMAGE} AS node
# tesseract-ocr brings the English data the vetting OCR reads
# (/usr/share/tesseract-ocr/5/tessdata); the digest above pins the Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tesseract-ocr \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/radfed/venv /opt/radfed/venv
COPY compose/node-entrypoint.sh /usr/local/bin/radfed-node-entrypoint
COPY compose/healthcheck.py /usr/local/bin/radfed-healthcheck
RUN chmod 0755 /usr/local/bin/radfed-node-entrypoint /usr/local/bin/radfed-healthcheck \
    && groupadd --system --gid 10001 radfed \
    && useradd --system --uid 10001 --gid radfed --home-dir /var/lib/radfed \
        --no-create-home --shell /usr/sbin/nologin radfed \
    && install -d -o radfed -g radfed -m 0700 /var/lib/radfed /var/lib/radfed/node
# Listen on every interface inside the container; compose publishes the ports on the
# host's loopback unless the site opens them.
ENV PATH=/opt/radfed/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/radfed \
    RADFED_NODE_HOME=/var/lib/radfed/node \
    RADFED_NODE_API_HOST=0.0.0.0 \
    RADFED_NODE_DICOM_HOST=0.0.0.0
USER 10001:10001
WORKDIR /var/lib/radfed
VOLUME ["/var/lib/radfed/node"]
EXPOSE 8080 11112
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["radfed-healthcheck", "node"]
ENTRYPOINT ["radfed-node-entrypoint"]
CMD ["serve"]
