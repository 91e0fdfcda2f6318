"""Run metrics: one JSON object per step in metrics.jsonl, a console progress bar, optional wandb."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

from csd_ray.config import Recipe
from csd_ray.schema import to_dict


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsLogger:
    def __init__(self, recipe: Recipe, run_dir: Path, total_steps: int, start_step: int = 0) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a")
        self.wandb = None
        if recipe.run.wandb.enabled:
            import wandb

            self.wandb = wandb.init(
                project=recipe.run.wandb.project, name=recipe.run.name, dir=str(run_dir),
                mode=recipe.run.wandb.mode, config=to_dict(recipe),
            )
        self.bar = None
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=recipe.run.name, unit="step",
                            file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        except ImportError:  # pragma: no cover - tqdm is a dependency
            pass

    def log(self, record: dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))
        if self.bar is not None and record.get("kind", "train") == "train":
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                                 tok_s=f"{record.get('tokens_per_s', 0):.0f}", refresh=False)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path, kind: Optional[str] = "train") -> list[dict]:
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if kind is None or r.get("kind", "train") == kind]
