"""unstructured_sparsity: exact, element-weighted zero fractions against direct counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _sparsity_cases import CASES, count_zeros, damage, gemm_weights
from models import TinyConvNet, conv_input
from weighttracker_core import ConfigError, TrackerType, WeightTracker


def _sparsity(tracker, **kwargs):
    return tracker.create_tracker("unstructured_sparsity", **kwargs).track()["unstructured_sparsity"]


def test_hand_worked_fraction_is_element_weighted():
    # Conv2d(2, 4, 2): 0 zeros of 32; Linear(4, 2): 3 zeros of 8.
    # sparsity = 3 / 40 = 0.075, whereas the mean of the layer fractions is 0.1875.
    model = nn.Sequential(nn.Conv2d(2, 4, 2), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 33.0).reshape(4, 2, 2, 2))
        model[2].weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 4.0, 5.0]]))
    tracker = WeightTracker(model, torch.randn(1, 2, 2, 2))
    out = _sparsity(tracker)
    assert out["sparsity"] == pytest.approx(3 / 40)
    assert out["num_zero_weights"] == 3 and out["num_weights"] == 40
    assert out["layers"] == {"0": 0.0, "2": pytest.approx(3 / 8)}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_direct_counts_after_damage(case):
    model, x, kwargs = CASES[case]()
    tracker = WeightTracker(model, x, **kwargs)
    damage(tracker, model, seed=3)
    out = _sparsity(tracker)
    weights = gemm_weights(model)
    small = case not in ("resnet18", "mobilenet_v2")
    zeros, total = count_zeros([t for ts in weights.values() for t in ts], loop=small)
    assert out["num_zero_weights"] == zeros
    assert out["num_weights"] == total
    assert out["sparsity"] == pytest.approx(zeros / total, rel=1e-12)
    assert zeros > 0
    assert set(out["layers"]) == set(weights)
    for name, tensors in weights.items():
        z, n = count_zeros(tensors)
        assert out["layers"][name] == pytest.approx(z / n, rel=1e-12), name


def test_normalisation_layers_only_when_included():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input(1))
    with torch.no_grad():
        model.bn1.weight[:3] = 0
        model.conv2.weight[0] = 0
    default = _sparsity(tracker)
    assert "bn1" not in default["layers"]
    assert default["num_zero_weights"] == 8 * 9
    by_type = _sparsity(tracker, include=[nn.BatchNorm2d])
    assert set(by_type["layers"]) == {"bn1", "bn2", "bn3"}
    assert by_type["num_zero_weights"] == 3 and by_type["num_weights"] == 8 + 8 + 16
    by_instance = _sparsity(tracker, include=[model.bn1, model.conv2])
    assert by_instance["layers"] == {"bn1": 3 / 8, "conv2": pytest.approx(72 / 576)}
    assert by_instance["sparsity"] == pytest.approx((3 + 72) / (8 + 576))


def test_include_subtree_and_ignore():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    tracker = WeightTracker(model, conv_input(1, 32))
    out = _sparsity(tracker, include=[model.layer1], ignore=[model.layer1[1]])
    assert set(out["layers"]) == {"layer1.0.conv1", "layer1.0.conv2"}
    # layer4 without its convolutions holds only batch norms, which are not counted
    with pytest.raises(ConfigError, match="normalization|weighted"):
        tracker.create_tracker("unstructured_sparsity", include=[model.layer4], ignore=[nn.Conv2d])


def test_include_that_selects_nothing_raises():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input(1))
    with pytest.raises(ConfigError, match="select"):
        tracker.create_tracker("unstructured_sparsity", include=[model.fc], ignore=[nn.Linear])
    with pytest.raises(ConfigError):
        tracker.create_tracker("unstructured_sparsity", include=[model.conv1], ignore=[model])


def test_tied_weights_count_once_in_the_total():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Tied()
    with torch.no_grad():
        model.a.weight[0] = 0
    tracker = WeightTracker(model, torch.randn(1, 4))
    out = _sparsity(tracker)
    assert out["num_weights"] == 16 and out["num_zero_weights"] == 4
    assert out["layers"] == {"a": 0.25, "b": 0.25}


def test_layers_can_be_turned_off_and_enum_works():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input(1))
    out = tracker.create_tracker(TrackerType.UNSTRUCTURED_SPARSITY, log_layerwise_stats=False).track()
    assert set(out["unstructured_sparsity"]) == {"sparsity", "num_zero_weights", "num_weights"}


def test_zero_counts_are_shared_between_trackers_in_one_track():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input(1))
    tracker.create_tracker("unstructured_sparsity")
    tracker.create_tracker("unstructured_sparsity", include=[model.conv2])
    before = tracker.graph.compute_counts["weight_param_zeros"]
    tracker.track()
    assert tracker.graph.compute_counts["weight_param_zeros"] == before + 1


def test_fused_and_plain_zero_counting_agree():
    from weighttracker_plugins.trackers._layers import count_nonzeros

    tensors = [torch.tensor([0.0, 1.0, -2.0]), torch.zeros(2, 2), torch.randn(3, 5, 7)]
    tensors[2][0, 0, :3] = 0
    expected = [2, 0, 105 - 3]
    assert count_nonzeros(tensors, fused=True).tolist() == expected
    assert count_nonzeros(tensors, fused=False).tolist() == expected


def test_stale_after_physical_prune():
    from weighttracker_core import StaleConsumerError

    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input(1))
    handle = tracker.create_tracker("unstructured_sparsity")
    tracker.prune_unit(1, 0)
    with pytest.raises(StaleConsumerError):
        handle.track()
    fresh = tracker.create_tracker("unstructured_sparsity").track()["unstructured_sparsity"]
    assert fresh["num_weights"] == sum(t.numel() for ts in gemm_weights(model).values() for t in ts)
