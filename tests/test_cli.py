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
        # list indices and ${...} references, refused clearly when they point nowhere
        ("stages: [{steps: 2}, {steps: 2}]\n", ["stages.2.steps=5"], ["cannot set 'stages.2.steps'", "'stages' has 2 entries", "got index 2"]),
        ("run:\n  steps: 2\n", ["stages.x.steps=5"], ["'stages' is a list; index it by number"]),
        ("run:\n  steps: 2\n  name: a\n", ["run.output_dir=runs/${run.nme}"], ["run.output_dir", "'${run.nme}' names no recipe key", "did you mean 'run.name'"]),
        ("run:\n  steps: 2\n  name: ${run.output_dir}\n  output_dir: ${run.name}\n", [], ["recipe.yaml:3", "refers back to itself"]),
        ("run:\n  steps: 2\n", ["run.seed=${run.name}"], ["run.seed", "expected an integer, got 'csd'"]),
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


def test_overrides_index_lists_and_fill_in_default_lists():
    from csd_ray.config import load_recipe

    recipe = load_recipe(REPO / "recipes" / "local.yaml", ["stages.1.steps=50", "stages.0.lr=2e-4"])
    assert [s.steps for s in recipe.stages] == [30, 50] and recipe.run.steps == 80
    assert recipe.stages[0].lr == 2e-4
    two = load_recipe(
        REPO / "recipes" / "smoke.yaml",
        ["batch.sources=[{kind: student, probability: 0.5}, {kind: teacher, probability: 0.5}]",
         "batch.sources.0.probability=0.25", "batch.sources.1.probability=0.75"])
    assert [(s.kind, s.probability) for s in two.batch.sources] == [("student", 0.25), ("teacher", 0.75)]
    # smoke.yaml never writes batch.sources: the default list is indexed
    default = load_recipe(REPO / "recipes" / "smoke.yaml", ["batch.sources.0.loss_weight=0.5"])
    assert [(s.kind, s.probability, s.loss_weight) for s in default.batch.sources] == [("student", 1.0, 0.5)]


def test_references_resolve_after_overrides_and_keep_types(tmp_path):
    from csd_ray.config import load_recipe

    path = _write(tmp_path, "run:\n  steps: 4\n  name: base\n  output_dir: runs/${run.name}/${trainer.num_ranks}\n"
                            "  checkpoint_every: ${run.eval_every}\n  eval_every: 2\n"
                            "trainer:\n  num_ranks: 2\n  lr: 1e-4\nstages: [{steps: 4, lr: '${trainer.lr}'}]\n")
    recipe = load_recipe(path, ["run.name=exp7"])
    assert recipe.run.output_dir == "runs/exp7/2"  # the override is seen; a default (num_ranks) too
    assert recipe.run.checkpoint_every == 2 and isinstance(recipe.run.checkpoint_every, int)
    assert recipe.stages[0].lr == 1e-4
    literal = load_recipe(path, ["run.name=$${not.a.reference}"])
    assert literal.run.name == "${not.a.reference}"


def test_help_lists_the_sections_and_points_to_the_reference():
    proc = subprocess.run([sys.executable, "-m", "csd_ray.run", "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0
    for section in ("run", "teacher_model", "student_model", "data", "batch", "sampler", "teacher", "trainer", "stages"):
        assert f"\n  {section} " in proc.stdout, section
    assert "Recipe reference" in proc.stdout and "stages.1.steps=50" in proc.stdout


@pytest.mark.parametrize("make, where", [
    (lambda tmp: (tmp / "taken").write_text("x") and tmp / "taken", "is a file, not a folder"),
    (lambda tmp: (tmp / "taken").write_text("x") and tmp / "taken" / "run", "cannot be made: "),
])
def test_an_output_dir_that_is_a_file_fails_before_any_actor_starts(tmp_path, capsys, make, where):
    """run.output_dir naming an existing file used to start Ray and every actor, then stop with
    a FileExistsError traceback (exit 1) at the folder's mkdir."""
    out = make(tmp_path)
    code = main([SMOKE, f"run.output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: run.output_dir: ") and where in err and err.count("\n") == 1, err
    assert not ray.is_initialized()


def test_a_plan_too_big_for_the_live_nodes_says_what_it_asks_and_what_they_have(ray_session, monkeypatch):
    """On one 2-CPU machine, recipes/smoke.yaml with sampler.replicas=2 teacher.replicas=2 (CPU=3
    in all) was refused with only "needs 2 'd7700eb48c99' nodes but the cluster allows at most 1":
    a node id, and neither the plan's demand nor the machine's CPUs. (A real local Ray, 2 CPUs.)"""
    import re

    from csd_ray.config import load_recipe
    from csd_ray.run import ConfigError, check_cluster

    monkeypatch.delenv("CSD_RAY_AUTOSCALING", raising=False)
    recipe = load_recipe(SMOKE, ["sampler.replicas=2", "teacher.replicas=2"])
    with pytest.raises(ConfigError) as err:
        check_cluster(recipe)
    text = str(err.value)
    node = re.search(r"needs 2 '([0-9a-f]{12})' nodes but the cluster allows at most 1", text)
    assert node, text
    assert f"the plan asks for CPU=3 in all, see --dry-run; node {node.group(1)}: CPU=2)" in text, text
    check_cluster(load_recipe(SMOKE, []))  # CPU=2 fits: no error
