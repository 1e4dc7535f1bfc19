"""``wt_register_attention_layouts()``: a plugin declares how its attention class forms heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weighttracker_core import AttentionLayout, ConfigError, WeightTracker
from weighttracker_core.plugin import AttentionLayoutRule, hookimpl


class FourHeads(nn.Module):
    """Separate q/k/v/o projections, 4 heads of width 2, head split written by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8) for _ in range(4))

    @property
    def num_heads(self) -> int:
        return self.q_proj.out_features // 2

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        q, k, v = (p(h).view(b, t, -1, 2).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Rules:
    def __init__(self, layout=None) -> None:
        self.layout = layout or (lambda m: AttentionLayout(
            q_proj=m.q_proj, k_proj=m.k_proj, v_proj=m.v_proj, o_proj=m.o_proj, num_heads=m.num_heads))

    @hookimpl
    def wt_register_attention_layouts(self):
        return (AttentionLayoutRule(name="test_four_heads", module_types=(FourHeads,), layout=self.layout),)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), FourHeads(), nn.Linear(8, 3)).eval()


def test_a_rule_declares_the_heads_and_a_head_prunes_physically():
    model, x = _model(), torch.randn(1, 5, 4)
    tracker = WeightTracker(model, x, plugins=[Rules()], prune_num_heads=True)
    layout = tracker.structure.layouts["1.q_proj"]
    assert (layout.num_heads, layout.head_dim, layout.source) == (4, 2, "attention_layouts")
    heads = next(g for g in tracker.groups if str(g.kind) == "head")
    assert heads.n_units == 4
    tracker.fake_prune_unit(heads.id, 1)
    expected = model(x)
    tracker.prune_zero_units()
    # oracle: head 1 is positions 2..3 of q, k and v and columns 2..3 of o
    assert [model[1].q_proj.out_features, model[1].o_proj.in_features] == [6, 6]
    torch.testing.assert_close(model(x), expected)


def test_a_rule_returning_no_layout_is_refused_naming_the_rule():
    with pytest.raises(ConfigError, match="test_four_heads"):
        WeightTracker(_model(), torch.randn(1, 5, 4), plugins=[Rules(lambda m: "four")], prune_num_heads=True)
