"""The array group search gives exactly Torch-Pruning's own ``get_pruning_group``.

Oracle: Torch-Pruning itself, on the same traced graph, for every layer of models whose
graphs use every index mapping (concatenation, split / unbind, slices, flatten in both
directions, grouped-query ``expand``, depthwise convolutions, unwrapped parameters).
Items must come in the same order, with the same dependency objects, indices and root
indices.
"""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn

from models import CatNet, MHANet, QKVNet, TinyConvNet, conv_input, sequence_input
from transformer_models import BertLike, LlamaLike, token_ids
from weighttracker_core.graph.search import NO_ROOT, GroupSearch


class FlattenNet(nn.Module):
    """conv -> flatten -> linear (forward flatten from the conv, reverse from the linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


class SplitSliceNet(nn.Module):
    """``chunk``, channel slices and a ``cat`` of a slice with a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(2, 2, 1)
        self.merge = nn.Conv2d(10, 3, 1)

    def forward(self, x):
        y = self.stem(x)
        p, q = y.chunk(2, dim=1)
        return self.merge(torch.cat([self.a(p), self.b(q), self.c(y[:, 2:4])], dim=1))


class TokenNet(nn.Module):
    """A parameter used outside any layer (a cls token, unwrapped)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.token = nn.Parameter(torch.randn(1, 1, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        h = torch.cat([self.token.expand(h.shape[0], -1, -1), h], dim=1)
        return self.head(h[:, 0])


def _cases():
    return [
        ("tiny", TinyConvNet, conv_input),
        ("cat", CatNet, conv_input),
        ("flatten", FlattenNet, lambda: torch.randn(1, 3, 4, 4)),
        ("split_slice", SplitSliceNet, lambda: torch.randn(1, 3, 4, 4)),
        ("token", TokenNet, sequence_input),
        ("mha", MHANet, sequence_input),
        ("fused_qkv", QKVNet, sequence_input),
        ("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(), lambda: torch.randn(1, 3, 32, 32)),
        ("googlenet", lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False),
         lambda: torch.randn(1, 3, 64, 64)),
        ("llama_gqa", lambda: LlamaLike(layers=2), token_ids),
        ("llama_gqa_interleave", lambda: LlamaLike(layers=1, repeat="interleave", rope="interleaved"),
         token_ids),
        ("llama_mha_tied", lambda: LlamaLike(kv_heads=8, tie=True), token_ids),
        ("bert", BertLike, lambda: token_ids(vocab=50)),
    ]


@pytest.mark.parametrize("name,factory,inputs", _cases(), ids=[c[0] for c in _cases()])
def test_array_search_equals_torch_pruning(name, factory, inputs):
    torch.manual_seed(0)
    model = factory().eval()
    graph = tp.DependencyGraph().build_dependency(model, inputs(), verbose=False)
    search = GroupSearch(graph)
    roots = [m for m in graph.module2node if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    assert roots
    for module in roots:
        pruner = graph.get_pruner_of_module(module)
        n = pruner.get_out_channels(module)
        expected = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(n)))
        # after Torch-Pruning's own update: both see the same index mappings
        got = search.group(module, pruner.prune_out_channels, n)
        assert len(got) == len(expected), (name, module)
        for mine, theirs in zip(got.items, expected.items):
            assert mine.dep.target is theirs.dep.target
            assert mine.dep.handler == theirs.dep.handler
            assert mine.idxs.tolist() == list(theirs.idxs)
            roots_theirs = [NO_ROOT if r is None else r for r in theirs.root_idxs]
            assert mine.root_idxs.tolist() == roots_theirs


def test_root_dependency_of_a_depthwise_conv_uses_the_depthwise_function():
    model = torchvision.models.mobilenet_v2().eval()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 32, 32), verbose=False)
    depthwise = model.features[1].conv[0][0]
    group = GroupSearch(graph).group(depthwise, tp.prune_conv_out_channels, depthwise.out_channels)
    assert group[0].dep.handler == tp.pruner.function.prune_depthwise_conv_out_channels


def test_bound_stops_a_search():
    model = TinyConvNet().eval()
    graph = tp.DependencyGraph().build_dependency(model, conv_input(), verbose=False)
    calls = []

    def bound(root_dep, dep, n_deps, n_idxs):
        calls.append((dep.target.module, n_deps, n_idxs))
        if n_deps >= 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        GroupSearch(graph, bound).group(model.conv1, tp.prune_conv_out_channels, 8)
    assert calls[0] == (model.conv1, 0, 8) and [c[1] for c in calls] == [0, 1, 2]
