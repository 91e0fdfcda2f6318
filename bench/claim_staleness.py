"""Claim (unpublished): does CSD's teacher weighting make on-policy distillation robust to stale rollouts?

Async on-policy distillation studies report teacher-weighted forward KL robust to stale rollouts
and student-weighted reverse KL fragile. Here every loss trains from one shared warm-up
checkpoint (bench/quality.py's warm-up, on the teacher's cached greedy answers) on student samples drawn with weights exactly k versions old at
most: the sampler receives new weights every k + 1 steps (`run.weight_sync_every`, sync mode, so
the staleness pattern is deterministic, 0, 1, …, k, 0, …, and identical for every loss), for
k = 0, 1, 2. Losses: RKL, FKL, CSD (S,S), CSD (T,S), CSD TS-mix (α=0.15).

Reported per loss and k: mean ± 95% CI over seeds, at the last step, of held-out coverage
(student NLL of the teacher's greedy answers), fidelity (teacher NLL of student samples) and
teacher agreement; and the verdict per loss: the change from k=0 to the largest k, called
robust when it is within the two intervals (not separated), degraded otherwise.

    python bench/claim_staleness.py                 # 5 losses x k in {0,1,2} x 2 seeds, 12 steps
    python bench/claim_staleness.py --quick         # smoke check: RKL and CSD (T,S), k in {0,2}, 1 seed, 2 steps

Finished runs in --out are reused. Writes OUT/staleness.md and OUT/staleness.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray  # noqa: E402

from quality import LABELS, LOSSES, common_overrides, mean_ci, parse_losses, run, warm_up  # noqa: E402  (same folder)

from csd_ray.metrics import read_metrics  # noqa: E402

COMPARED = ["rkl", "fkl", "csd_ss", "csd_ts", "csd_tsmix"]
#: metric -> (title, True when higher is better)
METRICS = {"student_nll_on_teacher": ("coverage: student NLL of teacher answers", False),
           "teacher_nll": ("fidelity: teacher NLL of samples", False),
           "teacher_agreement": ("teacher agreement", True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--losses", default=",".join(COMPARED))
    p.add_argument("--staleness", default="0,1,2", help="largest staleness k per run (weights synced every k+1 steps)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--eval-size", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup-steps", type=int, default=15)
    p.add_argument("--out", default="runs/staleness")
    args = p.parse_args()
    if args.quick:
        args.losses, args.staleness, args.seeds, args.steps, args.eval_size = "rkl,csd_ts", "0,2", 1, 3, 8
        args.new_tokens, args.warmup_steps = 16, 2
        args.out = args.out if args.out != "runs/staleness" else "runs/staleness_quick"
    losses = parse_losses(args.losses)
    ks = [int(k) for k in args.staleness.split(",")]
    seeds = list(range(args.seeds))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "teacher_greedy.pt"
    common = common_overrides(args.eval_size, args.new_tokens)
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    t0 = time.perf_counter()
    warm_dir = out / "warmup"
    warm_up(warm_dir, common, cache, args.warmup_steps, "{kind: teacher, greedy: true, cache: 128}", 3.0e-4)
    results: dict = {}
    for name in losses:
        loss, sources, mode = LOSSES[name]
        stage = json.dumps([{"name": name, "steps": args.steps, "sources": sources, "source_mode": mode, "loss": loss}])
        for k in ks:
            for seed in seeds:
                run_dir = out / "runs" / name / f"k{k}" / f"seed{seed}"
                wall = run([*common, f"run.seed={seed}", f"student_model.path={warm_dir / 'final'}", "student_model.num_layers=0",
                            f"run.weight_sync_every={k + 1}", f"run.eval_every={args.steps}", f"stages={stage}"],
                           run_dir, cache, args.steps, skip_first_eval=True)
                train = read_metrics(run_dir / "metrics.jsonl")
                last = read_metrics(run_dir / "metrics.jsonl", kind="eval")[-1]
                slot = results.setdefault(name, {}).setdefault(k, {m: [] for m in METRICS} | {"staleness": []})
                for m in METRICS:
                    slot[m].append(float(last[f"eval/{m}"]))
                slot["staleness"] += [r["staleness"] for r in train]
                print(f"{name} k={k} seed {seed}: {wall:.0f} s, staleness seen {sorted(set(r['staleness'] for r in train))}",
                      flush=True)
    ray.shutdown()
    lines = ["| loss | k | " + " | ".join(f"{t} {'↑' if up else '↓'}" for t, up in METRICS.values()) + " | mean staleness |",
             "|" + " --- |" * (len(METRICS) + 3)]
    verdicts = []
    for name, per_k in results.items():
        for k, slot in per_k.items():
            cells = [f"{mean_ci(slot[m])[0]:.3f} ± {mean_ci(slot[m])[1]:.3f}" for m in METRICS]
            lines.append(f"| {LABELS[name]} | {k} | " + " | ".join(cells) + f" | {sum(slot['staleness']) / len(slot['staleness']):.2f} |")
        lo, hi = per_k[min(per_k)], per_k[max(per_k)]
        parts = []
        for m, (title, up) in METRICS.items():
            (a, ha), (b, hb) = mean_ci(lo[m]), mean_ci(hi[m])
            worse = (b < a) if up else (b > a)
            separated = abs(b - a) > ha + hb
            verdict = ("no interval: one seed" if len(seeds) < 2 else
                       "degraded" if worse and separated else "improved" if separated else "robust")
            parts.append(f"{title.split(':')[0]} {a:.3f} → {b:.3f} ({verdict})")
        verdicts.append(f"- {LABELS[name]}, k {min(per_k)} → {max(per_k)}: " + "; ".join(parts))
    text = "\n".join(lines + ["", f"Mean ± 95% CI over {len(seeds)} seed(s), {args.steps} steps, {args.eval_size} held-out prompts.",
                              "", "Verdicts (robust = the change is within the two intervals; degraded / improved = separated):", "", *verdicts])
    (out / "staleness.md").write_text(text + "\n")
    (out / "staleness.json").write_text(json.dumps({"args": vars(args), "results": {n: {str(k): v for k, v in r.items()}
                                                                                      for n, r in results.items()}}, indent=1))
    print(text)
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; wrote {out}/staleness.md")


if __name__ == "__main__":
    main()
