"""`builder publish --preprocess gpu`: the DALI preprocessing model and the ensemble beside the classifier, and
the pipeline they publish, run here on the CPU (decoder "cpu" instead of "mixed": the one difference) against
the gateway's Pillow preprocessing of the same photos."""

from __future__ import annotations

import importlib.util
import json
import warnings

import numpy as np
import pytest
from google.protobuf import json_format

from builder import model_config
from server.preprocess import PreprocessSpec, preprocess_bytes
from server.triton import model_info_from_config

IMAGENET = PreprocessSpec(image_size=224, resize_size=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
SMALL_FLAGS = ["--resize", "4", "--crop", "4", "--mean", "0.5", "--std", "0.5", "--color-mode", "L"]


def _publish(tmp_path, capsys, *flags: str, name: str = "m") -> int:
    from builder.cli import main
    from tests.onnx_variants import conv_classifier

    onnx_path = tmp_path / "model.onnx"
    if not onnx_path.exists():
        conv_classifier(onnx_path)
        (tmp_path / "labels.txt").write_text("yes\nno\n")
    arguments = ["publish", "--onnx", str(onnx_path), "--name", name, "--repository", str(tmp_path / "repo")]
    capsys.readouterr()
    return main([*arguments, "--no-warmup", "--labels", str(tmp_path / "labels.txt"), *SMALL_FLAGS, *flags])


def _triton_json(config: model_config.ModelConfig) -> dict:
    """The config as Triton's model-config API returns it (protobuf's JSON of the same message)."""
    return json_format.MessageToDict(model_config.to_protobuf(config), preserving_proto_field_name=True)


def test_publish_writes_the_classifier_a_dali_model_and_an_ensemble(tmp_path, capsys):
    assert _publish(tmp_path, capsys, "--preprocess", "gpu") == 0, capsys.readouterr().err
    repository = tmp_path / "repo"
    assert sorted(p.name for p in repository.iterdir()) == ["m", "m-ensemble", "m-preprocess"]
    classifier = model_config.parse((repository / "m" / "config.pbtxt").read_text())

    dali = model_config.parse((repository / "m-preprocess" / "config.pbtxt").read_text())
    assert dali.backend == "dali" and dali.instance_kind == "KIND_GPU"
    (encoded,) = dali.inputs
    assert (encoded.data_type, encoded.dims, encoded.allow_ragged_batch) == ("UINT8", (-1,), True)
    (output,) = dali.outputs
    assert (output.data_type, output.dims) == ("FP32", classifier.inputs[0].dims)
    assert dali.max_batch_size == classifier.max_batch_size
    version = repository / "m-preprocess" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["build.json", "dali.py", "preprocess.json"]
    spec = PreprocessSpec.from_dict(json.loads((version / "preprocess.json").read_text()))
    assert spec == PreprocessSpec.from_parameters(classifier.parameters)

    ensemble = model_config.parse((repository / "m-ensemble" / "config.pbtxt").read_text())
    assert ensemble.platform == "ensemble" and ensemble.dynamic_batching is None
    first, second = ensemble.ensemble_steps
    assert (first.model_name, second.model_name) == ("m-preprocess", "m")
    assert first.input_map == {"IMAGE_BYTES": ensemble.inputs[0].name}
    assert second.input_map == {classifier.inputs[0].name: first.output_map[dali.outputs[0].name]}
    assert [t.name for t in ensemble.outputs] == [t.name for t in classifier.outputs]
    assert (repository / "m-ensemble" / "1").is_dir()
    # An ensemble has no instances of its own: Triton refuses an instance_group there.
    assert "instance_group" not in (repository / "m-ensemble" / "config.pbtxt").read_text()

    # What the gateway makes of each: the ensemble takes encoded bytes, with the classifier's spec and labels.
    info = model_info_from_config("m-ensemble", _triton_json(ensemble))
    assert info.encoded_input and not info.pixel_input and info.input_datatype == "UINT8"
    assert info.spec == spec and info.labels == ("yes", "no")
    assert not model_info_from_config("m", _triton_json(classifier)).encoded_input


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--pixel-input"], "--pixel-input"),
        (["--canary", "10"], "--canary"),
    ],
)
def test_preprocess_gpu_where_it_cannot_apply_is_refused_in_one_line(tmp_path, capsys, flags, words):
    assert _publish(tmp_path, capsys, "--preprocess", "gpu", *flags) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert words in line and "--preprocess gpu" in line
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


