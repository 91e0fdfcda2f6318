"""Dataclass <-> YAML plumbing for recipes: typed loading, line numbers, overrides, clear errors.

Configs are plain dataclasses (``csd_ray.config``); this module turns a YAML mapping into them
field by field, checking types from the annotations and remembering the YAML line of every key
so that a bad value is reported as ``file:line: key.path: expected X, got Y``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A recipe problem, with where it is and what was expected."""

    def __init__(self, message: str, key: str = "", source: str = "") -> None:
        self.key, self.source, self.detail = key, source, message
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key + ': ' if key else ''}{message}")


class Located:
    """Maps dotted key paths to 'file:line' (or the override that set them)."""

    def __init__(self, file: str = "") -> None:
        self.file = file
        self.where: dict[str, str] = {}

    def of(self, key: str) -> str:
        while key:
            if key in self.where:
                return self.where[key]
            key = key.rpartition(".")[0]
        return self.file

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, key=key, source=self.of(key))


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_yaml(path: Path, _seen: tuple = ()) -> tuple[dict, Located]:
    """Read a recipe, following its ``base:`` (a recipe it extends, relative path) and recording
    the file and line of every key."""
    data, located = _load_one(path)
    base = data.pop("base", None)
    located.where.pop("base", None)
    if base is None:
        return data, located
    if not isinstance(base, str):
        raise ConfigError(f"'base' must be the path of another recipe, got {base!r}", source=str(path))
    base_path = (path.parent / base).resolve()
    if base_path in _seen:
        raise ConfigError(f"recipes extend each other in a cycle: {' -> '.join(map(str, _seen + (base_path,)))}")
    base_data, base_located = load_yaml(base_path, _seen + (path.resolve(),))
    base_located.where.update(located.where)
    base_located.file = located.file
    return deep_merge(base_data, data), base_located


