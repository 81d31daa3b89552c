"""Quantization-aware training (QAT) in PyTorch, exported as a QDQ INT8 ONNX model.

For models whose ONNX Runtime static INT8 (`builder.quantize.quantize_int8`) loses more top-1 than
the budget allows: the weights learn to live with the rounding instead of being rounded afterwards.

Route: PyTorch FX graph mode (`torch.ao.quantization.quantize_fx.prepare_qat_fx`). Tracing inserts a
fake quantizer after every quantizable op (per-tensor uint8 activations held to 7 bits, per-channel
symmetric int8 weights) and fuses Conv+BN(+ReLU) into QAT modules that
fake-quantize the BN-folded weight, so training sees the weights that will be served. The recipe is
PyTorch's: fine-tune a few epochs with a small learning rate, freeze the BN running statistics part
way through, then freeze the observers (the scales) for the last steps.

Export: each Conv+BN QAT module is replaced by a plain convolution with the BN folded into its weight
and bias (the same arithmetic in eval mode, up to float rounding), and the graph goes through the
TorchScript exporter (opset 17), which writes each fake quantizer as a QuantizeLinear/DequantizeLinear
pair. The weight quantizers, whose
inputs are constants, are then computed once: the file stores int8 weights with their per-channel
scales feeding DequantizeLinear, the layout ONNX Runtime's static quantizer writes, so ONNX Runtime
runs both with the same integer kernels. The file appears only once ONNX Runtime agrees with the
fake-quantized PyTorch model on the top-1 of validation images.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import ModelMeta, load_model
from .data import ImageDataset, TorchSplit, load_run_dataset
from .errors import BuilderError, QATError, error_line
from .loop import evaluate_accuracy, seed_everything
from .loop import finetune as run_finetune
from .onnx_graph import INPUT_NAME, OUTPUT_NAME, simplify_graph, torch_to_onnx
from .onnx_meta import onnx_metadata, set_metadata
from .train_config import ARCHITECTURES
from .transforms import eval_transform, train_transform, validation_images

log = logging.getLogger(__name__)

# resnet18: trained, exported and run by ONNX Runtime in the tests; mobilenet_v3_small: the same, by hand
# (QLinearConv/QLinearAdd/QLinearMul after ONNX Runtime's fusions); resnet50 and mobilenet_v3_large
# use the same building blocks.
QAT_ARCHITECTURES = ARCHITECTURES
ACTIVATION_MAX = 127  # 7-bit activations; see qconfig()
MIN_AGREEMENT = 0.98  # top-1 agreement of ONNX Runtime with the fake-quantized PyTorch model


@dataclass(frozen=True)
class QATConfig:
    epochs: float = 2.0  # fine-tuning epochs on the training split (fractions allowed)
    lr: float = 1e-4  # peak AdamW learning rate (warmup, then cosine decay)
    batch_size: int = 64
    weight_decay: float = 1e-4
    freeze_bn_after: float = 0.5  # fraction of the steps after which BN running statistics stop updating
    freeze_observers_after: float = 0.75  # ... after which the quantization scales stop moving
    parity_images: int = 512  # validation images on which ONNX Runtime must agree with PyTorch
    min_agreement: float = MIN_AGREEMENT
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.epochs > 0:
            raise QATError(f"QAT epochs must be more than 0 (got {self.epochs})")
        if not self.lr > 0:
            raise QATError(f"QAT learning rate must be more than 0 (got {self.lr})")
        if self.batch_size < 1 or self.parity_images < 1:
            raise QATError("QAT batch_size and parity_images must be at least 1")
        for name in ("freeze_bn_after", "freeze_observers_after", "min_agreement"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise QATError(f"QAT {name} must be between 0 and 1 (got {getattr(self, name)})")


@dataclass(frozen=True)
class QATResult:
    onnx_path: Path
    val_accuracy: float  # fake-quantized PyTorch model on the validation split
    agreement: float  # top-1 agreement of ONNX Runtime with it on the parity images
    parity_images: int
    epochs: float
    seconds: float
    history: list[dict] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # the fake-quantized model, eval mode


# ---- fake quantization ----


def qconfig():
    """uint8 per-tensor affine activations in [0, 127], int8 per-channel symmetric weights.

    Activations keep to 7 bits, as in PyTorch's own x86 (fbgemm) default: x86 CPUs without VNNI (AVX2
    and older AVX-512) multiply uint8 by int8 with an instruction that adds pairs of products into
    int16, which saturates: 255 x 128 x 2 is over 32767, 127 x 128 x 2 is not. ONNX Runtime's fused kernels drift
    from the fake-quantized model (top-1 agreement 97.8% on an AVX2 EPYC, 100% with 7 bits); training
    with the 7-bit range makes the exported model exact on every x86 CPU.

    Plain FakeQuantize modules, not the fused default: the ONNX exporter has symbolics for
    fake_quantize_per_{tensor,channel}_affine, only for the (0, 255), (0, 127) and (-128, 127) ranges;
    it writes (0, 127) as QuantizeLinear, Clip, DequantizeLinear, which ONNX Runtime still fuses.
    """
    from torch.ao.quantization import (
        FakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        QConfig,
    )

    activation = FakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=ACTIVATION_MAX,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
        reduce_range=False,
    )
    weight = FakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver,
        quant_min=-128,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        reduce_range=False,
    )
    return QConfig(activation=activation, weight=weight)


def qconfig_mapping():
    """PyTorch's default QAT mapping with our qconfig everywhere except fixed-range ops (hardsigmoid,
    sigmoid, tanh, softmax) and shape ops that reuse their input's scale."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.fake_quantize import FixedQParamsFakeQuantize
    from torch.ao.quantization.observer import ReuseInputObserver

    mine = qconfig()
    mapping = get_default_qat_qconfig_mapping("x86").set_global(mine)
    for op, config in list(mapping.object_type_qconfigs.items()):
        activation = config.activation() if config is not None else None
        if not isinstance(activation, (FixedQParamsFakeQuantize, ReuseInputObserver)):
            mapping.set_object_type(op, mine)
    return mapping


