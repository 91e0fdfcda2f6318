"""Device choice, in one place: which device a role's models, payloads and collectives use.

Every actor asks ``role_device`` with its own placement; the same function answers on a CPU test
machine (where a test can check the decision without a GPU) and on a GPU node. Ray gives an actor
with ``num_gpus > 0`` its own ``CUDA_VISIBLE_DEVICES``, so device 0 is always the right one.
"""

from __future__ import annotations

from typing import Optional

import torch


class DeviceError(RuntimeError):
    """A role asked for GPUs it cannot see; the message names the role."""


def role_device(num_gpus: float, role: str, cuda_available: Optional[bool] = None) -> torch.device:
    """``cuda:0`` for a role placed with GPUs, else ``cpu``.

    Raises DeviceError when the placement reserves GPUs but CUDA is not usable in the process
    (a CPU torch build on a GPU node would otherwise run a 7B teacher on the CPU for hours)."""
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if num_gpus > 0:
        if not available:
            raise DeviceError(f"{role}: placement.num_gpus={num_gpus:g} but CUDA is not available in this process "
                              "(CPU build of torch, or no GPU visible); set num_gpus: 0 to run it on the CPU")
        return torch.device("cuda", 0)
    return torch.device("cpu")


def process_group_backend(setting: str, device: torch.device) -> str:
    """The torch.distributed backend for a trainer group on ``device`` ('auto': nccl on CUDA, else gloo)."""
    if setting != "auto":
        return setting
    return "nccl" if device.type == "cuda" else "gloo"


def actor_env(num_gpus: float) -> dict[str, str]:
    """Environment of a role's actor process.

    ``TORCH_COMPILE_DISABLE`` keeps CPU actors from compiling (seconds of start-up for
    no gain at test sizes); GPU actors keep torch.compile, which vLLM's CUDA graphs rely on."""
    # Library progress bars (weight loading, shard writing) from N actors flood captured logs.
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    if num_gpus == 0:
        env["TORCH_COMPILE_DISABLE"] = "1"
    return env
