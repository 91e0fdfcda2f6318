"""Placement plan: which actor gets which resources, computed from the recipe alone.

Used by ``--dry-run`` (printed), by the controller (placement groups, actor options) and to fail
early when the connected cluster can never hold the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from csd_ray.config import PlacementConfig, Recipe


@dataclass
class RolePlan:
    role: str
    replicas: int
    placement: PlacementConfig

    def bundle(self) -> dict[str, float]:
        b = {"CPU": self.placement.num_cpus, "GPU": self.placement.num_gpus, **self.placement.resources}
        return {k: float(v) for k, v in b.items() if v}

    def total(self) -> dict[str, float]:
        return {k: v * self.replicas for k, v in self.bundle().items()}


def plan(recipe: Recipe) -> list[RolePlan]:
    return [
        RolePlan("sampler", recipe.sampler.replicas, recipe.sampler.placement),
        RolePlan("teacher", recipe.teacher.replicas, recipe.teacher.placement),
        RolePlan("trainer", recipe.trainer.num_ranks, recipe.trainer.placement),
    ]


def total_demand(roles: list[RolePlan]) -> dict[str, float]:
    demand: dict[str, float] = {}
    for role in roles:
        for k, v in role.total().items():
            demand[k] = demand.get(k, 0.0) + v
    return demand


def describe(recipe: Recipe) -> str:
    roles = plan(recipe)
    lines = ["placement plan:"]
    for role in roles:
        bundle = ", ".join(f"{k}={v:g}" for k, v in role.bundle().items()) or "no reserved resources"
        lines.append(f"  {role.role:8s} x{role.replicas}: each {{{bundle}}}  (threads {role.placement.torch_threads()})")
    total = ", ".join(f"{k}={v:g}" for k, v in total_demand(roles).items())
    lines.append(f"  total: {{{total}}}")
    lines.append("  trainer ranks share one placement group (strategy PACK); sampler/teacher replicas are placed by resources")
    return "\n".join(lines)


def unsatisfiable(recipe: Recipe, cluster: dict[str, float], autoscaling: bool) -> list[str]:
    """Problems that mean the plan can never run on this cluster (empty list: fine)."""
    if autoscaling:
        return []
    problems = []
    for key, need in total_demand(plan(recipe)).items():
        have = cluster.get(key, 0.0)
        if need > have + 1e-9:
            problems.append(f"the recipe needs {key}={need:g} in total but the cluster has {key}={have:g}")
    return problems
