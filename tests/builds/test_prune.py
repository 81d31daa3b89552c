import copy

import pytest
import torch
from torch import nn

from builder.checkpoint import load_model
from builder.models import count_macs_and_params, create_model
from builder.prune import PruneConfig, prune

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
    assert len(pruned.history) == 2 and meta.pruning["keep_ratio"] == 0.5


def test_pruned_checkpoint_holds_only_tensors_and_plain_data(pruned):
    payload = torch.load(pruned.checkpoint, weights_only=True)  # no pickled module
    assert set(payload) == {"model", "meta"} and payload["meta"]["layer_shapes"]["fc"]["out"] == 10


def test_a_pruned_checkpoint_reloads_to_the_outputs_of_the_network_pruning_made(tiny_run, tmp_path, monkeypatch):
    import builder.prune as prune_module

    saved = []
    real_save = prune_module.save_model

    def keep_a_copy(model, meta, output):
        saved.append(copy.deepcopy(model).eval())
        return real_save(model, meta, output)

    monkeypatch.setattr(prune_module, "save_model", keep_a_copy)
    result = prune(tiny_run / "best.pt", tmp_path / "pruned.pt", PruneConfig(keep_ratio=0.5, **QUICK))
    (in_memory,) = saved
    reloaded, _ = load_model(result.checkpoint)
    original, _ = load_model(tiny_run / "best.pt")
    batch = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(batch), in_memory(batch))
        # Pruned and fine-tuned: not the original network under another name.
        assert not torch.allclose(reloaded(batch), original.eval()(batch), atol=1e-3)


def test_uniform_l2_pruning_by_parameters_also_reaches_its_target(tiny_run, tmp_path):
    result = prune(
        tiny_run / "best.pt",
        tmp_path / "p.pt",
        PruneConfig(
            target="params", keep_ratio=0.7, importance="l2", scope="uniform", steps=1, increments=40, finetune_epochs=0
        ),
    )
    assert result.params_after <= 0.7 * result.params_before


def _untrained_checkpoint(path, arch: str) -> None:
    model = create_model(arch, num_classes=10, in_channels=1, image_size=16) if arch != "vit_b_16" else nn.Linear(1, 1)
    meta = {
        "arch": arch,
        "num_classes": 10,
        "in_channels": 1,
        "image_size": 16,
        "classes": [str(i) for i in range(10)],
        "config": {"dataset": "digits"},
    }
    torch.save({"model": model.state_dict(), "meta": meta}, path)


def test_mobilenet_v3_with_its_squeeze_excitation_blocks_prunes_and_reloads(tmp_path):
    _untrained_checkpoint(tmp_path / "best.pt", "mobilenet_v3_small")
    result = prune(
        tmp_path / "best.pt",
        tmp_path / "pruned.pt",
        PruneConfig(keep_ratio=0.5, steps=1, increments=40, finetune_epochs=0),
    )
    assert result.macs_after <= 0.5 * result.macs_before
    model, _ = load_model(result.checkpoint)
    assert count_macs_and_params(model, (1, 16, 16)) == (result.macs_after, result.params_after)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_an_architecture_the_pruner_cannot_handle_is_one_line_and_writes_nothing(tmp_path, capsys):
    from builder.cli import main

    _untrained_checkpoint(tmp_path / "best.pt", "vit_b_16")
    assert main(["prune", "--checkpoint", str(tmp_path / "best.pt")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("builder prune: error:") and "vit_b_16" in error and "\n" not in error
    assert not (tmp_path / "pruned.pt").exists()
