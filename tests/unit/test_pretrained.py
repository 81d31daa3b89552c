"""`--pretrained`: torchvision's weights enum and torch.hub cache, the head replaced, the weights' own
preprocessing, the fine-tuning recipe's settings, and the one-line failures (offline, unknown weights).

No network: a test writes a weights file into a temporary TORCH_HOME under the name torchvision's URL gives
it. torch.hub checks the SHA-256 prefix in that name only while it downloads; a file already in the cache is
read as it is, which is what lets a test's file (and a locally made stand-in) load.
"""

import os
import subprocess
import sys

import pytest
import torch
import torchvision
from torchvision.models import MobileNet_V3_Small_Weights, ResNet18_Weights, ResNet50_Weights

from builder.checkpoint import ModelMeta
from builder.data import load_dataset, resolve_spec
from builder.errors import BuilderError, TrainError
from builder.models import (
    create_model,
    fetch_pretrained,
    load_pretrained,
    parameter_groups,
    pretrained_weights,
    weights_cache_file,
    weights_name,
)
from builder.onnx_meta import onnx_metadata
from builder.schedules import create_scheduler
from builder.train import _spec_settings
from builder.train_config import TrainConfig

# A closed port on loopback as the proxy: any download fails at once, network or not.
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": ""}


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))  # torch.hub reads it on every call
    return home


def cache_weights(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's `arch`, randomly initialized, saved where its DEFAULT weights are cached."""
    torch.manual_seed(0)
    state = getattr(torchvision.models, arch)(weights=None).state_dict()
    path = weights_cache_file(pretrained_weights(arch))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_weights_are_torchvisions_enum_members():
    assert pretrained_weights("resnet18") is ResNet18_Weights.IMAGENET1K_V1
    assert pretrained_weights("resnet50", "IMAGENET1K_V1") is ResNet50_Weights.IMAGENET1K_V1
    assert weights_name(pretrained_weights("mobilenet_v3_small")) == "MobileNet_V3_Small_Weights.IMAGENET1K_V1"


def test_weights_the_architecture_does_not_have_are_named_with_the_choices():
    with pytest.raises(
        BuilderError, match="ResNet18_Weights has no 'IMAGENET1K_V2'; choose DEFAULT or one of IMAGENET1K_V1"
    ):
        pretrained_weights("resnet18", "IMAGENET1K_V2")


def test_an_architecture_without_published_weights_is_refused():
    # torchvision has weights for every builder the CLI offers; a name it has no weights enum for stands in.
    with pytest.raises(BuilderError, match="'tiny_cnn' has no published torchvision weights"):
        pretrained_weights("tiny_cnn")


def test_the_cache_file_is_torchvisions_name_under_torch_home(torch_home):
    assert weights_cache_file(ResNet18_Weights.IMAGENET1K_V1) == torch_home / "hub/checkpoints/resnet18-f37072fd.pth"


def test_cached_weights_load_into_all_but_the_new_head(torch_home):
    state = cache_weights("mobilenet_v3_small")
    weights = pretrained_weights("mobilenet_v3_small")
    model = create_model("mobilenet_v3_small", num_classes=6, image_size=224)
    report = load_pretrained(model, weights, fetch_pretrained(weights))
    own = model.state_dict()
    head = {"classifier.3.weight", "classifier.3.bias"}
    assert report.skipped == [] and report.loaded == len(state) - len(head)
    assert all(torch.equal(own[name], tensor) for name, tensor in state.items() if name not in head)
    assert own["classifier.3.weight"].shape == (6, 1024)


def test_the_head_is_replaced_even_for_1000_classes(torch_home):
    state = cache_weights("resnet18")
    weights = pretrained_weights("resnet18")
    model = create_model("resnet18", num_classes=1000, image_size=224)
    load_pretrained(model, weights, fetch_pretrained(weights))
    assert not torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])


def test_a_stem_changed_for_small_inputs_is_reported_skipped(torch_home):
    cache_weights("resnet18")
    weights = pretrained_weights("resnet18")
    report = load_pretrained(create_model("resnet18", num_classes=3, image_size=32), weights, fetch_pretrained(weights))
    assert [s.split(":")[0] for s in report.skipped] == ["conv1.weight"]


