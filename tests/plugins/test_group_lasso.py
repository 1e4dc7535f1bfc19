"""group_lasso: value against brute-force loops, gradients, include/ignore, weighting."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from _lasso_oracle import brute_penalty
from models import CatNet, MHANet, QKVNet, TinyConvNet, conv_input, sequence_input
from weighttracker_core import ConfigError, RegularizerType, StaleConsumerError, WeightTracker


def _resnet18():
    model = torchvision.models.resnet18(num_classes=10)
    return model, torch.randn(1, 3, 32, 32), {"ignored_layers": [model.fc]}


def _mobilenet_v2():
    model = torchvision.models.mobilenet_v2(num_classes=10)
    return model, torch.randn(1, 3, 32, 32), {"ignored_layers": [model.classifier[1]]}


def _catnet():
    return CatNet(), conv_input(), {}


def _mhanet():
    return MHANet(), sequence_input(), {}


def _qkvnet_heads():
    model = QKVNet()
    return model, sequence_input(), {"num_heads": {model.attn.qkv: 4}, "prune_num_heads": True}


MODELS = {
    "resnet18": _resnet18,
    "mobilenet_v2": _mobilenet_v2,
    "catnet": _catnet,
    "mhanet": _mhanet,
    "qkvnet_heads": _qkvnet_heads,
}


def _randomize_norms(model):
    # BN/LN default to weight 1, bias 0; random affine parameters exercise every slice
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("weighting", ["sqrt_numel", "none"])
def test_value_matches_brute_force_loop(name, weighting):
    model, x, kwargs = MODELS[name]()
    _randomize_norms(model)
    tracker = WeightTracker(model, x, **kwargs)
    lasso = tracker.create_regularizer("group_lasso", weighting=weighting)
    value = lasso()
    expected = brute_penalty(model, tracker.groups, weighting=weighting)
    assert value.dim() == 0
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_hand_worked_linear():
    # Linear(2, 3) -> Linear(3, 1): unit j of the first layer owns W1[j, :], b1[j], W2[0, j]:
    # p_u = 2 + 1 + 1 = 4, so sqrt(p_u) = 2.
    #   unit 0: [3, 4], b 0, W2 0  -> norm 5        -> 2 * 5   = 10
    #   unit 1: [0, 0], b 0, W2 0  -> norm 0        -> 0
    #   unit 2: [1, 2], b 2, W2 4  -> norm sqrt(25)=5 -> 2 * 5 = 10
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 2.0]]))
        model[0].bias.copy_(torch.tensor([0.0, 0.0, 2.0]))
        model[2].weight.copy_(torch.tensor([[0.0, 0.0, 4.0]]))
    tracker = WeightTracker(model, torch.randn(1, 2), ignored_layers=[model[2]])
    assert [g.n_units for g in tracker.groups] == [3]
    assert tracker.create_regularizer("group_lasso")().item() == pytest.approx(20.0)
    assert tracker.create_regularizer("group_lasso", weighting="none")().item() == pytest.approx(10.0)


def test_enum_name_works():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    assert tracker.create_regularizer(RegularizerType.GROUP_LASSO)().item() > 0


@pytest.mark.parametrize("name", ["catnet", "mhanet", "qkvnet_heads"])
def test_gradient_matches_brute_force_autograd(name):
    model, x, kwargs = MODELS[name]()
    _randomize_norms(model)
    tracker = WeightTracker(model, x, **kwargs)
    params = [p for p in model.parameters()]
    value = tracker.create_regularizer("group_lasso")()
    grads = torch.autograd.grad(value, params, allow_unused=True)
    expected = torch.autograd.grad(brute_penalty(model, tracker.groups), params, allow_unused=True)
    for p, got, want in zip(params, grads, expected):
        if want is None:
            assert got is None or not got.any()
            continue
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-6)


def test_gradient_is_finite_at_exactly_zero_units():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input(), ignored_layers=[model.fc])
    group = next(g for g in tracker.groups if g.root_module == "conv3")
    tracker.fake_prune_units({group.id: [0, 3]})
    value = tracker.create_regularizer("group_lasso")()
    value.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    # the zero units' own elements get a zero (sub)gradient; others do not
    assert model.conv3.weight.grad[[0, 3]].abs().sum() == 0
    assert model.bn3.bias.grad[[0, 3]].abs().sum() == 0
    assert model.conv3.weight.grad[1].abs().sum() > 0


def test_all_zero_model_gives_zero_and_finite_gradient():
    model = TinyConvNet()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    tracker = WeightTracker(model, conv_input())
    value = tracker.create_regularizer("group_lasso")()
    value.backward()
    assert value.item() == 0.0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert torch.isfinite(model.conv1.weight.grad).all()


def test_same_value_twice_without_weight_change():
    model, x, kwargs = _resnet18()
    tracker = WeightTracker(model, x, **kwargs)
    lasso = tracker.create_regularizer("group_lasso")
    assert torch.equal(lasso(), lasso())


def test_value_follows_weight_changes():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    lasso = tracker.create_regularizer("group_lasso")
    before = lasso().item()
    with torch.no_grad():
        model.conv2.weight.mul_(2)
    assert lasso().item() > before
    assert lasso().item() == pytest.approx(brute_penalty(model, tracker.groups).item(), rel=1e-5)


def test_include_restricts_to_members_in_selected_layers():
    model, x, kwargs = _resnet18()
    tracker = WeightTracker(model, x, **kwargs)
    value = tracker.create_regularizer("group_lasso", include=[model.layer2])()
    expected = brute_penalty(model, tracker.groups, selected=lambda n: n.startswith("layer2."))
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_ignore_by_type_and_instance():
    model, x, kwargs = _resnet18()
    tracker = WeightTracker(model, x, **kwargs)
    value = tracker.create_regularizer("group_lasso", ignore=[nn.BatchNorm2d, model.layer4])()

    def selected(name):
        module = model.get_submodule(name)
        return not isinstance(module, nn.BatchNorm2d) and not name.startswith("layer4")

    expected = brute_penalty(model, tracker.groups, selected=selected)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_ignored_layers_get_no_gradient():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    tracker.create_regularizer("group_lasso", ignore=[model.conv2, model.bn2])().backward()
    assert model.conv2.weight.grad is None or not model.conv2.weight.grad.any()
    assert model.bn2.weight.grad is None or not model.bn2.weight.grad.any()
    assert model.conv3.weight.grad.abs().sum() > 0


def test_include_that_selects_nothing_is_an_error():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    with pytest.raises(ConfigError, match="selects no layer"):
        tracker.create_regularizer("group_lasso", include=[nn.LSTM])


def test_unknown_weighting_is_an_error():
    tracker = WeightTracker(TinyConvNet(), conv_input())
    with pytest.raises(ConfigError, match="weighting"):
        tracker.create_regularizer("group_lasso", weighting="sqrt")


def test_scalar_on_the_models_device_and_dtype():
    model = TinyConvNet().double()
    tracker = WeightTracker(model, conv_input().double())
    value = tracker.create_regularizer("group_lasso")()
    assert value.shape == () and value.dtype == torch.float64
    assert value.device == next(model.parameters()).device


@pytest.mark.gpu
def test_on_cuda_same_value_twice():
    model, x, kwargs = _resnet18()
    tracker = WeightTracker(model, x, **kwargs)
    expected = brute_penalty(model, tracker.groups)
    model.cuda()
    lasso = tracker.create_regularizer("group_lasso")
    value = lasso()
    assert value.device.type == "cuda"
    assert torch.equal(value, lasso())
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_stale_after_physical_prune():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input(), ignored_layers=[model.fc])
    lasso = tracker.create_regularizer("group_lasso")
    group = next(g for g in tracker.groups if g.root_module == "conv3")
    tracker.prune_unit(group.id, 0)
    with pytest.raises(StaleConsumerError):
        lasso()
    fresh = tracker.create_regularizer("group_lasso")()
    assert math.isclose(fresh.item(), brute_penalty(model, tracker.groups).item(), rel_tol=1e-5)
