"""`make bench`: what the gateway costs on top of the model, side by side in one run.

On the same photos and the same ResNet-18 (224x224, FP32, 1000 classes, untrained: speed does not
depend on the weights) it measures:
  1. the model-only ceiling: ONNX Runtime in this process, batch 8;
  2. Triton direct over gRPC with preprocessed tensors, one image per request;
  3. the gateway end to end, JPEG in and top-5 out, one image per request;
2 and 3 at concurrency 1, 4 and 16, each for a fixed duration. Every measurement is repeated in
several rounds, interleaved (ceiling, then Triton direct and the gateway at each concurrency, the order of
the two alternating between rounds), so that a burst of load from elsewhere on a shared machine hits both
sides of a comparison. The table gives the median throughput over the rounds with its range, and p50 and
p99 over every request of every round, and the CPU that Triton, the gateway and this load generator
spent per image. Prints the table and writes JSON. With --pixel-input the model is published to take
8-bit pixels, and the ceiling runs that same published file. The gateway hands its tensors to Triton
through shared memory, as it does whenever Triton shares its host (--no-shared-memory: as bytes); the
last line says which way they went.

What one gateway core does: the gateway's CPU per image is split into decoding and resizing plus
normalizing (measured on the bench's photos in this process, one thread) and the rest (HTTP, routing,
the Triton call, metrics and the log line), and turned into images per second per gateway core. With
--workers 1 2 one gateway per worker count serves the same Triton, measured in turn at each concurrency;
--model near-free serves a mean over the pixels and one linear layer, so that the gateway's share stands
out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

from builder.models import create_model
from builder.publish import PublishSettings, publish
from server.preprocess import PreprocessSpec, decode_image, model_input, preprocess_bytes
from stack.launcher import GatewayProcess, TritonServer, free_port
from stack.settings import TritonSettings
from stack.supervisor import local_stack

IMAGENET = PreprocessSpec(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png")
MODEL = "resnet18"


@dataclass
class Run:
    """One measurement: how many requests (or batches) were answered in how long, and each latency."""

    images: int
    seconds: float
    latencies_s: list[float]
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds each served process spent meanwhile


@dataclass
class Result:
    path: str
    concurrency: int
    requests: int
    images_per_s: float  # the median over the rounds
    p50_ms: float  # over every request of every round
    p99_ms: float
    images_per_s_min: float
    images_per_s_max: float
    rounds: int
    cpu_ms_per_image: dict[str, float] = field(default_factory=dict)


def summarize(path: str, concurrency: int, runs: list[Run]) -> Result:
    rates = [run.images / run.seconds for run in runs]
    latencies = [latency for run in runs for latency in run.latencies_s]
    images = sum(run.images for run in runs)
    cpu = {name: 1e3 * sum(run.cpu_s.get(name, 0.0) for run in runs) / images for name in runs[0].cpu_s}
    return Result(
        path,
        concurrency,
        sum(len(run.latencies_s) for run in runs),
        float(np.median(rates)),
        percentile(latencies, 50) * 1e3,
        percentile(latencies, 99) * 1e3,
        min(rates),
        max(rates),
        len(runs),
        cpu,
    )


def process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants (Triton's backend stubs), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in os.listdir(f"/proc/{current}/task"):
                pending += [int(c) for c in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue  # a process that exited meanwhile, or no /proc: it counts nothing
    return total


CLIENT = "bench client"


async def with_cpu(processes: dict[str, int], measurement) -> Run:
    """The measurement, with the CPU each served process and this load generator spent meanwhile."""
    before = {name: process_tree_cpu_s(pid) for name, pid in processes.items()}
    client_before = time.process_time()
    run = await measurement
    run.cpu_s = {name: process_tree_cpu_s(pid) - before[name] for name, pid in processes.items()}
    # The load generator shares the cores with what it measures: what it spends, they lack.
    run.cpu_s[CLIENT] = time.process_time() - client_before
    return run


def sample_jpegs(longer_side: int | None = None) -> list[bytes]:
    """The photos as JPEG files (quality 90); with `longer_side`, scaled to it first (bicubic)."""
    import io

    import skimage
    from PIL import Image

    folder = Path(skimage.__file__).parent / "data"
    encoded = []
    for name in PHOTOS:
        buffer = io.BytesIO()
        photo = Image.open(folder / name).convert("RGB")
        if longer_side is not None:
            scale = longer_side / max(photo.size)
            photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.BICUBIC)
        photo.save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


class NearFree(torch.nn.Module):
    """A mean over the pixels and one linear layer: 1000 classes for almost no work."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3)))


