"""The ``torchvision`` model source: random weights, nothing downloaded, clear errors."""

from __future__ import annotations

import pytest
import torch
import torchvision

from weighttracker_core import UnknownNameError, create_plugin_manager
from weighttracker_core.plugin import ModelSourceSpec
from weighttracker_core.registry import build_registries
from weighttracker_plugins.sources import torchvision as source


def _no_download(*args, **kwargs):
    raise AssertionError("the torchvision source must not download weights")


def test_registered_through_its_entry_point():
    registries = build_registries(create_plugin_manager(use_env=False))
    spec = registries.model_sources.get("torchvision")
    assert isinstance(spec, ModelSourceSpec)
    assert spec.load is source.load
    assert spec.default_input_shape == (1, 3, 224, 224)
    assert registries.model_sources.plugin_of("torchvision") == "torchvision_source"


@pytest.mark.parametrize("name, cls", [("resnet18", torchvision.models.ResNet),
                                       ("mobilenet_v2", torchvision.models.MobileNetV2)])
def test_builds_classification_models_with_random_weights(monkeypatch, name, cls):
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    first, second = source.load(name), source.load(name)
    assert type(first) is cls
    # random initialisation: two builds differ, so no checkpoint was loaded
    w1, w2 = next(first.parameters()), next(second.parameters())
    assert w1.shape == w2.shape and not torch.equal(w1, w2)
    with torch.no_grad():
        assert first.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_every_listed_name_is_a_torchvision_classification_model():
    names = source.available_models()
    assert "resnet18" in names and "vit_b_16" in names
    assert set(names) == set(torchvision.models.list_models(module=torchvision.models))
    assert "fasterrcnn_resnet50_fpn" not in names  # detection models return dicts


@pytest.mark.parametrize("name, close", [("resnet19", "resnet18"), ("mobilenetv2", "mobilenet_v2")])
def test_unknown_name_suggests_close_names(name, close):
    with pytest.raises(UnknownNameError) as info:
        source.load(name)
    message = str(info.value)
    assert f"no classification model named {name!r}" in message
    hint = message.split("Did you mean ")[1].split("?")[0]
    assert repr(close) in hint


def test_detection_model_is_refused_with_the_list():
    with pytest.raises(UnknownNameError, match="Available: alexnet, "):
        source.load("fasterrcnn_resnet50_fpn")
