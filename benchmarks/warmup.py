"""`python -m benchmarks.warmup --onnx MODEL.onnx`: the first requests to a freshly published version,
through the gateway, with Triton's model_warmup and without.

One Triton (polling its repository every second) and one gateway. Two models are published from the same
ONNX, one with `model_warmup` (publish's default) and one without; then, for each repetition, a new
version of each is published into the running stack, in turn. Once Triton reports the new version READY
(which it does only after its warmup), N classifications are sent one after another through the gateway
(JPEG in, top-5 out), each checked to be answered by the new version, and the first one's latency, the
p50 and the p99 of the N are recorded. The same for both models in each repetition, alternating which goes
first, so that load from elsewhere on a shared machine falls on both. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np
import tritonclient.http as httpclient

from builder.publish import PublishSettings, publish
from stack.launcher import TritonServer, sigterm_as_interrupt, triton_and_gateway

READY_TIMEOUT_S = 120.0


def _image() -> bytes:
    from builder.data import load_dataset

    out = io.BytesIO()
    load_dataset("digits").val.image(0, "RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


def wait_ready(triton: TritonServer, name: str, version: int) -> None:
    client = httpclient.InferenceServerClient(triton.http_url)
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            try:
                if client.is_model_ready(name, str(version)):
                    return
            except Exception:  # not in the index yet
                pass
            time.sleep(0.05)
    finally:
        client.close()
    raise TimeoutError(f"version {version} of {name} not ready after {READY_TIMEOUT_S:.0f} s")


def first_requests(url: str, name: str, version: int, image: bytes, count: int) -> list[float]:
    """Latencies (ms) of `count` classifications sent one after another, each answered by `version`."""
    latencies = []
    with httpx.Client(timeout=30) as client:
        while len(latencies) < count:
            started = time.perf_counter()
            response = client.post(
                f"{url}/v1/models/{name}/classify", content=image, headers={"Content-Type": "image/jpeg"}
            )
            elapsed = (time.perf_counter() - started) * 1000
            response.raise_for_status()
            if response.json()["version"] != str(version):
                # The gateway's cached config, or Triton's old version, answered: not a first request of
                # the new version; asked again.
                continue
            latencies.append(elapsed)
    return latencies


def measure(args: argparse.Namespace, folder: Path) -> list[dict]:
    repository = folder / "repo"
    models = {
        "warm": PublishSettings(instance_count=args.instances, max_accuracy_drop=100.0),
        "cold": PublishSettings(instance_count=args.instances, max_accuracy_drop=100.0, warmup=False),
    }
    for name, settings in models.items():
        publish(Path(args.onnx), repository, name, settings=settings)
    image = _image()
    results = []
    gateway_env = {"GATEWAY_MODEL_INFO_TTL_S": "0.5"}
    with triton_and_gateway(repository, folder, gateway_env) as (triton, gateway):
        for name in models:  # version 1 of each answers once: the gateway's connections are up
            wait_ready(triton, name, 1)
            first_requests(gateway.url, name, 1, image, 1)
        for repetition in range(args.repetitions):
            order = list(models) if repetition % 2 == 0 else list(reversed(models))
            for name in order:
                version = publish(Path(args.onnx), repository, name, settings=models[name]).version
                wait_ready(triton, name, version)
                latencies = first_requests(gateway.url, name, version, image, args.requests)
                results.append(
                    {
                        "repetition": repetition + 1,
                        "warmup": name == "warm",
                        "version": version,
                        "first_ms": round(latencies[0], 1),
                        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
                        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
                    }
                )
                print(json.dumps(results[-1]), flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.warmup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", required=True, help="the classifier to publish (e.g. a build's fp32.onnx)")
    parser.add_argument("--requests", type=int, default=50, help="sequential requests per new version")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--instances", type=int, default=2, help="model instances per version")
    parser.add_argument("--out", help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    with sigterm_as_interrupt():
        folder = Path(tempfile.mkdtemp(prefix="warmup-bench-"))
        try:
            results = measure(args, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    print("| run | without: first / p50 / p99 ms | with: first / p50 / p99 ms |")
    print("| --- | --- | --- |")
    for repetition in range(1, args.repetitions + 1):
        cells = {
            r["warmup"]: f"{r['first_ms']} / {r['p50_ms']} / {r['p99_ms']}"
            for r in results
            if r["repetition"] == repetition
        }
        print(f"| {repetition} | {cells[False]} | {cells[True]} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
