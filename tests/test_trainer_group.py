"""One trainer group (2 FSDP2 ranks) driven step by step: reported loss, source weights, staleness
guard, non-finite steps. Its own module: the group holds its CPUs until the module ends, and a
Controller run in the same Ray session would wait for them forever."""

import copy

import pytest
import ray
import torch

from conftest import smoke_recipe
from csd_ray.workers.trainer import StaleRollout
from test_system import _batch, _group


# Shared by the tests below: each reads the weights it starts from.
@pytest.fixture(scope="module")
def trainers(ray_session, tmp_path_factory):
    recipe = smoke_recipe(tmp_path_factory.mktemp("trainers"), "trainer.lr=1e-3")
    rollout, scores, head = _batch(recipe)
    group = _group(recipe, 2)
    group.call("set_teacher_lm_head", head)
    yield recipe, group, rollout, scores, head
    group.shutdown()


def _reference_loss(recipe, group, rollout, scores, head):
    """The recipe's loss on the group's current student logits, computed here from the teacher's hidden rows."""
    from csd_ray.losses import get_loss
    from csd_ray.models import load_tokenizer

    logits = group.call("probe_logits", rollout)[0].double()
    weight, _transform = head  # (lm_head, logit transform): the tiny teacher has none
    teacher_logits = scores.rows["hidden"].double() @ weight.double().t()
    loss = get_loss(recipe.trainer.loss.name, vocab_size=len(load_tokenizer(recipe.student_model)), **recipe.trainer.loss.params)
    return loss(logits, teacher_logits, torch.ones(logits.shape[0], dtype=torch.bool))[0].item()


def test_logged_loss_is_the_global_loss_times_the_source_weight(trainers):
    recipe, group, rollout, scores, head = trainers
    reference = _reference_loss(recipe, group, rollout, scores, head)
    result = group.call("train_step", [([ray.put(rollout)], [ray.put(scores)], 2.5)])
    assert [r["loss"] for r in result] == pytest.approx([2.5 * reference] * 2, rel=1e-4)

    # Two sources in one step: token-weighted mean of each source's loss times its weight.
    first, second = rollout.select(0, 2), rollout.select(2, 4)
    parts = [(first, scores.select(0, 2), 0.5), (second, scores.select(2, 4), 1.5)]
    refs = [_reference_loss(recipe, group, r, t, head) for r, t, _ in parts]
    tokens = [r.num_tokens() for r, _, _ in parts]
    expected = sum(w * ref * n for (_, _, w), ref, n in zip(parts, refs, tokens)) / sum(tokens)
    result = group.call("train_step", [([ray.put(r)], [ray.put(t)], w) for r, t, w in parts])
    assert [r["loss"] for r in result] == pytest.approx([expected] * 2, rel=1e-4)


def test_staleness_guard_accepts_the_bound_and_refuses_one_version_older(trainers):
    _, group, rollout, scores, _ = trainers
    stale = rollout.select(0, rollout.num_sequences)
    stale.weight_version = 7
    before = group.call("parameters_vector")[0]
    with pytest.raises(ray.exceptions.RayTaskError, match="weights v7 .* older than the allowed v8") as err:
        group.call("train_step", [([ray.put(stale)], [ray.put(scores)], 1.0)], None, None, 8)
    assert isinstance(err.value.as_instanceof_cause(), StaleRollout)
    assert torch.equal(group.call("parameters_vector")[0], before)  # refused before any update
    result = group.call("train_step", [([ray.put(stale)], [ray.put(scores)], 1.0)], None, None, 7)
    assert result[0]["rollout_version"] == 7
    assert (group.call("parameters_vector")[0] - before).abs().max() > 1e-5


def test_a_nonfinite_step_leaves_the_weights_and_optimizer_untouched(trainers):
    _, group, rollout, scores, _ = trainers
    poisoned = copy.deepcopy(scores)
    poisoned.rows["hidden"][3] = 1e30  # finite logits whose squared differences overflow fp32
    before = group.call("parameters_vector")[0]
    version = group.call("train_step", [([ray.put(rollout)], [ray.put(scores)], 1.0)])[0]["version"]
    after_good = group.call("parameters_vector")[0]
    skipped = group.call("train_step", [([ray.put(rollout)], [ray.put(poisoned)], 1.0)])
    assert all(r["skipped_nonfinite"] and r["version"] == version for r in skipped), skipped
    assert torch.equal(group.call("parameters_vector")[0], after_good), skipped
    # The optimizer state took nothing from the NaN step: the next good step is finite and moves.
    good = group.call("train_step", [([ray.put(rollout)], [ray.put(scores)], 1.0)])
    final = group.call("parameters_vector")[0]
    assert not good[0]["skipped_nonfinite"] and torch.isfinite(final).all()
    assert (final - after_good).abs().max() > 1e-6 and (after_good - before).abs().max() > 1e-6