def build_model(folder: Path, kind: str = "resnet18") -> Path:
    if kind == "near-free":
        model: torch.nn.Module = NearFree().eval()
    else:
        model = create_model("resnet18", num_classes=1000, in_channels=3, image_size=224).eval()
    path = folder / f"{kind}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 224, 224),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def model_ceiling(session: ort.InferenceSession, tensors: list[np.ndarray], duration_s: float) -> Run:
    batch = np.stack([tensors[i % len(tensors)] for i in range(8)])
    session.run(None, {"input": batch})
    latencies, deadline = [], time.perf_counter() + duration_s
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        session.run(None, {"input": batch})
        latencies.append(time.perf_counter() - started)
    return Run(8 * len(latencies), sum(latencies), latencies)


async def closed_loop(call, concurrency: int, duration_s: float) -> Run:
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
    return Run(len(latencies), time.perf_counter() - started, latencies)


async def triton_direct(
    grpc_url: str, tensors: list[np.ndarray], concurrency: int, duration_s: float, triton_key: str | None = None
) -> Run:
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    from server.triton import REPOSITORY_KEY_HEADER

    client = grpcclient.InferenceServerClient(grpc_url)
    output = [grpcclient.InferRequestedOutput("logits")]
    # The stack's Triton answers inference only with its key, the gateway's calls included.
    headers = {f"triton-grpc-protocol-{REPOSITORY_KEY_HEADER}": triton_key} if triton_key else None

    async def call(i: int) -> None:
        chosen = tensors[i % len(tensors)][None]
        tensor = grpcclient.InferInput("input", list(chosen.shape), np_to_triton_dtype(chosen.dtype))
        tensor.set_data_from_numpy(chosen)
        await client.infer(MODEL, [tensor], outputs=output, headers=headers)

    try:
        await call(0)
        return await closed_loop(call, concurrency, duration_s)
    finally:
        await client.close()


async def gateway_end_to_end(url: str, jpegs: list[bytes], concurrency: int, duration_s: float) -> Run:
    # aiohttp (tritonclient's HTTP transport) rather than httpx: a GET /healthz round trip costs it 0.2 ms
    # here against httpx's 0.6 ms, and the client's own overhead is not the gateway's.
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def call(i: int) -> None:
            async with session.post(
                f"/v1/models/{MODEL}/classify?top_k=5",
                data=jpegs[i % len(jpegs)],
                headers={"Content-Type": "image/jpeg"},
            ) as response:
                await response.read()
                response.raise_for_status()

        await call(0)
        return await closed_loop(call, concurrency, duration_s)


CEILING, TRITON, GATEWAY = "model only (ORT, batch 8)", "Triton gRPC (tensors)", "gateway (JPEG in, top-5 out)"


def draft_path(draft: str) -> str:
    """The table's name for the gateway with GATEWAY_JPEG_DRAFT=`draft` (--jpeg-draft compare)."""
    return f"gateway, JPEG draft {draft}"


def gateway_path(workers: int | None) -> str:
    """The table's name for the gateway with this many workers; None: the gateway as started by default."""
    if workers is None:
        return GATEWAY
    return f"gateway, {workers} worker{'s' if workers > 1 else ''}"


