"""clusters/slurm/csd_ray.sbatch: its shell logic, with fake `scontrol`, `srun` and `python` on PATH (issue 14).

No Slurm here: the fakes record what the script asks for; the recorded `ray start` resources are
then checked against the recipe's placement plan with the same planner `--dry-run` uses.
"""

import json
import os
import subprocess

from conftest import REPO
from csd_ray.config import load_recipe
from csd_ray.placement import nodes_needed

SCRIPT = REPO / "clusters" / "slurm" / "csd_ray.sbatch"

FAKES = {
    # scontrol show hostnames gpu[01-03] -> one host per line
    "scontrol": '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 9\necho gpu01; echo gpu02; echo gpu03\n',
    # every srun is recorded, one call per line (written in one append), arguments separated by
    # \x1f (quotes survive); `hostname --ip-address` answers like a node
    "srun": '#!/bin/sh\nline=$(printf "%s\\037" "$@")\nprintf "%s\\n" "$line" >> "$LOG_DIR/srun.log"\n'
            'case "$*" in *"hostname --ip-address"*) echo "10.1.2.3 fe80::1";; esac\n',
    # python: the node-wait snippet and the driver; the driver records its arguments and environment.
    # Like the real snippet, the wait returns once the N nodes' `ray start` steps are up (here: have
    # recorded themselves, at most 10 s): the script kills its background steps when it ends, and
    # a wait that returned at once lost the workers' records under load.
    "python": '#!/bin/sh\nif [ "$1" = "-" ]; then cat > /dev/null; i=0\n'
              'while [ "$(grep -c start "$LOG_DIR/srun.log" 2>/dev/null || true)" -lt "$2" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done\n'
              'echo "wait $2 $3" >> "$LOG_DIR/python.log"; exit 0; fi\n'
              'echo "run $* | RAY_ADDRESS=$RAY_ADDRESS RAY_AUTH_MODE=$RAY_AUTH_MODE" >> "$LOG_DIR/python.log"\n'
              'exit "${DRIVER_EXIT:-0}"\n',
}


def _run(tmp_path, *args, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True, exist_ok=True)
    (home / ".ray" / "auth_token").write_text("token-from-ray-get-auth-token\n")
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "LOG_DIR": str(tmp_path),
                "SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "96",
                "SLURM_JOB_ID": "4242", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], env=full_env, cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def _ray_starts(tmp_path):
    """{node: parsed `ray start` options} from the recorded srun calls."""
    starts = {}
    for line in (tmp_path / "srun.log").read_text().splitlines():
        argv = line.rstrip("\x1f").split("\x1f")
        if "ray" in argv and argv[argv.index("ray") + 1] == "start":
            node = argv[argv.index("-w") + 1]
            opts = dict(a[2:].split("=", 1) for a in argv[argv.index("ray") + 2:] if "=" in a)
            starts[node] = {"head": "--head" in argv, "block": "--block" in argv, **opts}
    return starts


def test_sbatch_starts_a_head_and_workers_with_role_resources_then_runs_the_recipe(tmp_path):
    proc = _run(tmp_path, "recipes/onpolicy.yaml", "run.output_dir=/lustre/me/onpolicy", "run.steps=10")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    starts = _ray_starts(tmp_path)
    assert sorted(starts) == ["gpu01", "gpu02", "gpu03"]
    head = starts["gpu01"]
    assert head["head"] and head["block"] and head["node-ip-address"] == "10.1.2.3" and head["port"] == "6379"
    assert json.loads(head["resources"]) == {"csd_infer": 8}
    for worker in ("gpu02", "gpu03"):
        assert not starts[worker]["head"] and starts[worker]["block"]
        assert starts[worker]["address"] == "10.1.2.3:6379"
        assert json.loads(starts[worker]["resources"]) == {"csd_train": 8}
    assert all(s["num-gpus"] == "8" and s["num-cpus"] == "96" for s in starts.values())

    wait, run = (tmp_path / "python.log").read_text().splitlines()
    assert wait == "wait 3 600"  # all three nodes up before the run checks its plan
    assert run == ("run -m csd_ray.run recipes/onpolicy.yaml run.output_dir=/lustre/me/onpolicy run.steps=10 | "
                   "RAY_ADDRESS=10.1.2.3:6379 RAY_AUTH_MODE=token")

    # What the nodes advertise holds the recipe the script was given (the same planner as --dry-run).
    types: dict = {}  # nodes that advertise the same resources form one type
    for s in starts.values():
        resources = {"CPU": float(s["num-cpus"]), "GPU": float(s["num-gpus"]),
                     **{k: float(v) for k, v in json.loads(s["resources"]).items()}}
        entry = types.setdefault(s["resources"], {"resources": resources, "max_workers": 0})
        entry["max_workers"] += 1
    counts, problems = nodes_needed(load_recipe(REPO / "recipes" / "onpolicy.yaml"), types)
    assert problems == [] and counts == {'{"csd_infer": 8}': 1, '{"csd_train": 8}': 1}


def test_sbatch_passes_on_the_runs_exit_code_and_refuses_a_split_without_trainers(tmp_path):
    proc = _run(tmp_path, "recipes/onpolicy.yaml", DRIVER_EXIT="3")
    assert proc.returncode == 3

    proc = _run(tmp_path, "recipes/onpolicy.yaml", CSD_RAY_INFER_NODES="3")
    assert proc.returncode == 2
    assert "CSD_RAY_INFER_NODES=3 leaves no trainer node among 3 allocated (gpu01 gpu02 gpu03)" in proc.stderr


def test_sbatch_without_a_recipe_says_how_to_call_it(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode != 0 and "usage: sbatch clusters/slurm/csd_ray.sbatch RECIPE" in proc.stderr
    assert not (tmp_path / "srun.log").exists()
