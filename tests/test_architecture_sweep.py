"""Structure discovery on every torchvision classifier and the timm families that work.

Per model, at 64x64 (random weights, 10 classes): ``WeightTracker(model, x)`` builds, or
refuses with a weighttracker error naming the layer and the operation; a refusal that
names layers to add to ``ignored_layers`` is followed and the rest of the model must then
build. For every model that builds:

* random units of groups without norm coupling are fake-pruned, the model is pruned
  physically, and its outputs must equal the fake-pruned outputs (eval mode, relative
  1e-5). LayerNorm / GroupNorm / RMSNorm statistics change when channels go, so groups
  with one of them are checked for cost only; BatchNorm in eval mode is a fixed affine map
  and fine;
* before each physical prune, ``structured_bops`` of every counted layer must equal
  fvcore's MACs of that layer in the physically pruned model (times 32 x 32 bits);
* no bare Python exception escapes: a refusal is a ``WeightTrackerError``.

The small models run by default; the rest are marked ``slow`` and only run when
``WEIGHTTRACKER_SWEEP=all`` is set (the largest need several GB of memory):
``WEIGHTTRACKER_SWEEP=all nice python -m pytest -q tests/test_architecture_sweep.py``.
"""

from __future__ import annotations

import copy
import math
import os
import random
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from weighttracker_core import PruningError, WeightTracker, WeightTrackerError

from fvcore_oracle import fvcore_macs, no_mha_fastpath

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("fvcore.nn")

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
RUN_ALL = os.environ.get("WEIGHTTRACKER_SWEEP") == "all"


@dataclass(frozen=True)
class Case:
    """How to build one architecture and what to expect of it.

    ``refuses``: a regex the refusal must match (the model is not expected to build).
    ``options``: extra ``WeightTracker`` options given the built model (hooks, ...).
    ``fixed``: a regex; groups with a member whose name matches are not pruned (the
    model's forward hard-codes their width; the case says why).
    ``physical``: ``False`` when the forward hard-codes widths in many places (a
    ``reshape(B, N, C)`` to the input width after attention, a ``split`` by stored sizes):
    a physical prune may then be refused, and must leave the model exactly as it was.
    """

    build: Callable[[], nn.Module]
    size: int = 64
    refuses: str | None = None
    options: Callable[[nn.Module], dict[str, Any]] = field(default=lambda model: {})
    fixed: str | None = None
    physical: bool = True


# ------------------------------------------------------------------------------ the oracle


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with no_mha_fastpath(), torch.no_grad():
        out = model.eval()(x)
    return out.logits if hasattr(out, "logits") else out


def vivify(model: nn.Module, rng: random.Random) -> None:
    """Weights a parity test can see through: BatchNorm statistics and layer scales.

    Random BatchNorm statistics make eval-mode BN a non-trivial affine map; layer scales
    initialised to 1e-6 (ConvNeXt, CaiT, ...) would hide every change of a block, and a
    classifier initialised to zero (torchvision's ViT) every change of the model.
    """
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.running_mean.normal_(0, 0.1, generator=gen)
                module.running_var.uniform_(0.5, 1.5, generator=gen)
        for param in model.parameters():
            flat = param.detach().flatten()
            if flat.numel() > 1 and 0 < abs(float(flat[0])) <= 1e-4 and bool((flat == flat[0]).all()):
                param.uniform_(0.5, 1.5, generator=gen)
            elif param.dim() > 1 and not bool(flat.any()):  # a zero-initialised classifier
                param.normal_(0, param.shape[1] ** -0.5, generator=gen)


def grouping(model: nn.Module, group: Any) -> int:
    """How many equal blocks a removal must be spread over (grouped convs, GroupNorm)."""
    blocks = 1
    for member in group.members:
        module = model.get_submodule(member.module_name)
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not (
            module.groups == module.in_channels == module.out_channels
        ):
            blocks = math.lcm(blocks, module.groups)
        if isinstance(module, nn.GroupNorm):
            blocks = math.lcm(blocks, module.num_groups)
    return blocks


