"""Cluster configs, KubeRay manifests, placement planning and a real two-node run on 127.0.0.1 (issue 5)."""

import json
import shlex

import pytest
import yaml

from conftest import REPO
from csd_ray.config import load_recipe
from csd_ray.placement import node_types, nodes_needed
from csd_ray.run import main

LAUNCHER_CONFIGS = sorted((REPO / "clusters").glob("*.yaml"))
KUBERAY = REPO / "clusters" / "kuberay"


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_cluster_launcher_configs_validate_against_rays_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(config))  # what `ray up` runs first
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = [n for n, t in types.items() if t["resources"].get("GPU")]
    assert gpu_types and all(types[n]["max_workers"] >= 1 for n in gpu_types)
    assert any("csd_ray" in c for c in config["setup_commands"])


def test_the_schema_check_catches_a_broken_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER_CONFIGS[0].read_text())
    config["available_node_types"]["gpu_train"]["resources"]["GPU"] = "eight"
    with pytest.raises(Exception, match="is not of type 'integer'"):
        validate_config(prepare_config(config))


def _check_cluster_spec(spec):
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    assert isinstance(head["rayStartParams"], dict)
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] and int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        json.loads(json.loads(group["rayStartParams"]["resources"]))  # the escaped JSON KubeRay expects


def test_kuberay_manifests_have_the_required_fields():
    cluster = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    job = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster") and cluster["metadata"]["name"]
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob") and job["metadata"]["name"]
    _check_cluster_spec(cluster["spec"])
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])


def test_rayjob_entrypoint_names_a_recipe_that_exists_and_validates():
    job = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "csd_ray.run"]
    recipe = REPO / argv[3]
    assert recipe.exists()
    load_recipe(recipe, argv[4:])


@pytest.mark.parametrize("recipe", sorted(p for p in (REPO / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_recipes_dry_run_and_fit_their_cluster(recipe, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main([str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "placement plan:" in out
    cluster = load_recipe(recipe).run.cluster
    if cluster:
        assert f"on {cluster}: needs" in out and "PROBLEM" not in out
        counts, problems = nodes_needed(load_recipe(recipe), node_types(REPO / cluster))
        assert not problems and sum(counts.values()) >= 1


def test_planner_counts_nodes_and_names_what_cannot_fit():
    recipe = load_recipe(REPO / "recipes" / "onpolicy.yaml")
    types = node_types(REPO / "clusters" / "aws.yaml")
    assert nodes_needed(recipe, types) == ({"gpu_train": 1, "gpu_infer": 1}, [])
    assert node_types(KUBERAY / "raycluster.yaml")["gpu-train"]["resources"]["csd_train"] == 8
    bigger = load_recipe(REPO / "recipes" / "onpolicy.yaml", ["trainer.num_ranks=24", "trainer.micro_batch_size=0",
                                                              "batch.prompts_per_step=48"])
    counts, problems = nodes_needed(bigger, types)
    assert counts["gpu_train"] == 3 and problems == ["needs 3 'gpu_train' nodes but the cluster allows at most 2"]
    huge = load_recipe(REPO / "recipes" / "onpolicy.yaml", ["teacher.placement.num_gpus=16"])
    assert any("a teacher actor needs" in p for p in nodes_needed(huge, types)[1])


def test_unplaceable_recipe_fails_before_actors_start(capsys, monkeypatch, tmp_path):
    import ray

    monkeypatch.delenv("CSD_RAY_AUTOSCALING", raising=False)
    try:
        code = main([str(REPO / "recipes" / "smoke.yaml"), f"run.output_dir={tmp_path}", "sampler.placement.num_gpus=1"])
    finally:
        ray.shutdown()
    err = capsys.readouterr().err
    assert code == 2 and "can never be placed" in err and "a sampler actor needs" in err
    assert not (tmp_path / "actors.json").exists()


def test_two_nodes_on_loopback_run_the_roles_on_the_nodes_the_recipe_names(tmp_path):
    """A head and a second node, both real raylets on 127.0.0.1, each with its own temp dir.

    `ray start` refuses a second node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which keeps every
    Ray listener on loopback); Ray's own multi-node harness, ray.cluster_utils.Cluster, starts the
    same node processes without that check.
    """
    import os
    import subprocess
    import sys
    import tempfile

    from ray.cluster_utils import Cluster

    def node_args(tag: str) -> dict:
        # Short temp dirs: Ray's unix socket paths must stay under 108 bytes.
        return dict(node_ip_address="127.0.0.1", num_cpus=2, resources={tag: 1}, include_dashboard=False,
                    temp_dir=tempfile.mkdtemp(prefix=f"csd{tag[-1]}", dir="/tmp"))

    cluster = Cluster(initialize_head=True, head_node_args=node_args("node_a"))
    try:
        node_b = cluster.add_node(**node_args("node_b"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        env["RAY_ADDRESS"] = cluster.address
        out = tmp_path / "run"
        proc = subprocess.run(
            [sys.executable, "-m", "csd_ray.run", str(REPO / "recipes" / "smoke.yaml"), f"run.output_dir={out}",
             "run.steps=2", "data.eval_size=0", "trainer.num_ranks=2",
             "sampler.placement.resources={node_a: 0.1}", "teacher.placement.resources={node_a: 0.1}",
             "trainer.placement.resources={node_b: 0.1}"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        actors = json.loads((out / "actors.json").read_text())
        head_id, worker_id = cluster.head_node.node_id, node_b.node_id
        assert head_id != worker_id
        assert {a["node_id"] for a in actors["sampler"] + actors["teacher"]} == {head_id}
        assert [a["node_id"] for a in actors["trainer"]] == [worker_id, worker_id]
        assert (out / "final" / "model.safetensors").exists()
    finally:
        cluster.shutdown()
