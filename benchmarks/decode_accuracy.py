"""What reduced-scale JPEG decoding costs a model in top-1: a labelled folder of large JPEGs, made reproducibly,
scored by `builder evaluate --gateway-decode` with the gateway's exact and reduced-scale decoding.

There is no labelled set of large photos at hand, so one is made: a ResNet-18 trained on a small
dataset (--dataset, default `digits`) at --size pixels, and that dataset's validation split written as
JPEG files (quality 90) scaled up (bicubic) to a longer side of 400 to 1400 pixels, at aspect ratios
from 3:4 to 4:3. The folder keeps the model's class order (`0-<class>`, `1-<class>`, ...), with one
image per class under train/ (a folder dataset needs one) and every validation image under val/.
A checkpoint already trained in --out is reused. Ends by running, and printing, the evaluate command.

    .venv/bin/python -m benchmarks.decode_accuracy [--out DIR] [--dataset digits] [--size 16] [--epochs 4]
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

import numpy as np
from PIL import Image

from builder.cli import main as builder_main
from builder.data import load_dataset
from builder.export import export_onnx
from builder.train import train
from builder.train_config import TrainConfig

SEED = 0


def write_jpeg_folder(source: str, folder: Path, min_side: int, max_side: int) -> int:
    """The dataset's validation split (and one training image per class) as scaled-up JPEG files; returns
    the number of validation images written."""
    dataset = load_dataset(source)
    rng = np.random.default_rng(SEED)
    written = 0
    for split_name, split in (("train", dataset.train), ("val", dataset.val)):
        done: set[int] = set()
        for index, label in enumerate(split.labels):
            if split_name == "train" and label in done:
                continue
            done.add(label)
            longer = int(rng.integers(min_side, max_side + 1))
            aspect = float(rng.uniform(0.75, 4 / 3))
            size = (longer, round(longer / aspect)) if aspect >= 1 else (round(longer * aspect), longer)
            target = folder / split_name / f"{label}-{dataset.classes[label]}" / f"{index:04d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            split.image(index, "RGB").resize(size, Image.Resampling.BICUBIC).save(target, "JPEG", quality=90)
            written += split_name == "val"
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/decode-accuracy"))
    parser.add_argument("--dataset", default="digits", help="a built-in dataset held in memory (digits, shapes...)")
    parser.add_argument("--size", type=int, default=16, help="the model's input side")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--min-side", type=int, default=400, help="shortest longer side of the JPEG files")
    parser.add_argument("--max-side", type=int, default=1400, help="longest longer side of the JPEG files")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 0 < args.min_side <= args.max_side or args.size < 8 or args.epochs < 1:
        parser.error("need 0 < --min-side <= --max-side, --size of at least 8 and --epochs of at least 1")
    source = args.dataset
    checkpoint = args.out / "train" / "best.pt"
    if not checkpoint.is_file():
        config = TrainConfig(dataset=source, image_size=args.size, epochs=args.epochs, out_dir=args.out / "train")
        checkpoint = train(config).best_checkpoint
    model = args.out / "model.onnx"
    export_onnx(checkpoint, model, parity_images=16)
    folder = args.out / "jpegs"
    if not (folder / "val").is_dir():
        print(f"wrote {write_jpeg_folder(source, folder, args.min_side, args.max_side)} validation JPEGs in {folder}")
    command = ["evaluate", "--onnx", str(model), "--dataset", str(folder), "--gateway-decode"]
    command += ["--out", str(args.out / "evaluate")]
    print("$ builder " + shlex.join(command), flush=True)
    return builder_main(command)


if __name__ == "__main__":
    raise SystemExit(main())