@pytest.mark.parametrize("case", ["equalize", "fixed batch", "plan"])
def test_what_the_gpu_path_cannot_serve_is_refused_with_nothing_written(tmp_path, case):
    from builder.errors import PublishError
    from builder.publish import PublishSettings, publish, publish_plan
    from tests.onnx_variants import conv_classifier, with_fixed_batch

    onnx_path = conv_classifier(tmp_path / "model.onnx")
    spec = PreprocessSpec(4, 4, (0.5,), (0.5,), color_mode="L", equalize=case == "equalize")
    settings = PublishSettings(preprocess="gpu", warmup=False, target="gpu" if case == "plan" else "cpu")
    with pytest.raises(
        PublishError,
        match={"equalize": "equalizes", "fixed batch": "dynamic batch axis", "plan": "for ONNX models"}[case],
    ):
        if case == "plan":
            publish_plan(tmp_path / "model.plan", onnx_path, tmp_path / "repo", "m", spec=spec, settings=settings)
        else:
            if case == "fixed batch":
                onnx_path = with_fixed_batch(onnx_path, tmp_path / "fixed.onnx", 1)
            publish(onnx_path, tmp_path / "repo", "m", spec=spec, settings=settings)
    assert not (tmp_path / "repo").exists()


def _pipeline_module(path):
    spec = importlib.util.spec_from_file_location("published_dali_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_on_cpu(version_dir, images: list[bytes]) -> list[np.ndarray]:
    """The published pipeline with its decoder on the CPU, serialized and deserialized (what the DALI backend
    does with the file), then run on `images` padded to one length as the gateway sends them."""
    from server.preprocess import encoded_batch

    # DALI warns that its wheel ships no CUDA libraries, under a warning filter of its own (so pytest's do not
    # apply): the CPU operators used here need none.
    with warnings.catch_warnings(record=True):
        from nvidia.dali import Pipeline, types

        module = _pipeline_module(version_dir / "dali.py")
        built = module.preprocessing(
            decoder_device="cpu", spec_file=str(version_dir / "preprocess.json"), device_id=None, batch_size=len(images)
        )
        pipeline = Pipeline.deserialize(
            serialized_pipeline=built.serialize(),
            device_id=types.CPU_ONLY_DEVICE_ID,
            batch_size=len(images),
            num_threads=2,
            exec_async=False,
            exec_pipelined=False,
        )
        pipeline.build()
    batch, _ = encoded_batch(images, max_pixels=10**8)
    pipeline.feed_input(module.INPUT_NAME, list(batch))
    (output,) = pipeline.run()
    return [np.array(output.at(i)) for i in range(len(images))]


@pytest.mark.parametrize("color_mode", ["RGB", "L"])
def test_the_published_pipeline_matches_the_gateway_on_photos(tmp_path, photos, color_mode):
    """RGB within 1.5 levels of 255 (seen: 1.0 at most, 0.18 on average): the sizes, the crop and the filter are
    the same, Pillow's and DALI's antialiased resizes round differently, and both decode JPEG with
    libjpeg-turbo on the CPU. Grayscale within 10 (seen: 8, 0.53 on average): DALI keeps the decoder's luma,
    Pillow converts decoded RGB with its own integer weights. nvJPEG on the GPU decodes with other IDCT and
    chroma upsampling code: `make gpu-check` compares that path."""
    from builder.dali_preprocess import DALI_MODEL, write_spec

    channels = 1 if color_mode == "L" else 3
    spec = PreprocessSpec(
        image_size=224,
        resize_size=256,
        mean=IMAGENET.mean[:channels],
        std=IMAGENET.std[:channels],
        color_mode=color_mode,
    )
    version = tmp_path / "1"
    version.mkdir()
    (version / "dali.py").write_text(DALI_MODEL.read_text())
    write_spec(spec, version / "preprocess.json")
    images = [path.read_bytes() for path in photos]
    served = _run_on_cpu(version, images)
    levels = 255 * np.asarray(spec.std, dtype=np.float32)[:, None, None]
    worst = mean = 0.0
    for data, dali_input in zip(images, served):
        gateway_input = preprocess_bytes(data, spec)
        assert dali_input.shape == gateway_input.shape == spec.input_shape
        difference = np.abs(dali_input - gateway_input) * levels
        worst, mean = max(worst, float(difference.max())), max(mean, float(difference.mean()))
    print(f"{color_mode}: at most {worst:.2f} levels of 255 apart, {mean:.3f} on average (worst photo)")
    assert worst <= (1.5 if color_mode == "RGB" else 10.0) and mean <= (0.5 if color_mode == "RGB" else 1.0)


def _image(fmt: str, size=(40, 30)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 10)).save(buffer, fmt)
    return buffer.getvalue()


def test_encoded_images_go_as_their_bytes_padded_to_the_longest():
    from server.preprocess import encoded_batch

    images = [_image("JPEG"), _image("PNG", (300, 200)), _image("WEBP")]
    batch, pixels = encoded_batch(images, max_pixels=10**6)
    assert batch.dtype == np.uint8 and batch.shape == (3, max(len(data) for data in images))
    for row, data in zip(batch, images):
        assert row[: len(data)].tobytes() == data and not row[len(data) :].any()
    assert pixels == 40 * 30 * 2 + 300 * 200


