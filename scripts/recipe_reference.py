"""Print the recipe reference (markdown) from the config dataclasses' field docstrings.

    python scripts/recipe_reference.py   # pasted into README.md; tests/test_docs.py checks it is current
"""

from __future__ import annotations

import dataclasses
import typing

from csd_ray.config import Recipe
from csd_ray.schema import _type_name, field_docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default) if f.default is not None else "null"
    value = f.default_factory()  # type: ignore[misc]
    return "(section)" if dataclasses.is_dataclass(value) else repr(value)


def reference() -> str:
    lines: list[str] = []
    documented: set[type] = set()

    def section(cls: type, prefix: str) -> None:
        documented.add(cls)
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        nested = []
        rows = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else tp
            if dataclasses.is_dataclass(tp):
                nested.append((tp, f"{prefix}{f.name}"))
                continue
            if dataclasses.is_dataclass(inner):
                nested.append((inner, f"{prefix}{f.name}[]"))
            optional = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] if typing.get_origin(tp) is typing.Union else []
            if optional and optional[0] not in documented:  # an optional section (e.g. stages[].adaptive), once
                nested.append((optional[0], f"{prefix}{f.name}"))
            type_name = _type_name(tp).replace("|", "\\|")
            rows.append(f"| `{prefix}{f.name}` | {type_name} | `{_default(f)}` | {docs.get(f.name, '')} |")
        if rows:
            title = prefix.rstrip(".") or "(top level)"
            lines.extend([f"**`{title}`** — {(cls.__doc__ or '').strip().splitlines()[0]}", "",
                          "| key | type | default | meaning |", "| --- | --- | --- | --- |", *rows, ""])
        for sub, name in nested:
            section(sub, f"{name}.")

    section(Recipe, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference())
