import json
import os
import sys
from pathlib import Path

import pytest

from builder import model_config
from builder.errors import OnnxFileError, PublishError
from builder.publish import PublishSettings, inspect_onnx, publish
from server.preprocess import PreprocessSpec
from tests.onnx_variants import retrained, with_metadata


def test_publish_writes_a_complete_version_with_spec_and_labels_in_the_config(tiny_run, tmp_path):
    repository = tmp_path / "repo"
    published = publish(tiny_run / "model.onnx", repository, "digits")
    assert published.version == 1
    files = sorted(p.name for p in published.version_dir.iterdir())
    assert files == ["build.json", "model.onnx", "model.py"]
    config = model_config.parse((repository / "digits" / "config.pbtxt").read_text())
    spec = PreprocessSpec.from_parameters(config.parameters)
    assert spec.input_shape == (1, 8, 8)
    assert json.loads(config.parameters["labels"]) == [str(i) for i in range(10)]
    assert config.inputs[0].dims == (1, 8, 8) and config.outputs[0].dims == (10,)
    assert config.dynamic_batching is not None
    assert (repository / "digits" / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    lineage = json.loads((published.version_dir / "build.json").read_text())
    assert lineage["version"] == 1 and lineage["onnx_metadata"]["arch"] == "resnet18"


def test_publishing_again_adds_the_next_version_and_leaves_no_staging_folders(tiny_run, tmp_path):
    repository = tmp_path / "repo"
    first = publish(tiny_run / "model.onnx", repository, "digits")
    # The same file (inode) with the same bytes: a copy put in its place would keep the mtime (copy2).
    before = {f.name: (f.stat().st_ino, f.read_bytes()) for f in first.version_dir.iterdir()}
    second = publish(
        tiny_run / "model.onnx",
        repository,
        "digits",
        settings=PublishSettings(max_batch_size=8, preferred_batch_sizes=(2, 4)),
    )
    assert second.version == 2
    assert {f.name: (f.stat().st_ino, f.read_bytes()) for f in first.version_dir.iterdir()} == before
    assert sorted(p.name for p in (repository / "digits").iterdir()) == [
        "1",
        "2",
        "config.pbtxt",
        "labels.txt",
        "warmup",
    ]
    assert [p.name for p in repository.iterdir()] == ["digits"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert model_config.parse((repository / "digits" / "config.pbtxt").read_text()).max_batch_size == 8


def test_a_file_that_is_not_onnx_is_refused_and_nothing_is_written(tmp_path):
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(os.urandom(256))
    with pytest.raises(OnnxFileError, match="not an ONNX model"):
        publish(bogus, tmp_path / "repo", "digits")
    assert not (tmp_path / "repo" / "digits").exists()


def test_missing_onnx_file_is_named(tmp_path):
    with pytest.raises(OnnxFileError, match="nope.onnx does not exist"):
        publish(tmp_path / "nope.onnx", tmp_path / "repo", "digits")


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "x" * 65])
def test_invalid_model_names_are_refused(tiny_run, tmp_path, name):
    with pytest.raises(PublishError, match="model name"):
        publish(tiny_run / "model.onnx", tmp_path / "repo", name)


def test_label_count_must_match_the_model(tiny_run, tmp_path):
    with pytest.raises(PublishError, match="3 labels"):
        publish(tiny_run / "model.onnx", tmp_path / "repo", "digits", labels=["a", "b", "c"])


def test_spec_must_produce_the_model_input_shape(tiny_run, tmp_path):
    spec = PreprocessSpec(16, 16, (0.5,), (0.5,), color_mode="L")
    with pytest.raises(PublishError, match="preprocessing makes"):
        publish(tiny_run / "model.onnx", tmp_path / "repo", "digits", spec=spec)


def test_repository_that_cannot_be_written_is_a_publish_error(tiny_run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PublishError, match="cannot write to model repository"):
        publish(tiny_run / "model.onnx", blocker / "repo", "digits")


def test_inspect_reads_names_and_shapes_from_the_graph(tiny_run):
    model = inspect_onnx(tiny_run / "model.onnx")
    assert (model.input_name, model.input_dims, model.output_names, model.num_classes) == (
        "input",
        (1, 8, 8),
        ("logits",),
        10,
    )
    assert "preprocess" in model.metadata


