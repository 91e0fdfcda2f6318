"""Shared test set-up: Ray binds loopback only, one Ray session per module that needs it."""

import os
from pathlib import Path

import pytest

os.environ.update(
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    RAY_USAGE_STATS_ENABLED="0",
    RAY_AUTH_MODE="disabled",
    TOKENIZERS_PARALLELISM="false",
    TORCH_COMPILE_DISABLE="1",
    WANDB_MODE="offline",
)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield ray
    ray.shutdown()


def smoke_recipe(tmp_path, *overrides):
    from csd_ray.config import load_recipe

    return load_recipe(REPO / "recipes" / "smoke.yaml", [f"run.output_dir={tmp_path}", *overrides])
