"""Leave no hooks behind: a guard for code that registers hooks on a user's model.

Torch-Pruning's tracer and fvcore's counter register forward hooks on every module and
remove them when they finish. When they fail half-way (a shape error, Ctrl-C) the hooks
stay: every later forward keeps its outputs' ``grad_fn`` alive, and ``torch.save(model)``
fails on the hooks' local functions. :func:`no_new_hooks` removes, on every exit path,
every hook that appeared on any module while it was active, and leaves hooks that were
there before untouched.

Example::

    with no_new_hooks(model):
        run_something_that_registers_hooks(model)
    # model._forward_hooks etc. hold exactly what they held before
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

#: The per-module hook dictionaries of ``nn.Module`` (those that exist in this torch).
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_SIDE_DICTS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def hook_state(model: nn.Module) -> dict[tuple[int, str], tuple[int, ...]]:
    """The hook ids registered on every module of ``model`` (for comparisons in tests)."""
    state: dict[tuple[int, str], tuple[int, ...]] = {}
    for module in model.modules():
        for attr in HOOK_DICTS:
            hooks = getattr(module, attr, None)
            if hooks:
                state[(id(module), attr)] = tuple(hooks)
    return state


@contextlib.contextmanager
def no_new_hooks(model: nn.Module) -> Iterator[None]:
    """Remove every hook registered on ``model``'s modules while the block runs.

    Hooks present before the block stay, in their order. Modules that appear during the
    block are not touched; the modules present at entry are cleaned even if they were
    detached from the model meanwhile.
    """
    modules = list(model.modules())
    before = {id(m): {attr: set(getattr(m, attr, {}) or {}) for attr in HOOK_DICTS} for m in modules}
    try:
        yield
    finally:
        for module in modules:
            saved = before[id(module)]
            for attr in HOOK_DICTS:
                hooks = getattr(module, attr, None)
                if not hooks:
                    continue
                for key in [k for k in hooks if k not in saved[attr]]:
                    del hooks[key]
                    for side in _SIDE_DICTS:
                        extra = getattr(module, side, None)
                        if extra is not None and key in extra:
                            del extra[key]