def prepare(model: nn.Module, meta: ModelMeta) -> torch.fx.GraphModule:
    """The model traced with fake quantizers and Conv+BN(+ReLU) fused into QAT modules (train mode)."""
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    if meta.arch not in QAT_ARCHITECTURES:
        raise QATError(f"architecture {meta.arch!r} is not supported by QAT; supported: {', '.join(QAT_ARCHITECTURES)}")
    example = torch.zeros(1, *meta.input_shape)
    model = copy.deepcopy(model).train()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
            return prepare_qat_fx(model, qconfig_mapping(), (example,))
    except Exception as e:  # FX raises whatever tracing hits
        raise QATError(f"cannot insert fake quantization into {meta.arch}: {error_line(e)}") from e


def freeze_observers(model: nn.Module) -> None:
    from torch.ao.quantization import disable_observer

    model.apply(disable_observer)


def freeze_bn(model: nn.Module) -> None:
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats

    model.apply(freeze_bn_stats)


# ---- fine-tuning ----


def finetune(prepared: nn.Module, meta: ModelMeta, config: QATConfig, dataset: ImageDataset) -> list[dict]:
    """Fine-tune with the training transform (on the GPU when there is one); freezes BN, then scales."""
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        TorchSplit(dataset.train, dataset.color_mode, train_transform(meta.spec)),
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
    )
    total_steps = max(1, math.ceil(config.epochs * len(loader)))
    freeze_bn_step = int(config.freeze_bn_after * total_steps)
    freeze_observer_step = max(1, int(config.freeze_observers_after * total_steps))  # observe at least once

    def before_step(step: int) -> None:
        if step == freeze_bn_step:
            freeze_bn(prepared)
        if step == freeze_observer_step:
            freeze_observers(prepared)

    # Full precision: the observers set the INT8 scales from what they see, and the exported graph is
    # checked against this model in float32.
    history = run_finetune(
        prepared,
        loader,
        epochs=config.epochs,
        lr=config.lr,
        weight_decay=config.weight_decay,
        amp=False,
        label="QAT",
        before_step=before_step,
    )
    freeze_bn(prepared)
    freeze_observers(prepared)
    prepared.eval()
    return history


# ---- export ----