def test_keep_removes_all_but_the_newest_versions(tiny_run, tmp_path):
    repository = tmp_path / "repo"
    for _ in range(3):
        published = publish(tiny_run / "model.onnx", repository, "digits", settings=PublishSettings(keep=2))
    assert published.version == 3
    assert sorted(p.name for p in (repository / "digits").iterdir()) == [
        "2",
        "3",
        "config.pbtxt",
        "labels.txt",
        "warmup",
    ]


def test_gpu_target_publishes_onnx_for_the_onnx_runtime_backend_with_tensorrt(tiny_run, tmp_path):
    published = publish(
        tiny_run / "model.onnx",
        tmp_path / "repo",
        "digits",
        settings=PublishSettings(target="gpu", instance_count=2, trt_cache_path="/cache/trt/digits"),
    )
    assert sorted(p.name for p in published.version_dir.iterdir()) == ["build.json", "model.onnx"]
    text = (published.model_dir / "config.pbtxt").read_text()
    config = model_config.parse(text)
    assert (config.backend, config.platform, config.instance_kind, config.instance_count) == (
        "onnxruntime",
        "onnxruntime_onnx",
        "KIND_GPU",
        2,
    )
    (accelerator,) = config.gpu_accelerators
    assert accelerator.name == "tensorrt" and {
        key: accelerator.parameters[key]
        for key in ("precision_mode", "trt_engine_cache_enable", "trt_engine_cache_path")
    } == {"precision_mode": "FP16", "trt_engine_cache_enable": "true", "trt_engine_cache_path": "/cache/trt/digits"}
    assert PreprocessSpec.from_parameters(config.parameters).input_shape == (1, 8, 8)


def _foreign_onnx(path: Path) -> Path:
    import torch

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=8), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)
    )
    torch.onnx.export(
        model.eval(),
        (torch.zeros(1, 3, 224, 224),),
        str(path),
        dynamo=False,
        input_names=["pixels"],
        output_names=["scores"],
        dynamic_axes={"pixels": {0: "n"}, "scores": {0: "n"}},
    )
    return path


def test_an_onnx_classifier_exported_elsewhere_is_published_with_labels_and_default_preprocessing(tmp_path, capsys):
    from builder.cli import main

    onnx_path = _foreign_onnx(tmp_path / "foreign.onnx")
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n")
    assert (
        main(
            [
                "publish",
                "--onnx",
                str(onnx_path),
                "--name",
                "animals",
                "--labels",
                str(tmp_path / "labels.txt"),
                "--repository",
                str(tmp_path / "repo"),
            ]
        )
        == 0
    )
    config = model_config.parse((tmp_path / "repo" / "animals" / "config.pbtxt").read_text())
    spec = PreprocessSpec.from_parameters(config.parameters)
    assert (spec.image_size, spec.resize_size, spec.color_mode) == (224, 256, "RGB")
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert (config.inputs[0].name, config.outputs[0].name) == ("pixels", "scores")
    assert json.loads(config.parameters["labels"]) == ["cat", "dog", "bird"]


def test_an_unreadable_labels_file_is_a_one_line_error(tmp_path, capsys):
    from builder.cli import main

    onnx_path = _foreign_onnx(tmp_path / "foreign.onnx")
    assert (
        main(
            [
                "publish",
                "--onnx",
                str(onnx_path),
                "--name",
                "animals",
                "--labels",
                str(tmp_path / "nope.txt"),
                "--repository",
                str(tmp_path / "repo"),
            ]
        )
        == 2
    )
    assert "labels file" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_an_unreachable_triton_is_reported_after_the_version_is_safely_written(tiny_run, tmp_path):
    from stack.launcher import free_port

    with pytest.raises(PublishError, match="is published, but Triton at"):
        publish(
            tiny_run / "model.onnx",
            tmp_path / "repo",
            "digits",
            settings=PublishSettings(triton_url=f"127.0.0.1:{free_port()}"),
        )
    assert (tmp_path / "repo" / "digits" / "1" / "model.onnx").is_file()