def test_fine_tuning_defaults_come_with_pretrained_weights():
    assert TrainConfig().fine_tuning() == (0, 1.0)
    assert TrainConfig(pretrained="DEFAULT").fine_tuning() == (1, 0.1)
    assert TrainConfig(pretrained="DEFAULT", freeze_epochs=0, backbone_lr_scale=0.5).fine_tuning() == (0, 0.5)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"pretrained": "DEFAULT", "init": "best.pt"}, "give one"),
        ({"freeze_epochs": -1}, "freeze_epochs"),
        ({"backbone_lr_scale": 0}, "backbone_lr_scale"),
    ],
)
def test_fine_tuning_settings_are_checked(settings, message):
    with pytest.raises(TrainError, match=message):
        TrainConfig(**settings)


def test_parameter_groups_put_the_head_first_at_the_full_rate():
    model = create_model("resnet18", num_classes=3, image_size=32)
    head, backbone = parameter_groups(model, lr=1e-2, backbone_scale=0.1)
    assert head["lr"] == 1e-2 and backbone["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in head["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    assert len(head["params"]) + len(backbone["params"]) == len(list(model.parameters()))


def test_onecycle_peaks_at_each_groups_own_rate():
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0},
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1},
    ]
    optimizer = torch.optim.SGD(groups, lr=1.0)
    scheduler = create_scheduler(optimizer, "onecycle", lr=1.0, epochs=4, steps_per_epoch=5, warmup_epochs=1)
    peaks = [0.0, 0.0]
    for _ in range(20):
        peaks = [max(p, g["lr"]) for p, g in zip(peaks, optimizer.param_groups, strict=True)]
        optimizer.step()
        scheduler.step()
    assert peaks == pytest.approx([1.0, 0.1])


def test_the_weights_preprocessing_replaces_measured_statistics():
    dataset = load_dataset("shapes:per_class=4")
    weights = pretrained_weights("resnet18")
    spec = resolve_spec(dataset, **_spec_settings(TrainConfig(pretrained="DEFAULT"), dataset, weights))
    assert (spec.image_size, spec.resize_size) == (224, 256)
    assert (spec.mean, spec.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    # Flags still win, and a smaller input keeps the weights' crop ratio.
    given = TrainConfig(pretrained="DEFAULT", image_size=112, mean=(0.5, 0.5, 0.5))
    spec = resolve_spec(dataset, **_spec_settings(given, dataset, weights))
    assert (spec.image_size, spec.resize_size, spec.mean) == (112, 128, (0.5, 0.5, 0.5))
    assert spec.std == (0.229, 0.224, 0.225)


def test_grayscale_data_gets_the_weights_average_statistics():
    dataset = load_dataset("digits")
    spec = resolve_spec(
        dataset, **_spec_settings(TrainConfig(pretrained="DEFAULT"), dataset, pretrained_weights("resnet18"))
    )
    assert spec.mean == pytest.approx((0.449,)) and spec.std == pytest.approx((0.226,))


def test_the_weights_name_travels_into_the_onnx_metadata():
    meta = ModelMeta(
        "resnet18",
        2,
        3,
        32,
        ("a", "b"),
        None,
        recipe={"pretrained_weights": {"weights": "ResNet18_Weights.IMAGENET1K_V1"}},
    )
    meta = meta.replace(preprocess=resolve_spec(load_dataset("shapes:per_class=4"), image_size=32))
    assert onnx_metadata(meta, None)["pretrained"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert "pretrained" not in onnx_metadata(meta.replace(recipe={}), None)


@pytest.mark.spawns
def test_offline_without_the_file_is_one_line_naming_where_to_put_it(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, **OFFLINE, "TORCH_HOME": str(tmp_path / "torch-home"), "PYTHONPATH": os.getcwd()}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "builder.cli",
            "train",
            "--arch",
            "mobilenet_v3_small",
            "--pretrained",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    expected = tmp_path / "torch-home/hub/checkpoints/mobilenet_v3_small-047dcff4.pth"
    assert last.startswith(
        "builder train: error: --pretrained: cannot download MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    )
    assert last.endswith(f"place that file at {expected}") and "Traceback" not in result.stderr
    assert not out.exists() and not expected.exists()
    assert MobileNet_V3_Small_Weights.IMAGENET1K_V1.url in last


@pytest.mark.parametrize("content", [b"not a weights file", "pickled object"])
def test_a_cached_file_that_is_not_a_state_dict_is_one_line(torch_home, tmp_path, content):
    weights = pretrained_weights("resnet18")
    path = weights_cache_file(weights)
    path.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:  # code in a pickle is refused, not run
        torch.save({"model": torch.nn.Identity()}, path)
    with pytest.raises(BuilderError, match=f"--pretrained: .*{path.name}") as caught:
        fetch_pretrained(weights)
    assert "\n" not in str(caught.value)
