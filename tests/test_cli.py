"""The entry point: dry runs and recipe validation that fails before any actor starts (issue 3)."""

import subprocess
import sys

import pytest
import ray

from conftest import REPO
from csd_ray.run import main

SMOKE = str(REPO / "recipes" / "smoke.yaml")


def _write(tmp_path, text):
    if "run:" not in text and not text.startswith("-"):
        text += "run:\n  steps: 2\n"
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "recipe_text, overrides, expected",
    [
        # unknown key, with the closest suggestion and the line it is on
        ("run:\n  steps: 2\ntrainer:\n  lr: 1e-4\n  num_rank: 2\n", [], ["recipe.yaml:5", "trainer.num_rank", "did you mean 'num_ranks'"]),
        ("runn:\n  steps: 2\n", [], ["recipe.yaml:1", "unknown key 'runn'", "did you mean 'run'"]),
        # wrong types
        ("trainer:\n  lr: fast\n", [], ["recipe.yaml:2", "trainer.lr", "expected a number, got 'fast'"]),
        ("run:\n  steps: 2.5\n", [], ["run.steps", "expected an integer, got 2.5"]),
        ("run:\n  mode: asynch\n", [], ["run.mode", "expected one of 'sync', 'async'", "did you mean 'async'"]),
        # impossible combinations
        ("batch:\n  prompts_per_step: 3\ntrainer:\n  num_ranks: 2\n", [], ["batch.prompts_per_step", "3 sequences", "trainer.num_ranks = 2"]),
        ("teacher:\n  backend: vllm\n  payload: hidden\n", [], ["teacher.payload", "only the 'topk' payload"]),
        ("trainer:\n  loss:\n    name: dld\nteacher:\n  payload: topk\n", [], ["trainer.loss.name", "'dld'", "topk"]),
        ("trainer:\n  loss:\n    name: csd\n    params: {weights: [student, techer]}\n", [], ["trainer.loss", "unknown weighting 'techer'"]),
        ("run:\n  steps: 2\n  mode: async\nbatch:\n  sources: [{kind: teacher}]\n", [], ["run.mode", "async", "batch.sources[0] is 'teacher'"]),
        ("run:\n  steps: 5\nstages: [{steps: 2}, {steps: 2}]\n", [], ["run.steps", "stages add up to 4"]),
        ("stages: [{steps: 2, loss: {name: csd, params: {alpha: 2}}}]\n", [], ["stages[0].loss", "'alpha' must be in [0, 1]"]),
        ("run:\n  steps: 0\n", [], ["run.steps", "must be >= 1 (or define stages)"]),
        ("batch:\n  sources: [{kind: student, probability: 0.5}]\n", [], ["batch.sources", "sum to 1, got 0.5"]),
        ("sampler:\n  weight_transfer: nccl\n", [], ["sampler.weight_transfer", "'nccl' needs"]),
        # overrides are checked the same way, and say they came from the command line
        ("run:\n  steps: 2\n", ["trainer.micro_batch_size=3"], ["override 'trainer.micro_batch_size=3'", "does not divide"]),
        ("run:\n  steps: 2\n", ["trainr.lr=1"], ["unknown key 'trainr'", "did you mean 'trainer'"]),
        ("run:\n  steps: 2\n", ["run.steps"], ["must look like key.path=value"]),
        # malformed YAML and missing files
        ("run:\n  steps: [1, 2\n", [], ["invalid YAML"]),
        ("- just\n- a list\n", [], ["a recipe must be a mapping"]),
    ],
)
def test_bad_recipes_fail_before_any_actor_starts(tmp_path, capsys, recipe_text, overrides, expected):
    code = main([_write(tmp_path, recipe_text), *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert not ray.is_initialized()


def test_missing_recipe_file(tmp_path, capsys):
    assert main([str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_dry_run_prints_resolved_recipe_and_placement_plan(capsys):
    assert main([SMOKE, "--dry-run", "trainer.lr=3e-4", "sampler.placement.num_gpus=1"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0003" in out
    assert "placement plan:" in out
    assert "sampler  x1: each {CPU=0.5, GPU=1}" in out
    assert "trainer  x2: each {CPU=0.5}" in out
    assert "total: {CPU=2, GPU=1}" in out
    assert not ray.is_initialized()


def test_cli_exit_code_and_message_in_a_real_process(tmp_path):
    bad = _write(tmp_path, "trainer:\n  num_ranks: 0\n")
    proc = subprocess.run([sys.executable, "-m", "csd_ray.run", bad], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "trainer.num_ranks: must be >= 1, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr and "Started a local Ray" not in proc.stderr
