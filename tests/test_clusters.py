"""Cluster configs, KubeRay manifests, placement planning and a real two-node run on 127.0.0.1 (issue 5)."""

import json
import shlex
from pathlib import Path

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


FAKE_TOOLS = {
    # The node's `python` is the test interpreter, with pip kept off the network: it resolves what
    # it is given (an editable requirement must parse and build its metadata) without installing.
    "python": '#!/bin/sh\nif [ "$1 $2 $3" = "-m pip install" ]; then shift 3; exec {python} -m pip install '
              '--dry-run --no-index --no-deps --no-build-isolation "$@"; fi\nexec {python} "$@"\n',
    # Root-only steps (apt, mount) are recorded, not run.
    "sudo": '#!/bin/sh\necho "$*" >> "$HOME/../sudo.log"\n',
    "mountpoint": "#!/bin/sh\nexit 1\n",  # nothing is mounted yet
    "dpkg": "#!/bin/sh\nexit 1\n",  # nothing is installed yet
}


def _node_home(config: dict, tmp_path):
    """A node's home after `ray up` copied the file_mounts (the checkout minus rsync_exclude)."""
    import shutil

    home = tmp_path / "home"
    home.mkdir()
    # rsync_exclude's patterns by name ('runs/**' -> runs), plus what a local pip install leaves.
    names = {pat.replace("**/", "").split("/")[0] for pat in config.get("rsync_exclude", [])}
    ignore = shutil.ignore_patterns(*names, "*.egg-info")

    for remote, local in config["file_mounts"].items():
        dest = home / remote.removeprefix("~/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if local.startswith("~"):  # from the user's own home (the Ray auth token)
            dest.write_text("a-token-made-by-ray-get-auth-token\n")
        else:
            shutil.copytree(REPO / local, dest, ignore=ignore)
    return home


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_setup_commands_run_the_way_rays_command_runner_runs_them(path, tmp_path):
    """Each setup command goes through Ray's own wrapper (bash --login -i -c '...') in a shell, with
    HOME holding the file_mounts, as on a fresh node; `~` in double quotes once broke `ray up` here."""
    import os
    import subprocess
    import sys

    from ray.autoscaler._private.command_runner import _with_interactive

    config = yaml.safe_load(path.read_text())
    home = _node_home(config, tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_TOOLS.items():
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    # A login shell resets PATH from /etc/profile; ~/.bashrc (which Ray sources) puts the node's
    # python first, as the GPU images' .bashrc does with their conda environment.
    (home / ".bashrc").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    pip_output = ""
    for command in config["setup_commands"]:
        proc = subprocess.run(" ".join(_with_interactive(command)), shell=True, env=env, cwd=home,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-2000:])
        pip_output += proc.stdout
    assert "Would install csd_ray-0.1.0" in pip_output.replace("csd-ray", "csd_ray")
    assert "does not provide the extra" not in pip_output
    # The shared file system lands where the cluster recipes write (the GCP config is the AWS one's twin).
    mounts = [line.split() for line in (tmp_path / "sudo.log").read_text().splitlines() if line.startswith("mount ")]
    assert len(mounts) == 1, mounts
    mount_point = Path(mounts[0][-1])
    recipes = [r for r in (REPO / "recipes").rglob("*.yaml") if load_recipe(r).run.cluster]
    assert recipes
    for recipe in recipes:
        assert mount_point in Path(load_recipe(recipe).run.output_dir).parents, (recipe, mount_point)
    # Token authentication on every node that starts Ray, with the token file the mounts ship.
    assert "~/.ray/auth_token" in config["file_mounts"]
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert command.startswith("RAY_AUTH_MODE=token ray start"), command


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


def _uses_the_token(env: list) -> bool:
    by_name = {e["name"]: e for e in env}
    secret = by_name.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    return by_name.get("RAY_AUTH_MODE", {}).get("value") == "token" and secret == {"name": "csd-ray-auth", "key": "auth_token"}


def test_kuberay_pods_start_ray_with_token_authentication():
    spec = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    assert containers and all(_uses_the_token(c.get("env", [])) for c in containers)
    assert _uses_the_token(spec["autoscalerOptions"].get("env", []))
    submitter = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())["spec"]["submitterPodTemplate"]
    assert _uses_the_token(submitter["spec"]["containers"][0]["env"])


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


