"""A checkpoint's metadata as builders have written it: shared by the unit tests of the checkpoint and ONNX
metadata and by the fine-tune loop's tests in tests/builds."""

from server.preprocess import PreprocessSpec

SPEC = PreprocessSpec(image_size=8, resize_size=9, mean=(0.5,), std=(0.25,), color_mode="L")
# A checkpoint's meta as builders have written it (train.py's keys, an epoch's additions).
OLD_META = {
    "arch": "resnet18",
    "num_classes": 3,
    "in_channels": 1,
    "image_size": 8,
    "classes": ["a", "b", "c"],
    "preprocess": SPEC.to_dict(),
    "config": {"dataset": "digits", "val_fraction": 0.25, "seed": 7, "lr": 0.003},
    "recipe": {"dropout": 0.0, "device": "cpu", "amp": False, "init": None},
    "epoch": 2,
    "val_accuracy": 0.75,
}
