"""Training losses: class weights and the focal loss."""

import pytest
import torch
import torch.nn.functional as F

from builder.losses import LossError, focal_loss, inverse_frequency_weights, resolve_class_weights


def test_auto_class_weights_are_inverse_frequencies_with_mean_one():
    weights = inverse_frequency_weights([10, 20, 40])
    assert weights.tolist() == pytest.approx([4 / 7 * 3, 2 / 7 * 3, 1 / 7 * 3])
    assert weights.mean().item() == pytest.approx(1.0)
    assert torch.equal(resolve_class_weights("auto", [10, 20, 40]), weights)


def test_explicit_class_weights_are_used_and_their_count_is_checked():
    assert resolve_class_weights("1,2.5,3", [5, 5, 5]).tolist() == [1.0, 2.5, 3.0]
    assert resolve_class_weights("none", [5, 5]) is None
    with pytest.raises(LossError, match="2 value.*3 classes"):
        resolve_class_weights("1,2", [5, 5, 5])
    with pytest.raises(LossError, match="positive"):
        resolve_class_weights("1,0,2", [5, 5, 5])


@pytest.mark.parametrize("soft", [False, True])
def test_focal_loss_with_gamma_zero_is_cross_entropy(soft):
    torch.manual_seed(0)
    logits = torch.randn(16, 5)
    target = torch.softmax(torch.randn(16, 5), dim=1) if soft else torch.randint(0, 5, (16,))
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0])
    for kwargs in ({}, {"weight": weight}, {"label_smoothing": 0.1}, {"weight": weight, "label_smoothing": 0.1}):
        expected = F.cross_entropy(logits, target, **kwargs)
        assert focal_loss(logits, target, gamma=0.0, **kwargs) == pytest.approx(expected.item(), rel=1e-5), kwargs


def test_focal_loss_down_weights_easy_examples_more_than_hard_ones():
    easy, hard = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.5, 0.0, 0.3]])
    label = torch.tensor([0])

    def ratio(logits):
        return (focal_loss(logits, label, gamma=2.0) / F.cross_entropy(logits, label)).item()

    assert ratio(easy) < 0.01 < 0.2 < ratio(hard) < 1.0