class FoldedConv(nn.Module):
    """A Conv+BN(+ReLU) QAT module in eval mode, BN folded into the weight and bias: same output."""

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        conv, bn = fused, fused.bn
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shape = [-1] + [1] * (conv.weight.dim() - 1)
            self.weight = nn.Parameter(conv.weight * scale.reshape(shape))  # exactly what the QAT module quantizes
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            self.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
        self.weight_fake_quant = fused.weight_fake_quant
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise QATError(f"convolutions with padding_mode={conv.padding_mode!r} cannot be exported after QAT")
        self.relu = isinstance(fused, _conv_bn_relu_types())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.conv2d(
            x, self.weight_fake_quant(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups
        )
        return nn.functional.relu(y) if self.relu else y


def _conv_bn_relu_types():
    from torch.ao.nn.intrinsic.qat import ConvBnReLU2d

    return (ConvBnReLU2d,)


def fold_batch_norms(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of the (trained, eval-mode) QAT model with every Conv+BN QAT module folded into a convolution."""
    from torch.ao.nn.intrinsic.qat import ConvBn2d, ConvBnReLU2d

    folded = copy.deepcopy(prepared).eval()
    for name, module in list(folded.named_modules()):
        if type(module) in (ConvBn2d, ConvBnReLU2d):
            parent_name, _, child = name.rpartition(".")
            parent = folded.get_submodule(parent_name) if parent_name else folded
            setattr(parent, child, FoldedConv(module))
    return folded.eval()


def _quantize_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Replace QuantizeLinear(constant float weight) with the int8 initializer it computes (4x smaller file)."""
    initializers = {i.name: i for i in proto.graph.initializer}
    constants = {n.output[0]: n for n in proto.graph.node if n.op_type == "Constant"}
    # The exporter shares equal constants (zero points) between layers through Identity nodes.
    aliases = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Identity"}

    def value(name: str):
        while name in aliases:
            name = aliases[name]
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = constants.get(name)
        if node is not None and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    kept, added = [], []
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) == 3:
            x, scale, zero_point = (value(n) for n in node.input)
            if x is not None and scale is not None and zero_point is not None:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                shape = [1] * x.ndim
                if scale.ndim == 1 and scale.size > 1:
                    shape[axis] = -1
                info = np.iinfo(zero_point.dtype)
                q = np.rint(x / scale.reshape(shape)) + zero_point.astype(np.int64).reshape(shape)
                added.append(
                    numpy_helper.from_array(np.clip(q, info.min, info.max).astype(zero_point.dtype), node.output[0])
                )
                continue
        kept.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    proto.graph.initializer.extend(added)
    used = {name for node in proto.graph.node for name in node.input}
    unused = [i for i in proto.graph.initializer if i.name not in used]
    for initializer in unused:
        proto.graph.initializer.remove(initializer)
    unused_constants = [n for n in proto.graph.node if n.op_type == "Constant" and n.output[0] not in used]
    for node in unused_constants:
        proto.graph.node.remove(node)
    return proto


def _drop_relu_before_quantize(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Remove each Relu read only by uint8 QuantizeLinear with zero point 0, which clamps at 0 itself.

    Exact, and it lets ONNX Runtime see DQ -> Add -> Q (FX fuses add+relu under one quantizer) and
    fuse it into QLinearAdd, as it does for the graphs its own static quantizer writes.
    """
    initializers = {i.name: i for i in proto.graph.initializer}
    aliases = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Identity"}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in proto.graph.output}

    def unsigned_zero(name: str) -> bool:
        while name in aliases:
            name = aliases[name]
        if name not in initializers:
            return False
        zero_point = numpy_helper.to_array(initializers[name])
        return zero_point.dtype == np.uint8 and not zero_point.any()

    dropped = []
    for node in proto.graph.node:
        if node.op_type != "Relu" or node.output[0] in outputs:
            continue
        readers = consumers.get(node.output[0], [])
        if readers and all(
            r.op_type == "QuantizeLinear" and len(r.input) == 3 and unsigned_zero(r.input[2]) for r in readers
        ):
            for reader in readers:
                reader.input[0] = node.input[0]
            dropped.append(node)
    for node in dropped:
        proto.graph.node.remove(node)
    return proto


def _scalar_quantization_parameters(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Per-tensor scales and zero points as scalars, not shape [1] (ONNX Runtime fuses QLinearAdd only then)."""
    users: dict[str, set[tuple[str, int]]] = {}
    for node in proto.graph.node:
        for position, name in enumerate(node.input):
            users.setdefault(name, set()).add((node.op_type, position))
    for initializer in proto.graph.initializer:
        uses = users.get(initializer.name, set())
        if (
            list(initializer.dims) == [1]
            and uses
            and all(op in ("QuantizeLinear", "DequantizeLinear") and position > 0 for op, position in uses)
        ):
            initializer.CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(initializer).reshape(()), initializer.name)
            )
    return proto


