"""Shared test set-up: Ray binds loopback only, one Ray session per module that needs it."""

import os
from pathlib import Path

import pytest

os.environ.update(
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    RAY_USAGE_STATS_ENABLED="0",
    RAY_AUTH_MODE="disabled",
    TOKENIZERS_PARALLELISM="false",
    TORCH_COMPILE_DISABLE="1",
    WANDB_MODE="offline",
)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield ray
    ray.shutdown()


def smoke_recipe(tmp_path, *overrides, evaluate=False):
    """recipes/smoke.yaml writing to tmp_path; held-out evaluation off unless asked for (it costs time)."""
    from csd_ray.config import load_recipe

    base = [f"run.output_dir={tmp_path}"] + ([] if evaluate else ["data.eval_size=0"])
    return load_recipe(REPO / "recipes" / "smoke.yaml", [*base, *overrides])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A Ray cluster started with `ray start` on 127.0.0.1 in its own temp dir.

    Teardown kills only the processes whose command line names that temp dir: `ray stop` would
    stop every Ray on the machine.
    """

    def __init__(self) -> None:
        import tempfile

        self.temp_dir = tempfile.mkdtemp(prefix="csdray", dir="/tmp")  # short: unix socket paths
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.env = {**os.environ, "RAY_ADDRESS": ""}

    def _ray(self, *args: str, timeout: int = 120):
        import subprocess
        import sys

        ray_cli = str(Path(sys.executable).parent / "ray")
        return subprocess.run([ray_cli, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def start_head(self, num_cpus: float = 2, resources: str = "") -> None:
        args = ["start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
                f"--num-cpus={num_cpus}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        if resources:
            args.append(f"--resources={resources}")
        proc = self._ray(*args)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def add_node(self, num_cpus: float = 1, resources: str = "") -> None:
        args = ["start", f"--address=127.0.0.1:{self.gcs_port}", "--node-ip-address=127.0.0.1",
                f"--num-cpus={num_cpus}", "--disable-usage-stats"]
        if resources:
            args.append(f"--resources={resources}")
        proc = self._ray(*args)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def submit(self, *entrypoint: str, working_dir: str, timeout: int = 600):
        return self._ray("job", "submit", f"--address=http://127.0.0.1:{self.dashboard_port}",
                         f"--working-dir={working_dir}", "--", *entrypoint, timeout=timeout)

    def stop(self) -> None:
        import shutil

        import psutil

        mine = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info.get("cmdline") or [])
            if self.temp_dir in cmdline or f"127.0.0.1:{self.gcs_port}" in cmdline:
                mine.append(proc)
        for proc in mine:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(mine, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
