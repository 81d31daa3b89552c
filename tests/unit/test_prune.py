import pytest
import torch
from torch import nn

from builder.errors import CheckpointError
from builder.evaluate import count_macs_and_params
from builder.models import create_model
from builder.prune import PruneConfig, PruneError, load_model, prune

QUICK = dict(steps=2, finetune_epochs=0.05, increments=40)


@pytest.fixture(scope="module")
def pruned(tiny_run, tmp_path_factory):
    output = tmp_path_factory.mktemp("pruned") / "pruned.pt"
    return prune(tiny_run / "best.pt", output, PruneConfig(keep_ratio=0.5, **QUICK))


def test_pruning_reaches_the_mac_target_with_a_physically_smaller_network(pruned, tiny_run):
    assert pruned.macs_after <= 0.5 * pruned.macs_before
    assert pruned.params_after < pruned.params_before
    model, meta = load_model(pruned.checkpoint)
    assert count_macs_and_params(model, (1, 8, 8)) == (pruned.macs_after, pruned.params_after)
    original, _ = load_model(tiny_run / "best.pt")
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    original_widths = [m.out_channels for m in original.modules() if isinstance(m, nn.Conv2d)]
    assert sum(widths) < sum(original_widths)
    assert all(w % 8 == 0 for w in widths)  # --round-to 8
    assert len(pruned.history) == 2 and meta["pruning"]["keep_ratio"] == 0.5


def test_pruned_checkpoint_holds_only_tensors_and_plain_data_and_reloads_to_the_same_outputs(pruned):
    payload = torch.load(pruned.checkpoint, weights_only=True)  # no pickled module
    assert set(payload) == {"model", "meta"} and payload["meta"]["layer_shapes"]["fc"]["out"] == 10
    first, _ = load_model(pruned.checkpoint)
    second, _ = load_model(pruned.checkpoint)
    batch = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(first(batch), second(batch))
        assert first(batch).shape == (3, 10)


def test_uniform_l2_pruning_by_parameters_also_reaches_its_target(tiny_run, tmp_path):
    result = prune(tiny_run / "best.pt", tmp_path / "p.pt",
                   PruneConfig(target="params", keep_ratio=0.7, importance="l2", scope="uniform", steps=1, increments=40,
                               finetune_epochs=0))
    assert result.params_after <= 0.7 * result.params_before


def test_an_architecture_the_pruner_cannot_handle_is_refused_with_the_choices(tmp_path):
    model = create_model("mobilenet_v3_small", num_classes=10, in_channels=1, image_size=8)
    meta = {"arch": "mobilenet_v3_small", "num_classes": 10, "in_channels": 1, "image_size": 8,
            "classes": [str(i) for i in range(10)], "config": {"dataset": "digits"}}
    torch.save({"model": model.state_dict(), "meta": meta}, tmp_path / "best.pt")
    with pytest.raises(PruneError, match="'mobilenet_v3_small' cannot be pruned here; prunable: resnet18"):
        prune(tmp_path / "best.pt", tmp_path / "pruned.pt")
    assert not (tmp_path / "pruned.pt").exists()


@pytest.mark.parametrize("settings, message", [
    ({"keep_ratio": 1.5}, "between 0 and 1"), ({"importance": "l3"}, "l1, l2"),
    ({"scope": "local"}, "global, uniform"), ({"target": "flops"}, "macs, params"),
])
def test_bad_prune_settings_name_the_valid_choices(settings, message):
    with pytest.raises(PruneError, match=message):
        PruneConfig(**settings)


def test_a_file_that_is_not_a_checkpoint_is_a_checkpoint_error(tmp_path):
    (tmp_path / "x.pt").write_text("nope")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "x.pt")
