"""One `evaluate()` for every stage: top-1, per-class precision and recall, a confusion matrix.

A PyTorch model and an ONNX file are scored the same way, on the validation split, through the
real eval transform (`builder.transforms.eval_transform`), so the numbers of different stages compare.
`measure_speed()` times an ONNX file with ONNX Runtime on this machine: latency at batch 1 and
throughput at batch 8. `compare_decodes()` scores an ONNX file on the validation split's JPEG files
decoded by the gateway's own functions twice, exactly and at reduced scale (GATEWAY_JPEG_DRAFT), and
says whether the model may be served the faster way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from server.errors import GatewayError
from server.preprocess import PreprocessSpec, open_image, prepare_batch

from .checkpoint import ModelMeta
from .data import ImageDataset, Split, load_run_dataset
from .errors import BuilderError, OnnxFileError, error_line
from .onnx_meta import OnnxMeta
from .transforms import eval_transform

LATENCY_BATCH = 1
THROUGHPUT_BATCH = 8
MAX_CONFUSION_INCHES = 20.0
MAX_LABELLED_CLASSES = 40
# Top-1 points reduced-scale decoding may cost and still be allowed; a build's own budget
# (`max_accuracy_drop`) by default.
DEFAULT_DECODE_BUDGET = 1.0
# The gateway refuses images over GATEWAY_MAX_IMAGE_PIXELS; a validation image is scored whatever its size.
VALIDATION_MAX_PIXELS = 1 << 40


@dataclass(frozen=True)
class ValidationData:
    """The validation split with the spec that turns its images into model inputs."""

    split: Split
    color_mode: str
    spec: PreprocessSpec
    classes: list[str]

    def __len__(self) -> int:
        return len(self.split)

    def batches(self, batch_size: int = 64) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        transform = eval_transform(self.spec)
        for start in range(0, len(self.split), batch_size):
            indices = range(start, min(start + batch_size, len(self.split)))
            images = np.stack([transform(self.split.image(i, self.color_mode)).numpy() for i in indices])
            yield images, np.asarray([self.split.labels[i] for i in indices])


def validation_data(meta: ModelMeta | OnnxMeta, dataset: ImageDataset | None = None) -> ValidationData:
    """The validation split of the run a checkpoint's (or an exported ONNX file's) `meta` describes."""
    dataset = dataset or load_run_dataset(meta.dataset_recipe)
    spec = meta.preprocess
    if spec is None:
        raise BuilderError("the model carries no preprocessing spec; export it with `builder export`")
    classes = list(meta.classes or dataset.classes)
    if len(classes) != len(dataset.classes):
        raise BuilderError(
            f"the model has {len(classes)} classes but dataset {dataset.name!r} has "
            f"{len(dataset.classes)}; give the dataset it was trained on"
        )
    return ValidationData(dataset.val, dataset.color_mode, spec, classes)


@dataclass(frozen=True)
class ClassScore:
    label: str
    precision: float
    recall: float
    support: int


@dataclass(frozen=True)
class Evaluation:
    top1: float
    images: int
    per_class: tuple[ClassScore, ...]
    confusion: np.ndarray = field(repr=False)  # rows: true class, columns: predicted class
    predictions: np.ndarray = field(repr=False)

    @property
    def macro_recall(self) -> float:
        """Mean recall over the classes present: every class counts the same, however rare."""
        recalls = [c.recall for c in self.per_class if c.support > 0]
        return float(np.mean(recalls)) if recalls else 0.0

    def to_dict(self) -> dict:
        return {
            "top1": self.top1,
            "macro_recall": self.macro_recall,
            "images": self.images,
            "per_class": [vars(c) for c in self.per_class],
            "confusion": self.confusion.tolist(),
        }


def _torch_predictor(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    model.eval()

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(images)).numpy()

    return predict


def onnx_session(path: Path, *, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ONNX Runtime's own error types for missing or foreign files
        raise OnnxFileError(f"{path} is not an ONNX model ONNX Runtime can load: {error_line(e)}") from e


def _onnx_predictor(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    session = onnx_session(path)
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    return lambda images: session.run([output_name], {input_name: images})[0]


def evaluate(
    model: nn.Module | Path | str, data: ValidationData, *, confusion_png: Path | None = None, batch_size: int = 64
) -> Evaluation:
    """Score a PyTorch model or an ONNX file on the validation split; optionally draw the confusion matrix."""
    predict = _torch_predictor(model) if isinstance(model, nn.Module) else _onnx_predictor(Path(model))
    return evaluate_predictor(predict, data, confusion_png=confusion_png, batch_size=batch_size)


def evaluate_predictor(
    predict: Callable[[np.ndarray], np.ndarray],
    data: ValidationData,
    *,
    confusion_png: Path | None = None,
    batch_size: int = 64,
    batches: Iterator[tuple[np.ndarray, np.ndarray]] | None = None,
) -> Evaluation:
    """Score any function from a batch of images to logits (a TensorRT engine's, say) like `evaluate`;
    `batches`: the model inputs and labels to score instead of the split through the eval transform."""
    predictions, labels = [], []
    for images, batch_labels in batches if batches is not None else data.batches(batch_size):
        scores = predict(images)
        if scores.ndim != 2 or scores.shape[1] != len(data.classes):
            raise BuilderError(
                f"the model gives {' x '.join(map(str, scores.shape[1:]))} scores per image but the dataset has "
                f"{len(data.classes)} classes; give the labelled images of the classes it was trained on"
            )
        predictions.append(scores.argmax(axis=1))
        labels.append(batch_labels)
    predicted, truth = np.concatenate(predictions), np.concatenate(labels)
    confusion = confusion_matrix(truth, predicted, len(data.classes))
    evaluation = Evaluation(
        top1=float((predicted == truth).mean()) if len(truth) else 0.0,
        images=len(truth),
        per_class=per_class_scores(confusion, data.classes),
        confusion=confusion,
        predictions=predicted,
    )
    if confusion_png is not None:
        plot_confusion(confusion, data.classes, confusion_png, title=f"top-1 {evaluation.top1:.2%}")
    return evaluation


@dataclass(frozen=True)
class DecodeComparison:
    """Top-1 on the validation split's image files decoded as the gateway decodes them: exactly, and with
    JPEGs at reduced scale (libjpeg's 1/2, 1/4, 1/8 DCT scaling, `server.preprocess.load_image`)."""

    exact_top1: float
    reduced_top1: float
    images: int
    jpeg_images: int  # the others decode the same both ways
    max_accuracy_drop: float  # top-1 points

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.exact_top1 - self.reduced_top1)

    @property
    def reduced_scale(self) -> bool:
        """Whether the model may be served with reduced-scale decoding: it costs at most the budget."""
        # Rounded: 100 * (0.9 - 0.89) is 1.0000000000000009, and one point lost is within a budget of one.
        return round(self.drop_points, 9) <= self.max_accuracy_drop

    def to_dict(self) -> dict:
        return {
            "reduced_scale": self.reduced_scale,
            "exact_top1": self.exact_top1,
            "reduced_top1": self.reduced_top1,
            "images": self.images,
            "jpeg_images": self.jpeg_images,
            "max_accuracy_drop": self.max_accuracy_drop,
        }

    @classmethod
    def from_dict(cls, data: dict) -> DecodeComparison:
        return cls(
            exact_top1=float(data["exact_top1"]),
            reduced_top1=float(data["reduced_top1"]),
            images=int(data["images"]),
            jpeg_images=int(data["jpeg_images"]),
            max_accuracy_drop=float(data["max_accuracy_drop"]),
        )

    def summary(self) -> str:
        verdict = "allowed" if self.reduced_scale else "not allowed"
        return (
            f"gateway decode: top-1 {100 * self.exact_top1:.2f}% exact, {100 * self.reduced_top1:.2f}% at reduced "
            f"scale ({self.drop_points:.2f} points lost, budget {self.max_accuracy_drop:g}) on {self.images} images "
            f"({self.jpeg_images} JPEG): reduced-scale decoding {verdict}"
        )


def reduced_scale_not_applicable(data: ValidationData) -> str | None:
    """Why reduced-scale decoding cannot be measured on this validation split, or None when it can: it
    applies to JPEG files, and the split's images are in memory (digits, shapes, CIFAR) or none is a JPEG."""
    images = data.split.images
    if not len(images) or not isinstance(images[0], Path):
        return "reduced-scale decoding does not apply: the validation images are in-memory arrays, not JPEG files"
    if not any(_is_jpeg(Path(path)) for path in images):
        return f"reduced-scale decoding does not apply: none of the {len(images)} validation images is a JPEG file"
    return None


def _is_jpeg(path: Path) -> bool:
    try:
        with open_image(path.read_bytes()) as image:
            return image.format == "JPEG"
    except (OSError, ValueError):  # unreadable: the gateway-decode pass reports it
        return False


def gateway_batches(
    data: ValidationData, *, reduced_scale: bool, batch_size: int = 32
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The validation split's files, read as bytes and turned into model inputs by the gateway's own
    `prepare_batch` (EXIF orientation, alpha on white, its resize), with JPEGs at reduced scale or not."""
    paths = [Path(path) for path in data.split.images]
    for start in range(0, len(paths), batch_size):
        chosen = range(start, min(start + batch_size, len(paths)))
        try:
            images, _, _ = prepare_batch(
                [paths[i].read_bytes() for i in chosen], data.spec, VALIDATION_MAX_PIXELS, jpeg_draft=reduced_scale
            )
        except (OSError, GatewayError) as e:  # an unreadable file; the gateway's 4xx (one it cannot decode)
            raise BuilderError(
                f"validation images {paths[chosen[0]]} to {paths[chosen[-1]]}: the gateway would refuse one: {e}"
            ) from e
        yield images, np.asarray([data.split.labels[i] for i in chosen])


def compare_decodes(
    onnx_path: Path, data: ValidationData, *, max_accuracy_drop: float = DEFAULT_DECODE_BUDGET
) -> DecodeComparison:
    """Top-1 of the ONNX model (ONNX Runtime) on the validation files decoded as the gateway decodes them,
    exactly and at reduced scale. The split must hold image files (`reduced_scale_not_applicable`)."""
    predict = _onnx_predictor(Path(onnx_path))
    exact, reduced = (
        evaluate_predictor(predict, data, batches=gateway_batches(data, reduced_scale=reduced_scale))
        for reduced_scale in (False, True)
    )
    return DecodeComparison(
        exact_top1=exact.top1,
        reduced_top1=reduced.top1,
        images=exact.images,
        jpeg_images=sum(_is_jpeg(Path(path)) for path in data.split.images),
        max_accuracy_drop=max_accuracy_drop,
    )


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


def per_class_scores(confusion: np.ndarray, classes: Sequence[str]) -> tuple[ClassScore, ...]:
    hits = np.diag(confusion).astype(np.float64)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    # A class never predicted (or absent) has precision (recall) 0 rather than NaN.
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
    return tuple(
        ClassScore(label, float(p), float(r), int(n)) for label, p, r, n in zip(classes, precision, recall, actual)
    )


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], path: Path, *, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on build machines
    import matplotlib.pyplot as plt

    # Grows with the classes up to a bound: at 120 dpi, ImageNet's 1000 would otherwise ask for a
    # 54,000-pixel square (about 12 GB of pixels).
    size = min(max(4.0, 0.45 * len(classes) + 2), MAX_CONFUSION_INCHES)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(confusion, cmap="Blues")
    if len(classes) <= MAX_LABELLED_CLASSES:  # beyond, the labels would overlap: the axes count classes
        ticks = range(len(classes))
        axes.set_xticks(ticks, labels=classes, rotation=90 if len(classes) > 12 else 0)
        axes.set_yticks(ticks, labels=classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    if len(classes) <= 30:
        threshold = confusion.max() / 2 if confusion.size else 0
        for (row, column), count in np.ndenumerate(confusion):
            axes.text(
                column,
                row,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if count > threshold else "black",
            )
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


@dataclass(frozen=True)
class Speed:
    latency_b1_ms: float  # median of single-image runs
    throughput_b8: float  # images per second at batch 8 (median run)


def _median_seconds(run: Callable[[], object], *, min_seconds: float, min_runs: int, warmup: int) -> float:
    for _ in range(warmup):
        run()
    times, started = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return float(np.median(times))


def measure_speed(
    onnx_path: Path, *, threads: int | None = None, min_seconds: float = 1.5, min_runs: int = 10, warmup: int = 3
) -> Speed:
    """ONNX Runtime (CPU) latency at batch 1 and throughput at batch 8, on this machine."""
    session = onnx_session(Path(onnx_path), threads=threads)
    first = session.get_inputs()[0]
    sample_shape = [d if isinstance(d, int) else 1 for d in first.shape[1:]]
    rng = np.random.default_rng(0)
    timings = {}
    for batch in (LATENCY_BATCH, THROUGHPUT_BATCH):
        feed = {first.name: rng.standard_normal((batch, *sample_shape)).astype(np.float32)}
        timings[batch] = _median_seconds(
            lambda feed=feed: session.run(None, feed), min_seconds=min_seconds, min_runs=min_runs, warmup=warmup
        )
    return Speed(
        latency_b1_ms=timings[LATENCY_BATCH] * 1000.0, throughput_b8=THROUGHPUT_BATCH / timings[THROUGHPUT_BATCH]
    )


def write_evaluation(evaluation: Evaluation, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(evaluation.to_dict(), indent=2))
    return path
