"""Reading pruner configs from plain dicts and YAML (shared by the pruners' attrs configs).

Two guards live here because every config passes through them:

* YAML is read with PyYAML's safe loader (no code runs) and its aliases (``*name``) may
  expand a document to at most :data:`MAX_YAML_NODES` nodes. A few hundred bytes of nested
  aliases can otherwise stand for billions of values; the expanded size is counted on the
  composed node graph, before any Python object is built.
* :func:`quote` is how error messages show a user's value: nested containers, long strings
  and big numbers are shortened, so a message stays readable whatever was passed.

No hook implementations here: this module is a helper, not a plugin.
"""

from __future__ import annotations

import os
import reprlib
from collections.abc import Iterator, Mapping
from typing import IO, Any

import attrs
import yaml

from weighttracker_core import ConfigError

#: Most nodes (scalars, lists, mappings) a YAML config may have once its aliases are
#: expanded, each counted once per place it appears. Documents without aliases are not
#: limited (their size is that of their text).
MAX_YAML_NODES = 100_000

#: Longest quote of a user value in an error message, in characters.
MAX_QUOTE = 200

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 8
_REPR.maxdict = 6
_REPR.maxstring = 80
_REPR.maxlong = 40
_REPR.maxother = 80


def is_ratio(value: Any) -> bool:
    """Whether ``value`` is an int or float (not a bool) in ``[0, 1]``."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= value <= 1.0


def quote(value: Any, limit: int = MAX_QUOTE) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters long.

    Containers are shortened while they are printed (``reprlib``), so quoting a value
    with millions of nested entries costs no more than quoting a short one.
    ``quote(list(range(100)))`` gives ``'[0, 1, 2, 3, 4, 5, 6, 7, ...]'``.
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__} object>"
    return shorten(text, limit)


def shorten(text: str, limit: int = MAX_QUOTE) -> str:
    """``text`` on one line (runs of whitespace become one space), cut to ``limit`` characters."""
    text = " ".join(text.split()) if "\n" in text else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_keys(owner: str, given: Mapping[str, Any], allowed: tuple[str, ...], noun: str = "key") -> None:
    """Refuse a key of ``given`` not in ``allowed``, naming it and every allowed one."""
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise ConfigError(
            f"Unknown {noun} {quote(unknown[0])} in {owner}; allowed {noun}s: {', '.join(allowed)}."
        )


def config_from_dict(cls: type, data: Any, owner: str, noun: str = "key") -> Any:
    """``cls(**data)`` after checking that ``data`` is a mapping of ``cls``'s fields."""
    if not isinstance(data, Mapping):
        hint = " (YAML text or a file path goes to from_yaml)" if isinstance(data, str) else ""
        raise ConfigError(f"{owner} must be built from a dict{hint}, got {quote(data)}.")
    check_keys(owner, data, tuple(f.name for f in attrs.fields(cls)), noun)
    return cls(**dict(data))


class YAMLSyntaxError(ConfigError):
    """A YAML config is not YAML at all (a syntax error), as opposed to YAML that is refused."""


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _children(node: yaml.Node) -> Iterator[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        yield from node.value
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield key
            yield value


def expanded_size(root: yaml.Node, where: str = "the YAML config") -> tuple[int, int]:
    """``(nodes once aliases are expanded, nodes written)`` of a composed YAML document.

    Linear in the written nodes: an alias shares its anchor's node, so every node's size is
    computed once (a depth-first walk with an explicit stack, so deep nesting cannot hit
    the recursion limit). The expanded size is capped a little above :data:`MAX_YAML_NODES`.
    Example: ``a: &x [1, 2]`` / ``b: [*x, *x]`` has 8 written nodes and 11 expanded ones.

    Raises:
        ConfigError: An anchor contains an alias to itself (its expansion is infinite).
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = min(1 + sum(sizes[id(child)] for child in _children(node)), MAX_YAML_NODES + 1)
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise ConfigError(
                f"{_cap(where)} has an anchor that contains an alias to itself (such as '&a [*a]', line "
                f"{node.start_mark.line + 1}); its expansion never ends. Write the value out instead."
            )
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    return sizes[id(root)], len(sizes)


def _parse(source: IO[str] | str, where: str) -> Any:
    loader = yaml.SafeLoader(source)
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as err:
            raise YAMLSyntaxError(f"{_cap(where)} is not valid YAML: {shorten(str(err), 400)}") from None
        if node is None:
            return None
        expanded, written = expanded_size(node, where)
        if expanded > MAX_YAML_NODES and expanded > written:
            raise ConfigError(
                f"{_cap(where)} expands to more than {MAX_YAML_NODES:,} nodes once its aliases (*name) "
                f"are resolved, from {written:,} written ones; such a document is refused before "
                "anything is built (a few nested aliases can stand for billions of values). Write "
                "the values out, or use fewer levels of aliases."
            )
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(
            f"{_cap(where)} nests lists or mappings too deeply to be read; flatten the document."
        ) from None
    finally:
        loader.dispose()


def _is_file(path: str) -> bool:
    try:
        return os.path.isfile(path)
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte, ...
        return False


def _exists(path: str) -> bool:
    try:
        return os.path.exists(path)
    except (OSError, ValueError):
        return False


def _read_file(path: str) -> Any:
    where = f"the YAML config file {quote(path)}"
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except FileNotFoundError:
        raise ConfigError(
            f"The YAML config file {quote(path)} does not exist (relative paths start at "
            f"{quote(os.getcwd())}). Pass the path of an existing file, an open stream or YAML text."
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{_cap(where)} is a directory; pass the path of a YAML file.") from None
    except OSError as err:
        raise ConfigError(f"Cannot read {where}: {err.strerror or err}.") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{_cap(where)} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    return _parse(text, where)


def load_yaml(source: IO[str] | str | os.PathLike[str]) -> Any:
    """The data of a YAML config given as a stream, a file path or YAML text.

    A stream (anything with ``read()``) is read; an ``os.PathLike`` is always a path; a
    ``str`` naming an existing file is that file. Any other ``str`` is YAML text, except
    that a one-line ``str`` that reads as a plain YAML string (``"missing.yaml"``,
    ``"C:/configs/run.yaml"``) is taken for a path and reported as a missing file.

    Raises:
        ConfigError: A missing or unreadable file, YAML syntax errors, an alias expansion
            over :data:`MAX_YAML_NODES` nodes, or an alias that contains itself.
    """
    if hasattr(source, "read"):
        return _parse(source, "the YAML stream")  # type: ignore[arg-type]
    if isinstance(source, os.PathLike):
        return _read_file(os.fspath(source))
    if not isinstance(source, str):
        raise ConfigError(
            f"A YAML config is a file path, an open stream or YAML text, got {quote(source)}."
        )
    if _is_file(source):
        return _read_file(source)
    if "\n" in source.strip():
        return _parse(source, "the YAML text")
    try:
        data = _parse(source, "the YAML text")
    except YAMLSyntaxError as err:
        if _exists(source):
            return _read_file(source)  # a directory or an unreadable file: say so
        raise YAMLSyntaxError(
            f"{quote(source)} is neither an existing file (relative paths start at "
            f"{quote(os.getcwd())}) nor valid YAML text: {err}"
        ) from None
    if data is not None and not isinstance(data, str):
        return data  # a one-line mapping, list or number: YAML text
    return _read_file(source)
