"""`python -m stack.demo` (the last step of make demo): start the stack, classify sample images, stop.

The samples are real images: handwritten digits from scikit-learn, saved as 8x8 PNG as in the
dataset, and photos that scikit-image ships, saved as JPEG.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from client import classify

from .launcher import LaunchError, free_port
from .settings import TritonSettings
from .supervisor import local_stack

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png")


def write_samples(folder: Path, digits: int = 4) -> list[Path]:
    """A few digit images (one per class, from the end of the dataset) and a few photos."""
    import skimage
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    data = load_digits()
    paths = []
    for label in range(digits):
        index = int(np.flatnonzero(data.target == label)[-1])
        pixels = np.round(data.images[index] * 255.0 / 16.0).astype(np.uint8)
        path = folder / f"digit-{label}.png"
        Image.fromarray(pixels, mode="L").save(path)  # 8x8, as the model was trained
        paths.append(path)
    photo_dir = Path(skimage.__file__).parent / "data"
    for name in PHOTOS:
        path = folder / name.replace(".png", ".jpg")
        Image.open(photo_dir / name).convert("RGB").save(path, quality=90)
        paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = Console()
    samples = write_samples(Path(".cache/demo-images"))
    settings = TritonSettings(
        model_repository=args.repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()
    )
    try:
        with local_stack(settings, gateway_port=free_port()) as (triton, gateway):
            console.print(f"Triton on {triton.grpc_url} (gRPC), gateway on {gateway.url}")
            answer = classify(samples, model=args.model, url=gateway.url, top_k=args.top_k)
    except (LaunchError, RuntimeError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    table = Table(title=f"{answer['model']} v{answer['version']}: top-{args.top_k} through the gateway")
    table.add_column("image")
    table.add_column("predictions (label: probability)")
    for path, result in zip(samples, answer["results"]):
        table.add_row(path.name, "  ".join(f"{p['label']}: {p['score']:.3f}" for p in result["predictions"]))
    console.print(table)
    console.print("Both servers stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
