"""Run metrics: one JSON object per step in metrics.jsonl, the console, and the trackers a recipe asks for.

Sinks, all fed by ``MetricsLogger.log``:

- ``metrics.jsonl`` (always): every record as written by the controller.
- console (stderr): a tqdm bar on a terminal; when stderr or stdout is not a terminal
  (``ray job logs``, ``kubectl logs``, a file) one plain line per step instead (``plain_line``).
- ``run.wandb``, ``run.tensorboard`` (event files in output_dir/tensorboard),
  ``run.mlflow`` (local file store in output_dir/mlruns, or a tracking server).
- ``run.plot``: output_dir/metrics.png (loss, lr, held-out metrics by step), rewritten at each
  evaluation and at the end.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

from csd_ray.config import Recipe
from csd_ray.schema import to_dict

PLOT_FILE = "metrics.png"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def _numbers(record: dict) -> dict[str, float]:
    """The record's finite numeric values (bools and NaN left out), for the trackers."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "step"}


def plain_line(record: dict, total_steps: int) -> str:
    """One log line for a train record, e.g.
    ``step 3/40 stage=main loss=0.4086 grad_norm=1.234 lr=1.00e-05 tokens=120 tok/s=80 step_time=1.02s``."""
    def num(key: str, fmt: str) -> str:
        value = record.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else str(value)

    parts = [f"step {record.get('step')}/{total_steps}", f"stage={record.get('stage', 'main')}",
             f"loss={num('loss', '.4f')}", f"grad_norm={num('grad_norm', '.3f')}", f"lr={num('lr', '.2e')}",
             f"tokens={record.get('tokens')}", f"tok/s={num('tokens_per_s', '.0f')}",
             f"step_time={num('step_time', '.2f')}s"]
    if record.get("staleness"):
        parts.append(f"staleness={record['staleness']}")
    if record.get("skipped_nonfinite"):
        parts.append("SKIPPED(non-finite)")
    return " ".join(parts)


def _flat(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: json.dumps(tree) if isinstance(tree, (list, dict)) else str(tree)}


class _Mlflow:
    """One MLflow run through MlflowClient (no process-global active run)."""

    def __init__(self, recipe: Recipe, run_dir: Path) -> None:
        cfg = recipe.run.mlflow
        uri = cfg.tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store in maintenance mode and refuses it unless asked: the
            # recipe asked for a local store, which needs no server and no database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=recipe.run.name).info.run_id
        params = [Param(k, v[:6000]) for k, v in _flat(to_dict(recipe)).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow metric names allow '/', letters, digits, '_', '-', '.', ' '.
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def write_plot(records: list[dict], path: Path) -> None:
    """PNG of training loss, learning rate and each held-out metric against the step.

    ``records``: metrics.jsonl records (kind 'train' and 'eval'). Written to a temp file and
    renamed, so a viewer never sees half a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind", "train") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    eval_keys = sorted({k for r in evals for k, v in r.items()
                        if k.startswith("eval/") and k != "eval/seconds" and isinstance(v, (int, float))})
    panels = [("loss", "train loss"), ("lr", "learning rate")] + [(k, f"held-out {k[5:]}") for k in eval_keys]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        source = evals if key.startswith("eval/") else train
        points = [(r["step"], r[key]) for r in source if isinstance(r.get(key), (int, float))]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)


class MetricsLogger:
    def __init__(self, recipe: Recipe, run_dir: Path, total_steps: int, start_step: int = 0) -> None:
        run = recipe.run
        self.run_dir, self.total_steps = run_dir, total_steps
        self.path = run_dir / "metrics.jsonl"
        # A resumed run's plot continues the earlier records.
        self.history: list[dict] = read_metrics(self.path, kind=None) if run.plot and self.path.exists() else []
        self.file = open(self.path, "a")
        self.plot = run_dir / PLOT_FILE if run.plot else None
        self.wandb = None
        if run.wandb.enabled:
            import wandb

            self.wandb = wandb.init(project=run.wandb.project, name=run.name, dir=str(run_dir),
                                    mode=run.wandb.mode, config=to_dict(recipe))
        self.tensorboard = None
        if run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.mlflow = _Mlflow(recipe, run_dir) if run.mlflow.enabled else None
        self.bar = None
        # A bar redraws one line with '\r': in captured logs it becomes one line of thousands of
        # characters. Only on a terminal; otherwise plain_line per step.
        if sys.stderr.isatty() and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=run.name, unit="step",
                            file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def log(self, record: dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        kind, step = record.get("kind", "train"), record.get("step")
        values = _numbers(record)
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.tensorboard is not None and step is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key if "/" in key else f"{kind}/{key}", value, step)
            self.tensorboard.flush()
        if self.mlflow is not None and step is not None:
            self.mlflow.log({k if "/" in k else f"{kind}/{k}": v for k, v in values.items()}, step)
        if self.plot is not None:
            self.history.append(record)
            if kind == "eval":
                write_plot(self.history, self.plot)
        if kind == "train":
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                                     tok_s=f"{record.get('tokens_per_s', 0):.0f}", refresh=False)
            else:
                print(plain_line(record, self.total_steps), file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.plot is not None and self.history:
            write_plot(self.history, self.plot)
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None:
            self.mlflow.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path, kind: Optional[str] = "train") -> list[dict]:
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if kind is None or r.get("kind", "train") == kind]
