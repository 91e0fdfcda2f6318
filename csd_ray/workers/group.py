"""The trainer group: N TrainerRank actors in one placement group and one process group."""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from csd_ray.config import Recipe
from csd_ray.placement import RolePlan
from csd_ray.workers.trainer import TrainerRank


class TrainerGroup:
    def __init__(self, recipe: Recipe, role: RolePlan, env: dict[str, str], name: str = "") -> None:
        """``name``: the placement group's name in Ray; rank i's actor is named ``{name}-{i}``."""
        self.recipe, self.world_size = recipe, role.replicas
        self.pg = placement_group([role.bundle() or {"CPU": 0.001}] * self.world_size, strategy="PACK", name=name)
        ray.get(self.pg.ready())
        actor_cls = ray.remote(TrainerRank)
        self.ranks = [
            actor_cls.options(
                num_cpus=role.placement.num_cpus,
                num_gpus=role.placement.num_gpus,
                resources=dict(role.placement.resources),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                runtime_env={"env_vars": env},
                name=f"{name}-{i}" if name else None,
            ).remote(recipe, i, self.world_size)
            for i in range(self.world_size)
        ]
        addr, port = ray.get(self.ranks[0].address.remote())
        ray.get([r.init_group.remote(addr, port) for r in self.ranks])

    def info(self) -> list[dict]:
        return ray.get([r.ready.remote() for r in self.ranks])

    def call(self, method: str, *args: Any) -> list:
        """Run a method on every rank (collectives need all of them); block for the results.

        Fails fast: the first rank to fail raises at once, instead of waiting on ranks that may
        be stuck in a collective with it."""
        refs = [getattr(r, method).remote(*args) for r in self.ranks]
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # raises the rank's error
        return ray.get(refs)

    def call_async(self, method: str, *args: Any) -> list:
        return [getattr(r, method).remote(*args) for r in self.ranks]

    def shutdown(self) -> None:
        try:
            ray.get([r.shutdown.remote() for r in self.ranks], timeout=30)
        except Exception:
            pass
        for r in self.ranks:
            ray.kill(r)
        remove_placement_group(self.pg)
