"""kill -9 of the sampler, the teacher and a trainer rank mid-run: the run survives (issue 6)."""

import json
import os
import signal
import threading
import time

import pytest
import torch

from conftest import smoke_recipe
from csd_ray.controller import Controller, RunStopped
from csd_ray.metrics import read_metrics


def _kill_when(run_dir, plan, stop):
    """After step N has been logged, kill -9 the actor named in ``plan[N]`` (pids from actors.json)."""
    killed = []
    while not stop.is_set() and plan:
        metrics = run_dir / "metrics.jsonl"
        done = len(read_metrics(metrics)) if metrics.exists() else 0
        for after_step in sorted(plan):
            if done >= after_step:
                role, index = plan.pop(after_step)
                pid = json.loads((run_dir / "actors.json").read_text())[role][index]["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append((role, pid, after_step))
        time.sleep(0.05)
    return killed


def test_killed_sampler_teacher_and_trainer_rank_are_survived(ray_session, tmp_path):
    steps = 7
    recipe = smoke_recipe(tmp_path, f"run.steps={steps}", "run.checkpoint_every=2", "run.keep_checkpoints=4")
    plan = {1: ("sampler", 0), 3: ("teacher", 0), 5: ("trainer", 1)}
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=lambda: killed.extend(_kill_when(tmp_path, plan, stop)), daemon=True)
    watcher.start()
    try:
        Controller(recipe, log=lambda m: None).run()
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert [k[0] for k in killed] == ["sampler", "teacher", "trainer"]

    records = read_metrics(tmp_path / "metrics.jsonl", kind=None)
    events = [r for r in records if r["kind"] in ("restart", "rollback")]
    assert [e["roles"] for e in events] == [["sampler"], ["teacher"], ["trainer"]]
    assert events[2]["step"] == 4  # the trainer group came back from the step-4 checkpoint

    train = [r for r in records if r["kind"] == "train"]
    # The lineage that produced the final weights: the last record of each step number.
    final = {r["step"]: r for r in train}
    assert sorted(final) == list(range(1, steps + 1))  # every step trained, none missing
    assert max(r["weight_version"] for r in final.values()) == steps
    ids = [i for r in train for i in r["rollout_ids"]]
    assert len(ids) == len(set(ids))  # no rollout trained twice (redone steps got fresh rollouts)
    actors = json.loads((tmp_path / "actors.json").read_text())
    assert {actors["sampler"][0]["pid"], actors["teacher"][0]["pid"]}.isdisjoint({k[1] for k in killed})
    # Redone work drew the same prompts (rewound prompt stream, same per-step seeds): the trained
    # weights equal those of the same recipe run without failures.
    from safetensors.torch import load_file

    straight_dir = tmp_path / "straight"
    Controller(smoke_recipe(straight_dir, f"run.steps={steps}", "run.checkpoint_every=2"), log=lambda m: None).run()
    a, b = load_file(tmp_path / "final" / "model.safetensors"), load_file(straight_dir / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), (key, (a[key] - b[key]).abs().max())


def test_max_actor_restarts_is_enforced_with_exit_code_4(ray_session, tmp_path):
    recipe = smoke_recipe(tmp_path, "run.steps=4", "run.max_actor_restarts=0")
    plan = {1: ("sampler", 0)}
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=lambda: killed.extend(_kill_when(tmp_path, plan, stop)), daemon=True)
    watcher.start()
    try:
        with pytest.raises(RunStopped, match=r"the sampler failed 1 times \(run.max_actor_restarts=0\)") as stopped:
            Controller(recipe, log=lambda m: None).run()
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert stopped.value.exit_code == 4 and [k[0] for k in killed] == ["sampler"]
    assert len(read_metrics(tmp_path / "metrics.jsonl")) < 4