async def measure(
    session: ort.InferenceSession,
    triton: TritonServer,
    gateways: dict[str, GatewayProcess],
    tensors: list[np.ndarray],
    jpegs: list[bytes],
    args: argparse.Namespace,
    console: Console,
) -> list[Result]:
    def cpu_of(gateway: GatewayProcess) -> dict[str, int]:
        assert triton.pid is not None and gateway.pid is not None  # both started
        return {"Triton": triton.pid, "gateway": gateway.pid}

    first = next(iter(gateways.values()))
    runs: dict[tuple[str, int], list[Run]] = {}
    for round_ in range(args.rounds):
        console.print(
            f"round {round_ + 1} of {args.rounds}: the ceiling, then concurrency "
            f"{', '.join(map(str, args.concurrency))} ..."
        )
        # Triton idles meanwhile: the in-process session has the cores to itself.
        runs.setdefault((CEILING, 1), []).append(model_ceiling(session, tensors, args.duration))
        for concurrency in args.concurrency:
            sides = [
                (
                    TRITON,
                    cpu_of(first),
                    lambda concurrency=concurrency: triton_direct(
                        triton.grpc_url, tensors, concurrency, args.duration, triton.repository_api_key
                    ),
                ),
            ] + [
                (
                    path,
                    cpu_of(gateway),
                    lambda concurrency=concurrency, gateway=gateway: gateway_end_to_end(
                        gateway.url, jpegs, concurrency, args.duration
                    ),
                )
                for path, gateway in gateways.items()
            ]
            for path, processes, run in sides if round_ % 2 == 0 else reversed(sides):
                runs.setdefault((path, concurrency), []).append(await with_cpu(processes, run()))
    order = [(CEILING, 1)] + [(path, c) for c in args.concurrency for path in (TRITON, *gateways)]
    return [summarize(path, concurrency, runs[(path, concurrency)]) for path, concurrency in order]


def stage_cpu_ms(
    jpegs: list[bytes], spec: PreprocessSpec, pixel_input: bool, repeats: int = 20, *, reduced_scale: bool = False
) -> dict[str, float]:
    """CPU milliseconds per image that the gateway's preprocessing takes on these photos, by stage: decoding
    (at reduced scale with `reduced_scale`), then resizing and normalizing into the batch; one thread, the
    median over `repeats` passes."""
    passes: dict[str, list[float]] = {"decode": [], "resize and normalize": []}
    for _ in range(repeats):
        decode_s = rest_s = 0.0
        for data in jpegs:
            started = time.thread_time()
            image = decode_image(data, draft_size=spec.resize_size if reduced_scale else None)
            decoded = time.thread_time()
            model_input(image, spec, pixel_input=pixel_input)
            rest_s += time.thread_time() - decoded
            decode_s += decoded - started
        passes["decode"].append(1e3 * decode_s / len(jpegs))
        passes["resize and normalize"].append(1e3 * rest_s / len(jpegs))
    return {stage: float(np.median(values)) for stage, values in passes.items()}


def per_core_lines(results: list[Result], stages: dict[str, float]) -> list[str]:
    """For each gateway measurement: its CPU per image by stage, and the images per second that makes
    per gateway core (1000 ms over its CPU ms per image)."""
    lines = []
    for r in results:
        total = r.cpu_ms_per_image.get("gateway")
        if r.path in (CEILING, TRITON) or not total:
            continue
        rest = total - sum(stages.values())
        split = ", ".join(f"{stage} {ms:.2f}" for stage, ms in stages.items())
        lines.append(
            f"{r.path} at concurrency {r.concurrency}: gateway CPU {total:.2f} ms/image ({split}, "
            f"HTTP, routing, the Triton call, metrics and log {rest:.2f}): {1e3 / total:.0f} images/s per gateway core"
        )
    return lines


