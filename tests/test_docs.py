"""The README's recipe reference matches the config dataclasses; every shipped recipe validates."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from csd_ray.config import load_recipe


def readme_recipe_reference(readme: str) -> str:
    """The README's recipe reference: from its first table title to the next section (or the end)."""
    heading = readme.index("## Recipe reference")
    start = readme.index("**`", heading)
    end = readme.find("\n## ", start)
    return readme[start:] if end == -1 else readme[start:end]


def test_readme_recipe_reference_is_the_whole_generated_text():
    # PYTHONPATH: this checkout's csd_ray, not whichever one is pip-installed.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ref = subprocess.run([sys.executable, str(REPO / "scripts" / "recipe_reference.py")], capture_output=True,
                         text=True, check=True, env=env).stdout
    readme = (REPO / "README.md").read_text()
    assert readme_recipe_reference(readme).strip() == ref.strip(), "regenerate: python scripts/recipe_reference.py"
    assert readme.count(ref.strip().splitlines()[0]) == 1  # no stale copy anywhere else either


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_recipe_validates(recipe):
    load_recipe(REPO / "recipes" / recipe)


def _leaves(tree, prefix=""):
    """{dotted.path: value} of a nested mapping; lists are leaves (a base's list is replaced whole)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else key))
    return out


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes" / "baselines").glob("*.yaml")))
def test_a_baseline_differs_from_its_base_only_where_it_says_so(recipe):
    """`base:` merges mappings key by key: a baseline keeps every key of recipes/local.yaml it does not set."""
    import yaml

    from csd_ray.schema import to_dict

    path = REPO / "recipes" / "baselines" / recipe
    own = yaml.safe_load(path.read_text())
    assert own.pop("base") == "../local.yaml"
    set_here = set(_leaves(own))
    mine, base = _leaves(to_dict(load_recipe(path))), _leaves(to_dict(load_recipe(REPO / "recipes" / "local.yaml")))
    changed = {k for k in mine.keys() | base.keys() if mine.get(k) != base.get(k)}
    assert changed <= set_here, sorted(changed - set_here)
    assert base["run.seed"] == mine["run.seed"] and mine["run.overlap_offpolicy"] is False  # kept from the base


def test_base_merges_nested_mappings_and_replaces_lists(tmp_path):
    (tmp_path / "parent.yaml").write_text(
        "run: {steps: 4, seed: 7}\n"
        "trainer: {lr: 0.5, betas: [0.8, 0.9], loss: {name: csd, params: {weights: [teacher, student], temperature: 2.0}}}\n")
    (tmp_path / "child.yaml").write_text(
        "base: parent.yaml\nrun: {steps: 6}\ntrainer: {betas: [0.5, 0.6], loss: {params: {temperature: 0.5}}}\n")
    r = load_recipe(tmp_path / "child.yaml")
    assert (r.run.steps, r.run.seed) == (6, 7)
    assert r.trainer.lr == 0.5 and list(r.trainer.betas) == [0.5, 0.6]
    assert r.trainer.loss.name == "csd"
    assert r.trainer.loss.params == {"weights": ["teacher", "student"], "temperature": 0.5}


def test_an_error_names_the_recipe_file_that_set_the_key(tmp_path):
    from csd_ray.schema import ConfigError

    (tmp_path / "parent.yaml").write_text("run:\n  steps: many\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrainer:\n  lr: fast\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(tmp_path / "child.yaml", ["trainer.lr=1e-4"])
    assert "parent.yaml:2" in str(err.value) and "run.steps" in str(err.value), str(err.value)
    with pytest.raises(ConfigError) as err:
        load_recipe(tmp_path / "child.yaml", ["run.steps=3"])
    assert "child.yaml:3" in str(err.value) and "trainer.lr" in str(err.value), str(err.value)
