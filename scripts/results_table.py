"""Markdown table of held-out metrics before/after for finished runs (the README's results table).

    python scripts/results_table.py NAME=RUN_DIR[:WALL_SECONDS] ...
"""

from __future__ import annotations

import sys
from pathlib import Path

from csd_ray.metrics import read_metrics

COLUMNS = [("teacher_nll", "teacher NLL of student samples ↓"), ("student_nll_on_teacher", "student NLL of teacher answers ↓"),
           ("rouge_l", "ROUGE-L vs teacher ↑"), ("distinct2", "distinct-2 ↑"), ("eos_rate", "ends with EOS ↑"),
           ("accuracy", "accuracy ↑")]


def main(args: list[str]) -> None:
    print("| recipe | " + " | ".join(title for _, title in COLUMNS) + " | wall time |")
    print("| --- " * (len(COLUMNS) + 2) + "|")
    before_printed = False
    for arg in args:
        name, _, rest = arg.partition("=")
        run_dir, _, wall = rest.partition(":")
        evals = read_metrics(Path(run_dir) / "metrics.jsonl", kind="eval")
        first, last = evals[0], evals[-1]
        if not before_printed:
            print("| (student before training) | " + " | ".join(f"{first[f'eval/{k}']:.3f}" for k, _ in COLUMNS) + " | |")
            before_printed = True
        wall_text = f"{float(wall) / 60:.1f} min" if wall else ""
        print(f"| `{name}` | " + " | ".join(f"{last[f'eval/{k}']:.3f}" for k, _ in COLUMNS) + f" | {wall_text} |")


if __name__ == "__main__":
    main(sys.argv[1:])
