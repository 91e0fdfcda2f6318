"""Recipe plumbing (csd_ray.schema): typed conversion, locations, overrides and their exact messages."""

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from csd_ray.schema import ConfigError, Located, apply_override, build, deep_merge, load_yaml, to_dict


@dataclass
class Inner:
    """A section."""

    n: int = 1
    """A count."""


@dataclass
class Outer:
    """Top."""

    flag: bool = False
    count: int = 0
    rate: float = 0.5
    name: str = "x"
    mode: Literal["sync", "async"] = "sync"
    maybe: Optional[int] = None
    items: list[float] = field(default_factory=list)
    pair: tuple[int, ...] = (1, 2)
    extra: dict = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    inners: list[Inner] = field(default_factory=list)


def _build(data):
    located = Located("r.yaml")
    located.where.update({k: f"r.yaml:{i + 1}" for i, k in enumerate(["flag", "count", "rate", "name", "mode"])})
    return build(Outer, data, located)


def test_values_convert_by_annotation():
    o = _build({"flag": True, "count": 3, "rate": "1e-4", "name": "n", "mode": "async", "maybe": None,
                "items": [1, 2.5], "pair": [3, 4], "extra": {"a": 1}, "inner": {"n": 5}, "inners": [{"n": 6}, {}]})
    assert (o.flag, o.count, o.rate, o.name, o.mode, o.maybe) == (True, 3, 1e-4, "n", "async", None)
    assert o.items == [1.0, 2.5] and isinstance(o.items[0], float) and o.pair == (3, 4)
    assert o.extra == {"a": 1} and o.inner == Inner(5) and o.inners == [Inner(6), Inner(1)]
    assert _build({"maybe": 4}).maybe == 4 and _build({"rate": 2}).rate == 2.0
    assert to_dict(o)["inners"] == [{"n": 6}, {"n": 1}] and to_dict(o)["pair"] == [3, 4]


@pytest.mark.parametrize("data, message", [
    ({"flag": "yes"}, "r.yaml:1: flag: expected true or false, got 'yes'"),
    ({"count": True}, "r.yaml:2: count: expected an integer, got True"),
    ({"count": 1.5}, "r.yaml:2: count: expected an integer, got 1.5"),
    ({"rate": "fast"}, "r.yaml:3: rate: expected a number, got 'fast'"),
    ({"rate": False}, "r.yaml:3: rate: expected a number, got False"),
    ({"name": 3}, "r.yaml:4: name: expected a string, got 3"),
    ({"mode": "asyn"}, "r.yaml:5: mode: expected one of 'sync', 'async', got 'asyn' (did you mean 'async'?)"),
    ({"mode": "zzz"}, "r.yaml:5: mode: expected one of 'sync', 'async', got 'zzz'"),
    ({"maybe": "a"}, "r.yaml: maybe: expected an integer, got 'a'"),
    ({"items": 3}, "r.yaml: items: expected list of float, got 3"),
    ({"items": [1, "b"]}, "r.yaml: items[1]: expected a number, got 'b'"),
    ({"extra": [1]}, "r.yaml: extra: expected a mapping, got [1]"),
    ({"inner": 3}, "r.yaml: inner: expected a mapping (section), got 3"),
    ({"inner": {"nn": 1}}, "r.yaml: inner.nn: unknown key 'nn' in section 'inner'; did you mean 'n'? (known: n)"),
    ({"cuont": 1}, "r.yaml: cuont: unknown key 'cuont' in the recipe; did you mean 'count'? (known: flag, count, rate, "
                   "name, mode, maybe, items, pair, extra, inner, inners)"),
    ({"zzzzzz": 1}, "r.yaml: zzzzzz: unknown key 'zzzzzz' in the recipe (known: flag, count, rate, name, mode, maybe, "
                    "items, pair, extra, inner, inners)"),
])
def test_conversion_errors_are_exact(data, message):
    with pytest.raises(ConfigError) as err:
        _build(data)
    assert str(err.value) == message


def test_overrides_and_locations(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("run:\n  steps: 3\n  sub:\n    deep: 1\ntrainer: {lr: 0.1}\n")
    data, located = load_yaml(path)
    assert located.of("run.sub.deep") == f"{path}:4" and located.of("run.sub.deep.x") == f"{path}:4"
    assert located.of("trainer.lr") == f"{path}:5" and located.of("nothing") == str(path)
    apply_override(data, located, "run.sub.deep=[1, 2]")
    apply_override(data, located, "new.section.key= 5")
    apply_override(data, located, "run.name=")
    apply_override(data, located, "run.tag=[unclosed")
    assert data["run"]["sub"]["deep"] == [1, 2] and data["new"] == {"section": {"key": 5}}
    assert data["run"]["name"] == "" and data["run"]["tag"] == "[unclosed"
    assert located.of("run.sub.deep") == "override 'run.sub.deep=[1, 2]'"
    with pytest.raises(ConfigError, match=r"^override 'run.steps.x=1': cannot set 'run.steps.x': 'run.steps' is not a section or a list$"):
        apply_override(data, located, "run.steps.x=1")
    with pytest.raises(ConfigError, match=r"^override 'run' must look like key.path=value$"):
        apply_override(data, located, "run")


def test_yaml_errors_point_at_the_start_of_the_broken_construct(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("run:\n  steps: [2,\n  x: 1\n\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert str(err.value).startswith(f"{path}:2: invalid YAML: ")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list.yaml: a recipe must be a mapping of sections, got list$"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml")[0] == {}
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="recipes extend each other in a cycle"):
        load_yaml(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: 3\n")
    with pytest.raises(ConfigError, match="'base' must be the path of another recipe, got 3"):
        load_yaml(tmp_path / "c.yaml")


def test_deep_merge_does_not_touch_its_inputs():
    base, over = {"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"b": 3}, "l": [2], "n": {"x": 1}}
    assert deep_merge(base, over) == {"a": {"b": 3, "c": 2}, "l": [2], "n": {"x": 1}}
    assert base == {"a": {"b": 1, "c": 2}, "l": [1]}


def test_type_names_in_messages_and_the_reference():
    from typing import Union

    from csd_ray.schema import _type_name

    assert _type_name(Literal["a", "b"]) == "'a' | 'b'"
    assert _type_name(Optional[int]) == "int" and _type_name(Union[int, str]) == "int or str"
    assert _type_name(list) == "list" and _type_name(list[Inner]) == "list of mapping (section)"
    assert _type_name(dict[str, int]) == "mapping" and _type_name(Inner) == "mapping (section)"
    assert _type_name(float) == "float"


def test_an_override_changes_only_the_key_it_names_when_the_yaml_shares_a_value_by_anchor(tmp_path):
    """recipes/methods/distillm.yaml gives both stages one loss through a YAML anchor (&loss/*loss):
    overriding stage 1's loss must leave stage 0's as written."""
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - loss: &loss {name: srkl, params: {skew: 0.1}}\n  - loss: *loss\n")
    data, located = load_yaml(path)
    apply_override(data, located, "stages.1.loss.params.skew=0.3")
    assert [s["loss"]["params"]["skew"] for s in data["stages"]] == [0.1, 0.3]
    from csd_ray.config import recipe_from_dict

    loss = {"name": "srkl", "params": {"skew": 0.1}}
    recipe = recipe_from_dict({"stages": [{"steps": 1, "loss": loss}, {"steps": 1, "loss": loss}]},
                              ["stages.1.loss.params.skew=0.3"])
    assert [s.loss.params["skew"] for s in recipe.stages] == [0.1, 0.3] and loss["params"]["skew"] == 0.1
