"""The literature's methods as recipes (recipes/methods/), and the trainer pieces they need (issue 12).

Every recipe runs 2 steps through the whole actor system on tiny models (its last two stages,
one step each; an adaptive stage two, so that an evaluation falls inside it), sharing one Ray session. The trainer's target and per-sequence weighting are
checked in-process against the model's own cross-entropy.
"""

import copy
import math
from pathlib import Path

import pytest
import torch

from conftest import REPO
from csd_ray.config import ModelConfig, Recipe, TinyModelConfig, load_recipe
from csd_ray.controller import Controller
from csd_ray.losses import get_loss
from csd_ray.metrics import read_metrics
from csd_ray.models import load_model, load_tokenizer
from csd_ray.rollout import TeacherOutput, rollout_from_tokens
from csd_ray.schema import apply_override, build, load_yaml
from csd_ray.workers.trainer import StudentLoss

METHODS = sorted((REPO / "recipes" / "methods").glob("*.yaml"))
TINY = [
    "teacher_model={path: tiny, tiny: {num_layers: 2, hidden_size: 64, num_heads: 2, num_kv_heads: 1, seed: 1}}",
    "student_model={path: tiny, tiny: {num_layers: 1, hidden_size: 64, num_heads: 2, num_kv_heads: 1, seed: 2}}",
    "data.num_examples=100", "data.eval_size=0", "batch.prompts_per_step=2", "batch.max_new_tokens=8",
    "sampler.placement={num_cpus: 0.5, threads: 1}", "teacher.placement={num_cpus: 0.5, threads: 1}",
    "trainer.placement={num_cpus: 0.5, threads: 1}", "trainer.num_ranks=1",
]


def tiny_method(path: Path, output_dir: Path) -> Recipe:
    """The recipe at ``path`` on tiny models: its last two stages, one step each (an adaptive stage
    two: its schedule needs an evaluation between two of its steps)."""
    data, located = load_yaml(path)
    for override in TINY + [f"run.output_dir={output_dir}"]:
        apply_override(data, located, override)
    stages = copy.deepcopy(data["stages"][-2:])
    for stage in stages:
        stage["steps"] = 1 if len(stages) == 2 and "adaptive" not in stage else 2
    data["stages"] = stages
    if any("adaptive" in stage for stage in stages):  # driven by evaluations: a tiny one each step
        for override in ("data.eval_size=2", "run.eval_every=1", "run.eval_max_new_tokens=4"):
            apply_override(data, located, override)
    recipe = build(Recipe, data, located)
    recipe.validate(located)
    return recipe


def test_every_method_has_a_counterpart():
    names = {p.stem for p in METHODS}
    assert {"supervised_kd", "seqkd", "imitkd", "gkd", "distillm", "contrastive_pairs"} <= names
    for name in names:
        assert f"{name}_csd" in names or name.endswith(("_csd", "_fkl")) or f"{name}_fkl" in names, name


@pytest.mark.parametrize("path", METHODS, ids=[p.stem for p in METHODS])
def test_method_recipe_validates_as_shipped(path):
    recipe = load_recipe(path)
    assert recipe.run.steps == 40  # the demo's budget: comparable with recipes/local.yaml


@pytest.mark.parametrize("path", METHODS, ids=[p.stem for p in METHODS])
def test_method_recipe_trains_two_steps_on_tiny_models(ray_session, tmp_path, path):
    recipe = tiny_method(path, tmp_path)
    Controller(recipe, log=lambda m: None).run()
    records = read_metrics(tmp_path / "metrics.jsonl")
    steps = recipe.run.steps
    assert [r["step"] for r in records] == list(range(1, steps + 1)) and records[-1]["weight_version"] == steps
    assert steps == (3 if any(s.adaptive for s in recipe.stages) else 2)
    for record, stage in zip(records, [recipe.stage_at(i) for i in range(steps)]):
        assert record["loss_name"] == stage.loss.name
        assert math.isfinite(record["loss"]) and record["loss"] >= 0 and record["grad_norm"] > 0
        kinds = [s.kind for s in stage.sources]
        if record["replayed"]:
            continue
        if stage.source_mode == "all":
            assert record["sources"] == kinds
        else:
            assert len(record["sources"]) == 1 and record["sources"][0] in kinds
    assert (tmp_path / "final" / "config.json").exists()


@pytest.fixture(scope="module")
def tiny_student():
    tokenizer = load_tokenizer(ModelConfig(path="tiny"))
    model = load_model(ModelConfig(path="tiny", tiny=TinyModelConfig(num_layers=1, seed=3)), tokenizer, dtype="float32")
    return model.double(), tokenizer


def _two_sequences(tokenizer):
    prompts = [[1, 42, 7, 99], [5, 6]]
    responses = [[11, 12, 13, 14, 15, 16, 2], [21, 22, 2]]  # 7 and 3 response tokens
    return rollout_from_tokens(prompts, responses, tokenizer.pad_token_id, source="teacher")


def _reference_ce(model, rollout):
    """Per-sequence mean cross-entropy of the response tokens, from the model's own logits."""
    from csd_ray.models import position_ids

    logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                   position_ids=position_ids(rollout.attention_mask)).logits[:, :-1]
    targets = rollout.input_ids[:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    mask = rollout.target_mask()
    return (per_token * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("average", ["token", "sequence"])
def test_trainer_ce_is_the_models_own_cross_entropy_on_response_tokens(tiny_student, average):
    model, tokenizer = tiny_student
    rollout = _two_sequences(tokenizer)
    rows = int(rollout.target_mask().sum())
    teacher = TeacherOutput("logits", {"logits": torch.zeros(rows, len(tokenizer), dtype=torch.float64)},
                            torch.tensor([0, 7, 10]))
    module = StudentLoss(model, get_loss("ce", vocab_size=len(tokenizer)), average=average)
    normalizer = 2.0 if average == "sequence" else float(rows)
    value, _ = module(rollout, teacher, None, normalizer)
    per_sequence = _reference_ce(model, rollout)
    lengths = rollout.target_mask().sum(1).double()
    expected = per_sequence.mean() if average == "sequence" else (per_sequence * lengths).sum() / lengths.sum()
    assert value.item() == pytest.approx(expected.item(), rel=1e-9)
    # The two averages really differ here (sequences of 7 and 3 tokens), so the test tells them apart.
    assert abs(per_sequence.mean() - (per_sequence * lengths).sum() / lengths.sum()) > 1e-3