def test_planner_reads_kuberay_1_5_group_resources(tmp_path):
    """KubeRay 1.5 lets a worker group declare Ray resources in a `resources` map instead of the
    escaped JSON in rayStartParams; the plan must see them either way."""
    manifest = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    for group in manifest["spec"]["workerGroupSpecs"]:
        custom = json.loads(json.loads(group["rayStartParams"].pop("resources")))
        group["resources"] = {k: str(v) for k, v in custom.items()}
    manifest["spec"]["workerGroupSpecs"][0]["resources"]["CPU"] = "43500m"
    path = tmp_path / "raycluster-1.5.yaml"
    path.write_text(yaml.safe_dump(manifest))
    types = node_types(path)
    assert types["gpu-train"]["resources"] == {"CPU": 90.0, "GPU": 8.0, "csd_train": 8.0}
    assert types["gpu-infer"]["resources"] == {"CPU": 43.5, "GPU": 4.0, "csd_infer": 4.0}
    recipe = load_recipe(REPO / "recipes" / "onpolicy.yaml")
    assert nodes_needed(recipe, types) == ({"gpu-train": 1, "gpu-infer": 1}, [])


def test_actors_and_placement_groups_carry_the_run_name_and_the_job_its_metadata(tmp_path, monkeypatch):
    import ray

    monkeypatch.delenv("CSD_RAY_AUTOSCALING", raising=False)
    try:
        code = main([str(REPO / "recipes" / "smoke.yaml"), f"run.output_dir={tmp_path}", "run.name=exp-7",
                     "run.steps=1", "data.eval_size=0", "run.plot=false"])
        assert code == 0
        actors = json.loads((tmp_path / "actors.json").read_text())
        assert [a["name"] for a in actors["sampler"]] == ["csd_ray/exp-7/sampler-0"]
        assert [a["name"] for a in actors["teacher"]] == ["csd_ray/exp-7/teacher-0"]
        assert [a["name"] for a in actors["trainer"]] == ["csd_ray/exp-7/trainer-0", "csd_ray/exp-7/trainer-1"]
        groups = [g["name"] for g in ray.util.placement_group_table().values()]
        assert groups == ["csd_ray/exp-7/trainer"]
        jobs = ray._private.worker.global_worker.gcs_client.get_all_job_info()
        (metadata,) = [dict(job.config.metadata) for job in jobs.values()]
        assert metadata["csd_ray.run"] == "exp-7" and metadata["csd_ray.output_dir"] == str(tmp_path)
    finally:
        ray.shutdown()


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
    """A head and a second node, both real raylets on 127.0.0.1, each with its own temp dir; then a
    run whose output_dir the trainer nodes do not share is refused before training.

    `ray start` refuses a second node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which keeps every
    Ray listener on loopback); Ray's own multi-node harness, ray.cluster_utils.Cluster, starts the
    same node processes without that check.
    """
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from ray.cluster_utils import Cluster

    def node_args(tag: str) -> dict:
        # Short temp dirs: Ray's unix socket paths must stay under 108 bytes.
        return dict(node_ip_address="127.0.0.1", num_cpus=2, resources={tag: 1}, include_dashboard=False,
                    temp_dir=tempfile.mkdtemp(prefix=f"csd{tag[-1]}", dir="/tmp"))

    # Cluster.add_node records the head's address in Ray's default temp dir, which it does not create.
    from ray._private.utils import get_ray_address_file

    Path(get_ray_address_file(None)).parent.mkdir(parents=True, exist_ok=True)
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
        assert not list(out.glob(".shared-check-*"))

        # Not shared: a relative run.output_dir under a job's working_dir is a different folder on
        # every node (each unpacks its own copy), so trainer shards and the driver's COMPLETE
        # markers would part ways. The run stops before training, with one line.
        working_dir = tmp_path / "working_dir"
        shutil.copytree(REPO / "csd_ray", working_dir / "csd_ray", ignore=shutil.ignore_patterns("__pycache__"))
        driver_cwd = tmp_path / "driver"
        driver_cwd.mkdir()
        env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps({"runtime_env": {"working_dir": str(working_dir)}})
        env["PYTHONPATH"] = str(REPO)
        proc = subprocess.run(
            [sys.executable, "-m", "csd_ray.run", str(REPO / "recipes" / "smoke.yaml"), "run.output_dir=relative_out",
             "run.steps=2", "data.eval_size=0", "trainer.num_ranks=2",
             "sampler.placement.resources={node_a: 0.1}", "teacher.placement.resources={node_a: 0.1}",
             "trainer.placement.resources={node_b: 0.1}"],
            env=env, cwd=driver_cwd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert errors[0].startswith("error: run.output_dir: 'relative_out' is not one directory shared")
        assert "rank 0 on node" in errors[0] and "rank 1 on node" in errors[0]
        assert not (driver_cwd / "relative_out" / "checkpoints").exists()
    finally:
        cluster.shutdown()
