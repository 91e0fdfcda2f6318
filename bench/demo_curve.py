"""What a pruned student can reach, and how fast: student depth x steps -> teacher-relative accuracy (issue 12).

Runs the demo recipe (recipes/local.yaml) through the real actor system, once per student depth
(the number of SmolLM2-135M-Instruct's 30 decoder layers kept), with only its off-policy warm-up:
sequence-level KD on the teacher's greedy responses (made once, in large batches: the teacher
source's `cache`), forward KL on the teacher's full distribution, evaluated every --eval-every
steps on the same held-out prompts. Prints, per depth and step, the student's greedy accuracy,
the teacher's on the same prompts, their ratio, teacher agreement, distinct answers and ROUGE-L,
and the wall time per step; writes OUT/curve.md, OUT/curve.png, OUT/curve.json.

    python bench/demo_curve.py                        # depths 8, 15, 22; 48 steps; eval every 16
    python bench/demo_curve.py --depths 8 --steps 4 --eval-every 2 --eval-size 8   # smoke check

Finished runs in OUT are reused, so the depths can be run one invocation at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from csd_ray.metrics import read_metrics  # noqa: E402
from quality import Parser, int_at_least, positive_int, usage_error  # noqa: E402  (same folder)


def layers_kept(text: str) -> int:
    """argparse type: a depth in 1..30 (SmolLM2-135M has 30 decoder layers)."""
    value = positive_int(text)
    if value > 30:
        raise argparse.ArgumentTypeError(f"expected 1..30 layers (SmolLM2-135M has 30), got {value}")
    return value


non_negative_int = int_at_least(0)


def run_depth(depth: int, args, out: Path) -> Path:
    run_dir = out / f"depth{depth}"
    if (run_dir / "final").is_dir():
        return run_dir
    stage = (f"[{{name: seqkd, steps: {args.steps}, sources: [{{kind: teacher, greedy: true, cache: {args.cache}}}], "
             f"loss: {{name: fkl}}, lr: {args.lr}}}]")
    overrides = [f"run.output_dir={run_dir}", "run.resume=never", f"student_model.num_layers={depth}",
                 f"stages={stage}", f"run.eval_every={args.eval_every}", f"data.eval_size={args.eval_size}",
                 f"run.eval_max_new_tokens={args.max_new_tokens}", f"batch.max_new_tokens={args.max_new_tokens}",
                 f"batch.prompts_per_step={args.prompts_per_step}", "run.checkpoint_every=0"]
    if run_dir.exists():  # an interrupted run: start it again
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "csd_ray.run", str(REPO / "recipes" / "local.yaml"), *overrides], cwd=REPO)
    if done.returncode:  # the run printed its own error line
        print(f"error: the depth-{depth} run exited with code {done.returncode}", file=sys.stderr)
        raise SystemExit(done.returncode)
    print(f"depth {depth}: {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def curve(run_dir: Path) -> list[dict]:
    records = read_metrics(run_dir / "metrics.jsonl", kind=None)
    train = [r for r in records if r.get("kind") == "train"]
    per_step = sum(r["step_time"] for r in train[1:]) / max(1, len(train) - 1)
    rows = []
    for r in records:
        if r.get("kind") != "eval":
            continue
        acc, teacher = r["eval/accuracy"], r["eval/teacher_accuracy"]
        rows.append({"step": r["step"], "accuracy": acc, "teacher_accuracy": teacher,
                     "relative": acc / teacher if teacher else float("nan"), "agreement": r["eval/teacher_agreement"],
                     "distinct_answer_share": r["eval/distinct_answer_share"], "rouge_l": r["eval/rouge_l"],
                     "s_per_step": per_step})
    return rows


def main() -> None:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", type=layers_kept, nargs="+", default=[8, 15, 22], help="decoder layers kept (of 30)")
    p.add_argument("--steps", type=positive_int, default=48)
    p.add_argument("--eval-every", type=positive_int, default=16)
    p.add_argument("--eval-size", type=positive_int, default=32, help="held-out prompts")
    p.add_argument("--prompts-per-step", type=positive_int, default=16)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--cache", type=non_negative_int, default=256, help="teacher responses made per batch (source cache)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "demo_curve")
    p.add_argument("--only-report", action="store_true", help="tabulate the finished runs in --out")
    args = p.parse_args()
    if not args.lr > 0:
        usage_error(f"--lr: expected a positive number, got {args.lr}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for depth in args.depths:
        run_dir = args.out / f"depth{depth}"
        if not args.only_report:
            run_depth(depth, args, args.out)
        if (run_dir / "final").is_dir():
            results[depth] = curve(run_dir)
    lines = ["| layers kept | step | student accuracy | teacher accuracy | student / teacher | agreement | distinct answers | ROUGE-L | s/step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for depth, rows in results.items():
        for r in rows:
            lines.append(f"| {depth} | {r['step']} | {r['accuracy']:.3f} | {r['teacher_accuracy']:.3f} | {r['relative']:.2f} | "
                         f"{r['agreement']:.3f} | {r['distinct_answer_share']:.2f} | {r['rouge_l']:.3f} | {r['s_per_step']:.1f} |")
    text = "\n".join(lines)
    print(text)
    (args.out / "curve.md").write_text(text + "\n")
    (args.out / "curve.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    if results:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for depth, rows in results.items():
            ax.plot([r["step"] for r in rows], [r["relative"] for r in rows], marker="o", label=f"{depth} of 30 layers")
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="goal: half the teacher's accuracy")
        ax.set_xlabel("warm-up step (16 prompts each)")
        ax.set_ylabel("student accuracy / teacher accuracy")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "curve.png", dpi=120)
        print(f"wrote {args.out / 'curve.md'}, {args.out / 'curve.png'}")


if __name__ == "__main__":
    main()
