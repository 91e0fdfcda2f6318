"""Failures and resume: bad input, checkpoints, signals, non-finite steps (issue 6)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import ray
import torch

from conftest import REPO, smoke_recipe
from csd_ray.controller import Controller, RunStopped, complete_checkpoints, fingerprint
from csd_ray.metrics import read_metrics
from csd_ray.run import main

SMOKE = str(REPO / "recipes" / "smoke.yaml")


def _fake_checkpoint(run_dir, step, recipe_overrides=(), complete=True):
    path = run_dir / "checkpoints" / f"step_{step:06d}"
    path.mkdir(parents=True)
    recipe = smoke_recipe(run_dir, *recipe_overrides)
    (path / "controller.json").write_text(json.dumps({"step": step, "version": step, "stream": {"epoch": 0, "cursor": 0},
                                                      "fingerprint": fingerprint(recipe)}))
    if complete:
        (path / "COMPLETE").write_text("ok\n")
    return path


@pytest.fixture
def files(tmp_path):
    """Bad inputs a user might hand us, made on disk."""
    (tmp_path / "broken.yaml").write_text("run:\n  steps: [2\n")
    (tmp_path / "bad.jsonl").write_text('{"question": "a"}\n{"question": "b",}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "long.jsonl").write_text(json.dumps({"question": "word " * 400}) + "\n")
    (tmp_path / "noprompt.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"question": "ok?"}) + "\n" + json.dumps({"question": "  \n"}) + "\n")
    (tmp_path / "blankchat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": " "},
                                                                      {"role": "assistant", "content": "4"}]}) + "\n")
    from csd_ray.config import ModelConfig
    from csd_ray.models import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    tok.add_tokens(["<other>"])
    tok.save_pretrained(tmp_path / "other_tokenizer")
    _fake_checkpoint(tmp_path / "other_run", 2, ["student_model.tiny.seed=9"])
    _fake_checkpoint(tmp_path / "finished_run", 2)
    (tmp_path / "not_a_checkpoint").mkdir()
    return tmp_path


BAD_INPUTS = [
    # (name, recipe, overrides, key words in the one-line message)
    ("malformed yaml", "{d}/broken.yaml", [], ["broken.yaml:2", "invalid YAML"]),
    ("missing recipe", "{d}/nope.yaml", [], ["recipe file not found"]),
    ("unknown key", SMOKE, ["trainer.learning_rate=1"], ["unknown key 'learning_rate'"]),
    ("mistyped value", SMOKE, ["run.steps=many"], ["run.steps", "expected an integer, got 'many'"]),
    ("unknown loss", SMOKE, ["trainer.loss.name=klx"], ["unknown loss 'klx'"]),
    ("bad override", SMOKE, ["run.steps"], ["must look like key.path=value"]),
    ("missing model path", SMOKE, ["student_model.path=./models/missing"], ["model path not found: ./models/missing"]),
    ("tokenizer mismatch", SMOKE, ["teacher_model.tokenizer={d}/other_tokenizer"], ["tokenizer mismatch: student 'tiny' has 49152 tokens, teacher 'tiny' has 49153"]),
    ("malformed data line", SMOKE, ["data.source={d}/bad.jsonl"], ["bad.jsonl:2: malformed JSON line"]),
    ("empty data", SMOKE, ["data.source={d}/empty.jsonl"], ["the dataset is empty"]),
    ("prompts all too long", SMOKE, ["data.source={d}/long.jsonl"], ["all 1 prompts are longer than data.max_prompt_tokens"]),
    ("missing prompt field", SMOKE, ["data.source={d}/noprompt.jsonl"], ["no field 'question'", "fields: text"]),
    ("vllm head size", SMOKE, ["sampler.backend=vllm", "student_model.tiny.num_heads=4"],
     ["student_model.tiny.hidden_size", "head size", "= 16"]),
    ("empty prompt", SMOKE, ["data.source={d}/blank.jsonl"], ["blank.jsonl:2: 'question' is empty"]),
    ("empty chat prompt", SMOKE, ["data.source={d}/blankchat.jsonl", "data.prompt_field=messages"],
     ["blankchat.jsonl:1: 'messages' has no non-empty message"]),
    ("incompatible checkpoint", SMOKE, ["run.output_dir={d}/other_run"], ["incompatible run", "tiny"]),
    ("resume=never over checkpoints", SMOKE, ["run.output_dir={d}/finished_run", "run.resume=never"], ["already holds checkpoints"]),
    ("teacher option on a student source", SMOKE, ["stages=[{{name: a, steps: 3, sources: [{{kind: student, cache: 8}}]}}]"],
     ["stages[0].sources[0].cache", "teacher responses only", "'student'"]),
    ("negative teacher cache", SMOKE, ["stages=[{{name: a, steps: 3, sources: [{{kind: teacher, cache: -1}}]}}]"],
     ["stages[0].sources[0].cache", "must be >= 0, got -1"]),
    ("adaptive schedule without evaluations", SMOKE,
     ["stages=[{{name: a, steps: 3, sources: [{{kind: student, probability: 0}}, {{kind: dataset, probability: 1}}], adaptive: {{}}}}]"],
     ["stages[0].adaptive", "run.eval_every > 0"]),
    ("misspelt key inside an optional section", SMOKE,
     ["run.eval_every=1", "stages=[{{name: a, steps: 3, sources: [{{kind: student, probability: 0}}, {{kind: dataset, probability: 1}}], "
      "adaptive: {{metric: rouge_l}}}}]"],
     ["stages[0].adaptive.metric", "expected one of 'student_nll_on_teacher', 'teacher_nll', got 'rouge_l'"]),
    ("adaptive schedule that could never change a draw", SMOKE,
     ["run.eval_every=5", "stages=[{{name: a, steps: 3, sources: [{{kind: student, probability: 0}}, {{kind: dataset, probability: 1}}], "
      "adaptive: {{}}}}]"],
     ["stages[0].adaptive", "no held-out evaluation falls between", "set run.eval_every <= 2"]),
    ("resume path not a checkpoint", SMOKE, ["run.resume={d}/not_a_checkpoint"], ["not a complete csd_ray checkpoint"]),
    ("no arithmetic examples", SMOKE, ["data.num_examples=0"], ["data.num_examples", "must be >= 1, got 0"]),
]


@pytest.mark.parametrize("name, recipe, overrides, words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_one_clear_message_and_exit_code_2(files, capsys, name, recipe, overrides, words):
    d = str(files)
    code = main([recipe.format(d=d), *(o.format(d=d) for o in overrides), f"run.output_dir={d}/out"]
                if not any(o.startswith("run.output_dir") for o in overrides)
                else [recipe.format(d=d), *(o.format(d=d) for o in overrides)])
    err = capsys.readouterr().err
    assert code == 2, err
    message = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(message) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in message[0], (word, message[0])
    assert not ray.is_initialized()  # nothing started


def test_debug_flag_shows_the_traceback(files):
    with pytest.raises(Exception, match="data file not found"):
        main([SMOKE, f"data.source={files}/nothing.jsonl", "--debug"])


def test_half_written_checkpoints_are_ignored_in_favour_of_the_last_complete_one(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 6, complete=False)  # crashed after the rename? never: no COMPLETE, not used
    (tmp_path / "checkpoints" / ".tmp-step_000008").mkdir()  # crashed mid-write
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000002", "step_000004"]
    controller = Controller(smoke_recipe(tmp_path, "run.steps=6"), log=lambda m: None)
    assert controller._resume_point().name == "step_000004"


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(ray_session, tmp_path):
    # An absurd learning rate turns the weights to inf after the first update; every later loss is NaN.
    recipe = smoke_recipe(tmp_path, "trainer.lr=1e30", "trainer.grad_clip=0", "run.steps=6", "run.max_nonfinite_steps=2")
    with pytest.raises(RunStopped, match="2 steps in a row had a non-finite loss") as stop:
        Controller(recipe, log=lambda m: None).run()
    assert stop.value.exit_code == 3
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["skipped_nonfinite"] for r in records] == [False, True, True]
    assert [r["weight_version"] for r in records] == [1, 1, 1]  # skipped steps change nothing


def _final_weights(path):
    from safetensors.torch import load_file

    return load_file(path / "final" / "model.safetensors")


def test_a_failed_checkpoint_write_never_looks_complete(ray_session, tmp_path):
    """Shards go to a temporary folder; only a finished one is renamed into place, COMPLETE last."""
    controller = Controller(smoke_recipe(tmp_path, "run.steps=2", "run.checkpoint_every=1"), log=lambda m: None)
    controller.start()
    try:
        controller.train()
        (good,) = complete_checkpoints(tmp_path)
        assert good.name == "step_000001"
        assert {"COMPLETE", "controller.json", "trainer_state.pt", ".metadata"} <= {p.name for p in good.iterdir()}
        rank1 = json.loads((tmp_path / "actors.json").read_text())["trainer"][1]["pid"]
        os.kill(rank1, signal.SIGKILL)  # the step-2 checkpoint dies mid-write
        with pytest.raises(ray.exceptions.RayError):
            controller.checkpoint()
    finally:
        controller.shutdown()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000001"]
    assert Controller(smoke_recipe(tmp_path, "run.steps=2"), log=lambda m: None)._resume_point() == good


def test_sigint_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    # A warm-up + linear decay schedule: a resume that restarted the scheduler would train differently.
    common = [sys.executable, "-m", "csd_ray.run", SMOKE, "run.steps=4", "data.eval_size=0",
              "trainer.warmup_steps=2", "trainer.lr_schedule=linear"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    straight = subprocess.run(common + [f"run.output_dir={tmp_path / 'straight'}"], env=env, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]

    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen(common + [f"run.output_dir={run_dir}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.2)
    assert (run_dir / "metrics.jsonl").exists(), "the run never started a step"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-2000:]
    assert "SIGINT received" in err and "Resume by running the same command again" in err
    stopped_at = len(read_metrics(run_dir / "metrics.jsonl"))
    assert 1 <= stopped_at < 4 and [p.name for p in complete_checkpoints(run_dir)][-1] == f"step_{stopped_at:06d}"

    resumed = subprocess.run(common + [f"run.output_dir={run_dir}"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:06d}'}" in resumed.stderr
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # every step once, none repeated
    lr = 1e-3  # smoke.yaml's trainer.lr
    assert [r["lr"] for r in records] == pytest.approx([lr / 2, lr, lr, lr / 2], rel=1e-9)
    assert [r["lr"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")] == [r["lr"] for r in records]
    a, b = _final_weights(tmp_path / "straight"), _final_weights(run_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key


def test_a_second_signal_exits_at_once_without_a_new_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "csd_ray.run", SMOKE, "run.steps=200", "data.eval_size=0", f"run.output_dir={run_dir}"]
    proc = subprocess.Popen(cmd, env={**os.environ, "RAY_ADDRESS": ""}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.2)
    assert (run_dir / "metrics.jsonl").exists(), "the run never started a step"
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)  # the second one, while the step is still running
    _, err = proc.communicate(timeout=240)
    assert proc.returncode not in (0, 143), (proc.returncode, err[-2000:])
    assert "received: finishing this step" in err and "Resume by running" not in err, err[-2000:]
    assert len(read_metrics(run_dir / "metrics.jsonl")) < 200
    assert complete_checkpoints(run_dir) == []  # no checkpoint written on the way out
