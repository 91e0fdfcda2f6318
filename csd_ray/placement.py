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


def live_node_types() -> dict[str, dict]:
    """The connected cluster's alive nodes, each as a 'type' of which there is exactly one."""
    import ray

    return {
        node["NodeID"][:12]: {"resources": dict(node["Resources"]), "max_workers": 1}
        for node in ray.nodes()
        if node.get("Alive")
    }


def node_types(cluster_file: str) -> dict[str, dict]:
    """{node type: {"resources": {...}, "max_workers": n}} of a Ray cluster-launcher YAML or a
    KubeRay RayCluster/RayJob manifest (worker groups; GPUs from nvidia.com/gpu limits; custom
    resources from rayStartParams.resources and, KubeRay 1.5+, the group's `resources` map)."""
    import json

    import yaml

    with open(cluster_file) as f:
        doc = yaml.safe_load(f)
    if "available_node_types" in doc:
        head = doc.get("head_node_type")
        return {
            name: {"resources": {k: float(v) for k, v in t.get("resources", {}).items()},
                   "max_workers": 0 if name == head else t.get("max_workers", doc.get("max_workers", 0))}
            for name, t in doc["available_node_types"].items()
        }
    spec = doc.get("spec", {})
    spec = spec.get("rayClusterSpec", spec)
    types = {}
    for group in spec.get("workerGroupSpecs", []):
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        resources = {"CPU": float(str(limits.get("cpu", 0))), "GPU": float(str(limits.get("nvidia.com/gpu", 0)))}
        custom = group.get("rayStartParams", {}).get("resources")
        if custom:  # every KubeRay version: an escaped JSON string passed to `ray start --resources`
            resources.update({k: float(v) for k, v in json.loads(json.loads(custom)).items()})
        # KubeRay 1.5+: a group-level `resources` map (quantities as strings), which overrides
        # what the container limits imply.
        resources.update({k: _quantity(v) for k, v in (group.get("resources") or {}).items()})
        types[group["groupName"]] = {"resources": resources, "max_workers": group.get("maxReplicas", 0)}
    return types


def _quantity(value) -> float:
    """A Kubernetes-style quantity as Ray counts it: '8' -> 8, '500m' -> 0.5."""
    text = str(value).strip()
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def nodes_needed(recipe: Recipe, types: dict[str, dict]) -> tuple[dict[str, int], list[str]]:
    """Pack every actor's bundle onto nodes (first fit, biggest bundles first).

    Returns ({node type: nodes needed}, problems); a problem is a bundle no node type can hold,
    or more nodes of a type than its max_workers.
    """
    bundles = [(role.role, role.bundle()) for role in plan(recipe) for _ in range(role.replicas)]
    bundles.sort(key=lambda rb: (-rb[1].get("GPU", 0), -rb[1].get("CPU", 0)))
    open_nodes: list[tuple[str, dict[str, float]]] = []  # (type, free resources)
    problems: list[str] = []

    def fits(free: dict[str, float], need: dict[str, float]) -> bool:
        return all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items())

    for role, need in bundles:
        for _, free in open_nodes:
            if fits(free, need):
                break
        else:
            candidates = [name for name, t in types.items() if fits(t["resources"], need)]
            if not candidates:
                problems.append(f"a {role} actor needs {need} but no node type offers that")
                continue
            free = dict(types[candidates[0]]["resources"])
            open_nodes.append((candidates[0], free))
        for k, v in need.items():
            free[k] = free.get(k, 0.0) - v
    counts: dict[str, int] = {}
    for name, _ in open_nodes:
        counts[name] = counts.get(name, 0) + 1
    for name, count in counts.items():
        if count > types[name]["max_workers"]:
            problems.append(f"needs {count} '{name}' nodes but the cluster allows at most {types[name]['max_workers']}")
    return counts, problems


def describe_cluster_fit(recipe: Recipe, cluster_file: str) -> tuple[str, list[str]]:
    counts, problems = nodes_needed(recipe, node_types(cluster_file))
    needed = ", ".join(f"{n} x {name}" for name, n in counts.items()) or "nothing"
    lines = [f"on {cluster_file}: needs {needed}"] + [f"  PROBLEM: {p}" for p in problems]
    return "\n".join(lines), problems
