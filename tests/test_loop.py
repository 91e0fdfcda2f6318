"""The loop's promises over several steps (issue 11, point 8), read from metrics.jsonl and the weights."""

import json
import math
from collections import Counter

import pytest
import ray
import torch

from conftest import smoke_recipe
from csd_ray.controller import Controller, RunStopped
from csd_ray.data import PromptStream
from csd_ray.evaluation import response_tokens
from csd_ray.metrics import read_metrics


class Recording(Controller):
    """The real controller, also keeping the full student weights after every step."""

    def __init__(self, *args, stop_after=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.weights, self.stop_after = [], stop_after

    def _step(self, planned):
        if self.stop_after is not None and self.step + 1 == self.stop_after:
            self.stop_requested = "stop asked by the test"  # the SIGTERM/SIGINT path
        super()._step(planned)
        self.weights.append(self.trainers.call("parameters_vector")[0])


def test_a_stages_learning_rate_applies_from_its_first_step(ray_session, tmp_path):
    stages = "[{name: fast, steps: 2, lr: 1.0e-3}, {name: slow, steps: 2, lr: 1.0e-5}]"
    recipe = smoke_recipe(tmp_path, f"stages={stages}", "run.steps=4", "trainer.grad_clip=0")
    controller = Recording(recipe, log=lambda m: None)
    controller.run()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["lr"] for r in records] == [1e-3, 1e-3, 1e-5, 1e-5]
    w = controller.weights  # w[i]: after step i + 1
    step3 = (w[2] - w[1]).abs().max()
    step2 = (w[1] - w[0]).abs().max()
    # Adam moves each weight by about lr per step: step 3 (lr 1e-5) moves ~100x less than step 2 (lr 1e-3).
    assert step3 < 0.05 * step2, (float(step3), float(step2))


def test_async_run_with_skipped_steps_stops_cleanly_with_exit_3(ray_session, tmp_path):
    """max_staleness + 1 skipped (non-finite) steps used to end in IndexError: the bound counted step indices."""
    recipe = smoke_recipe(tmp_path, "run.mode=async", "run.max_staleness=1", "trainer.lr=1e30", "trainer.grad_clip=0",
                          "run.steps=6", "run.max_nonfinite_steps=3")
    with pytest.raises(RunStopped, match="3 steps in a row had a non-finite loss") as stop:
        Controller(recipe, log=lambda m: None).run()
    assert stop.value.exit_code == 3
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["skipped_nonfinite"] for r in records] == [False, True, True, True]
    assert all(r["staleness"] <= 1 for r in records)


def test_async_run_survives_skipped_steps_and_finishes(ray_session, tmp_path):
    recipe = smoke_recipe(tmp_path, "run.mode=async", "run.max_staleness=1", "trainer.lr=1e30", "trainer.grad_clip=0",
                          "run.steps=4", "run.max_nonfinite_steps=10")
    Controller(recipe, log=lambda m: None).run()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["weight_version"] for r in records] == [1, 1, 1, 1]


def test_a_resumed_run_with_replay_trains_the_same_data_and_weights(ray_session, tmp_path):
    common = ["run.steps=6", "batch.replay.capacity=3", "batch.replay.probability=0.5", "run.seed=1"]
    straight = Recording(smoke_recipe(tmp_path / "straight", *common), log=lambda m: None)
    straight.run()
    interrupted = Recording(smoke_recipe(tmp_path / "resumed", *common), log=lambda m: None, stop_after=3)
    with pytest.raises(RunStopped):
        interrupted.run()
    resumed = Recording(smoke_recipe(tmp_path / "resumed", *common), log=lambda m: None)
    resumed.run()
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "step_000003"
    a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    b = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert any(r["replayed"] for r in a[3:]), "seed 1 replays after the resume point"
    for x, y in zip(a, b):
        assert (x["replayed"], x["rollout_ids"], x["tokens"]) == (y["replayed"], y["rollout_ids"], y["tokens"]), x["step"]
    assert torch.allclose(straight.weights[-1], resumed.weights[-1], atol=1e-6, rtol=0)


class Trained(Controller):
    """The real controller, also keeping every trained rollout (fetched from the object store)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained = []

    def _step(self, planned):
        self.trained += [r for g in planned.groups for r in ray.get(list(g.rollouts))]
        super()._step(planned)


def test_cached_greedy_teacher_responses_are_made_at_once_and_train_as_per_step_ones(ray_session, tmp_path, capsys):
    """SeqKD warm-up: `cache` makes a stage's teacher responses in one batch, same prompts, same responses."""
    def run(cache):
        stages = f"[{{name: seqkd, steps: 3, sources: [{{kind: teacher, greedy: true, cache: {cache}}}], loss: {{name: ce}}}}]"
        controller = Trained(smoke_recipe(tmp_path / f"cache{cache}", "batch.prompts_per_step=2", f"stages={stages}"),
                             log=lambda m: None)
        controller.run()
        return controller.trained, capsys.readouterr().err

    per_step, log_per_step = run(0)
    cached, log_cached = run(4)
    assert "teacher responses:" not in log_per_step
    assert log_cached.count("teacher responses: 6 generated") == 1  # 2 now + the next 4: all 3 steps
    assert [r.prompt_indices for r in cached] == [r.prompt_indices for r in per_step]  # the stream did not move
    assert all(r.source == "teacher" for r in cached)
    for a, b in zip(cached, per_step):
        assert response_tokens(a) == response_tokens(b)  # greedy: the same responses, made in one batch
        assert all(len(t) > 0 for t in response_tokens(a))