def report(results: list[Result], console: Console) -> None:
    ceiling = results[0].images_per_s
    table = Table(title="Gateway benchmark: ResNet-18 224x224 FP32 on this machine's CPU")
    for column in (
        "path",
        "concurrency",
        "requests",
        "images/s",
        "range",
        "p50 ms",
        "p99 ms",
        "% of ceiling",
        "Triton CPU ms/image",
        "gateway CPU ms/image",
        "client CPU ms/image",
    ):
        table.add_column(column, justify="right" if column != "path" else "left")
    for r in results:
        cpu = [
            f"{r.cpu_ms_per_image[name]:.1f}" if name in r.cpu_ms_per_image else "-"
            for name in ("Triton", "gateway", CLIENT)
        ]
        table.add_row(
            r.path,
            str(r.concurrency),
            str(r.requests),
            f"{r.images_per_s:.1f}",
            f"{r.images_per_s_min:.0f}-{r.images_per_s_max:.0f}",
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            f"{100 * r.images_per_s / ceiling:.0f}%",
            *cpu,
        )
    console.print(table)
    by_key = {(r.path, r.concurrency): r for r in results}
    # The target lines need their runs; a --concurrency list without 1 or 16 leaves them out.
    if (GATEWAY, 16) in by_key:
        share = 100 * by_key[(GATEWAY, 16)].images_per_s / ceiling
        console.print(
            f"gateway throughput at concurrency 16: {share:.1f}% of the model-only ceiling "
            f"(target >= 75%: {'met' if share >= 75 else 'missed'})"
        )
    if (GATEWAY, 1) in by_key and (TRITON, 1) in by_key:
        gap = by_key[(GATEWAY, 1)].p50_ms - by_key[(TRITON, 1)].p50_ms
        console.print(
            f"gateway p50 at concurrency 1 minus Triton direct p50: {gap:.1f} ms "
            f"(target <= 5 ms: {'met' if gap <= 5 else 'missed'})"
        )