def test_dynamic_batching_and_its_queue_are_set_from_the_command_line(tiny_run, tmp_path):
    from builder.cli import main

    repository = tmp_path / "repo"
    common = ["publish", "--onnx", str(tiny_run / "model.onnx"), "--repository", str(repository)]
    assert main([*common, "--name", "batched", "--max-queue-delay-us", "0", "--max-queue-size", "8"]) == 0
    batched = model_config.parse((repository / "batched" / "config.pbtxt").read_text()).dynamic_batching
    assert (batched.max_queue_delay_us, batched.max_queue_size) == (0, 8)
    assert main([*common, "--name", "unbatched", "--no-dynamic-batching"]) == 0
    assert model_config.parse((repository / "unbatched" / "config.pbtxt").read_text()).dynamic_batching is None


def test_onnx_runtime_spinning_is_a_model_parameter(tiny_run, tmp_path):
    from builder.cli import main

    repository = tmp_path / "repo"
    common = ["publish", "--onnx", str(tiny_run / "model.onnx"), "--repository", str(repository)]
    assert main([*common, "--name", "spinning", "--intra-op-spinning"]) == 0
    assert main([*common, "--name", "sleeping"]) == 0
    for name, value in (("spinning", "1"), ("sleeping", "0")):
        config = model_config.parse((repository / name / "config.pbtxt").read_text())
        assert config.parameters["onnxruntime.allow_spinning"] == value


def test_cpu_and_gpu_targets_get_their_own_instance_and_batching_defaults(tiny_run, tmp_path):
    from builder.cli import main

    repository = tmp_path / "repo"
    common = ["publish", "--onnx", str(tiny_run / "model.onnx"), "--repository", str(repository)]
    assert main([*common, "--name", "cpu"]) == 0
    assert main([*common, "--name", "gpu", "--target", "gpu"]) == 0
    assert main([*common, "--name", "one", "--instances", "1", "--intra-op-threads", "3"]) == 0
    assert main([*common, "--name", "waiting", "--max-queue-delay-us", "700"]) == 0
    expected = {
        "cpu": (2, "KIND_CPU", "0", (), 0),
        "gpu": (1, "KIND_GPU", None, (4, 8), 2000),
        "one": (1, "KIND_CPU", "3", (), 0),
        "waiting": (2, "KIND_CPU", "0", (), 700),
    }
    for name, (count, kind, threads, preferred, delay) in expected.items():
        config = model_config.parse((repository / name / "config.pbtxt").read_text())
        assert (config.instance_count, config.instance_kind) == (count, kind), name
        batching = config.dynamic_batching
        assert (batching.preferred_batch_sizes, batching.max_queue_delay_us) == (preferred, delay), name
        assert config.parameters.get("onnxruntime.intra_op_threads") == threads, name
        assert json.loads((repository / name / "1" / "build.json").read_text())["config"]["instance_count"] == count
    with pytest.raises(SystemExit) as exited:  # argparse: one usage line, exit code 2
        main([*common, "--name", "bad", "--intra-op-threads", "-1"])
    assert exited.value.code == 2 and not (repository / "bad").exists()
    with pytest.raises(PublishError, match="at least 1 instance"):
        PublishSettings(instance_count=0)


@pytest.mark.parametrize(
    ("requested", "instances", "cores", "threads"),
    [
        (0, 2, 2, 1),  # the default on this kind of machine: one core each
        (0, 1, 2, 2),  # a single instance takes every core
        (0, 2, 16, 8),
        (0, 3, 2, 1),  # more instances than cores: still one thread each
        (4, 2, 2, 4),  # asked for explicitly: as asked
    ],
)
def test_the_served_model_divides_the_cores_among_its_instances(monkeypatch, requested, instances, cores, threads):
    import importlib.util
    import types

    from builder.publish import BACKEND_MODEL

    # model.py imports Triton's backend utilities at the top; the arithmetic under test never touches them.
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location("served_model", BACKEND_MODEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.intra_op_threads(requested, instances, cores) == threads
    assert 1 <= module.usable_cores() <= (os.cpu_count() or 1)


def test_pixel_input_moves_the_normalization_into_the_published_model(tiny_run, tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort

    from builder.cli import main

    source = tiny_run / "model.onnx"
    before = source.read_bytes()
    assert (
        main(
            [
                "publish",
                "--onnx",
                str(source),
                "--name",
                "pixels",
                "--repository",
                str(tmp_path / "repo"),
                "--pixel-input",
            ]
        )
        == 0
    )
    assert source.read_bytes() == before  # the source file is never changed
    version_dir = tmp_path / "repo" / "pixels" / "1"
    config = model_config.parse((tmp_path / "repo" / "pixels" / "config.pbtxt").read_text())
    assert (config.inputs[0].name, config.inputs[0].data_type, config.inputs[0].dims) == ("input", "UINT8", (8, 8, 1))
    assert json.loads((version_dir / "build.json").read_text())["pixel_input"] is True
    spec = PreprocessSpec.from_parameters(config.parameters)
    published = onnx.load(str(version_dir / "model.onnx"))
    assert {p.key for p in published.metadata_props} >= {"preprocess", "labels"}

    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 8, 8, 1), dtype=np.uint8)
    normalized = (
        (pixels.transpose(0, 3, 1, 2) / 255.0 - np.array(spec.mean)[:, None, None]) / np.array(spec.std)[:, None, None]
    ).astype(np.float32)
    floats = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    eight_bit = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        eight_bit.run(None, {"input": pixels})[0], floats.run(None, {"input": normalized})[0], atol=1e-4
    )


