"""Write docs/api.md, the API reference, from the docstrings of the public modules.

    python scripts/apidoc.py            # rewrite docs/api.md
    python scripts/apidoc.py --check    # exit 1 if docs/api.md is out of date

The sources are read with ``ast``, never imported, so the page is the same with or without
the optional dependencies (Lightning, TensorBoard, timm) installed. A module's public names
are its ``__all__`` (re-exports are followed to the module that defines them); a module
without ``__all__`` contributes its public top-level functions and classes.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "api.md"
COMMAND = "python scripts/apidoc.py"

#: Where each top-level package's sources live.
PACKAGES = {
    "weighttracker_core": ROOT / "weighttracker_core",
    "weighttracker_plugins": ROOT / "plugins" / "weighttracker_plugins",
    "weighttracker_timm": ROOT / "contrib_timm" / "weighttracker_timm",
    "weighttracker_transformers": ROOT / "contrib_transformers" / "weighttracker_transformers",
}

#: (module, one-line description), in page order.
MODULES = [
    ("weighttracker_core", "The user API: `WeightTracker`, errors, plugin managers."),
    ("weighttracker_core.plugin", "The plugin author's API: `hookimpl`, specs, contexts, protocols."),
    ("weighttracker_core.testing", "pytest fixtures for plugin authors (entry point `pytest11`)."),
    ("weighttracker_plugins.pruners.ranked", "The `ranked` pruner, its config and schedulers."),
    ("weighttracker_plugins.pruners.magnitude", "The `magnitude` pruner, its configs and schedulers."),
    ("weighttracker_plugins.training.tensorboard", "TensorBoard logging (needs `tensorboard` to create a writer)."),
    ("weighttracker_plugins.training.lightning", "The Lightning callback (needs `lightning`)."),
    ("weighttracker_timm", "timm attention heads (distribution `weighttracker-timm`)."),
    ("weighttracker_transformers", "Hugging Face models (distribution `weighttracker-transformers`)."),
    ("weighttracker_transformers.trainer", "The Hugging Face `Trainer` callback (needs `transformers`, `accelerate`)."),
]


def _path(module: str) -> Path:
    top, *rest = module.split(".")
    base = PACKAGES[top].joinpath(*rest)
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


class Module:
    """One parsed source file: definitions, imports and ``__all__``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = _path(name)
        self.tree = ast.parse(self.path.read_text(encoding="utf-8"))
        self.is_package = self.path.name == "__init__.py"
        self.defs: dict[str, ast.AST] = {}
        self.imports: dict[str, tuple[str, str]] = {}
        self.all: list[str] | None = None
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.defs[node.name] = node
            elif isinstance(node, ast.ImportFrom):
                source = self._absolute(node)
                for alias in node.names:
                    self.imports[alias.asname or alias.name] = (source, alias.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        if target.id == "__all__":
                            self.all = list(ast.literal_eval(node.value))
                        else:
                            self.defs[target.id] = node

    def _absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        parts = self.name.split(".")
        base = parts if self.is_package else parts[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def public(self) -> list[str]:
        if self.all is not None:
            return self.all
        return [n for n, d in self.defs.items() if not n.startswith("_")
                and isinstance(d, (ast.FunctionDef, ast.ClassDef))]


_CACHE: dict[str, Module] = {}


def load(name: str) -> Module:
    if name not in _CACHE:
        _CACHE[name] = Module(name)
    return _CACHE[name]


def resolve(module: Module, name: str) -> tuple[Module, ast.AST | None]:
    """The module that defines ``name`` and its node (``None`` for outside definitions)."""
    seen = set()
    while name not in module.defs and name in module.imports:
        source, original = module.imports[name]
        if source.split(".")[0] not in PACKAGES or (source, original) in seen:
            return module, None
        seen.add((source, original))
        try:
            module = load(source)
        except (OSError, SyntaxError):
            return module, None
        name = original
    return module, module.defs.get(name)


# ------------------------------------------------------------------------------ render


def _doc(node: ast.AST) -> str:
    doc = ast.get_docstring(node, clean=False) if isinstance(
        node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else None
    return inspect.cleandoc(doc) if doc else ""


def _fence(text: str) -> list[str]:
    return ["```text", text, "```", ""] if text else []


def _decorators(node: ast.AST) -> list[str]:
    return [ast.unparse(d) for d in getattr(node, "decorator_list", [])]


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef, drop_self: bool) -> str:
    args = node.args
    if drop_self and (args.posonlyargs or args.args):
        args = ast.arguments(posonlyargs=args.posonlyargs[1:] if args.posonlyargs else [],
                             args=args.args if args.posonlyargs else args.args[1:],
                             vararg=args.vararg, kwonlyargs=args.kwonlyargs,
                             kw_defaults=args.kw_defaults, kwarg=args.kwarg,
                             defaults=args.defaults)
    text = f"({ast.unparse(args)})"
    if node.returns is not None:
        text += f" -> {ast.unparse(node.returns)}"
    return text


def _short(value: ast.AST, limit: int = 100) -> str:
    text = " ".join(ast.unparse(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_attrs(node: ast.ClassDef) -> bool:
    return any(d.split("(")[0] in ("attrs.define", "attrs.frozen", "attrs.mutable", "define", "frozen")
               for d in _decorators(node))


def _inherited(node: ast.ClassDef, owner: Module | None) -> list[ast.AST]:
    """Methods of ``node``'s bases defined in our packages, not overridden by ``node``."""
    if owner is None:
        return []
    own = {item.name for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
    out: list[ast.AST] = []
    for base in node.bases:
        if not isinstance(base, ast.Name):
            continue
        _, base_node = resolve(owner, base.id)
        if isinstance(base_node, ast.ClassDef):
            out += [item for item in base_node.body
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name not in own]
    return out


def _class(name: str, node: ast.ClassDef, owner: Module | None = None) -> list[str]:
    bases = ", ".join(ast.unparse(b) for b in node.bases)
    init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    header = f"class {name}" + (_signature(init, True).split(" -> ")[0] if init else f"({bases})" if bases else "")
    out = [f"### `{header}`", ""]
    if bases and init:
        out += [f"Bases: `{bases}`", ""]
    out += _fence(_doc(node))
    fields = []
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) \
                and not item.target.id.startswith("_") and _is_attrs(node):
            default = f" = {_short(item.value)}" if item.value is not None else ""
            fields.append(f"- `{item.target.id}: {ast.unparse(item.annotation)}{default}`")
        elif isinstance(item, ast.Assign) and not _is_attrs(node):
            for target in item.targets:
                if isinstance(target, ast.Name) and target.id.isupper():
                    fields.append(f"- `{target.id} = {_short(item.value)}`")
    if fields:
        out += ["Fields:" if _is_attrs(node) else "Members:", "", *fields, ""]
    for item in [*node.body, *_inherited(node, owner)]:
        if not isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if item.name.startswith("_") and item.name != "__call__":
            continue
        decorators = _decorators(item)
        if "property" in decorators or any(d.endswith(".setter") for d in decorators):
            if any(d.endswith(".setter") for d in decorators):
                continue
            returns = f": {ast.unparse(item.returns)}" if item.returns is not None else ""
            out += [f"#### `{name}.{item.name}{returns}` (property)", ""]
        else:
            kind = " (class method)" if "classmethod" in decorators else \
                " (static method)" if "staticmethod" in decorators else ""
            drop = "staticmethod" not in decorators
            out += [f"#### `{name}.{item.name}{_signature(item, drop)}`{kind}", ""]
        out += _fence(_doc(item))
    return out


def render_name(module: Module, name: str) -> list[str]:
    owner, node = resolve(module, name)
    if node is None:
        source = module.imports.get(name, ("?", name))[0]
        return [f"### `{name}`", "", f"Re-exported from `{source}`.", ""]
    where = [] if owner is module else [f"Defined in `{owner.name}`.", ""]
    if isinstance(node, ast.ClassDef):
        lines = _class(name, node, owner)
        return lines[:2] + where + lines[2:]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        prefix = " (pytest fixture)" if any("fixture" in d for d in _decorators(node)) else ""
        return [f"### `{name}{_signature(node, False)}`{prefix}", "", *where, *_fence(_doc(node))]
    value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
    return [f"### `{name}`", "", *where, f"`{name} = {_short(value) if value is not None else '...'}`", ""]


def render() -> str:
    lines = [
        "# API reference",
        "",
        f"Generated from the docstrings by `{COMMAND}`; do not edit by hand (the test",
        "suite checks that this page is up to date). Everything listed here is public;",
        "anything else is internal and may change. Guides: [index.md](index.md).",
        "",
        "Modules:",
        "",
    ]
    lines += [f"- [`{name}`](#{name.replace('.', '')}): {summary}" for name, summary in MODULES]
    lines.append("")
    for name, summary in MODULES:
        module = load(name)
        lines += [f"## {name}", "", summary, ""]
        module_doc = ast.get_docstring(module.tree)
        if module_doc:
            lines += _fence(inspect.cleandoc(module_doc))
        for public in module.public():
            lines += render_name(module, public)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that docs/api.md is current")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            sys.stderr.write(f"docs/api.md is out of date; regenerate it with: {COMMAND}\n")
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
