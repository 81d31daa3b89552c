"""server.triton: what the gateway reads from a model's config and how it answers Triton's refusals; and
TritonClient with the shared-memory region, against a stand-in for tritonclient's own client: which answers
refuse the region for good, when it is offered again, stale regions, and what each call sends."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from server.errors import BadRequest, ModelNotFound, TritonFailed
from server.preprocess import PreprocessSpec
from server.shared_memory import InputRegion
from server.triton import ModelInfo, TritonClient, model_info_from_config, translate_error

SPEC = PreprocessSpec(2, 2, (0.5,), (0.25,), color_mode="L")


class Answer:
    def __init__(self, rows: int) -> None:
        self.logits = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)

    def get_response(self):
        return type("Response", (), {"model_version": "1"})()

    def as_numpy(self, name: str) -> np.ndarray:
        return self.logits


class RecordingClient:
    """Records what TritonClient asks of tritonclient; raises the queued errors first."""

    def __init__(self, register_errors=(), infer_errors=(), regions=()) -> None:
        self.register_errors, self.infer_errors = list(register_errors), list(infer_errors)
        self.regions = {name: {"name": name, "key": key} for name, key in regions}
        self.registered, self.unregistered, self.inputs = [], [], []

    async def register_system_shared_memory(self, name, key, byte_size, headers=None, client_timeout=None):
        if self.register_errors:
            raise self.register_errors.pop(0)
        self.registered.append(name)
        self.regions[name] = {"name": name, "key": key}

    async def unregister_system_shared_memory(self, name="", headers=None, client_timeout=None):
        self.unregistered.append(name)
        self.regions.pop(name, None)

    async def get_system_shared_memory_status(self, headers=None, as_json=False, client_timeout=None):
        return {"regions": dict(self.regions)}

    async def infer(self, model, inputs, model_version="", outputs=None, headers=None, client_timeout=None):
        (tensor,) = inputs
        self.inputs.append(tensor._get_tensor())
        if self.infer_errors:
            raise self.infer_errors.pop(0)
        return Answer(tensor._get_tensor().shape[0])

    async def close(self):
        pass


@pytest.fixture
def region():
    made = InputRegion(slots=2, slot_bytes=4096)
    yield made
    made.close()


def run(region, scenario, **recording):
    """`scenario(client, triton)` on a TritonClient whose tritonclient is a RecordingClient."""

    async def main():
        client = TritonClient("127.0.0.1:1", region=region)
        await client._client.close()
        client._client = RecordingClient(**recording)
        return await scenario(client, client._client)

    return asyncio.run(main())


def info(max_batch_size: int = 8, response_cache: bool = False) -> ModelInfo:
    return ModelInfo("m", SPEC, ("a", "b", "c"), "input", "logits", max_batch_size, response_cache=response_cache)


def test_a_triton_that_cannot_open_the_key_refuses_until_it_was_seen_down(region, caplog):
    refusal = InferenceServerException("Unable to open shared memory region: '/x'", "StatusCode.INTERNAL")

    async def scenario(client, triton):
        await client.register_region()
        assert client.region_refused and not client.region_registered
        await client.register_region()
        assert triton.registered == []  # not asked again
        client.forget_region()
        await client.register_region()
        assert client.region_registered and triton.registered == [region.name]

    with caplog.at_level(logging.WARNING, logger="server.triton"):
        run(region, scenario, register_errors=[refusal])
    assert "cannot use shared memory" in caplog.text


@pytest.mark.parametrize(
    "message, status",
    [
        ("failed to connect to all addresses", "StatusCode.UNAVAILABLE"),
        ("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED"),
    ],
)
def test_an_unreachable_or_slow_triton_is_asked_again(region, message, status):
    async def scenario(client, triton):
        await client.register_region()
        assert not client.region_refused and not client.region_registered
        await client.register_region()
        assert client.region_registered

    run(region, scenario, register_errors=[InferenceServerException(message, status)])


def test_a_registration_whose_answer_was_lost_counts_as_made(region):
    already = InferenceServerException(
        f"shared memory region '{region.name}' already in manager", "StatusCode.ALREADY_EXISTS"
    )

    async def scenario(client, triton):
        await client.register_region()
        assert client.region_registered

    run(region, scenario, register_errors=[already])


def test_regions_of_killed_gateways_are_unregistered_and_live_ones_kept(region):
    alive = InputRegion(slots=1, slot_bytes=64)

    async def scenario(client, triton):
        await client.register_region()
        assert triton.unregistered == ["gateway-1-dead"]
        assert set(triton.regions) == {region.name, alive.name, "someone-else"}

    try:
        run(
            region,
            scenario,
            regions=[("gateway-1-dead", "/gateway-1-dead"), (alive.name, alive.key), ("someone-else", "/gone")],
        )
    finally:
        alive.close()


def test_chunks_go_at_their_own_offsets_in_the_slot(region):
    slot, batch = region.acquire((5, 1, 2, 2), np.float32)
    batch[...] = 1.0

    async def scenario(client, triton):
        await client.register_region()
        answer = await client.infer(info(max_batch_size=2), batch, slot=slot)
        assert answer.transport == "shared_memory" and answer.logits.shape == (5, 3)
        return triton.inputs

    inputs = run(region, scenario)
    placed = [
        (t.parameters["shared_memory_offset"].int64_param, t.parameters["shared_memory_byte_size"].int64_param)
        for t in inputs
    ]
    image = 4 * 4  # one 1x2x2 float image
    assert placed == [(slot.offset, 2 * image), (slot.offset + 2 * image, 2 * image), (slot.offset + 4 * image, image)]
    assert all(t.parameters["shared_memory_region"].string_param == region.name for t in inputs)


def test_a_lost_registration_is_made_again_and_the_call_sent_as_bytes(region):
    lost = InferenceServerException(f"Unable to find shared memory region: '{region.name}'", "StatusCode.NOT_FOUND")
    slot, batch = region.acquire((1, 1, 2, 2), np.float32)

    async def scenario(client, triton):
        await client.register_region()
        answer = await client.infer(info(), batch, slot=slot)
        assert answer.transport == "bytes" and triton.registered == [region.name, region.name]
        assert "shared_memory_region" not in triton.inputs[-1].parameters and client.region_registered

    run(region, scenario, infer_errors=[lost])


def test_other_shared_memory_errors_are_not_taken_for_a_lost_registration(region):
    wrong = InferenceServerException(
        f"Invalid offset + byte size for shared memory region: '{region.name}'", "StatusCode.INVALID_ARGUMENT"
    )
    slot, batch = region.acquire((1, 1, 2, 2), np.float32)

    async def scenario(client, triton):
        await client.register_region()
        with pytest.raises(Exception, match="Invalid offset"):
            await client.infer(info(), batch, slot=slot)
        assert len(triton.inputs) == 1 and triton.registered == [region.name]

    run(region, scenario, infer_errors=[wrong])


def test_a_model_with_the_response_cache_gets_bytes(region):
    slot, batch = region.acquire((1, 1, 2, 2), np.float32)

    async def scenario(client, triton):
        await client.register_region()
        assert (await client.infer(info(response_cache=True), batch, slot=slot)).transport == "bytes"
        assert "shared_memory_region" not in triton.inputs[0].parameters

    run(region, scenario)


def test_closing_unregisters_even_without_a_known_registration(region):
    async def scenario(client, triton):
        await client.close()
        assert triton.unregistered == [region.name]

    run(region, scenario)


def _config(max_batch_size: int, dims: list) -> dict:
    parameters = {
        key: {"string_value": value}
        for key, value in PreprocessSpec(8, 8, (0.5,), (0.5,), color_mode="L").to_parameters().items()
    }
    return {
        "max_batch_size": max_batch_size,
        "parameters": parameters,
        "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": dims}],
        "output": [{"name": "logits", "dims": ["10"]}],
    }


@pytest.mark.parametrize(
    ("max_batch_size", "dims", "per_call"),
    [
        (32, ["1", "8", "8"], 32),
        (0, ["1", "1", "8", "8"], 1),  # a fixed batch of 1: one image per call (gRPC's JSON has strings)
        (0, [1, 1, 8, 8], 1),  # HTTP's has numbers
        (0, ["-1", "1", "8", "8"], None),  # no batching but a dynamic first axis: all at once
    ],
)
def test_images_per_call_follow_the_batch_axis(max_batch_size, dims, per_call):
    assert model_info_from_config("m", _config(max_batch_size, dims)).images_per_call == per_call


@pytest.mark.parametrize(
    ("status", "message", "error"),
    [
        ("StatusCode.INVALID_ARGUMENT", "input of shape [2, 1, 8, 8], the model takes [1, 1, 8, 8]", BadRequest),
        ("400", "unexpected shape for input 'input' for model 'm'", BadRequest),
        ("400", "Request for unknown model: 'm' is not found", ModelNotFound),
        ("StatusCode.INTERNAL", "inference failed: out of memory", TritonFailed),
    ],
)
def test_a_refused_input_is_the_clients_error_and_a_failure_is_tritons(status, message, error):
    translated = translate_error(InferenceServerException(message, status=status), "m")
    assert type(translated) is error
    assert translated.status == {BadRequest: 400, ModelNotFound: 404, TritonFailed: 502}[error]


def test_the_grpc_channel_reconnects_within_seconds_and_keeps_tritonclients_defaults(monkeypatch):
    import grpc
    import tritonclient.grpc.aio as grpc_client

    from server.triton import MAX_RECONNECT_BACKOFF_MS, TritonClient

    seen: list[dict] = []
    real_channel = grpc.aio.insecure_channel
    monkeypatch.setattr(
        grpc.aio, "insecure_channel", lambda url, options=None: seen.append(dict(options or [])) or real_channel(url)
    )

    async def open_and_close() -> None:
        await TritonClient("127.0.0.1:1", protocol="grpc").close()

    asyncio.run(open_and_close())
    options = seen[-1]
    # gRPC's default is 120 s between reconnect attempts: a restarted Triton would go unnoticed that long.
    assert options["grpc.max_reconnect_backoff_ms"] == MAX_RECONNECT_BACKOFF_MS <= 5000
    assert options["grpc.max_receive_message_length"] == grpc_client.MAX_GRPC_MESSAGE_SIZE
    assert options["grpc.keepalive_time_ms"] == grpc_client.KeepAliveOptions().keepalive_time_ms
