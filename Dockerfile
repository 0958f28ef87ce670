# moe-router container (first version; hardened in a later issue).
# CPU build by default; for CUDA hosts pass a CUDA torch wheel spec, e.g.
#   docker build --build-arg TORCH_SPEC="torch==2.13.0" -t moe-router .
FROM python:3.11-slim AS runtime

ARG TORCH_SPEC="torch==2.13.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    # glibc malloc tuned for large gRPC messages (README "Large messages").
    MALLOC_MMAP_THRESHOLD_=33554432 \
    MALLOC_TRIM_THRESHOLD_=1073741824 \
    MALLOC_TOP_PAD_=67108864

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY client ./client
RUN pip install --no-cache-dir ${TORCH_SPEC} \
 && pip install --no-cache-dir '.[server]' \
 && useradd --system --uid 10001 moe
# The shipped config listens on loopback; in a container the gRPC, metrics and health
# endpoints must be reachable from outside it.
COPY config.yaml /tmp/config.yaml
RUN mkdir -p /etc/moe-router \
 && sed 's/^\(  host:\) 127\.0\.0\.1/\1 0.0.0.0/' /tmp/config.yaml > /etc/moe-router/config.yaml \
 && grep -c '^  host: 0.0.0.0' /etc/moe-router/config.yaml | grep -qx 3

USER 10001
# gRPC, Prometheus metrics, HTTP health (/healthz, /readyz).
EXPOSE 50051 9090 8080
ENTRYPOINT ["moe-router", "serve", "--config", "/etc/moe-router/config.yaml"]
