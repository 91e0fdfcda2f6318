"""The controller's pure decisions (no Ray): what may launch when, curriculum, shards, resume checks."""

import json

import pytest

from conftest import smoke_recipe
from csd_ray.controller import Controller, _first_line, _shards, complete_checkpoints, fingerprint
from csd_ray.schema import ConfigError


def _controller(tmp_path, *overrides):
    return Controller(smoke_recipe(tmp_path, *overrides), log=lambda m: None)


def test_sync_mode_samples_only_after_the_previous_step_trained(tmp_path):
    c = _controller(tmp_path, "run.steps=6")
    c.step, c.synced_version = 2, 2
    assert [c._may_launch(i) for i in (2, 3)] == [True, False]


def test_async_mode_runs_ahead_by_at_most_max_staleness(tmp_path):
    c = _controller(tmp_path, "run.steps=9", "run.mode=async", "run.max_staleness=2")
    c.step, c.version, c.synced_version = 3, 3, 3
    assert [c._may_launch(i) for i in (3, 4, 5, 6)] == [True, True, True, False]
    c.synced_version = 2  # the sampler's weights lag one version: one step less ahead
    assert [c._may_launch(i) for i in (4, 5)] == [True, False]
    c.version, c.synced_version = 1, 1  # two skipped (non-finite) steps applied no update: staleness counts versions
    assert [c._may_launch(i) for i in (3, 4, 5, 6)] == [True, True, True, False]


@pytest.mark.parametrize("overlap, expected", [("true", [True, True, False]), ("false", [True, False, False])])
def test_offpolicy_responses_are_produced_one_step_ahead_when_overlapping(tmp_path, overlap, expected):
    c = _controller(tmp_path, "run.steps=6", "batch.sources=[{kind: teacher}]", f"run.overlap_offpolicy={overlap}")
    c.step = 1
    assert [c._may_launch(i) for i in (1, 2, 3)] == expected


def test_curriculum_grows_the_response_length_linearly(tmp_path):
    c = _controller(tmp_path, "batch.curriculum.start_tokens=4", "batch.curriculum.warmup_steps=4")
    assert [c._max_new_tokens(i, 12) for i in range(6)] == [4, 6, 8, 10, 12, 12]
    assert c._max_new_tokens(0, 3) == 3  # never above the stage's cap
    assert _controller(tmp_path)._max_new_tokens(0, 12) == 12  # no curriculum


def test_shards_split_a_batch_between_replicas():
    assert list(_shards(["a", "b"], 5)) == [("a", 0, 3), ("b", 3, 5)]
    assert list(_shards(["a", "b", "c"], 2)) == [("a", 0, 1), ("b", 1, 2)]
    assert list(_shards(["a"], 4)) == [("a", 0, 4)]


def test_first_line_of_an_error():
    assert _first_line(RuntimeError("\n  first  \nsecond")) == "first"
    assert _first_line(RuntimeError("")) == "RuntimeError"
    assert len(_first_line(RuntimeError("x" * 500))) == 300


def _checkpoint(run_dir, step, recipe, complete=True, **state):
    path = run_dir / "checkpoints" / f"step_{step:06d}"
    path.mkdir(parents=True)
    (path / "controller.json").write_text(json.dumps({"step": step, "version": step, "fingerprint": fingerprint(recipe),
                                                      **state}))
    if complete:
        (path / "COMPLETE").write_text("ok\n")
    return path


def test_resume_points(tmp_path):
    recipe = smoke_recipe(tmp_path, "run.steps=5")
    assert _controller(tmp_path, "run.steps=5")._resume_point() is None
    assert complete_checkpoints(tmp_path) == []
    _checkpoint(tmp_path, 10, recipe)
    _checkpoint(tmp_path, 2, recipe)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000002", "step_000010"]  # by step, not name
    with pytest.raises(ConfigError, match="at step 10, beyond run.steps=5"):
        _controller(tmp_path, "run.steps=5")._resume_point()
    assert _controller(tmp_path, "run.steps=10")._resume_point().name == "step_000010"
    explicit = tmp_path / "checkpoints" / "step_000002"
    assert _controller(tmp_path, "run.steps=5", f"run.resume={explicit}")._resume_point() == explicit
    with pytest.raises(ConfigError, match="already holds checkpoints \\(step_000010\\)"):
        _controller(tmp_path, "run.steps=10", "run.resume=never")._resume_point()
    assert _controller(tmp_path / "fresh", "run.resume=never")._resume_point() is None
    with pytest.raises(ConfigError, match=r"incompatible run \(trainer_ranks: checkpoint 2, recipe 1\)"):
        _controller(tmp_path, "run.steps=10", "trainer.num_ranks=1")._resume_point()


