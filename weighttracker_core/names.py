"""Dotted names of modules and parameters: one way to join and split them.

``join_name("encoder.0", "attn.qkv")`` gives ``"encoder.0.attn.qkv"``; an empty part (the
model itself) is left out, so ``join_name("", "weight")`` is ``"weight"``.
``split_name("encoder.0.weight")`` gives ``("encoder.0", "weight")`` and
``split_name("weight")`` gives ``("", "weight")``.
"""

from __future__ import annotations

from typing import Any


def join_name(*parts: str) -> str:
    """The dotted name of ``parts``, skipping empty ones (the root module's name is ``""``)."""
    return ".".join(part for part in parts if part)


def split_name(name: str) -> tuple[str, str]:
    """``(owner, last)``: the module that holds ``name``'s attribute, and the attribute."""
    owner, _, last = name.rpartition(".")
    return owner, last


def owner_of(root: Any, name: str) -> tuple[Any, str]:
    """The submodule of ``root`` that holds ``name``'s last part, and that part.

    ``owner_of(model, "encoder.0.weight")`` gives ``(model.encoder[0], "weight")``.

    Raises:
        AttributeError: ``root`` has no such submodule.
    """
    owner, last = split_name(name)
    return (root.get_submodule(owner) if owner else root), last