def _load_one(path: Path) -> tuple[dict, Located]:
    """Read one recipe file, recording the line of every key."""
    located = Located(str(path))
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"recipe file not found: {path}") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Point at where the broken construct starts (e.g. an unclosed '['), not at end of file.
        problem_mark, context_mark = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
        mark = context_mark or problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        detail = getattr(exc, "problem", None) or str(exc)
        if context_mark is not None and problem_mark is not None and problem_mark.line != context_mark.line:
            detail += f" ({exc.context} started here; the problem shows at line {problem_mark.line + 1})"
        raise ConfigError(f"invalid YAML: {detail}", source=f"{path}{line}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe must be a mapping of sections, got {type(data).__name__}", source=str(path))
    data = unshared(data)  # a YAML alias (*loss) is one object with its anchor: an override would change both

    def walk(n: yaml.Node, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                located.where[key] = f"{path}:{key_node.start_mark.line + 1}"
                walk(value_node, key)

    if node is not None:
        walk(node, "")
    return data, located


def unshared(tree: Any) -> Any:
    """A copy of a tree of mappings and lists in which no mapping or list appears twice (unlike
    ``copy.deepcopy``, which keeps shared parts shared), so that setting one key changes one place."""
    if isinstance(tree, dict):
        return {k: unshared(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unshared(v) for v in tree]
    return tree


def _canonical(parts: list[str]) -> str:
    """['stages', '1', 'steps'] -> 'stages[1].steps' (how errors name list items)."""
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _lookup(tree: Any, parts: list[str]) -> tuple[bool, Any]:
    """(found, value) at a dotted path through mappings and (by index) lists."""
    for part in parts:
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return False, None
    return True, tree


def apply_override(data: dict, located: Located, override: str, defaults: Optional[dict] = None) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the raw recipe mapping.

    A numeric part indexes a list (``stages.1.steps=50``). A section or list the recipe leaves out
    is first copied from ``defaults`` (the plain-data form of the default recipe), so
    ``batch.sources.0.probability=0.5`` works on a recipe that never wrote ``batch.sources``.
    """
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key.path=value")
    key, _, raw = override.partition("=")
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    source = f"override {override!r}"
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        here = _canonical(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"cannot set '{key}': '{_canonical(parts[:i])}' is a list; index it by number",
                                  source=source)
            if int(part) >= len(node):
                raise ConfigError(f"cannot set '{key}': '{_canonical(parts[:i])}' has {len(node)} entries "
                                  f"(indices 0-{len(node) - 1}), got index {part}", source=source)
            child = node[int(part)]
        else:
            child = node.get(part)
            if child is None:
                found, default = _lookup(defaults or {}, parts[: i + 1])
                child = copy.deepcopy(default) if found and isinstance(default, (dict, list)) else {}
                node[part] = child
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"cannot set '{key}': '{here}' is not a section or a list", source=source)
        node = child
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"cannot set '{key}': '{_canonical(parts[:-1])}' has {len(node)} entries "
                              f"(indices 0-{len(node) - 1})", source=source)
        node[int(last)] = value
    else:
        node[last] = value
    located.where[_canonical(parts)] = source


_REFERENCE = re.compile(r"\$\{([^{}]*)\}")


def resolve_references(data: dict, located: Located, defaults: Optional[dict] = None) -> None:
    """Replace ``${section.key}`` in string values, in place, OmegaConf-style.

    A value that is exactly one reference takes the referenced value with its type
    (``eval_every: ${run.checkpoint_every}`` is an int); a reference inside a longer string is
    pasted as text (``output_dir: runs/${run.name}``). References see the recipe after overrides,
    then the defaults; chains resolve, cycles and unknown keys are refused with the key that holds
    the reference. ``$${...}`` stays literal as ``${...}``.
    """

    def resolve(value: Any, key: str, stack: tuple[str, ...]) -> Any:
        if isinstance(value, dict):
            return {k: resolve(v, f"{key}.{k}" if key else str(k), stack) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, f"{key}[{i}]", stack) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value

        def target(ref: str) -> Any:
            ref = ref.strip()
            parts = ref.replace("[", ".").replace("]", "").split(".")
            if ref in stack:
                raise located.error(key, f"'${{{ref}}}' refers back to itself ({' -> '.join(stack + (ref,))})")
            for tree in (data, defaults or {}):
                found, got = _lookup(tree, parts)
                if found:
                    return resolve(got, _canonical(parts), stack + (ref,))
            known = sorted(located.where) + sorted(_paths(defaults or {}))
            close = difflib.get_close_matches(ref, known, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise located.error(key, f"'${{{ref}}}' names no recipe key{hint}")

        escaped = value.replace("$${", "\0")
        whole = _REFERENCE.fullmatch(escaped)
        if whole:
            return target(whole.group(1))
        out = _REFERENCE.sub(lambda m: str(target(m.group(1))), escaped)
        return out.replace("\0", "${")

    resolved = resolve(data, "", ())
    data.clear()
    data.update(resolved)


def _paths(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return []
    out = []
    for k, v in tree.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        out += [path, *_paths(v, path)]
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping (section)"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str, located: Located) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own message names the key inside (a section's field, a choice)
            return _convert(options[0], value, key, located)
        for arg in options:
            try:
                return _convert(arg, value, key, located)
            except ConfigError:
                pass
        raise located.error(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise located.error(key, f"expected one of {', '.join(map(repr, choices))}, got {value!r}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise located.error(key, f"expected a mapping (section), got {value!r}")
        return build(tp, value, located, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise located.error(key, f"expected {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{key}[{i}]", located) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise located.error(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise located.error(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise located.error(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise located.error(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise located.error(key, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def build(cls: type, data: dict, located: Located, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            where = f"section '{prefix}'" if prefix else "the recipe"
            raise located.error(path, f"unknown key '{key}' in {where}{hint} (known: {', '.join(fields)})")
        kwargs[key] = _convert(hints[key], value, path, located)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise located.error(prefix, str(exc)) from None
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain YAML-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def field_docs(cls: type) -> dict[str, str]:
    """Per-field docstrings (the string literal right after each field), for docs and --help."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