def input_transports(gateway_url: str) -> dict[str, float]:
    """How the gateway sent its inputs to Triton (shared_memory or bytes), counted from its /metrics."""
    counts = {}
    for line in httpx.get(f"{gateway_url}/metrics", timeout=10).text.splitlines():
        if line.startswith('gateway_triton_inputs_total{transport="'):
            sample, _, value = line.rpartition(" ")
            counts[sample.split('"')[1]] = float(value)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="times each measurement is repeated, interleaved")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/gateway.json"))
    parser.add_argument(
        "--jpeg-draft",
        nargs="?",
        const="on",
        choices=("auto", "off", "on", "compare"),
        help="GATEWAY_JPEG_DRAFT for the gateway (alone: on, decode JPEGs at reduced scale); compare: one gateway "
        "with it off and one with it on, on the same Triton, measured in turn",
    )
    parser.add_argument(
        "--photo-side",
        type=int,
        help="scale the photos up to this longer side before encoding them (default: their own 300 to 740 pixels)",
    )
    parser.add_argument(
        "--intra-op-spinning",
        action="store_true",
        help="publish the model with ONNX Runtime's idle threads busy-waiting (its own default)",
    )
    parser.add_argument("--instances", type=int, help="model instances in Triton (default: publish's, 2 on the CPU)")
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="ONNX Runtime threads per instance (0: the cores divided among the instances)",
    )
    parser.add_argument(
        "--pixel-input",
        action="store_true",
        help="publish the model with an 8-bit pixel input that it normalizes itself",
    )
    parser.add_argument(
        "--model",
        choices=("resnet18", "near-free"),
        default="resnet18",
        help="ResNet-18, or a mean over the pixels and one linear layer (the gateway's share stands out)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        help="one gateway per worker count, on the same Triton (default: one gateway, GATEWAY_WORKERS or one per core)",
    )
    parser.add_argument(
        "--no-shared-memory",
        action="store_true",
        help="have the gateway send input tensors to Triton as bytes, not through /dev/shm",
    )
    args = parser.parse_args()
    if (
        args.duration <= 0
        or args.rounds < 1
        or min(args.concurrency) < 1
        or (args.instances is not None and args.instances < 1)
        or args.intra_op_threads < 0
        or (args.workers is not None and min(args.workers) < 1)
        or (args.photo_side is not None and args.photo_side < 1)
    ):
        parser.error(
            "--duration, --rounds, --concurrency, --instances, --workers and --photo-side must be positive, "
            "--intra-op-threads 0 or more"
        )
    if args.workers and args.jpeg_draft == "compare":
        parser.error("--jpeg-draft compare and --workers each start gateways of their own: give one of them")
    if args.jpeg_draft and args.jpeg_draft != "compare":
        os.environ["GATEWAY_JPEG_DRAFT"] = args.jpeg_draft  # the gateway process inherits the environment
    if args.no_shared_memory:
        os.environ["GATEWAY_SHARED_MEMORY_SLOTS"] = "0"
    console = Console(width=150)
    jpegs = sample_jpegs(args.photo_side)
    tensors = [preprocess_bytes(j, IMAGENET, pixel_input=args.pixel_input) for j in jpegs]
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        folder = Path(tmp)
        published = publish(
            build_model(folder, args.model),
            folder / "repo",
            MODEL,
            spec=IMAGENET,
            labels=[f"class {i}" for i in range(1000)],
            settings=PublishSettings(
                intra_op_spinning=args.intra_op_spinning,
                instance_count=args.instances,
                intra_op_threads=args.intra_op_threads,
                pixel_input=args.pixel_input,
            ),
        )
        # The ceiling runs the very file Triton serves (with --pixel-input, its normalization included).
        onnx_path = published.version_dir / "model.onnx"
        settings = TritonSettings(
            model_repository=str(folder / "repo"),
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            cache_dir=str(folder / "cache"),
        )
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        with local_stack(settings, gateway_port=free_port()) as (triton, gateway), contextlib.ExitStack() as more:
            # The stack's own gateway idles while gateways of their own are measured.
            extras = {gateway_path(workers): {"GATEWAY_WORKERS": str(workers)} for workers in args.workers or ()}
            if args.jpeg_draft == "compare":
                extras = {draft_path(draft): {"GATEWAY_JPEG_DRAFT": draft} for draft in ("off", "on")}
            gateways = {GATEWAY: gateway} if not extras else {}
            for number, (path, env) in enumerate(extras.items()):
                extra = GatewayProcess(
                    port=free_port(), env={**gateway.env, **env}, log_path=folder / f"gateway-{number}.log"
                )
                gateways[path] = more.enter_context(extra)
            # One event loop for every measurement: grpc.aio is bound to the loop it first ran on.
            results = asyncio.run(measure(session, triton, gateways, tensors, jpegs, args, console))
            transports: dict[str, float] = {}
            for served in gateways.values():
                for name, count in input_transports(served.url).items():
                    transports[name] = transports.get(name, 0.0) + count
    report(results, console)
    stages = stage_cpu_ms(jpegs, IMAGENET, args.pixel_input, reduced_scale=args.jpeg_draft == "on")
    reduced_stages = stage_cpu_ms(jpegs, IMAGENET, args.pixel_input, reduced_scale=True)
    drafted = [r for r in results if r.path == draft_path("on")]
    lines = per_core_lines([r for r in results if r not in drafted], stages) + per_core_lines(drafted, reduced_stages)
    for line in lines:
        console.print(line)
    console.print(
        "the gateway's input tensors reached Triton: "
        + ", ".join(f"{count:.0f} times as {name.replace('_', ' ')}" for name, count in transports.items())
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "results": [asdict(r) for r in results],
                "gateway_cpu_ms_per_image_by_stage": stages,
                "gateway_cpu_ms_per_image_by_stage_reduced_scale": reduced_stages,
            },
            indent=2,
        )
    )
    console.print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