def to_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> onnx.ModelProto:
    """The fake-quantized model as QDQ ONNX: weights stored as INT8, the graph simplified and checked."""
    proto = _drop_relu_before_quantize(_quantize_weights(torch_to_onnx(model, example, path)))
    # onnxslim drops the Identity nodes (shared zero points) and keeps the QDQ pairs.
    proto = _scalar_quantization_parameters(simplify_graph(proto))
    onnx.checker.check_model(proto)
    return proto


def top1_agreement(onnx_path: Path, model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model.eval()
    agree = 0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        (onnx_logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})
        with torch.no_grad():
            torch_logits = model(batch).numpy()
        agree += int((onnx_logits.argmax(axis=1) == torch_logits.argmax(axis=1)).sum())
    return agree / max(1, len(images))


def export_qat(
    prepared: torch.fx.GraphModule,
    meta: ModelMeta,
    output: Path,
    *,
    parity: torch.Tensor,
    metadata: dict[str, str],
    min_agreement: float = MIN_AGREEMENT,
) -> float:
    """Write the QDQ ONNX file once ONNX Runtime agrees with `prepared` on `parity`; returns the agreement."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        try:
            proto = to_onnx(fold_batch_norms(prepared), parity[:1], tmp)
        except BuilderError:
            raise
        except Exception as e:  # the exporter and the checker raise their own types
            raise QATError(f"the QAT model of {meta.arch} cannot be exported to ONNX: {error_line(e)}") from e
        set_metadata(proto, metadata)
        onnx.save(proto, str(tmp))
        agreement = top1_agreement(tmp, prepared, parity)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if agreement < min_agreement:
        tmp.unlink(missing_ok=True)
        raise QATError(
            f"ONNX Runtime agrees with the fake-quantized PyTorch model on only {agreement:.1%} of "
            f"{len(parity)} validation images (< {min_agreement:.0%}); not writing {output}"
        )
    os.replace(tmp, output)
    return agreement


def quantization_aware_train(
    checkpoint: Path, output_onnx: Path, config: QATConfig = QATConfig(), dataset: ImageDataset | None = None
) -> QATResult:
    """Fine-tune the model of `checkpoint` (trained or pruned) with fake quantization; write INT8 QDQ ONNX."""
    started = time.monotonic()
    checkpoint, output_onnx = Path(checkpoint), Path(output_onnx)
    model, meta = load_model(checkpoint)
    prepared = prepare(model, meta)
    dataset = dataset or load_run_dataset(meta.dataset_recipe)
    seed_everything(config.seed)
    history = finetune(prepared, meta, config, dataset)
    val_loader = DataLoader(TorchSplit(dataset.val, dataset.color_mode, eval_transform(meta.spec)), batch_size=128)
    val_accuracy = evaluate_accuracy(prepared, val_loader)
    parity = validation_images(meta.spec, dataset, config.parity_images)
    metadata = {
        **onnx_metadata(meta, checkpoint),
        "precision": "int8",
        "quantization": "qat",
        "qat": json.dumps({**asdict(config), "val_accuracy": val_accuracy}),
    }
    agreement = export_qat(
        prepared, meta, output_onnx, parity=parity, metadata=metadata, min_agreement=config.min_agreement
    )
    log.info(
        "QAT %s -> %s: fake-quant val accuracy %.4f, ONNX Runtime agrees on %.1f%% of %d images",
        checkpoint,
        output_onnx,
        val_accuracy,
        100 * agreement,
        len(parity),
    )
    return QATResult(
        output_onnx, val_accuracy, agreement, len(parity), config.epochs, time.monotonic() - started, history, prepared
    )
