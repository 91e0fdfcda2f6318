"""Sync vs async pipeline, side by side in one process and one Ray session (issue 3).

Runs the same recipe (default: recipes/smoke.yaml with longer responses) in sync mode and in
async mode (max_staleness=1), drops the first step of each as warm-up, and prints per-phase
times, step time and tokens/s, ending with `async/sync step time ratio: X.XXX`.

    python bench/pipeline.py [--recipe recipes/smoke.yaml] [--steps 8] [override ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from csd_ray.config import load_recipe  # noqa: E402
from csd_ray.controller import Controller  # noqa: E402
from csd_ray.metrics import read_metrics  # noqa: E402

PHASES = ["time_sample", "time_score", "time_train", "time_sync", "step_time", "tokens_per_s"]


def run(recipe_path: str, mode: str, steps: int, overrides: list[str], out: Path) -> list[dict]:
    recipe = load_recipe(recipe_path, [f"run.output_dir={out / mode}", f"run.steps={steps}", f"run.mode={mode}",
                                       "run.max_staleness=1", *overrides])
    Controller(recipe, log=lambda m: None).run()
    return read_metrics(out / mode / "metrics.jsonl")[1:]  # first step: warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/smoke.yaml")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("overrides", nargs="*", default=["batch.max_new_tokens=48", "batch.prompts_per_step=8"])
    args = parser.parse_args()
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sync", "async"):
            results[mode] = run(args.recipe, mode, args.steps, args.overrides, Path(tmp))
    ray.shutdown()
    print(f"recipe {args.recipe} {' '.join(args.overrides)}; {args.steps} steps, first dropped; "
          f"{os.cpu_count()} CPUs")
    print(f"{'':6s}" + "".join(f"{p.removeprefix('time_'):>13s}" for p in PHASES) + f"{'staleness':>11s}")
    means = {}
    for mode, records in results.items():
        means[mode] = {p: statistics.mean(r[p] for r in records) for p in PHASES}
        stale = max(r["staleness"] for r in records)
        print(f"{mode:6s}" + "".join(f"{means[mode][p]:13.3f}" for p in PHASES) + f"{stale:11d}")
    print("(seconds per step; tokens_per_s = response tokens trained per second of wall time)")
    print(f"async/sync step time ratio: {means['async']['step_time'] / means['sync']['step_time']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
