# syntax=docker/dockerfile:1
# moe-router production image: `make image` (docker or podman).
#
#   CPU (default):  docker build -t moe-router:0.1.0-cpu .
#   CUDA:           docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#                     -t moe-router:0.1.0-cu128 .
# TORCH_INDEX is where torch comes from: the PyTorch CPU wheel index by default (PyPI's
# own torch wheel is the CUDA build, several GB); a CUDA index gives the CUDA build, whose
# CUDA libraries come as nvidia-* wheels, so the base stays the same slim Python and the
# host needs only the NVIDIA driver and container toolkit.
#
# Stages: `deps` installs the pinned dependencies (deploy/image/constraints.txt) and never
# sees the source, so a code change rebuilds only the last layers; `wheel` builds our
# wheel; `ops` compiles the fused CPU top-k ops (routing/fused_topk.cpp) for this build
# host's CPU; `runtime` is the slim base plus the virtual environment, the wheel, the
# compiled ops, a config and a non-root user. No compiler or build tool reaches the
# runtime image: on a CPU whose vector extensions differ from the build host's the ops
# are not found, the server logs it once and routes with PyTorch ops.

# The base, pinned to an exact release (override with --build-arg BASE_IMAGE=...@sha256:...
# to pin a digest from your registry).
ARG BASE_IMAGE=python:3.11.13-slim-bookworm

FROM ${BASE_IMAGE} AS deps
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/moe-router
ENV PATH=/opt/moe-router/bin:$PATH
COPY deploy/image/constraints.txt /tmp/constraints.txt
# torch alone from TORCH_INDEX (its version from the constraints), then everything else
# from PyPI, exactly as pinned.
RUN pip install --no-deps --index-url "${TORCH_INDEX}" -c /tmp/constraints.txt torch \
 && pip install -r /tmp/constraints.txt \
 && pip check

FROM ${BASE_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY deploy/image/constraints.txt /tmp/constraints.txt
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip install -c /tmp/constraints.txt setuptools
COPY pyproject.toml README.md ./
COPY server ./server
COPY client ./client
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation -w /dist .
# The shipped config listens on loopback; in a container the gRPC, metrics and health
# endpoints must be reachable from outside it.
COPY config.yaml /tmp/config.yaml
RUN mkdir -p /dist/etc \
 && sed 's/^\(  host:\) 127\.0\.0\.1/\1 0.0.0.0/' /tmp/config.yaml > /dist/etc/config.yaml \
 && grep -c '^  host: 0.0.0.0' /dist/etc/config.yaml | grep -qx 3

FROM deps AS ops
ENV TORCH_EXTENSIONS_DIR=/opt/moe-router-ops
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/* \
 && pip install ninja
COPY --from=wheel /dist/*.whl /tmp/wheel/
# Built through the same loader the server uses, so the library's name (a digest of the
# source, the flags and torch's version) is the one the server looks for.
RUN pip install --no-deps /tmp/wheel/*.whl \
 && python -c "from moe_router.routing import fused_topk; assert fused_topk.kernel_available()" \
 && find /opt/moe-router-ops -type f ! -name '*.so' -delete

FROM ${BASE_IMAGE} AS runtime
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
LABEL org.opencontainers.image.title="moe-router" \
      org.opencontainers.image.description="gRPC service hosting Mixture-of-Experts token routers" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.moe-router.torch-index="${TORCH_INDEX}"
ENV PATH=/opt/moe-router/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # glibc malloc tuned for large gRPC messages (README "Large messages"); set here, the
    # CLI does not re-exec itself to set them.
    MALLOC_MMAP_THRESHOLD_=33554432 \
    MALLOC_TRIM_THRESHOLD_=1073741824 \
    MALLOC_TOP_PAD_=67108864
# Where the ops stage compiled the fused CPU top-k ops; the server only reads there.
ENV TORCH_EXTENSIONS_DIR=/opt/moe-router-ops
RUN groupadd --system --gid 10001 moe \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin moe
COPY --from=deps /opt/moe-router /opt/moe-router
COPY --from=ops /opt/moe-router-ops /opt/moe-router-ops
COPY --from=wheel /dist/*.whl /tmp/wheel/
RUN pip install --no-deps /tmp/wheel/*.whl && rm -rf /tmp/wheel
COPY --from=wheel /dist/etc/config.yaml /etc/moe-router/config.yaml

USER 10001:10001
WORKDIR /tmp
# gRPC (moe_router.v1, v2 inference, grpc.health.v1), Prometheus metrics, HTTP /healthz /readyz.
EXPOSE 50051 9090 8080
# grpc.health.v1 on the gRPC port, without importing torch (doors/healthcheck.py). The
# start period covers loading the routers (NOT_SERVING until then).
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-m", "moe_router.doors.healthcheck", "--target", "127.0.0.1:50051"]
# SIGTERM drains (health NOT_SERVING, in-flight calls finish) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["moe-router"]
CMD ["serve", "--config", "/etc/moe-router/config.yaml"]
