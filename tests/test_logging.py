"""Run logs people read: TensorBoard, MLflow, a PNG plot, plain per-step lines in captured logs (issue 14).

The logger is fed the records the controller writes; the trackers' own readers check the files.
A real run through `ray job submit` (tests/test_job_submit.py) checks the captured log itself.
"""

import math

import pytest

from conftest import REPO
from csd_ray.config import load_recipe
from csd_ray.metrics import PLOT_FILE, MetricsLogger, plain_line, read_metrics


def _train(step, loss):
    return {"kind": "train", "step": step, "stage": "main", "loss": loss, "grad_norm": 0.5 * step, "lr": 1e-4 * step,
            "tokens": 40, "tokens_per_s": 81.4, "step_time": 0.49, "staleness": 0, "skipped_nonfinite": False,
            "sources": ["student"], "rollout_version": step - 1}


def _eval(step, acc):
    return {"kind": "eval", "step": step, "eval/accuracy": acc, "eval/rougeL": acc / 2, "eval/seconds": 3.0}


def _logger(tmp_path, *overrides):
    recipe = load_recipe(REPO / "recipes" / "smoke.yaml", [f"run.output_dir={tmp_path}", "run.name=logtest", *overrides])
    return MetricsLogger(recipe, tmp_path, total_steps=3)


def test_tensorboard_and_mlflow_receive_every_step_and_evaluation(tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = _logger(tmp_path, "run.tensorboard=true", "run.mlflow.enabled=true", "run.plot=false")
    logger.log(_eval(0, 0.25))
    for step, loss in ((1, 2.5), (2, 1.75), (3, float("nan"))):
        logger.log(_train(step, loss))
    logger.log(_eval(3, 0.5))
    logger.close()

    (event_dir,) = {p.parent for p in (tmp_path / "tensorboard").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(event_dir))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(1, 2.5), (2, 1.75)]  # the NaN step is in metrics.jsonl, not plotted as a number
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/lr")] == [(1, 1e-4), (2, 2e-4), (3, 3e-4)]
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(0, 0.25), (3, 0.5)]

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("csd_ray").experiment_id])
    assert run.info.run_name == "logtest" and run.info.status == "FINISHED"
    assert run.data.params["trainer.num_ranks"] == "2" and run.data.params["run.name"] == "logtest"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.5), (2, 1.75)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/accuracy")] == [(0, 0.25), (3, 0.5)]
    assert math.isnan(float(read_metrics(tmp_path / "metrics.jsonl")[-1]["loss"]))


def test_the_plot_is_a_png_rewritten_at_each_evaluation(tmp_path):
    import matplotlib.image

    logger = _logger(tmp_path)
    logger.log(_eval(0, 0.25))
    plot = tmp_path / PLOT_FILE
    first = plot.read_bytes()
    assert first.startswith(b"\x89PNG\r\n\x1a\n")
    logger.log(_train(1, 2.5))
    logger.log(_train(2, 1.5))
    assert plot.read_bytes() == first  # steps alone do not redraw it
    logger.log(_eval(2, 0.75))
    second = plot.read_bytes()
    assert second != first
    image = matplotlib.image.imread(plot)
    # loss, lr, accuracy, rougeL: two rows of three panels at 80 dpi
    assert image.shape[:2] == (480, 1008)
    assert image.std() > 0.01  # something is drawn
    logger.close()
    assert not list(tmp_path.glob(".*.tmp.png"))


def test_resumed_runs_plot_the_earlier_records_too(tmp_path):
    first = _logger(tmp_path)
    first.log(_train(1, 2.5))
    first.close()
    again = _logger(tmp_path)
    assert [r["step"] for r in again.history] == [1]
    again.close()


def test_one_plain_line_per_step_when_not_on_a_terminal(tmp_path, capsys):
    logger = _logger(tmp_path, "run.plot=false")  # pytest's captured stderr is not a terminal
    logger.log(_eval(0, 0.25))
    logger.log(_train(1, 2.5))
    logger.log({**_train(2, float("nan")), "skipped_nonfinite": True, "staleness": 1})
    logger.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == [
        "step 1/3 stage=main loss=2.5000 grad_norm=0.500 lr=1.00e-04 tokens=40 tok/s=81 step_time=0.49s",
        "step 2/3 stage=main loss=nan grad_norm=1.000 lr=2.00e-04 tokens=40 tok/s=81 step_time=0.49s staleness=1 "
        "SKIPPED(non-finite)",
    ]
    assert plain_line(_train(3, 0.1), 10).startswith("step 3/10 stage=main loss=0.1000")
