"""Device choice in one place (issue 11, point 9): checked here even where no GPU exists."""

import tomllib

import pytest
import torch

from conftest import REPO, smoke_recipe
from csd_ray.devices import DeviceError, actor_env, process_group_backend, role_device


def test_a_role_with_gpus_runs_on_cuda_and_one_without_on_the_cpu():
    assert role_device(1, "teacher", cuda_available=True) == torch.device("cuda", 0)
    assert role_device(0.5, "sampler", cuda_available=True) == torch.device("cuda", 0)
    assert role_device(0, "teacher", cuda_available=True) == torch.device("cpu")
    with pytest.raises(DeviceError, match="teacher: placement.num_gpus=1 but CUDA is not available"):
        role_device(1, "teacher", cuda_available=False)


def test_collectives_use_nccl_on_cuda_and_gloo_on_the_cpu():
    assert process_group_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert process_group_backend("auto", torch.device("cpu")) == "gloo"
    assert process_group_backend("gloo", torch.device("cuda", 0)) == "gloo"


def test_compile_switches_stay_out_of_gpu_actors():
    assert actor_env(0)["TORCH_COMPILE_DISABLE"] == "1"
    assert "TORCH_COMPILE_DISABLE" not in actor_env(1)


@pytest.mark.parametrize("role", ["sampler", "teacher"])
def test_hf_roles_placed_on_gpus_go_to_the_gpu_or_refuse(tmp_path, role):
    """On this CPU machine a GPU placement cannot be honoured: the actor says so instead of running on the CPU."""
    from csd_ray.workers.sampler import HFSampler
    from csd_ray.workers.teacher import HFTeacher

    recipe = smoke_recipe(tmp_path, f"{role}.placement.num_gpus=1")
    cls = HFSampler if role == "sampler" else HFTeacher
    if torch.cuda.is_available():
        assert cls(recipe).model.device.type == "cuda"
    else:
        with pytest.raises(DeviceError, match=f"{role}: placement.num_gpus=1"):
            cls(recipe)


def test_the_vllm_requirement_admits_only_releases_whose_api_we_use():
    from packaging.requirements import Requirement

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (req,) = [Requirement(r) for r in extras["vllm"]]
    assert req.name == "vllm"
    assert all(req.specifier.contains(v) for v in ("0.32.0", "0.33.1"))
    assert not any(req.specifier.contains(v) for v in ("0.10.0", "0.31.2", "0.34.0"))
