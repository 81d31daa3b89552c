# The gateway alone: pyproject's base dependencies, no torch, no training code.
FROM python:3.11-slim

# The malloc thresholds keep the per-request 600 KB buffers on the heap (see GATEWAY_MALLOC_ENV in server/settings.py).
# A container has its own /dev/shm, which a Triton container cannot open: no shared-memory region is
# reserved unless GATEWAY_SHARED_MEMORY_SLOTS is set (both containers then need one IPC namespace).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MALLOC_MMAP_THRESHOLD_=16777216 \
    MALLOC_TRIM_THRESHOLD_=67108864 \
    GATEWAY_SHARED_MEMORY_SLOTS=0 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080

# Numeric uid, so Kubernetes' runAsNonRoot can verify it.
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin gateway

WORKDIR /app
COPY pyproject.toml ./
COPY server/ server/
RUN pip install --no-cache-dir . && rm -rf build *.egg-info

USER 10001:10001
EXPOSE 8080
# Every interface, unlike the local default (127.0.0.1): a container is reached from outside it, so
# set GATEWAY_API_KEYS or GATEWAY_API_KEYS_FILE. server/serve.py starts uvicorn with GATEWAY_WORKERS
# worker processes (default: one per core the container may run on; a CPU limit does not narrow that, so
# set it to the limit) and every other option from the GATEWAY_* settings. Python is PID 1: SIGTERM
# reaches the supervisor, which passes it on to every worker, and each drains.
CMD ["python", "-m", "server"]
