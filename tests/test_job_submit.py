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
                              f"run.output_dir={out}", working_dir=str(REPO))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "succeeded" in proc.stdout
        assert "final student:" in proc.stdout
        assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "llama"
        assert (out / "final" / "model.safetensors").exists()
        assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    finally:
        cluster.stop()
