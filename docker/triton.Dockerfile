# NVIDIA's Triton plus what the Python-backend models import (builder/backend/model.py).
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# The compose healthcheck uses curl; install it only if this base lacks it.
RUN command -v curl >/dev/null \
    || (apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*)

# numpy<2: the wheels the backend stub and onnxruntime were built against.
RUN python3 -m pip install --no-cache-dir "onnxruntime>=1.18" "numpy<2"

# ONNX Runtime's TensorRT provider creates only the last folder of trt_engine_cache_path
# (<root>/<model>, builder/model_config.py): the root must exist even where nothing is mounted on it.
RUN mkdir -p /opt/tritonserver/trt_engine_cache
