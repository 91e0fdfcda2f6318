"""Claim (unpublished): does CSD's teacher weighting make on-policy distillation robust to stale rollouts?

Async on-policy distillation studies report teacher-weighted forward KL robust to stale rollouts
and student-weighted reverse KL fragile. Here every loss trains from bench/quality.py's shared
warm-up checkpoint (the demo's stage 1) on student samples drawn with weights exactly k versions
old at most: the sampler receives new weights every k + 1 steps (`run.weight_sync_every`, sync
mode, so the staleness pattern is deterministic, 0, 1, …, k, 0, …, and identical for every loss).
k = 0 is bench/quality.py's own comparison run (same folder, reused when it exists), so only the
stale runs cost time here; they evaluate only at the end (training draws its samples with per-step
seeds, so a mid-run evaluation, which falls on a weight sync, changes nothing that is trained).
Losses by default: RKL (the student-weighted loss the studies call fragile), FKL (teacher-weighted,
called robust) and CSD (T,S) (teacher-weighted CSD: the question). CSD (S,S) at τ=1 has RKL's
gradient exactly (bench/claim_mode_seeking.py), so it would repeat RKL's runs; add it, or TS-mix,
with --losses.

Reported per loss and k: mean ± 95% CI over seeds, at the last step, of held-out coverage
(student NLL of the teacher's greedy answers), fidelity (teacher NLL of student samples) and
teacher agreement; and the verdict per loss: the change from k=0 to the largest k, called
robust when it is within the two intervals (not separated), degraded otherwise.

    python bench/claim_staleness.py                 # RKL, FKL, CSD (T,S) x k in {0,2} x 3 seeds, quality.py's settings
    python bench/claim_staleness.py --staleness 0,1,2   # also k = 1 (15 more runs)
    python bench/claim_staleness.py --quick         # smoke check: RKL and CSD (T,S), k in {0,2}, 1 seed, 3 steps

Finished runs in --out are reused. Writes OUT/staleness.md and OUT/staleness.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray  # noqa: E402

from quality import (EVAL_EVERY, LABELS, STEPS, WARMUP_LR, WARMUP_SOURCE, Parser, check_settings, common_overrides,  # noqa: E402
                     compared_run, mean_ci, parse_losses, positive_int, usage_error, warm_up)  # (same folder)

from csd_ray.metrics import read_metrics  # noqa: E402

COMPARED = ["rkl", "fkl", "csd_ts"]
#: metric -> (title, True when higher is better)
METRICS = {"student_nll_on_teacher": ("coverage: student NLL of teacher answers", False),
           "teacher_nll": ("fidelity: teacher NLL of samples", False),
           "teacher_agreement": ("teacher agreement", True)}


def main() -> None:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke check: RKL and CSD (T,S), k 0 and 2, 1 seed, 3 steps, "
                   "8 prompts (options given with it take precedence)")
    p.add_argument("--losses", default=",".join(COMPARED))
    p.add_argument("--staleness", default="0,2", help="largest staleness k per run (weights synced every k+1 steps)")
    p.add_argument("--seeds", type=positive_int, default=3)
    p.add_argument("--steps", type=positive_int, default=STEPS)
    p.add_argument("--eval-every", type=positive_int, default=EVAL_EVERY, help="bench/quality.py's cadence (its k = 0 runs are reused)")
    p.add_argument("--eval-size", type=positive_int, default=64)
    p.add_argument("--new-tokens", type=positive_int, default=32)
    p.add_argument("--eval-new-tokens", type=positive_int, default=64)
    p.add_argument("--warmup-steps", type=positive_int, default=30)
    p.add_argument("--out", default="runs/quality", help="bench/quality.py's folder: its runs are the k = 0 runs")
    args = p.parse_with_quick(dict(losses="rkl,csd_ts", staleness="0,2", seeds=1, steps=3, eval_size=8, new_tokens=16,
                                   eval_new_tokens=16, warmup_steps=2, eval_every=3, out="runs/staleness_quick"))
    losses = parse_losses(args.losses)
    try:
        ks = [int(k) for k in args.staleness.split(",")]
    except ValueError:
        usage_error(f"--staleness: expected comma-separated integers >= 0, got '{args.staleness}'")
    if any(k < 0 for k in ks):
        usage_error(f"--staleness: expected comma-separated integers >= 0, got '{args.staleness}'")
    seeds = list(range(args.seeds))
    out = Path(args.out).resolve()
    check_settings(out, args)  # its k = 0 runs are bench/quality.py's: the same settings or none
    cache = out / "teacher_greedy.pt"
    common = common_overrides(args.eval_size, args.new_tokens, args.eval_new_tokens)
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    t0 = time.perf_counter()
    warm_up(out / "warmup", common, cache, args.warmup_steps, WARMUP_SOURCE, WARMUP_LR)
    results: dict = {}
    for name in losses:
        for k in ks:
            for seed in seeds:
                extra = (f"run.weight_sync_every={k + 1}",) if k else ()
                run_dir, wall = compared_run(out, common, cache, name, seed, args.steps, args.eval_every if k == 0 else args.steps,
                                             extra, f"k{k}" if k else "")
                train = read_metrics(run_dir / "metrics.jsonl")
                last = read_metrics(run_dir / "metrics.jsonl", kind="eval")[-1]
                slot = results.setdefault(name, {}).setdefault(k, {m: [] for m in METRICS} | {"staleness": []})
                for m in METRICS:
                    slot[m].append(float(last[f"eval/{m}"]))
                slot["staleness"] += [r.get("staleness", 0) for r in train]
                print(f"{name} k={k} seed {seed}: {wall:.0f} s, staleness seen {sorted(set(slot['staleness'][-len(train):]))}",
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
    text = "\n".join(lines + ["", f"Mean ± 95% CI over {len(seeds)} seed(s), {args.steps} steps, {args.eval_size} held-out prompts; "
                              "k = 0 runs are bench/quality.py's.",
                              "", "Verdicts (robust = the change is within the two intervals; degraded / improved = separated):", "", *verdicts])
    (out / "staleness.md").write_text(text + "\n")
    (out / "staleness.json").write_text(json.dumps({"args": vars(args), "results": {n: {str(k): v for k, v in r.items()}
                                                                                      for n, r in results.items()}}, indent=1))
    print(text)
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; wrote {out}/staleness.md")


if __name__ == "__main__":
    main()