def test_a_tensorrt_plan_cannot_take_pixels(tiny_run, tmp_path):
    from builder.publish import publish_plan

    with pytest.raises(PublishError, match="keeps the float input"):
        publish_plan(
            tmp_path / "model.plan",
            tiny_run / "model.onnx",
            tmp_path / "repo",
            "digits",
            settings=PublishSettings(target="gpu", pixel_input=True),
        )
    assert not (tmp_path / "repo").exists()


# ------------------------------------------------------------------ the GPU target: TensorRT through ONNX Runtime


def _tensorrt_engine_identity(model_path: Path) -> tuple[str, tuple]:
    """What ONNX Runtime's TensorRT provider names a cached engine by: the graph name, which is part of the
    engine's file name (`TensorrtExecutionProvider_TRTKernel_graph_<graph name>_<hash>_..._fp16.engine`), and
    TRTGenerateId's hash (tensorrt_execution_provider_utils.h): the model's *file name* (not its folder), the
    names of the graph inputs and initializers, the name of every node output, and the OS, ONNX Runtime, CUDA
    and TensorRT versions, which are the same for every version served by one Triton. No weight is hashed."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    hashed = (
        model_path.name,
        tuple(i.name for i in model.graph.input),
        tuple(i.name for i in model.graph.initializer),
        tuple(o for n in model.graph.node for o in n.output),
    )
    return model.graph.name, hashed


def test_gpu_versions_with_other_weights_never_share_a_tensorrt_engine(tiny_run, tmp_path):
    import numpy as np
    import onnxruntime as ort

    repository = tmp_path / "repo"
    other_weights = retrained(tiny_run / "model.onnx", tmp_path / "other_weights.onnx")
    settings = PublishSettings(target="gpu")
    versions = [
        publish(source, repository, "digits", settings=settings).version_dir
        for source in (tiny_run / "model.onnx", other_weights, tiny_run / "model.onnx")
    ]
    (first, first_hashed), (second, second_hashed), (again, _) = (
        _tensorrt_engine_identity(v / "model.onnx") for v in versions
    )
    assert first_hashed == second_hashed  # ONNX Runtime's hash alone cannot tell the two versions apart
    assert first != second  # the graph name, part of every engine's file name, does
    assert again == first  # the same weights published again reuse the engine already built
    (accelerator,) = model_config.parse((repository / "digits" / "config.pbtxt").read_text()).gpu_accelerators
    # A cache prefix would replace the graph name in the engine's file name (and is one for all versions).
    assert "trt_engine_cache_prefix" not in accelerator.parameters
    assert json.loads((versions[1] / "build.json").read_text())["tensorrt_graph_name"] == second
    # The renamed graph answers as its source does.
    images = np.random.default_rng(0).normal(size=(4, 1, 8, 8)).astype(np.float32)
    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"input": images}
    )[0]
    np.testing.assert_array_equal(run(versions[1] / "model.onnx"), run(other_weights))


def test_the_tensorrt_accelerator_builds_one_profile_from_batch_1_to_the_max_at_load(tiny_run, tmp_path, capsys):
    from builder.cli import main

    repository = tmp_path / "repo"
    common = ["publish", "--onnx", str(tiny_run / "model.onnx"), "--repository", str(repository), "--target", "gpu"]
    assert main([*common, "--name", "floats"]) == 0
    assert (
        main(
            [
                *common,
                "--name",
                "pixels",
                "--pixel-input",
                "--max-batch-size",
                "16",
                "--preferred-batch-sizes",
                "2",
                "4",
            ]
        )
        == 0
    )
    # The GPU's default preferred sizes (4, 8) that a smaller max batch cannot hold are left out.
    assert main([*common, "--name", "small", "--max-batch-size", "4"]) == 0
    expected = {
        "floats": ("input:1x1x8x8", "input:8x1x8x8", "input:32x1x8x8"),
        "pixels": ("input:1x8x8x1", "input:4x8x8x1", "input:16x8x8x1"),
        "small": ("input:1x1x8x8", "input:4x1x8x8", "input:4x1x8x8"),
    }
    for name, shapes in expected.items():
        config = model_config.parse((repository / name / "config.pbtxt").read_text())
        (accelerator,) = config.gpu_accelerators
        assert tuple(accelerator.parameters[f"trt_profile_{k}_shapes"] for k in ("min", "opt", "max")) == shapes, name
    assert model_config.parse(
        (repository / "small" / "config.pbtxt").read_text()
    ).dynamic_batching.preferred_batch_sizes == (4,)
    # Sizes asked for explicitly that exceed the max batch are refused with one line.
    capsys.readouterr()
    assert main([*common, "--name", "bad", "--max-batch-size", "8", "--preferred-batch-sizes", "4", "16"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "preferred batch sizes [16] exceed --max-batch-size 8" in line
    assert not (repository / "bad").exists()


@pytest.fixture(scope="module")
def fixed_batch_onnx(tiny_run, tmp_path_factory):
    """The tiny model exported with its batch axis fixed, at 1 and at 4."""
    from tests.onnx_variants import with_fixed_batch

    folder = tmp_path_factory.mktemp("fixed-batch")
    return {batch: with_fixed_batch(tiny_run / "model.onnx", folder / f"batch{batch}.onnx", batch) for batch in (1, 4)}


def test_inspect_reads_the_batch_axis(tiny_run, fixed_batch_onnx):
    assert inspect_onnx(tiny_run / "model.onnx").batch_size is None
    assert inspect_onnx(fixed_batch_onnx[1]).batch_size == 1
    assert inspect_onnx(fixed_batch_onnx[4]).batch_size == 4
    assert inspect_onnx(fixed_batch_onnx[4]).input_dims == (1, 8, 8)


def _config(onnx_path, **settings):
    from builder.publish import build_config, resolve_interface

    model, spec, labels = resolve_interface(onnx_path, None, None)
    return build_config("digits", model, spec, labels, PublishSettings(**settings))


def test_a_dynamic_batch_model_is_published_with_batching(tiny_run):
    config = _config(tiny_run / "model.onnx")
    assert config.max_batch_size == 32 and config.dynamic_batching is not None
    assert config.inputs[0].dims == (1, 8, 8) and config.outputs[0].dims == (10,)


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_a_fixed_batch_of_one_is_published_without_batching_and_the_batch_axis_in_its_dims(fixed_batch_onnx, target):
    config = _config(fixed_batch_onnx[1], target=target)
    assert config.max_batch_size == 0
    # The bounded queue stays (429s past it), without batches to form.
    assert config.dynamic_batching == model_config.DynamicBatching(
        preferred_batch_sizes=(), max_queue_delay_us=0, max_queue_size=64
    )
    assert config.inputs[0].dims == (1, 1, 8, 8) and config.outputs[0].dims == (1, 10)
    model_config.parse(model_config.render(config))  # Triton's own protobuf takes it


def test_a_fixed_batch_of_one_with_pixel_input_takes_one_image_of_pixels(fixed_batch_onnx, tmp_path):
    import numpy as np
    import onnxruntime as ort

    published = publish(fixed_batch_onnx[1], tmp_path / "repo", "pixels", settings=PublishSettings(pixel_input=True))
    config = model_config.parse((published.model_dir / "config.pbtxt").read_text())
    assert (config.max_batch_size, config.inputs[0].dims, config.inputs[0].data_type) == (0, (1, 8, 8, 1), "UINT8")
    session = ort.InferenceSession(str(published.version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 8, 8, 1]  # the graph says so too, not only the config
    assert session.run(None, {"input": np.zeros((1, 8, 8, 1), np.uint8)})[0].shape == (1, 10)


@pytest.mark.parametrize("settings", [{}, {"target": "gpu"}, {"pixel_input": True}])
def test_a_fixed_batch_above_one_is_refused_with_how_to_export_it(fixed_batch_onnx, tmp_path, settings):
    with pytest.raises(PublishError, match="fixed batch of 4.*dynamic batch axis") as refused:
        publish(fixed_batch_onnx[4], tmp_path / "repo", "digits", settings=PublishSettings(**settings))
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "repo").exists()


def test_the_cli_refuses_a_fixed_batch_above_one_in_one_line(fixed_batch_onnx, tmp_path, capsys):
    from builder.cli import main

    assert (
        main(
            ["publish", "--onnx", str(fixed_batch_onnx[4]), "--name", "digits", "--repository", str(tmp_path / "repo")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "dynamic batch axis" in err
    assert not (tmp_path / "repo").exists()


def _backend_module(monkeypatch):
    import importlib.util
    import types

    from builder.publish import BACKEND_MODEL

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location("served_model", BACKEND_MODEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("shape", "dtype", "problem"),
    [
        ((1, 1, 8, 8), "float32", None),
        ((3, 1, 8, 8), "float32", None),  # a dynamic batch axis takes any batch
        ((2, 1, 8, 8), "float32", "takes [1, 1, 8, 8]"),
        ((1, 1, 8, 9), "float32", "takes [N, 1, 8, 8]"),
        ((1, 8, 8), "float32", "shape [1, 8, 8]"),
        ((1, 1, 8, 8), "float64", "the model takes float32"),
        ((0, 1, 8, 8), "float32", "no images"),
    ],
)
def test_the_served_model_names_what_its_onnx_session_cannot_take(monkeypatch, shape, dtype, problem):
    import numpy as np

    module = _backend_module(monkeypatch)
    session_shape = (1, 1, 8, 8) if "takes [1" in (problem or "") else (None, 1, 8, 8)
    found = module.input_problem(np.zeros(shape, dtype), session_shape, np.dtype(np.float32))
    assert found is None if problem is None else problem in found


def test_versions_served_side_by_side_must_share_preprocessing_and_labels(tiny_run, tmp_path):
    repository, onnx_path = tmp_path / "repo", tiny_run / "model.onnx"
    both = PublishSettings(version_policy="all")
    publish(onnx_path, repository, "digits", settings=both)
    config_before = (repository / "digits" / "config.pbtxt").read_text()
    other_spec = PreprocessSpec(image_size=8, resize_size=8, mean=(0.9,), std=(0.1,), color_mode="L")
    with pytest.raises(PublishError, match="preprocess.mean"):
        publish(onnx_path, repository, "digits", spec=other_spec, settings=both)
    with pytest.raises(PublishError, match="labels differ"):
        publish(onnx_path, repository, "digits", labels=[f"class {i}" for i in range(10)], settings=both)
    # Nothing was written: version 1 alone, served with its own spec and labels.
    assert sorted(p.name for p in (repository / "digits").iterdir() if p.name.isdigit()) == ["1"]
    assert (repository / "digits" / "config.pbtxt").read_text() == config_before
    # The same interface may be served beside it, and a new spec may replace the model's when only the
    # newest version is served.
    assert publish(onnx_path, repository, "digits", settings=both).version == 2
    assert publish(onnx_path, repository, "digits", spec=other_spec).version == 3
    # A canary is served beside the version served now: the same rule, said of the canary.
    with pytest.raises(PublishError, match="a canary is served beside") as refused:
        publish(onnx_path, repository, "digits", settings=PublishSettings(canary_percent=10))
    assert "--version-policy" not in str(refused.value)


def test_two_publishes_racing_for_one_version_number_both_land_whole(tiny_run, tmp_path, monkeypatch):
    import threading

    import builder.publish as publish_module

    repository = tmp_path / "repo"
    publish(tiny_run / "model.onnx", repository, "digits")
    # Both runs have picked version 2 and staged it before either renames it into place.
    staged = threading.Barrier(2, timeout=60)
    real_stage = publish_module._stage_version

    def stage_then_wait(*args, **kwargs):
        real_stage(*args, **kwargs)
        staged.wait()

    monkeypatch.setattr(publish_module, "_stage_version", stage_then_wait)
    outcomes: list[object] = []

    def run(batch: int) -> None:
        try:
            outcomes.append(
                publish(tiny_run / "model.onnx", repository, "digits", settings=PublishSettings(max_batch_size=batch))
            )
        except Exception as e:  # noqa: BLE001 - the test reports whatever escaped
            outcomes.append(e)

    racers = [threading.Thread(target=run, args=(batch,)) for batch in (4, 8)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(120)
    assert all(not isinstance(o, Exception) for o in outcomes), outcomes
    assert sorted(o.version for o in outcomes) == [2, 3]
    model_dir = repository / "digits"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "3", "config.pbtxt", "labels.txt", "warmup"]
    for published in outcomes:
        assert sorted(p.name for p in published.version_dir.iterdir()) == ["build.json", "model.onnx", "model.py"]
        lineage = json.loads((published.version_dir / "build.json").read_text())
        assert lineage["version"] == published.version


def _listing(repository: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repository)): p.read_bytes() for p in sorted(repository.rglob("*")) if p.is_file()}


def _scored(tiny_run, tmp_path, accuracy: str | None, name: str) -> Path:
    return with_metadata(tiny_run / "model.onnx", tmp_path / f"{name}.onnx", val_accuracy=accuracy)


def test_a_model_recorded_worse_than_the_serving_one_is_refused_unless_forced(tiny_run, tmp_path, caplog):
    repository = tmp_path / "repo"
    publish(_scored(tiny_run, tmp_path, "1.0", "good"), repository, "digits")
    before = _listing(repository)
    worse = _scored(tiny_run, tmp_path, "0.1", "chance")
    with pytest.raises(PublishError, match=r"10.00%, 90.00 points below the 100.00% of version 1 of digits.*--force"):
        publish(worse, repository, "digits")
    assert _listing(repository) == before
    # Within the budget it goes ahead; forced, it goes ahead with a warning.
    assert publish(worse, repository, "digits", settings=PublishSettings(max_accuracy_drop=90)).version == 2
    publish(_scored(tiny_run, tmp_path, "1.0", "good"), repository, "digits")
    with caplog.at_level("WARNING", logger="builder.publish"):
        assert publish(worse, repository, "digits", settings=PublishSettings(force=True)).version == 4
    assert "publishing it anyway (--force)" in caplog.text
    assert json.loads((repository / "digits" / "4" / "build.json").read_text())["val_accuracy"] == 0.1


def test_a_worse_canary_is_published_with_a_warning_and_a_plain_publish_says_it_ends_the_rollout(
    tiny_run, tmp_path, caplog
):
    repository = tmp_path / "repo"
    publish(_scored(tiny_run, tmp_path, "1.0", "good"), repository, "digits")
    worse = _scored(tiny_run, tmp_path, "0.1", "chance")
    with caplog.at_level("WARNING", logger="builder.publish"):
        assert publish(worse, repository, "digits", settings=PublishSettings(canary_percent=10)).version == 2
    assert "90.00 points below" in caplog.text and "publishing it as a 10% canary beside it" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="builder.publish"):
        assert publish(_scored(tiny_run, tmp_path, "1.0", "good"), repository, "digits").version == 3
    assert "ends the rollout of version 2 (10%) beside version 1 of digits" in caplog.text


def test_a_plain_publish_during_a_rollout_is_compared_with_the_stable_version_not_the_canary(tiny_run, tmp_path):
    repository = tmp_path / "repo"
    publish(_scored(tiny_run, tmp_path, "1.0", "good"), repository, "digits")
    worse = _scored(tiny_run, tmp_path, "0.1", "chance")
    publish(worse, repository, "digits", settings=PublishSettings(canary_percent=10))  # version 2, on trial
    before = _listing(repository)
    # It would replace both versions: the one it falls short of is the stable version 1, whatever the canary.
    with pytest.raises(PublishError, match="90.00 points below the 100.00% of version 1"):
        publish(worse, repository, "digits")
    assert _listing(repository) == before


def test_a_model_without_a_recorded_accuracy_is_published_with_one_warning(tiny_run, tmp_path, caplog):
    repository = tmp_path / "repo"
    publish(tiny_run / "model.onnx", repository, "digits")
    with caplog.at_level("WARNING", logger="builder.publish"):
        assert publish(_scored(tiny_run, tmp_path, None, "elsewhere"), repository, "digits").version == 2
    warnings = [r.getMessage() for r in caplog.records if "accuracy" in r.getMessage()]
    assert len(warnings) == 1 and "this model records no validation accuracy" in warnings[0]


def _cli_publish(onnx_path: Path, repository: Path, *flags: str) -> int:
    """`builder publish`'s exit status (argparse exits on a bad flag; main returns on a refused model)."""
    from builder.cli import main

    argv = ["publish", "--onnx", str(onnx_path), "--name", "digits", "--repository", str(repository), *flags]
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