@pytest.mark.parametrize(
    ("images", "limits", "error", "words"),
    [
        ([_image("PNG", (300, 200))], {"max_pixels": 300 * 200 - 1}, "PayloadTooLarge", "image 0"),
        ([_image("JPEG")] * 3, {"max_pixels": 10**6, "max_request_pixels": 40 * 30 * 2}, "PayloadTooLarge", "in all"),
        # DALI's decoder reads no GIF: refused from the header, before Triton sees it.
        ([_image("JPEG"), _image("GIF")], {"max_pixels": 10**6}, "InvalidImage", "image 1"),
        ([b"not an image"], {"max_pixels": 10**6}, "InvalidImage", "image 0"),
        # Padded to the longest: one PNG among small JPEGs makes a batch of 4 x the PNG's length.
        (
            [_image("PNG", (300, 200))] + [_image("JPEG")] * 3,
            {"max_pixels": 10**6, "max_batch_bytes": 3 * len(_image("PNG", (300, 200)))},
            "PayloadTooLarge",
            "padded to the longest",
        ),
    ],
)
def test_encoded_images_are_checked_from_their_headers(images, limits, error, words):
    from server import errors
    from server.preprocess import encoded_batch

    with pytest.raises(getattr(errors, error), match=words):
        encoded_batch(images, **limits)


def test_only_a_uint8_input_of_any_length_is_taken_for_encoded_images():
    from server.triton import model_info_from_config

    def config(data_type: str, dims: list[str]) -> dict:
        parameters = {k: {"string_value": v} for k, v in IMAGENET.to_parameters().items()}
        return {
            "input": [{"name": "x", "data_type": data_type, "dims": dims}],
            "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": ["2"]}],
            "max_batch_size": 8,
            "parameters": parameters,
        }

    encoded = model_info_from_config("e", config("TYPE_UINT8", ["-1"]))
    pixels = model_info_from_config("p", config("TYPE_UINT8", ["224", "224", "3"]))
    floats = model_info_from_config("f", config("TYPE_FP32", ["3", "224", "224"]))
    assert (encoded.encoded_input, encoded.pixel_input) == (True, False)
    assert (pixels.encoded_input, pixels.pixel_input) == (False, True)
    assert (floats.encoded_input, floats.pixel_input, floats.input_datatype) == (False, False, "FP32")


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("companion", ["m-preprocess", "m-ensemble"])
def test_another_model_at_a_companion_name_is_refused_with_nothing_written(tmp_path, capsys, companion):
    assert _publish(tmp_path, capsys, name=companion) == 0, capsys.readouterr().err
    before = _tree(tmp_path / "repo")
    assert _publish(tmp_path, capsys, "--preprocess", "gpu") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert companion in line and "another model" in line
    assert _tree(tmp_path / "repo") == before


def test_a_file_in_the_way_of_a_companion_is_refused_with_nothing_written(tmp_path, capsys):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "m-ensemble").write_text("not a model")
    assert _publish(tmp_path, capsys, "--preprocess", "gpu") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "m-ensemble" in line and "in the way" in line
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["m-ensemble"]


def test_republishing_with_gpu_preprocessing_adds_a_version_to_each_companion(tmp_path, capsys):
    assert _publish(tmp_path, capsys, "--preprocess", "gpu") == 0, capsys.readouterr().err
    assert _publish(tmp_path, capsys, "--preprocess", "gpu") == 0, capsys.readouterr().err
    for model in ("m", "m-preprocess", "m-ensemble"):
        assert model_config.present_versions(tmp_path / "repo" / model) == [1, 2]


@pytest.mark.parametrize("first", [False, True])
def test_a_companion_failing_to_write_undoes_the_whole_publish(tmp_path, capsys, monkeypatch, first):
    import errno

    from builder import publish

    if first:
        assert _publish(tmp_path, capsys, "--preprocess", "gpu") == 0, capsys.readouterr().err
    before = _tree(tmp_path / "repo") if first else None
    write_version = publish._write_version

    def full_disk_at_the_ensemble(files, repository, name, *args, **kwargs):
        if name.endswith("-ensemble"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_version(files, repository, name, *args, **kwargs)

    monkeypatch.setattr(publish, "_write_version", full_disk_at_the_ensemble)
    assert _publish(tmp_path, capsys, "--preprocess", "gpu") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "No space left" in line
    if first:
        assert _tree(tmp_path / "repo") == before
    else:
        assert not any((tmp_path / "repo").iterdir())


@pytest.mark.parametrize("served", [True, False])
def test_publishing_into_the_local_stacks_repository_warns_that_dali_cannot_load_there(
    tmp_path, capsys, monkeypatch, caplog, served
):
    # The stack's Triton is the nvidia-pytriton wheel's, whose backends hold no DALI.
    monkeypatch.setenv("TRITON_MODEL_REPOSITORY", str(tmp_path / ("repo" if served else "elsewhere")))
    assert _publish(tmp_path, capsys, "--preprocess", "gpu") == 0, capsys.readouterr().err
    warned = [r.getMessage() for r in caplog.records if "no DALI backend" in r.getMessage()]
    assert len(warned) == served
