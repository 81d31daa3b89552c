"""What large, cheap-to-send images cost the gateway: time and memory, and a small request's latency
beside them.

Starts the real stack on loopback (a tiny digits model: the cost measured is the gateway's decoding, not
the model), then sends a 6324 x 6324 RGBA PNG of a few hundred KB, and two requests of N such PNGs at once
while a small JPEG is classified in a loop. Prints status codes, seconds, and the gateway's RSS (now and
peak, from /proc) before and after. Bounded: a few dozen requests, all to 127.0.0.1.

    .venv/bin/python -m benchmarks.large_images [--side 6324] [--counts 2 32]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import skimage
from PIL import Image, ImageDraw

from builder.export import export_onnx
from builder.publish import publish
from builder.train import train
from builder.train_config import TrainConfig
from stack.launcher import GatewayProcess, triton_and_gateway


def transparent_png(side: int) -> bytes:
    """Nested translucent rings on transparency, drawn small and scaled up: compresses to a few hundred KB."""
    small_side = max(side // 12, 16)
    small = Image.new("RGBA", (small_side, small_side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(small)
    for ring in range(12):
        radius = small_side // 2 - ring * small_side // 26
        draw.ellipse(
            (small_side // 2 - radius,) * 2 + (small_side // 2 + radius,) * 2,
            fill=(ring * 20 % 256, 255 - ring * 20 % 256, 128, 40 + ring * 15),
        )
    buffer = io.BytesIO()
    small.resize((side, side), Image.Resampling.NEAREST).save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def memory_mib(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) // 1024 for line in f if line.startswith(("VmRSS", "VmHWM"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=6324, help="side of the square RGBA PNG")
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 32], help="PNGs per request, two requests at once")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-large-"))
    run = train(TrainConfig(dataset="digits", epochs=1, image_size=8, out_dir=work / "run"))
    export_onnx(run.best_checkpoint, work / "model.onnx", parity_images=4)
    publish(work / "model.onnx", work / "repo", "digits")
    with triton_and_gateway(work / "repo", work, {"GATEWAY_PREPROCESS_THREADS": "2"}) as (_, gateway):
        return measure(args, gateway)


def measure(args: argparse.Namespace, gateway: GatewayProcess) -> int:
    url = f"{gateway.url}/v1/models/digits/classify"
    png = transparent_png(args.side)
    buffer = io.BytesIO()
    Image.open(Path(skimage.__file__).parent / "data" / "astronaut.png").convert("RGB").save(buffer, "JPEG")
    photo = buffer.getvalue()

    def post(**kwargs) -> tuple[int, float]:
        started = time.perf_counter()
        response = httpx.post(url, timeout=600, **kwargs)
        return response.status_code, time.perf_counter() - started

    def small() -> float:
        return post(content=photo, headers={"Content-Type": "image/jpeg"})[1]

    for _ in range(3):
        small()
    idle = [small() for _ in range(10)]
    print(
        f"PNG {args.side}x{args.side} RGBA, {len(png)} bytes; a small JPEG alone: p50 "
        f"{statistics.median(idle) * 1000:.1f} ms"
    )
    before = memory_mib(gateway.pid)
    status, seconds = post(content=png, headers={"Content-Type": "image/png"})
    print(
        f"one PNG: {status} in {seconds:.2f} s; gateway RSS {before['VmRSS']} -> peak "
        f"{memory_mib(gateway.pid)['VmHWM']} MiB"
    )
    time.sleep(2)
    print(f"  RSS 2 s later: {memory_mib(gateway.pid)['VmRSS']} MiB")
    for count in args.counts:
        files = [("image", (f"{i}.png", png, "image/png")) for i in range(count)]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            large = [pool.submit(post, files=files) for _ in range(2)]
            time.sleep(0.3)
            beside: list[float] = []
            while not all(f.done() for f in large) and len(beside) < 200:
                beside.append(small())
            answers = [f.result() for f in large]
        print(
            f"two requests of {count} PNGs at once: {[(code, round(s, 2)) for code, s in answers]}; small "
            f"requests meanwhile: {len(beside)}, median {statistics.median(beside or [0]):.3f} s, max "
            f"{max(beside or [0]):.3f} s; gateway peak RSS {memory_mib(gateway.pid)['VmHWM']} MiB"
        )
        time.sleep(2)
        print(f"  RSS 2 s later: {memory_mib(gateway.pid)['VmRSS']} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