@pytest.mark.parametrize(
    "flags, message",
    [
        ((), "points below the 100.00% of version 1 of digits"),
        (("--max-accuracy-drop", "-1"), "--max-accuracy-drop: '-1' must be a finite number, 0 or more"),
        (("--max-accuracy-drop", "nan"), "--max-accuracy-drop: 'nan' must be a finite number"),
        (("--max-accuracy-drop", "ten"), "--max-accuracy-drop: 'ten' is not a number"),
        (("--force=yes",), "--force: ignored explicit argument 'yes'"),
    ],
)
def test_the_cli_refuses_a_worse_model_or_a_bad_budget_in_one_line_and_writes_nothing(
    tiny_run, tmp_path, capsys, flags, message
):
    repository = tmp_path / "repo"
    publish(_scored(tiny_run, tmp_path, "1.0", "good"), repository, "digits")
    before = _listing(repository)
    assert (_cli_publish(_scored(tiny_run, tmp_path, "0.5", "worse"), repository, *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert _listing(repository) == before
    assert _cli_publish(tmp_path / "worse.onnx", repository, "--force") == 0


def test_versions_are_warmed_with_validation_images_as_the_gateway_sends_them(tiny_run, tmp_path):
    from builder.data import load_dataset
    from server.preprocess import model_input

    repository = tmp_path / "repo"
    settings = PublishSettings(max_batch_size=8, preferred_batch_sizes=(2, 4), pixel_input=True)
    publish(tiny_run / "model.onnx", repository, "digits", settings=settings)
    config = model_config.parse((repository / "digits" / "config.pbtxt").read_text())
    assert [(s.name, s.batch_size) for s in config.warmup] == [
        ("image0_batch1", 1),
        ("image1_batch1", 1),
        ("image2_batch1", 1),
        ("image0_batch4", 4),
    ]
    spec = PreprocessSpec.from_parameters(config.parameters)
    digits = load_dataset("digits")
    for i, sample in enumerate(config.warmup[:3]):
        (warmup_input,) = sample.inputs.values()
        assert warmup_input.data_type == "UINT8" and warmup_input.dims == (8, 8, 1)
        expected = model_input(digits.val.image(i, "L"), spec, pixel_input=True).tobytes()
        assert (repository / "digits" / "warmup" / warmup_input.data_file).read_bytes() == expected


def test_without_a_dataset_versions_are_warmed_with_synthetic_data_and_a_warning(tiny_run, tmp_path, caplog):
    repository = tmp_path / "repo"
    elsewhere = with_metadata(tiny_run / "model.onnx", tmp_path / "elsewhere.onnx", dataset=None)
    with caplog.at_level("WARNING", logger="builder.publish"):
        published = publish(elsewhere, repository, "digits")
    assert "no images to warm digits up with (the model names no dataset" in caplog.text
    config = model_config.parse((repository / "digits" / "config.pbtxt").read_text())
    assert [s.name for s in config.warmup] == ["image0_batch1"]
    assert config.warmup[0].inputs["input"] == model_config.WarmupInput("FP32", (1, 8, 8), synthetic="zero_data")
    assert json.loads((published.version_dir / "build.json").read_text())["warmup"].startswith("zero_data")
    assert not (repository / "digits" / "warmup").exists()


def test_no_warmup_writes_no_samples(tiny_run, tmp_path):
    assert _cli_publish(tiny_run / "model.onnx", tmp_path / "repo", "--no-warmup") == 0
    assert model_config.parse((tmp_path / "repo" / "digits" / "config.pbtxt").read_text()).warmup == ()
    assert not (tmp_path / "repo" / "digits" / "warmup").exists()
