"""Shared test set-up: Ray binds loopback only, one Ray session per module that needs it."""

import os
from pathlib import Path

import pytest

# This test machine's settings (csd_ray itself sets none of them): Ray on loopback only, no
# authentication between the tests' own processes (tests that need it start their own head).
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

    def __init__(self, **env: str) -> None:
        """``env``: variables for the head's processes on top of the test environment (e.g. RAY_AUTH_MODE)."""
        import tempfile

        self.temp_dir = tempfile.mkdtemp(prefix="csdray", dir="/tmp")  # short: unix socket paths
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        # Like a user's shell: no RAY_ADDRESS, and none of pytest's variables (Ray switches on
        # test-only behaviour when it sees PYTEST_CURRENT_TEST).
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        self.env["RAY_ADDRESS"] = ""
        self.env.update(env)

    def _ray(self, *args: str, timeout: int = 120, env: dict | None = None):
        import shutil
        import subprocess
        import sys

        # The `ray` beside this Python; in a venv made with --system-site-packages it is the one on PATH.
        beside = Path(sys.executable).parent / "ray"
        ray_cli = str(beside) if beside.exists() else shutil.which("ray")
        if ray_cli is None:
            raise RuntimeError(f"no `ray` command beside {sys.executable} or on PATH")
        return subprocess.run([ray_cli, *args], env=env or self.env, capture_output=True, text=True, timeout=timeout)

    def start_head(self, num_cpus: int = 2) -> None:
        # Every port chosen free: the agents' defaults (e.g. 52365) may still be held by a Ray
        # another test just shut down, and an agent that cannot bind never registers.
        ports = {flag: free_port() for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port")}
        args = ["start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
                f"--num-cpus={num_cpus}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
                *(f"--{flag}={port}" for flag, port in ports.items())]
        proc = self._ray(*args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        self._wait_for_job_agent()

    def _wait_for_job_agent(self, timeout: float = 90) -> None:
        """`ray start` returns before the dashboard agent that runs jobs has registered."""
        import time

        log = Path(self.temp_dir) / "session_latest" / "logs" / "dashboard_agent.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists() and "Registered" in log.read_text(errors="replace"):
                return
            time.sleep(0.5)
        logs = log.parent
        detail = sorted(p.name for p in logs.glob("*agent*")) if logs.exists() else f"no {logs}"
        raise AssertionError(f"the Ray dashboard agent did not come up within {timeout} s ({log}; {detail})")

    def submit(self, *entrypoint: str, working_dir: str | None = None, timeout: int = 600, env: dict | None = None):
        """`ray job submit` from a shell with the head's environment, or ``env`` instead."""
        import time

        deadline = time.monotonic() + 60
        options = [f"--working-dir={working_dir}"] if working_dir else []
        while True:
            proc = self._ray("job", "submit", f"--address=http://127.0.0.1:{self.dashboard_port}",
                             *options, "--", *entrypoint, timeout=timeout, env=env)
            # Right after `ray start` the job agent may not be up yet; Ray says to try again.
            if "No available agent to submit job" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
                return proc
            time.sleep(2)

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


@pytest.fixture(scope="session")
def family_folder(tmp_path_factory):
    """family_folder(name, seed=0, num_layers=2) -> an HF folder of a family fixture (tests/families.py), built once."""
    from families import build

    built = {}

    def get(name: str, seed: int = 0, num_layers: int = 2) -> Path:
        key = (name, seed, num_layers)
        if key not in built:
            built[key] = build(name, tmp_path_factory.mktemp(f"{name}-s{seed}-l{num_layers}"), seed, num_layers)
        return built[key]

    return get


def family_recipe(tmp_path, student: Path, teacher: Path, *overrides, evaluate=False):
    """The smoke recipe with a family fixture as student and teacher (fp32 unless overridden)."""
    return smoke_recipe(tmp_path, f"student_model.path={student}", f"teacher_model.path={teacher}",
                        "student_model.dtype=float32", "teacher_model.dtype=float32", *overrides, evaluate=evaluate)
