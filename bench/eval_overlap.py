"""The held-out evaluation with and without overlapping the teacher and the sampler, side by side
on the same actors (run.overlap_offpolicy; issue 12).

Starts recipes/local.yaml's actors once (student = 15 of SmolLM2-135M-Instruct's 30 layers, no
training), then times ``Evaluator.run`` alternately with ``overlap`` on and off, ``--repeats``
times each after one untimed warm-up evaluation, and checks the metrics are equal both ways.
Ends with `serial/overlapped evaluation time ratio: X.XXX` (below 1: serial is faster, as on 2
cores where each role has 2 torch threads).

    python bench/eval_overlap.py [--eval-size 64] [--repeats 2] [override ...]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import Parser, positive_int  # noqa: E402  (same folder)

from csd_ray.config import load_recipe  # noqa: E402
from csd_ray.controller import Controller  # noqa: E402


def main() -> None:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-size", type=positive_int, default=64, help="held-out prompts")
    parser.add_argument("--repeats", type=positive_int, default=2, help="timed evaluations per setting")
    parser.add_argument("overrides", nargs="*", help="recipe overrides (key=value)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe(REPO / "recipes" / "local.yaml",
                             [f"data.eval_size={args.eval_size}", f"run.output_dir={out}", *args.overrides])
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        controller = Controller(recipe, log=lambda m: None)
        try:
            controller.start()
            evaluator = controller.evaluator
            evaluator.run(0)  # untimed: first calls, and the teacher's greedy answers (made once)
            seconds: dict[bool, list[float]] = {True: [], False: []}
            metrics: dict[bool, dict] = {}
            for _ in range(args.repeats):
                for overlap in (True, False):
                    evaluator.overlap = overlap
                    t0 = time.perf_counter()
                    metrics[overlap] = evaluator.run(0)
                    seconds[overlap].append(time.perf_counter() - t0)
        finally:
            controller.shutdown()
            ray.shutdown()
    for overlap, label in ((True, "overlapped"), (False, "serial")):
        print(f"{label:10s} evaluation of {args.eval_size} prompts: "
              + ", ".join(f"{s:.1f} s" for s in seconds[overlap]))
    print(f"metrics equal both ways: {metrics[True] == metrics[False]}")
    print(f"serial/overlapped evaluation time ratio: "
          f"{statistics.median(seconds[False]) / statistics.median(seconds[True]):.3f}")


if __name__ == "__main__":
    main()
