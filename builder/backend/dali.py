"""The preprocessing model for Triton's DALI backend (`builder publish --preprocess gpu`): encoded image bytes
in, the classifier's normalized N x C x H x W float32 input out, decoded with nvJPEG on the GPU.

Published as `<version>/dali.py` with the spec beside it in `<version>/preprocess.json`. The DALI backend
looks for a serialized `model.dali` first and otherwise serializes the `@autoserialize` pipeline of
`dali.py` itself, with the DALI of the serving container (dali_backend r24.10 README, "Autoserialization";
src/dali_model.h LoadModel). That is why no serialized file is written: serializing a pipeline with a
"mixed" (GPU) decoder needs a CUDA driver on the publishing machine, and a pipeline serialized by a newer
DALI than the container's may name arguments the older one refuses.

Self-contained (Triton runs it where neither the builder nor the gateway is installed), and the one
definition the builder's tests run on the CPU (`decoder_device="cpu"`) against the gateway's Pillow path:

- decode as RGB, BGR or grayscale (`fn.decoders.image`, "mixed": nvJPEG, with the hardware decoder where
  the GPU has one), turned by the EXIF orientation as the gateway does (`adjust_orientation`, on by
  default from DALI 1.39; not passed here, since the 1.35 the tests run has no such argument);
- resize so the shorter side is `resize_size`, the longer one scaled and truncated as torchvision's
  Resize(int) and the gateway do (`fn.resize(resize_shorter=...)` would round it: one pixel more on some
  sizes, which moves the centre crop). The sizes come from the encoded header (`fn.peek_image_shape`);
  linear or cubic interpolation, antialiased when shrinking as Pillow is;
- centre crop `image_size` and `(level - 255 mean) / (255 std)` per channel into CHW float32
  (`fn.crop_mirror_normalize`).
"""

from __future__ import annotations

import json
from pathlib import Path

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.triton import autoserialize

# The names Triton's config gives the preprocessing model's input and output (the DALI backend matches the
# input to the external source of that name: its README, "Tips & Tricks").
INPUT_NAME = "IMAGE_BYTES"
OUTPUT_NAME = "PREPROCESSED"
SPEC_FILE = "preprocess.json"
DECODED = {"RGB": types.RGB, "BGR": types.BGR, "L": types.GRAY}
INTERPOLATION = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


def read_spec(path: str | Path | None = None) -> dict:
    """The preprocessing spec (PreprocessSpec.to_dict()) published beside this file."""
    return json.loads(Path(path or Path(__file__).with_name(SPEC_FILE)).read_text())


def preprocessing_graph(encoded, spec: dict, decoder_device: str = "mixed"):
    """The DALI operators from a batch of encoded images to the model's input."""
    images = fn.decoders.image(encoded, device=decoder_device, output_type=DECODED[spec["color_mode"]])
    # Height and width from the header (H x W x C), as int64 so that the products below cannot overflow.
    shape = fn.peek_image_shape(encoded, dtype=types.INT64)
    height, width = shape[0], shape[1]
    shorter = dmath.min(height, width)
    size = int(spec["resize_size"])
    images = fn.resize(
        images,
        resize_x=fn.cast(width * size // shorter, dtype=types.FLOAT),
        resize_y=fn.cast(height * size // shorter, dtype=types.FLOAT),
        interp_type=INTERPOLATION[spec["interpolation"]],
        antialias=True,
    )
    side = int(spec["image_size"])
    return fn.crop_mirror_normalize(
        images,
        crop=(side, side),
        crop_pos_x=0.5,
        crop_pos_y=0.5,
        mean=[255.0 * float(m) for m in spec["mean"]],
        std=[255.0 * float(s) for s in spec["std"]],
        dtype=types.FLOAT,
        output_layout="CHW",
    )


# Triton's config sets the batch size (max_batch_size) and the device (the instance's GPU) when it builds the
# pipeline; these are the defaults of a pipeline built from this file elsewhere.
@autoserialize
@pipeline_def(batch_size=32, num_threads=4, device_id=0)
def preprocessing(decoder_device: str = "mixed", spec_file: str | None = None):
    encoded = fn.external_source(name=INPUT_NAME, device="cpu", dtype=types.UINT8, ndim=1)
    return preprocessing_graph(encoded, read_spec(spec_file), decoder_device)
