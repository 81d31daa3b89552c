"""Does `--pretrained` help? The same small `shapes` run, from scratch and from pretrained weights.

There is no network here, so the "published" weights are a local stand-in: a ResNet-18 trained by the builder
on a larger generated set (other seed, other images, ImageNet's mean and std), saved under the file name
torchvision's ResNet18_Weights.IMAGENET1K_V1 has in the torch.hub cache of a temporary TORCH_HOME. The
fine-tuning run then takes the real code path: the weights enum, `get_state_dict`, head replacement, the
weights' preprocessing, the frozen first epoch and the lower backbone learning rate.

    python -m benchmarks.pretrained_vs_scratch --out benchmarks/results/pretrained
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/pretrained")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--pretrain", default="shapes:per_class=1000", help="the stand-in's dataset (seed 1)")
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--target", default="shapes:per_class=20", help="the fine-tuning dataset (seed 0)")
    parser.add_argument("--val-fraction", type=float, default=0.9, help="shapes: a large, balanced val split")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="every run's")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch_home = Path(tempfile.mkdtemp(prefix="torch-home-"))
    os.environ["TORCH_HOME"] = str(torch_home)  # read by torch.hub on every call

    import torch

    from builder.models import pretrained_weights, weights_cache_file
    from builder.train import train
    from builder.train_config import IMAGENET_MEAN, IMAGENET_STD, TrainConfig

    started = time.monotonic()
    stand_in = train(
        TrainConfig(
            dataset=args.pretrain,
            arch=args.arch,
            epochs=args.pretrain_epochs,
            batch_size=args.batch_size,
            image_size=args.image_size,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            seed=1,
            out_dir=out / "stand-in",
        )
    )
    cache_file = weights_cache_file(pretrained_weights(args.arch))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    state = torch.load(stand_in.best_checkpoint, map_location="cpu", weights_only=True)["model"]
    torch.save(state, cache_file)
    results: dict = {
        "stand_in": {"dataset": args.pretrain, "val_accuracy": stand_in.val_accuracy, "file": cache_file.name},
        "target": args.target,
        "runs": [],
    }
    for seed in args.seeds:
        for pretrained in (None, "DEFAULT"):
            name = f"{'pretrained' if pretrained else 'scratch'}-seed{seed}"
            result = train(
                TrainConfig(
                    dataset=args.target,
                    arch=args.arch,
                    epochs=args.epochs,
                    image_size=args.image_size,
                    val_fraction=args.val_fraction,
                    batch_size=args.batch_size,
                    seed=seed,
                    pretrained=pretrained,
                    out_dir=out / name,
                )
            )
            results["runs"].append(
                {
                    "name": name,
                    "seed": seed,
                    "pretrained": pretrained,
                    "best_val_accuracy": result.val_accuracy,
                    "val_accuracy": [round(h["val_accuracy"], 4) for h in result.history],
                    "val_loss": [round(h["val_loss"], 4) for h in result.history],
                    "train_accuracy": [round(h["train_accuracy"], 4) for h in result.history],
                }
            )
    results["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    results["seconds"] = round(time.monotonic() - started, 1)
    (out / "pretrained_curves.json").write_text(json.dumps(results, indent=2))
    _plot(results, out / "pretrained_curves.png")
    for run in results["runs"]:
        print(run["name"], "best", run["best_val_accuracy"], "curve", run["val_accuracy"])
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in results["runs"]:
        epochs = range(1, len(run["val_accuracy"]) + 1)
        ax.plot(epochs, run["val_accuracy"], "-" if run["pretrained"] else "--", label=run["name"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("val accuracy")
    ax.set_title(f"{results['target']}: pretrained stand-in vs scratch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
