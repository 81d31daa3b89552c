"""`make bench`: what the gateway costs on top of the model, side by side in one run.

On the same photos and the same ResNet-18 (224x224, FP32, 1000 classes, untrained: speed does not
depend on the weights) it measures:
  1. the model-only ceiling: ONNX Runtime in this process, batch 8;
  2. Triton direct over gRPC with preprocessed tensors, one image per request;
  3. the gateway end to end, JPEG in and top-5 out, one image per request;
2 and 3 at concurrency 1, 4 and 16, each for a fixed duration. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import numpy as np
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

from builder.models import create_model
from builder.publish import PublishSettings, publish
from server.launcher import free_port
from server.preprocess import PreprocessSpec, preprocess_bytes
from server.settings import TritonSettings
from server.stack import local_stack

IMAGENET = PreprocessSpec(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png")
MODEL = "resnet18"


@dataclass
class Result:
    path: str
    concurrency: int
    requests: int
    images_per_s: float
    p50_ms: float
    p99_ms: float


def sample_jpegs() -> list[bytes]:
    import io

    import skimage
    from PIL import Image

    folder = Path(skimage.__file__).parent / "data"
    encoded = []
    for name in PHOTOS:
        buffer = io.BytesIO()
        Image.open(folder / name).convert("RGB").save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def build_model(folder: Path) -> Path:
    model = create_model("resnet18", num_classes=1000, in_channels=3, image_size=224).eval()
    path = folder / "resnet18.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def model_ceiling(onnx_path: Path, tensors: list[np.ndarray], duration_s: float) -> Result:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batch = np.stack([tensors[i % len(tensors)] for i in range(8)])
    session.run(None, {"input": batch})
    latencies, deadline = [], time.perf_counter() + duration_s
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        session.run(None, {"input": batch})
        latencies.append(time.perf_counter() - started)
    return Result("model only (ORT, batch 8)", 1, len(latencies), 8 * len(latencies) / sum(latencies),
                  percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3)


async def closed_loop(call, concurrency: int, duration_s: float) -> tuple[int, float, list[float]]:
    """`concurrency` workers, each sending its next request when the last one is answered."""
    latencies: list[float] = []
    deadline = time.perf_counter() + duration_s

    async def worker(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - started)
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return len(latencies), time.perf_counter() - started, latencies


async def triton_direct(grpc_url: str, tensors: list[np.ndarray], concurrency: int, duration_s: float) -> Result:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    output = [grpcclient.InferRequestedOutput("logits")]

    async def call(i: int) -> None:
        tensor = grpcclient.InferInput("input", [1, 3, 224, 224], "FP32")
        tensor.set_data_from_numpy(tensors[i % len(tensors)][None])
        await client.infer(MODEL, [tensor], outputs=output)

    try:
        await call(0)
        count, elapsed, latencies = await closed_loop(call, concurrency, duration_s)
    finally:
        await client.close()
    return Result("Triton gRPC (tensors)", concurrency, count, count / elapsed,
                  percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3)


async def gateway_end_to_end(url: str, jpegs: list[bytes], concurrency: int, duration_s: float) -> Result:
    # aiohttp (tritonclient's HTTP transport) rather than httpx: a GET /healthz round trip costs it 0.2 ms
    # here against httpx's 0.6 ms, and the client's own overhead is not the gateway's.
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def call(i: int) -> None:
            async with session.post(f"/v1/models/{MODEL}/classify?top_k=5", data=jpegs[i % len(jpegs)],
                                    headers={"Content-Type": "image/jpeg"}) as response:
                await response.read()
                response.raise_for_status()

        await call(0)
        count, elapsed, latencies = await closed_loop(call, concurrency, duration_s)
    return Result("gateway (JPEG in, top-5 out)", concurrency, count, count / elapsed,
                  percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3)


async def measure_served(grpc_url: str, gateway_url: str, tensors: list[np.ndarray], jpegs: list[bytes],
                         args: argparse.Namespace, console: Console) -> list[Result]:
    results = []
    for concurrency in args.concurrency:
        console.print(f"measuring concurrency {concurrency} ...")
        results.append(await triton_direct(grpc_url, tensors, concurrency, args.duration))
        results.append(await gateway_end_to_end(gateway_url, jpegs, concurrency, args.duration))
    return results


def report(results: list[Result], console: Console) -> None:
    ceiling = results[0].images_per_s
    table = Table(title="Gateway benchmark: ResNet-18 224x224 FP32 on this machine's CPU")
    for column in ("path", "concurrency", "requests", "images/s", "p50 ms", "p99 ms", "% of ceiling"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for r in results:
        table.add_row(r.path, str(r.concurrency), str(r.requests), f"{r.images_per_s:.1f}", f"{r.p50_ms:.1f}",
                      f"{r.p99_ms:.1f}", f"{100 * r.images_per_s / ceiling:.0f}%")
    console.print(table)
    by_key = {(r.path.split()[0], r.concurrency): r for r in results}
    # The target lines need their runs; a --concurrency list without 1 or 16 leaves them out.
    if ("gateway", 16) in by_key:
        share = 100 * by_key[("gateway", 16)].images_per_s / ceiling
        console.print(f"gateway throughput at concurrency 16: {share:.0f}% of the model-only ceiling (target >= 75%)")
    if ("gateway", 1) in by_key and ("Triton", 1) in by_key:
        gap = by_key[("gateway", 1)].p50_ms - by_key[("Triton", 1)].p50_ms
        console.print(f"gateway p50 at concurrency 1 minus Triton direct p50: {gap:.1f} ms (target <= 5 ms)")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/gateway.json"))
    parser.add_argument("--jpeg-draft", action="store_true", help="let the gateway decode JPEGs at reduced scale")
    parser.add_argument("--intra-op-spinning", action="store_true",
                        help="publish the model with ONNX Runtime's idle threads busy-waiting (its own default)")
    parser.add_argument("--instances", type=int, default=1, help="model instances in Triton")
    parser.add_argument("--intra-op-threads", type=int, default=0,
                        help="ONNX Runtime threads per instance (0: every core)")
    args = parser.parse_args()
    if args.jpeg_draft:
        os.environ["GATEWAY_JPEG_DRAFT"] = "true"  # the gateway process inherits the environment
    console = Console(width=120)
    jpegs = sample_jpegs()
    tensors = [preprocess_bytes(j, IMAGENET) for j in jpegs]
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        folder = Path(tmp)
        onnx_path = build_model(folder)
        publish(onnx_path, folder / "repo", MODEL, spec=IMAGENET, labels=[f"class {i}" for i in range(1000)],
                settings=PublishSettings(intra_op_spinning=args.intra_op_spinning, instance_count=args.instances,
                                         intra_op_threads=args.intra_op_threads))
        settings = TritonSettings(model_repository=str(folder / "repo"), http_port=free_port(),
                                  grpc_port=free_port(), metrics_port=free_port(), cache_dir=str(folder / "cache"))
        with local_stack(settings, gateway_port=free_port()) as (triton, gateway):
            # One event loop for every measurement: grpc.aio is bound to the loop it first ran on.
            served = asyncio.run(measure_served(triton.grpc_url, gateway.url, tensors, jpegs, args, console))
        console.print("measuring the model-only ceiling ...")
        results = [model_ceiling(onnx_path, tensors, args.duration), *served]
    report(results, console)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps([asdict(r) for r in results], indent=2))
    console.print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
