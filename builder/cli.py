"""`builder` command line: parses flags, calls the stage functions, prints results.

User mistakes (a BuilderError) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from .errors import BuilderError
from .models import ARCHITECTURES

log = logging.getLogger("builder")


def _train(args: argparse.Namespace) -> None:
    from .train import TrainConfig, train

    config = TrainConfig(
        dataset=args.dataset, arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        image_size=args.image_size, seed=args.seed, out_dir=Path(args.out),
    )
    result = train(config)
    print(json.dumps({"run_dir": str(result.run_dir), "best_checkpoint": str(result.best_checkpoint),
                      "val_accuracy": round(result.val_accuracy, 4), "seconds": round(result.seconds, 1)}))


def _export(args: argparse.Namespace) -> None:
    from .export import export_onnx

    output = Path(args.output) if args.output else Path(args.checkpoint).with_name("model.onnx")
    result = export_onnx(Path(args.checkpoint), output, parity_images=args.parity_images)
    print(json.dumps({"onnx": str(result.onnx_path), "max_abs_diff": result.max_abs_diff,
                      "parity_images": result.parity_images}))


def _publish(args: argparse.Namespace) -> None:
    from .publish import PublishSettings, publish

    settings = PublishSettings(max_batch_size=args.max_batch_size, instance_count=args.instances)
    published = publish(Path(args.onnx), Path(args.repository), args.name, settings=settings)
    print(json.dumps({"model": args.name, "version": published.version,
                      "path": str(published.version_dir)}))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="builder", description="Train, export and publish image classifiers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a classifier")
    train.add_argument("--dataset", default="digits", help="'digits' or a folder of class subfolders")
    train.add_argument("--arch", default="resnet18", choices=ARCHITECTURES)
    train.add_argument("--epochs", type=_positive_int, default=6)
    train.add_argument("--batch-size", type=_positive_int, default=64)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--image-size", type=_positive_int, default=None,
                       help="model input side in pixels (default: 32 for digits, 224 for folders)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", default="runs/latest", help="run folder for checkpoints and metrics")
    train.set_defaults(func=_train)

    export = commands.add_parser("export", help="export a checkpoint to ONNX, parity-checked")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--output", help="ONNX path (default: model.onnx beside the checkpoint)")
    export.add_argument("--parity-images", type=_positive_int, default=32)
    export.set_defaults(func=_export)

    publish = commands.add_parser("publish", help="publish an ONNX model as the next version in a Triton repository")
    publish.add_argument("--onnx", required=True)
    publish.add_argument("--name", required=True)
    publish.add_argument("--repository", default="model_repository")
    publish.add_argument("--max-batch-size", type=_positive_int, default=32)
    publish.add_argument("--instances", type=_positive_int, default=1)
    publish.set_defaults(func=_publish)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # argparse itself exits with 2 and one usage line
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args.func(args)
    except BuilderError as e:
        print(f"builder {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"builder {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
