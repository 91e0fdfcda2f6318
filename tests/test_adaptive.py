"""DistiLLM's adaptive off-policy schedule (Ko et al., ICML 2024, Sec. 3.2): φ, its draw weights,
its checkpointed state, and the recipe checks that keep it from silently doing nothing (issue 12)."""

import math

import pytest

from conftest import REPO
from csd_ray.adaptive import AdaptiveSchedule
from csd_ray.config import AdaptiveSourceConfig, ConfigError, SourceConfig, load_recipe


def test_phi_rises_by_the_increment_each_time_the_held_out_loss_is_worse_than_the_reference():
    s = AdaptiveSchedule(AdaptiveSourceConfig(increment=0.25, maximum=0.6, tolerance=0.1), initial=0.0, reference=5.0)
    seen = []
    for value in [4.0, 4.05, 4.2, 4.15, 4.31, None, float("nan"), 9.0, 20.0]:
        rose = s.observe(value)
        seen.append((rose, s.probability, s.reference))
    assert seen == [
        (False, 0.0, 5.0),   # better than the reference: no rise, and the reference stays
        (False, 0.0, 5.0),
        (False, 0.0, 5.0),   # 4.2 < 5.0 + 0.1
        (False, 0.0, 5.0),
        (False, 0.0, 5.0),
        (False, 0.0, 5.0),   # an evaluation that could not score changes nothing
        (False, 0.0, 5.0),
        (True, 0.25, 9.0),   # 9.0 >= 5.1: rise, the reference moves to the triggering value
        (True, 0.5, 20.0),
    ]
    assert s.observe(20.1) and s.probability == 0.6  # 20.1 >= 20.1: a rise, capped at maximum
    assert s.observe(30.0) and s.probability == 0.6


def test_the_first_value_becomes_the_reference_and_negative_tolerance_rises_unless_it_improved_enough():
    s = AdaptiveSchedule(AdaptiveSourceConfig(increment=0.5, tolerance=-1.0), initial=0.1)
    assert not s.observe(3.0) and s.reference == 3.0 and s.probability == 0.1
    assert s.observe(2.5) and s.probability == pytest.approx(0.6)  # improved by 0.5 < 1.0
    assert not s.observe(1.0) and s.probability == pytest.approx(0.6)  # improved by 1.5


def test_weights_give_phi_to_the_student_and_share_the_rest_in_proportion():
    s = AdaptiveSchedule(AdaptiveSourceConfig(), initial=0.2)
    sources = [SourceConfig(kind="dataset", probability=0.6), SourceConfig(kind="student", probability=0.2),
               SourceConfig(kind="teacher", probability=0.2)]
    assert s.weights(sources) == pytest.approx([0.6, 0.2, 0.2])
    s.probability = 0.7
    assert s.weights(sources) == pytest.approx([0.3 * 0.75, 0.7, 0.3 * 0.25])
    zeros = [SourceConfig(kind="student", probability=0.7), SourceConfig(kind="dataset", probability=0.0),
             SourceConfig(kind="teacher", probability=0.0)]
    assert s.weights(zeros) == pytest.approx([0.7, 0.15, 0.15])
    s.probability = 1.0
    assert s.weights(sources) == pytest.approx([0.0, 1.0, 0.0])


def test_state_round_trips_through_json():
    import json

    s = AdaptiveSchedule(AdaptiveSourceConfig(increment=0.3), initial=0.0, reference=2.0)
    s.observe(2.5)
    t = AdaptiveSchedule(AdaptiveSourceConfig(increment=0.3), initial=0.0)
    t.load_state(json.loads(json.dumps(s.state())))
    assert (t.probability, t.reference) == (pytest.approx(0.3), 2.5)
    assert not t.observe(2.4) and t.observe(2.6) and t.probability == pytest.approx(0.6)


STAGE = "stages=[{{name: a, steps: 2, source_mode: {mode}, sources: {sources}, adaptive: {adaptive}}}]"
MIXED = "[{kind: student, probability: 0.0}, {kind: dataset, probability: 1.0}]"


