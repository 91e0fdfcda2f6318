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
    """GPU: trainer rank 0 is NCCL rank 0; sampler i's vLLM worker is rank 1 + i (one GPU per engine)."""

    name = "nccl"

    def __init__(self) -> None:
        self.ready = False

    def _setup(self, trainers, samplers: list) -> None:
        addr, port = ray.get(trainers.ranks[0].address.remote())
        world = 1 + len(samplers)
        # Both sides block in the rendezvous, so they are started together.
        refs = [s.init_broadcast.remote(addr, port, world, 1 + i) for i, s in enumerate(samplers)]
        ray.get(refs + trainers.call_async("init_weight_broadcast", addr, port, world))
        self.ready = True

    def push(self, trainers, samplers: list, version: int) -> list:
        if not self.ready:
            self._setup(trainers, samplers)
        names, dtype_names, shapes = ray.get(trainers.ranks[0].weight_metadata.remote())
        receive = [s.receive_broadcast.remote(version, names, dtype_names, shapes) for s in samplers]
        return trainers.call_async("broadcast_weights") + receive


def make_transfer(recipe) -> WeightTransfer:
    """The recipe's strategy (validation already tied 'nccl' to vllm samplers and GPUs)."""
    return NCCLBroadcastTransfer() if recipe.sampler.weight_transfer == "nccl" else ObjectStoreTransfer()
