"""Trainer -> sampler weight transfer strategies behind one interface.

* ``ObjectStoreTransfer``: trainer rank 0 gathers the full state dict into the Ray object store;
  each sampler loads it (hf sampler; a vLLM sampler reloads it in place through its worker
  extension). Works everywhere, CPU included.
* ``NCCLBroadcastTransfer``: GPU only; trainer rank 0 and the vLLM workers join one NCCL group
  and the tensors are broadcast without touching host memory (see csd_ray.workers.vllm_backend).

Every push carries a version number; samplers stamp it on the rollouts they produce.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import ray


class WeightTransfer(ABC):
    name: str

    @abstractmethod
    def push(self, trainers, samplers: list, version: int) -> list:
        """Send the trainers' current weights to every sampler; return refs that resolve once applied."""


class ObjectStoreTransfer(WeightTransfer):
    name = "object_store"

    def push(self, trainers, samplers: list, version: int) -> list:
        refs = trainers.call_async("full_state_dict")
        state_ref = refs[0]  # rank 0 holds the full dict; the others only took part in the gather
        ray.get(refs[1:])
        return [s.receive_weights.remote(state_ref, version) for s in samplers]


class NCCLBroadcastTransfer(WeightTransfer):
    name = "nccl"

    def push(self, trainers, samplers: list, version: int) -> list:
        refs = trainers.call_async("broadcast_weights", version)
        return refs + [s.receive_broadcast.remote(version) for s in samplers]


def make_transfer(recipe) -> WeightTransfer:
    gpu = recipe.trainer.placement.num_gpus > 0 and recipe.sampler.placement.num_gpus > 0
    if recipe.sampler.backend == "vllm" and gpu and recipe.sampler.weight_transfer == "nccl":
        return NCCLBroadcastTransfer()
    return ObjectStoreTransfer()
