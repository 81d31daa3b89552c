# TensorRT 10.5, the release Triton 24.10 loads: engines built here load there.
FROM nvcr.io/nvidia/tensorrt:24.10-py3

WORKDIR /opt/project
# Only what the install needs, so source edits elsewhere keep this layer cached.
COPY pyproject.toml ./
COPY builder/ builder/
COPY server/ server/
COPY stack/ stack/
# torch and torchvision held to CUDA 12.6 builds (why: the constraints file), which PyTorch's cu126 index
# serves; the base image's TensorRT stays.
COPY docker/builder-constraints.txt docker/builder-constraints.txt
RUN python3 -m pip install --no-cache-dir ".[builder]" --constraint docker/builder-constraints.txt \
        --extra-index-url https://download.pytorch.org/whl/cu126 \
    && python3 -c "import tensorrt, torch; \
assert tensorrt.__version__.startswith('10.5.'), tensorrt.__version__; \
assert torch.version.cuda == '12.6', torch.version.cuda; \
print('TensorRT', tensorrt.__version__, 'torch', torch.__version__, 'CUDA', torch.version.cuda)"

# The repository is mounted here: datasets, runs and model_repository stay on the host.
WORKDIR /workspace
ENTRYPOINT ["builder"]
CMD ["--help"]
