"""The README's recipe reference matches the config dataclasses; every shipped recipe validates."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from csd_ray.config import load_recipe


def test_readme_recipe_reference_is_current():
    # PYTHONPATH: this checkout's csd_ray, not whichever one is pip-installed.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ref = subprocess.run([sys.executable, str(REPO / "scripts" / "recipe_reference.py")], capture_output=True,
                         text=True, check=True, env=env).stdout
    assert ref.strip() in (REPO / "README.md").read_text(), "regenerate: python scripts/recipe_reference.py"


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_recipe_validates(recipe):
    load_recipe(REPO / "recipes" / recipe)