def choose(model: nn.Module, groups: list[Any], rng: random.Random, share: float = 0.5) -> dict[int, list[int]]:
    """Random units of about ``share`` of the groups: the same local units in every block."""
    eligible = []
    for group in groups:
        blocks = grouping(model, group)
        if group.n_units % blocks == 0 and group.n_units // blocks >= 2:
            eligible.append((group, blocks))
    picked = [e for e in eligible if rng.random() < share] or eligible[:1]
    request = {}
    for group, blocks in picked:
        size = group.n_units // blocks
        local = rng.sample(range(size), rng.randint(1, max(1, size // 2)))
        request[group.id] = sorted(b * size + u for b in range(blocks) for u in local)
    return request


def norm_coupled(group: Any) -> bool:
    return any(issubclass(m.module_type, NORMS) for m in group.members)


def check_prune(model: nn.Module, x: torch.Tensor, options: dict[str, Any], rng: random.Random,
                norms: bool, fixed: str | None = None, physical: bool = True) -> int:
    """One fake prune of groups with (``norms``) or without norm coupling, checked against
    the physical prune: outputs (without norms) and per-layer BOPs against fvcore."""
    tracker = WeightTracker(model, x, **options)
    groups = [g for g in tracker.groups if norm_coupled(g) == norms
              and not (fixed and any(re.search(fixed, m.module_name) for m in g.members))]
    request = choose(model, groups, rng)
    if not request:
        return 0
    dense = outputs(model, x)
    tracker.fake_prune_units(request)
    expected = outputs(model, x)
    assert not torch.equal(dense, expected), "the fake prune changed nothing: the check would be vacuous"
    layers = tracker.create_tracker("structured_bops", log_layerwise_stats=True).track()[
        "structured_bops"]["modules"]
    if not physical:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            report = tracker.prune_zero_units()
        except PruningError as err:
            assert "restored unchanged" in str(err)
            now = model.state_dict()
            assert now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())
            return 0
    else:
        report = tracker.prune_zero_units()
    assert report.num_units >= sum(len(u) for u in request.values())
    if not norms:
        got = outputs(model, x)
        scale = float(expected.abs().max())
        assert float((got - expected).abs().max()) <= 1e-5 * scale + 1e-7
    macs = fvcore_macs(model, x)
    for name, stats in layers.items():
        assert stats["bops"] == pytest.approx(macs.get(name, 0) * 32 * 32, rel=1e-6, abs=1e-6), name
    return report.num_units


ADVICE = re.compile(r"ignored_layers=\[([^\]]*)\]")


def check_model(case: Case, seed: int = 0) -> dict[str, Any]:
    """Build, or refuse (then follow the advice), then check; what happened, as a dict."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = case.build().eval()
    vivify(model, rng)
    x = torch.randn(2, 3, case.size, case.size)
    options = case.options(model)
    result: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untraced / uncovered layers are reported elsewhere
        try:
            WeightTracker(model, x, **options)
        except WeightTrackerError as err:
            result["refused"] = f"{type(err).__name__}: {err}"
            if case.refuses is None or not re.search(case.refuses, str(err)):
                raise
            advice = ADVICE.search(str(err))
            if advice is None:
                return result
            names = [n.strip()[len("model."):] for n in advice.group(1).split(",")]
            options = {**options, "ignored_layers": [model.get_submodule(n) for n in names]}
            WeightTracker(model, x, **options)  # following the advice builds the rest
            result["followed"] = len(names)
        else:
            assert case.refuses is None, f"expected a refusal matching {case.refuses!r}"
        result["groups"] = len(WeightTracker(model, x, **options).groups)
        for key, norms in (("units", False), ("norm_units", True)):
            result[key] = check_prune(model, x, options, rng, norms=norms, fixed=case.fixed,
                                      physical=case.physical)
    return result


# ------------------------------------------------------------------------------- the cases


def tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)


def _vit_sync(model: nn.Module) -> dict[str, Any]:
    # torchvision's ViT reshapes its patch embedding with the stored hidden_dim
    def sync(tracker: WeightTracker) -> None:
        tracker.model.hidden_dim = tracker.model.conv_proj.out_channels

    return {"post_prune_hooks": [sync]}


def _maxvit() -> nn.Module:
    # maxvit_t's layers and widths; partition size 2 fits 64x64 inputs (7 needs 224)
    return torchvision.models.MaxVit(
        input_size=(64, 64), stem_channels=64, partition_size=2, block_channels=[64, 128, 256, 512],
        block_layers=[2, 2, 5, 2], head_dim=32, stochastic_depth_prob=0.2, num_classes=10,
    )


SHUFFLE = r"channel shuffle \(view, TransposeBackward0, reshape\) feeds"
# the attention's fused to_qkv chunked along the last axis of 4-D windows, heads merged back
MAXVIT = r"A PermuteBackward0 before the flatten \(ViewBackward0\) that feeds .*attn_layer\.1\.merge"
SWIN = r"attn\.proj \(Linear\) is not called as a module"

TORCHVISION: dict[str, Case] = {}
for _name in torchvision.models.list_models(module=torchvision.models):
    if _name.startswith("vit_"):
        TORCHVISION[_name] = Case(tv(_name, image_size=64), options=_vit_sync)
    elif _name in ("googlenet", "inception_v3"):
        # Inception v3 needs at least 75x75 inputs
        TORCHVISION[_name] = Case(tv(_name, init_weights=False), size=75 if _name == "inception_v3" else 64)
    elif _name == "maxvit_t":
        # the attention reshapes its output to the width of its input (reshape(B, G, P, D)):
        # the residual stream cannot lose channels while to_qkv keeps all of its outputs
        TORCHVISION[_name] = Case(_maxvit, refuses=MAXVIT, fixed=r"attn_layer\.1\.to_qkv$")
    elif _name.startswith("shufflenet"):
        TORCHVISION[_name] = Case(tv(_name), refuses=SHUFFLE)
    elif _name.startswith("swin"):
        TORCHVISION[_name] = Case(tv(_name), refuses=SWIN)
    else:
        TORCHVISION[_name] = Case(tv(_name))

FAST = {
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet", "inception_v3",
    "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
    "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1",
    "swin_t", "vit_b_32",
}



# --------------------------------------------------------------------------------- timm


def tm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        try:
            return timm.create_model(name, pretrained=False, num_classes=10, img_size=64, **kwargs)
        except TypeError:  # no img_size: the model takes any input size
            return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    return build


# why each refused family is refused (docs/canonical-units.md, "Architectures")
HEAD_SPLIT = r"qkv(\.linear)?:prune_out_channels maps indices outside .*(proj|attn\.proj\.ln\.linear)"
HIDDEN_QKV = r"attn\.qkv \(Linear\) is not called as a module"
TIMM: dict[str, Case] = {
    # built and checked in full (the timm integration adds attention heads where it knows them)
    **{name: Case(tm(name)) for name in (
        "vit_tiny_patch16_224", "deit_tiny_patch16_224", "resnet18", "efficientnet_b0",
        "mobilenetv3_small_050", "convnext_atto", "regnetx_002", "ghostnet_050", "poolformer_s12",
        "mobilevit_xxs", "fastvit_t8", "repvit_m0_9", "hgnetv2_b0", "mobilenetv4_conv_small",
        "starnet_s1", "densenet121", "dla34", "sequencer2d_s",
    )},
    "swin_tiny_patch4_window7_224": Case(tm("swin_tiny_patch4_window7_224", window_size=4)),
    # refused, naming the operation; the advice is followed and the rest checked
    "levit_128s": Case(tm("levit_128s"), refuses=HEAD_SPLIT),
    "tiny_vit_5m_224": Case(tm("tiny_vit_5m_224"), refuses=HEAD_SPLIT),
    "beit_base_patch16_224": Case(tm("beit_base_patch16_224"), refuses=HIDDEN_QKV),
    "eva02_tiny_patch14_224": Case(tm("eva02_tiny_patch14_224"), refuses=HIDDEN_QKV),
    "maxvit_tiny_tf_224": Case(tm("maxvit_tiny_tf_224"), refuses=r"TransposeBackward0 before the flatten .* attn\.proj"),
    "edgenext_xx_small": Case(tm("edgenext_xx_small"), refuses=r"mlp\.fc2:prune_out_channels maps indices outside .*convs\.0"),
    "mambaout_femto": Case(tm("mambaout_femto"), refuses=r"input channels of stages\.0\.blocks\.0\.fc2 belong to a unit"),
    "mixer_s32_224": Case(tm("mixer_s32_224"), refuses=r"mlp_channels\.fc2:prune_out_channels maps indices outside .*mlp_tokens"),
    "pit_ti_224": Case(tm("pit_ti_224"), refuses=r"maps indices outside pos_embed"),
    "efficientvit_b0": Case(tm("efficientvit_b0"), refuses=r"qkv\.conv:prune_out_channels maps indices outside"),
    "caformer_s18": Case(tm("caformer_s18"), refuses=r"token_mixer\.qkv reach a consumer"),
    "rexnet_100": Case(tm("rexnet_100"), refuses=r"torch\.cat .* one tensor along two paths"),
    "resnest14d": Case(tm("resnest14d"), refuses=r"TransposeBackward0 before the flatten .* conv3"),
    "gcvit_xxtiny": Case(tm("gcvit_xxtiny"), refuses=r"expand \(ExpandBackward0\) that feeds .* repeat of key/value heads"),
    "focalnet_tiny_srf": Case(tm("focalnet_tiny_srf"), refuses=r"chunks of SplitWithSizesBackward0 feed"),
    "hiera_tiny_224": Case(tm("hiera_tiny_224"), refuses=r"attn\.qkv reach a consumer"),
    # built; their forwards hard-code widths, so physical prunes may be refused (cleanly)
    "cait_xxs24_224": Case(tm("cait_xxs24_224"), refuses=r"attn\.qkv:prune_out_channels maps indices outside .*proj_l", physical=False),
    "xcit_nano_12_p16_224": Case(tm("xcit_nano_12_p16_224"), refuses=r"chunks of UnbindBackward0 feed", physical=False),
    "pvt_v2_b0": Case(tm("pvt_v2_b0"), physical=False),
    "res2net50_14w_8s": Case(tm("res2net50_14w_8s"), refuses=r"conv1:prune_out_channels maps indices outside .*convs\.0", physical=False),
    "coat_lite_mini": Case(tm("coat_lite_mini"), refuses=r"chunks of UnbindBackward0 feed", physical=False),
    "twins_svt_small": Case(tm("twins_svt_small"), refuses=r"expand \(ExpandBackward0\)", physical=False),
    "nest_tiny": Case(tm("nest_tiny"), refuses=r"PermuteBackward0 before the flatten", physical=False),
    "davit_tiny": Case(tm("davit_tiny"), refuses=r"attn\.qkv reach a consumer", physical=False),
    "volo_d1_224": Case(tm("volo_d1_224"), refuses=r"attn\.qkv reach a consumer", physical=False),
}
TIMM_FAST = {"deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "ghostnet_050", "dla34",
             "levit_128s"}


def _params(cases: dict[str, Case], fast: set[str]) -> list[Any]:
    slow = [pytest.mark.slow, pytest.mark.skipif(not RUN_ALL, reason="set WEIGHTTRACKER_SWEEP=all")]
    return [pytest.param(name, id=name, marks=() if name in fast else slow) for name in cases]


@pytest.mark.parametrize("name", _params(TORCHVISION, FAST))
def test_torchvision_classifier(name):
    check_model(TORCHVISION[name])


@pytest.mark.parametrize("name", _params(TIMM, TIMM_FAST))
def test_timm_family(name):
    pytest.importorskip("timm")
    check_model(TIMM[name])