def test_adaptive_schedule_draws_student_samples_as_the_held_out_loss_dictates(ray_session, tmp_path):
    """DistiLLM's schedule through the real loop: φ follows the logged evaluations, sources follow φ,
    and a later adaptive stage starts again from its own student probability."""
    mixed = "[{kind: student, probability: 0.0}, {kind: dataset, probability: 1.0}]"
    stages = (f"[{{name: rising, steps: 3, sources: {mixed}, adaptive: {{increment: 0.5, tolerance: -1000}}}},"
              f" {{name: flat, steps: 2, sources: {mixed}, adaptive: {{increment: 0.5, tolerance: 1000}}}}]")
    recipe = smoke_recipe(tmp_path, "run.steps=0", "run.eval_every=1", "data.eval_size=2", "run.eval_max_new_tokens=4",
                          "batch.prompts_per_step=2", f"stages={stages}", evaluate=True)
    # Stopped (the SIGINT path) after step 2, before that step's evaluation, then resumed: the
    # resumed run must make that evaluation and draw step 3 with the φ it yields.
    with pytest.raises(RunStopped):
        Recording(recipe, log=lambda m: None, stop_after=2).run()
    Controller(recipe, log=lambda m: None).run()
    train = read_metrics(tmp_path / "metrics.jsonl")
    evals = read_metrics(tmp_path / "metrics.jsonl", kind="eval")
    assert [e["step"] for e in evals] == [0, 1, 2, 3, 4, 5]
    assert all(math.isfinite(e["eval/student_nll_on_teacher"]) for e in evals)
    # tolerance -1000: every evaluation inside the stage raises φ by 0.5 (capped at 1); the next
    # stage starts from its own 0 and never rises (tolerance 1000).
    assert [r["student_probability"] for r in train] == [0.0, 0.5, 1.0, 0.0, 0.0]
    assert [r["sources"] for r in train][:1] + [r["sources"] for r in train][2:] == [["dataset"], ["student"], ["dataset"], ["dataset"]]
    saved = json.loads((sorted((tmp_path / "checkpoints").glob("step_*"))[-1] / "controller.json").read_text())
    assert saved["adaptive"]["0"]["probability"] == 1.0 and saved["adaptive"]["1"]["probability"] == 0.0
    # the evaluation after the stage's last step (step 3) was its last trigger
    assert saved["adaptive"]["0"]["reference"] == pytest.approx(evals[3]["eval/student_nll_on_teacher"])


def test_each_cached_teacher_response_trains_once_and_nothing_is_generated_in_vain(ray_session, tmp_path, capsys):
    """`cache` where it is hard: sampled (not greedy) teacher responses, 2 per prompt, beside a
    student source (source_mode 'all', so the stream alternates between them), 3 training prompts
    (each comes back within the stage), then a greedy cached stage with a cache smaller than two
    steps. Each generated response trains exactly once (a reused one would repeat: sampled
    responses never coincide), each stage generates in one batch only what it will train on, and
    the prompts are the stream's, in its order."""
    stages = ("[{name: mixed, steps: 3, source_mode: all, sources: [{kind: student}, {kind: teacher, cache: 8}]},"
              " {name: seqkd, steps: 2, sources: [{kind: teacher, greedy: true, cache: 2}], loss: {name: ce}}]")
    recipe = smoke_recipe(tmp_path, "run.steps=5", "data.num_examples=3", "batch.prompts_per_step=2", "batch.samples_per_prompt=2",
                          f"stages={stages}")
    controller = Trained(recipe, log=lambda m: None)
    controller.run()
    log = capsys.readouterr().err

    stream = PromptStream(controller.prompts.train, seed=recipe.run.seed)
    expected = [[e.index for e in stream.next_batch(2) for _ in range(2)] for _ in range(3 * 2 + 2)]
    assert [r.prompt_indices for r in controller.trained] == expected
    assert [r.source for r in controller.trained] == ["student", "teacher"] * 3 + ["teacher"] * 2
    # stage 1: this step's 2 prompts + the teacher's 4 later ones (not the student's), x2; stage 2: 2 + 2, x2
    assert log.count("teacher responses: ") == 2, log
    assert log.count("teacher responses: 12 generated") == 1 and log.count("teacher responses: 8 generated") == 1
    assert all(not cached for cached in controller.teacher_cache.values())  # everything made was trained

    def pairs(rollouts):
        return [(i, tuple(t)) for r in rollouts for i, t in zip(r.prompt_indices, response_tokens(r))]

    sampled = pairs(controller.trained[1:6:2])
    assert max(Counter(i for i, _ in sampled).values()) >= 4  # a prompt came back in a later step
    assert len(set(sampled)) == len(sampled) == 12  # every response trained once
    greedy = pairs(controller.trained[6:])
    for index in {i for i, _ in greedy}:
        assert len({t for i, t in greedy if i == index}) == 1  # greedy: one answer per prompt
