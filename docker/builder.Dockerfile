# TensorRT 10.5, the release Triton 24.10 loads: engines built here load there.
FROM nvcr.io/nvidia/tensorrt:24.10-py3

WORKDIR /opt/project
# Only what the install needs, so source edits elsewhere keep this layer cached.
COPY pyproject.toml ./
COPY builder/ builder/
COPY server/ server/
RUN python3 -m pip install --no-cache-dir ".[builder]" \
    && python3 -c "import tensorrt; print('TensorRT', tensorrt.__version__)"

# The repository is mounted here: datasets, runs and model_repository stay on the host.
WORKDIR /workspace
ENTRYPOINT ["builder"]
CMD ["--help"]
