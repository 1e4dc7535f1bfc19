"""Reading Torch-Pruning's graph nodes: the autograd operation's name and output shape."""

from __future__ import annotations

from typing import Any


def grad_name(node: Any) -> str:
    """The autograd function's name of ``node`` (``"AddmmBackward0"``), or ``""``."""
    fn = node.grad_fn
    return fn.name() if fn is not None and hasattr(fn, "name") else ""


def op_name(node: Any) -> str:
    """:func:`grad_name` in lower case, for matching words such as ``"view"``."""
    return grad_name(node).lower()


def output_shape(grad_fn: Any) -> tuple[int, ...] | None:
    """The shape the autograd function ``grad_fn`` produced, when autograd recorded it."""
    meta = getattr(grad_fn, "_input_metadata", None)
    if not meta:
        return None
    try:
        return tuple(int(s) for s in meta[0].shape)
    except (AttributeError, TypeError, IndexError):
        return None