def test_fingerprint_names_what_a_checkpoint_must_agree_on(tmp_path):
    f = fingerprint(smoke_recipe(tmp_path))
    assert f == {"student": "tiny", "num_layers": 0, "keep_layers": [], "tiny": f["tiny"], "trainer_ranks": 2, "seed": 0}
    assert f["tiny"]["seed"] == 2 and f["tiny"]["num_layers"] == 1
    assert fingerprint(smoke_recipe(tmp_path, "run.seed=4"))["seed"] == 4


def test_more_launch_and_resume_rules(tmp_path):
    c = _controller(tmp_path, "run.steps=4",
                    "stages=[{steps: 2, sources: [{kind: teacher}]}, {steps: 2, sources: [{kind: student}]}]")
    c.step, c.synced_version = 2, 2
    assert [c._may_launch(i) for i in (2, 3)] == [True, False]  # stage 2 is on-policy: no running ahead
    c.step = 0
    assert [c._may_launch(i) for i in (0, 1, 2)] == [True, True, False]  # stage 1: teacher samples one ahead
    assert _controller(tmp_path, "batch.curriculum.warmup_steps=4")._max_new_tokens(1, 12) == 12  # no start: off
    assert _controller(tmp_path, "batch.curriculum.start_tokens=4")._max_new_tokens(1, 12) == 12  # no warm-up: off
    recipe = smoke_recipe(tmp_path, "run.steps=5")
    half = _checkpoint(tmp_path, 3, recipe, complete=False)
    with pytest.raises(ConfigError, match="not a complete csd_ray checkpoint") as err:
        _controller(tmp_path, "run.steps=5", f"run.resume={half}")._resume_point()
    assert err.value.key == "run.resume"
    _checkpoint(tmp_path, 1, recipe)
    with pytest.raises(ConfigError) as err:
        _controller(tmp_path, "run.resume=never")._resume_point()
    assert err.value.key == "run.resume" and "use another run.output_dir or run.resume=auto to continue it" in str(err.value)


def test_a_fresh_controller_and_the_exact_resume_refusals(tmp_path):
    seen = []
    c = Controller(smoke_recipe(tmp_path, "batch.replay.capacity=3"), log=seen.append)
    assert (c.step, c.version, c.synced_version, c._sync_seconds, c.attempt) == (0, 0, 0, 0.0, 0)
    assert c.replay.maxlen == 3 and c.failures == {"sampler": 0, "teacher": 0, "trainer": 0}
    c.log("hello")
    assert seen == ["hello"]
    recipe = smoke_recipe(tmp_path, "run.steps=9")
    _checkpoint(tmp_path, 4, recipe)
    with pytest.raises(ConfigError) as err:
        _controller(tmp_path, "run.steps=9", "run.seed=5", "trainer.num_ranks=1")._resume_point()
    assert err.value.key == "run.resume" and err.value.detail == (
        f"{tmp_path / 'checkpoints' / 'step_000004'} belongs to an incompatible run (trainer_ranks: checkpoint 2, "
        "recipe 1; seed: checkpoint 0, recipe 5); use another run.output_dir or run.resume=PATH")
    with pytest.raises(ConfigError) as err:
        _controller(tmp_path, "run.steps=3")._resume_point()
    assert err.value.key == "run.steps"
    old = tmp_path / "old" / "checkpoints" / "step_000001"
    old.mkdir(parents=True)
    (old / "controller.json").write_text(json.dumps({"step": 1}))  # no fingerprint: nothing matches
    (old / "COMPLETE").write_text("ok\n")
    with pytest.raises(ConfigError, match="student: checkpoint None, recipe 'tiny'"):
        _controller(tmp_path / "old")._resume_point()
