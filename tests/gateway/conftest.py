"""The gateway in process, without Triton: FastAPI's TestClient against create_app, with the replica pool
replaced (through a dependency override) by a double of the gateway's own ReplicaPool interface. Triton's
addresses point at a closed port, so anything that does reach for Triton finds it unreachable."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.app import create_app
from server.deps import get_replicas
from server.errors import ModelNotFound
from server.preprocess import PreprocessSpec
from server.settings import Settings
from server.triton import Inference, ModelInfo

MODEL = "digits"
CLASSES = 10
INFO = ModelInfo(
    name=MODEL,
    spec=PreprocessSpec(image_size=8, resize_size=8, mean=(0.5,), std=(0.25,), color_mode="L"),
    labels=tuple(str(i) for i in range(CLASSES)),
    input_name="input",
    output_name="logits",
    max_batch_size=8,
)


class ServedReplicas:
    """The ReplicaPool interface with one model served; it records the batches it was asked to classify and
    answers logits that rank the classes 9, 8, 7, ... for every image."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    async def server_ready(self) -> bool:
        return True

    async def repository_index(self) -> list[dict[str, str]]:
        return [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]

    async def model_info(self, name: str) -> ModelInfo:
        if name != MODEL:
            raise ModelNotFound(f"model {name!r} is not served")
        return INFO

    async def statistics(self, name: str) -> dict:
        return {}

    async def infer(self, info: ModelInfo, batch: np.ndarray, version: str = "", slot=None) -> Inference:
        self.batches.append(batch.copy())
        logits = np.tile(np.arange(CLASSES, dtype=np.float32), (len(batch), 1))
        return Inference(logits, version or "1", "bytes")


@pytest.fixture(autouse=True)
def pillows_pixel_limit(monkeypatch):
    """Each app sets Pillow's process-wide pixel limit from its settings (server/app.py): every test starts
    from the gateway's default and leaves it as it found it, so that none depends on the apps made before."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Settings.model_fields["max_image_pixels"].default)


def gateway_settings(**overrides) -> Settings:
    return Settings(
        triton_grpc_url="127.0.0.1:9",
        triton_http_url="127.0.0.1:9",
        triton_timeout_s=1,
        shared_memory_slots=0,
        log_json=False,
        preprocess_threads=2,
        **overrides,
    )


def client_of(settings: Settings, replicas=None, **client_options) -> TestClient:
    app = create_app(settings)
    app.dependency_overrides[get_replicas] = lambda: replicas if replicas is not None else ServedReplicas()
    return TestClient(app, **client_options)


@pytest.fixture
def replicas() -> ServedReplicas:
    return ServedReplicas()


@pytest.fixture
def gateway(replicas):
    with client_of(gateway_settings(), replicas) as client:
        yield client


def png(value: int = 128, size=(8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("L", size, value).save(out, format="PNG")
    return out.getvalue()


def rejections(client: TestClient, reason: str) -> float:
    return client.app.state.metrics.registry.get_sample_value("gateway_rejections_total", {"reason": reason}) or 0.0