@pytest.mark.parametrize("mode, sources, adaptive, extra, message", [
    ("all", MIXED, "{}", [], "needs source_mode 'sample'"),
    ("sample", "[{kind: dataset}]", "{}", [], "one 'student' source"),
    ("sample", "[{kind: student}]", "{}", [], "at least one other source"),
    ("sample", MIXED, "{increment: 0}", [], "stages[0].adaptive.increment: must be in (0, 1], got 0.0"),
    ("sample", MIXED, "{increment: -0.1}", [], "stages[0].adaptive.increment: must be in (0, 1], got -0.1"),
    ("sample", MIXED, "{increment: 2}", [], "stages[0].adaptive.increment: must be in (0, 1], got 2.0"),
    ("sample", MIXED, "{maximum: 1.5}", [], "stages[0].adaptive.maximum: must be in [0, 1], got 1.5"),
    ("sample", MIXED, "{maximum: -1}", [], "stages[0].adaptive.maximum: must be in [0, 1], got -1.0"),
    ("sample", MIXED, "{tolerance: .nan}", [], "stages[0].adaptive.tolerance: must be a finite number, got nan"),
    ("sample", MIXED, "{tolerance: abc}", [], "stages[0].adaptive.tolerance: expected a number, got 'abc'"),
    ("sample", MIXED, "{maximum: 0}", [], "stages[0].adaptive.maximum: must exceed the student source's probability "
     "(the initial φ), 0.0, or φ can never rise; got 0.0"),
    ("sample", MIXED, "{incremnt: 0.2}", [], "stages[0].adaptive.incremnt: unknown key 'incremnt' in section "
     "'stages[0].adaptive'; did you mean 'increment'?"),
    ("sample", "[{kind: student, probability: 0.5}, {kind: dataset, probability: 0.5}]", "{maximum: 0.3}", [],
     "exceeds adaptive.maximum"),
    ("sample", MIXED, "{}", ["run.eval_every=0"], "set run.eval_every > 0"),
    ("sample", MIXED, "{}", ["data.eval_size=0"], "data.eval_size > 0"),
    ("sample", MIXED, "{}", ["run.eval_every=2"], "stages[0].adaptive: no held-out evaluation falls between the stage's "
     "steps 1..2 with run.eval_every=2, so φ could never change a draw; set run.eval_every <= 1"),
    ("sample", MIXED, "{}", ["stages.0.steps=1"], "no held-out evaluation falls between the stage's steps 1..1 with "
     "run.eval_every=1, so φ could never change a draw; give the stage at least 2 steps"),
    ("sample", MIXED, "{metric: accuracy}", [], "stages[0].adaptive.metric: expected one of 'student_nll_on_teacher', "
     "'teacher_nll', got 'accuracy'"),
])
def test_adaptive_stages_that_could_not_work_are_refused(mode, sources, adaptive, extra, message):
    stage = STAGE.format(mode=mode, sources=sources, adaptive=adaptive)
    with pytest.raises(ConfigError) as err:
        load_recipe(REPO / "recipes" / "smoke.yaml", ["run.steps=0", "run.eval_every=1", stage, *extra])
    assert message in str(err.value) and "stages[0]" in str(err.value), str(err.value)


def test_a_valid_adaptive_stage_keeps_its_settings():
    stage = STAGE.format(mode="sample", sources=MIXED, adaptive="{increment: 0.2, tolerance: -0.5, metric: teacher_nll}")
    recipe = load_recipe(REPO / "recipes" / "smoke.yaml", ["run.steps=0", "run.eval_every=1", stage])
    a = recipe.stage_at(1).adaptive
    assert (a.increment, a.maximum, a.tolerance, a.metric) == (0.2, 1.0, -0.5, "teacher_nll")
    assert recipe.stage_index(0) == recipe.stage_index(1) == 0 and math.isclose(recipe.stage_at(0).sources[0].probability, 0.0)


@pytest.mark.parametrize("eval_every, accepted", [(3, True), (4, True), (5, False), (13, True), (14, False)])
def test_a_later_adaptive_stage_needs_an_evaluation_between_two_of_its_steps(eval_every, accepted):
    """Steps 10..13 (0-based) are the stage's: an evaluation after step 11, 12 or 13 (1-based) can
    change a later draw of it; one at 10 (before it) is its reference and one at 14 comes too late."""
    stages = ("stages=[{steps: 10, sources: [{kind: dataset}]}, {steps: 4, sources: " + MIXED + ", adaptive: {}}]")
    overrides = ["run.steps=0", f"run.eval_every={eval_every}", stages]
    if accepted:
        assert load_recipe(REPO / "recipes" / "smoke.yaml", overrides).stage_at(13).adaptive is not None
    else:
        with pytest.raises(ConfigError, match=r"stages\[1\].adaptive: no held-out evaluation falls between the stage's "
                                              rf"steps 11..14 with run.eval_every={eval_every}.*set run.eval_every <= 3"):
            load_recipe(REPO / "recipes" / "smoke.yaml", overrides)
