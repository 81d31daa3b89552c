"""`builder train --pretrained` over real epochs: the run starts from the weights file in the torch.hub cache,
records the weights' name, keeps the backbone frozen for its first epoch and then trains it at a tenth of
the classifier's learning rate. No network: the test writes the file torchvision's URL names into a
temporary TORCH_HOME (torch.hub checks a file's hash only while downloading it)."""

import json

import pytest
import torch
import torchvision

from builder.cli import main
from builder.models import pretrained_weights, weights_cache_file
from builder.train import train
from builder.train_config import TrainConfig
from tests.builds.test_train import separable_dataset

BACKBONE = ("layer1.0.conv1.weight", "layer3.1.bn2.running_mean", "layer4.1.conv2.weight")


@pytest.fixture
def cached_resnet18(tmp_path, monkeypatch) -> dict[str, torch.Tensor]:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    for name, buffer in model.named_buffers():  # statistics a fresh model does not have, to see them kept
        if name.endswith("running_mean"):
            buffer.normal_()
    state = model.state_dict()
    path = weights_cache_file(pretrained_weights("resnet18"))
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_a_pretrained_run_freezes_its_first_epoch_then_tunes_the_backbone_slower(tmp_path, cached_resnet18):
    run_dir = tmp_path / "run"
    seen: dict[int, dict] = {}

    def snapshot(record: dict) -> None:
        payload = torch.load(run_dir / "last.pt", weights_only=True)
        seen[record["epoch"]] = payload

    train(
        TrainConfig(dataset="separable", pretrained="DEFAULT", image_size=8, epochs=2, batch_size=8, out_dir=run_dir),
        separable_dataset(),
        on_epoch=snapshot,
    )
    first, second = seen[1]["model"], seen[2]["model"]
    assert all(torch.equal(first[name], cached_resnet18[name]) for name in BACKBONE)
    assert not any(torch.equal(second[name], cached_resnet18[name]) for name in BACKBONE)
    assert not torch.equal(first["fc.weight"], second["fc.weight"])
    head, backbone = seen[2]["resume"]["optimizer"]["param_groups"]
    assert backbone["initial_lr"] == pytest.approx(0.1 * head["initial_lr"])
    recipe = seen[2]["meta"]["recipe"]
    assert recipe["pretrained_weights"]["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert recipe["pretrained_weights"]["file"].endswith("hub/checkpoints/resnet18-f37072fd.pth")
    assert (recipe["freeze_epochs"], recipe["backbone_lr_scale"]) == (1, 0.1)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["pretrained"] == "DEFAULT" and config["pretrained_weights"]["weights"].startswith("ResNet18")
    assert config["preprocess"]["mean"] == [0.485, 0.456, 0.406]


def test_unknown_weights_on_the_command_line_are_one_line_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--arch", "resnet18", "--pretrained", "IMAGENET1K_V2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("builder train: error: --pretrained: ResNet18_Weights has no 'IMAGENET1K_V2'")
    assert not out.exists()
