"""`ray start --head` on 127.0.0.1, then `ray job submit -- python -m csd_ray.run recipes/smoke.yaml` (issue 3)."""

import json

from conftest import REPO, LocalCluster
from csd_ray.metrics import read_metrics


def test_ray_job_submit_runs_the_smoke_recipe(tmp_path):
    cluster = LocalCluster()
    try:
        cluster.start_head(num_cpus=2)
        out = tmp_path / "run"
        proc = cluster.submit("python", "-m", "csd_ray.run", "recipes/smoke.yaml", "run.steps=2",
                              f"run.output_dir={out}", "run.tensorboard=true", "run.mlflow.enabled=true",
                              working_dir=str(REPO))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "succeeded" in proc.stdout
        assert "final student:" in proc.stdout
        # Captured logs (what `ray job logs` shows): one plain line per step, no redrawn bars,
        # no library progress bars from the actors.
        log = proc.stdout
        assert [line.split(" stage=")[0] for line in log.splitlines() if line.startswith("step ")] == ["step 1/2", "step 2/2"]
        assert "\r" not in log and "it/s]" not in log and "Writing model shards" not in log, log[-3000:]
        assert list((out / "tensorboard").glob("events.out.tfevents.*")) and (out / "mlruns").is_dir()
        assert (out / "metrics.png").read_bytes().startswith(b"\x89PNG")
        assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "llama"
        assert (out / "final" / "model.safetensors").exists()
        assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    finally:
        cluster.stop()


def test_a_head_with_token_authentication_refuses_submissions_without_the_token(tmp_path):
    """What clusters/README.md tells users: RAY_AUTH_MODE=token on the head, the same mode and token
    when submitting. A submitter without the token is turned away, one with it runs its job."""
    import os
    import secrets

    token = secrets.token_hex(16)
    # HOME: Ray would otherwise pick up (or write) a token in the tester's ~/.ray.
    cluster = LocalCluster(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, HOME=str(tmp_path))
    try:
        cluster.start_head(num_cpus=1)
        job = ("python", "-c", "print('job ran as', __import__('os').getpid())")
        anonymous = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        anonymous["RAY_AUTH_MODE"] = "disabled"
        refused = cluster.submit(*job, env=anonymous)
        assert refused.returncode != 0
        assert "Unauthorized" in refused.stdout + refused.stderr or "401" in refused.stdout + refused.stderr, refused
        assert "job ran as" not in refused.stdout
        wrong = cluster.submit(*job, env={**cluster.env, "RAY_AUTH_TOKEN": "not-" + token})
        assert wrong.returncode != 0 and "job ran as" not in wrong.stdout
        accepted = cluster.submit(*job, env=cluster.env)
        assert accepted.returncode == 0, accepted.stdout[-3000:] + accepted.stderr[-3000:]
        assert "job ran as" in accepted.stdout and "succeeded" in accepted.stdout
    finally:
        cluster.stop()


def test_the_entry_point_leaves_rays_authentication_and_binding_alone():
    """Importing csd_ray.run (what every driver does, local or joining a cluster) must not switch
    off a cluster's token authentication or change how Ray picks its node address."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") and not k.startswith("PYTEST_")}
    code = ("import os, csd_ray.run; "
            "print(os.environ.get('RAY_AUTH_MODE'), os.environ.get('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "None"]
