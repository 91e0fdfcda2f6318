"""Losses compared at equal budget, with seeds and confidence intervals (issue 12).

One shared warm-up first: the demo's stage 1 (recipes/local.yaml: its 15-layer student,
SeqKD with forward KL on the teacher's cached greedy answers), saved once. Every compared run
then starts from that checkpoint and differs only in the compared stage's loss (and, for GKD, its
λ-mixed sources), for the same number of steps, batch, response length and learning rate, on
the same held-out prompts (``data.split_seed`` fixed), once per seed. Evaluation generates up to
64 tokens (the teacher's answers run to ~50; shorter would cut its final answer off). Reported
per loss: mean ± 95% CI (Student t over seeds) of

  teacher NLL of student samples (fidelity), student NLL of the teacher's greedy answers
  (coverage), teacher agreement and accuracy (student and teacher greedy final answers),
  ROUGE-L vs the teacher's answers (rouge-score, stemmed), distinct-2 and Self-BLEU (sacrebleu)
  of student samples, share of samples ending with EOS;

as a markdown table (with the winner per metric, and whether the runner-up's interval overlaps)
and a PNG (metric vs step, one line per loss, 95% bands).

    python bench/quality.py                 # default set: 8 losses x 3 seeds, 64 held-out prompts
    python bench/quality.py --quick         # smoke check: 2 losses x 2 seeds, 8 prompts, 2 steps

Finished runs in --out are reused (a full run can be resumed by running the command again).
Writes OUT/quality.md, OUT/quality.png, OUT/quality.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import NoReturn, Optional

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from csd_ray.config import load_recipe  # noqa: E402
from csd_ray.controller import Controller  # noqa: E402
from csd_ray.metrics import read_metrics  # noqa: E402

STUDENT = [{"kind": "student"}]
#: name -> (loss spec, sources, source_mode) of the compared stage.
LOSSES: dict[str, tuple[dict, list, str]] = {
    "fkl": ({"name": "fkl"}, STUDENT, "sample"),
    "rkl": ({"name": "rkl"}, STUDENT, "sample"),
    "gkd": ({"name": "gjsd", "params": {"beta": 0.5}},
            [{"kind": "student", "probability": 0.5}, {"kind": "dataset", "probability": 0.5}], "sample"),
    "csd_ss": ({"name": "csd", "params": {"weights": ["student", "student"]}}, STUDENT, "sample"),
    "csd_us": ({"name": "csd", "params": {"weights": ["uniform", "student"]}}, STUDENT, "sample"),
    "csd_ts": ({"name": "csd", "params": {"weights": ["teacher", "student"]}}, STUDENT, "sample"),
    "csd_tsmix": ({"name": "csd", "params": {"weights": ["mix", "student"], "alpha": 0.15}}, STUDENT, "sample"),
    "dld": ({"name": "dld"}, STUDENT, "sample"),
}
LABELS = {"fkl": "FKL", "rkl": "RKL", "gkd": "GKD (JSD β=0.5, λ=0.5)", "csd_ss": "CSD (S,S)", "csd_us": "CSD (U,S)",
          "csd_ts": "CSD (T,S)", "csd_tsmix": "CSD TS-mix (α=0.15)", "dld": "DLD"}
#: metric -> (title, True when higher is better)
METRICS = {
    "teacher_nll": ("teacher NLL of samples", False),
    "student_nll_on_teacher": ("student NLL of teacher answers", False),
    "teacher_agreement": ("teacher agreement", True),
    "accuracy": ("accuracy", True),
    "rouge_l": ("ROUGE-L vs teacher", True),
    "distinct2": ("distinct-2", True),
    "self_bleu": ("Self-BLEU (lower = more diverse)", False),
    "eos_rate": ("ends with EOS", True),
}
# Two-sided 95% Student t quantiles by degrees of freedom (n - 1 seeds).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t interval over seeds (0 for one value; NaNs dropped)."""
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T95.get(n - 1, 1.96) * sd / math.sqrt(n)


class BenchController(Controller):
    """The product's controller, lighter where a comparison only reads metrics.jsonl: the
    teacher's greedy evaluation answers are computed once and reused (they depend only on the
    teacher and the held-out prompts, which every run shares); no evaluation before training (a
    compared run's step 0 is the shared warm-up, evaluated once; the warm-up's own step 0, the
    pruned student, is in no table); without ``keep_student`` the run ends with its evaluation,
    writing no checkpoint and no student (~8 s a run)."""

    def __init__(self, recipe, cache: Path, keep_student: bool = False) -> None:
        super().__init__(recipe, log=lambda m: None)
        self.cache, self.keep_student = cache, keep_student

    def start(self) -> None:
        super().start()
        if self.evaluator is not None and self.cache.exists():
            self.evaluator._teacher_greedy = torch.load(self.cache, weights_only=False)

    def evaluate(self) -> dict:
        if self.step == 0:
            return {}
        metrics = super().evaluate()
        if self.evaluator is not None and not self.cache.exists():
            # Written whole or not at all: a half-written cache (Ctrl-C during the save) would stop
            # every later run of this --out at torch.load.
            tmp = self.cache.with_name(self.cache.name + ".tmp")
            torch.save(self.evaluator.teacher_greedy(), tmp)
            os.replace(tmp, self.cache)
        return metrics

    def finish(self) -> Path:
        if self.keep_student:
            return super().finish()
        self.evaluate()
        return self.run_dir


def finished(run_dir: Path, steps: int) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and any(r["step"] == steps for r in read_metrics(path, kind="eval"))


def run(overrides: list[str], run_dir: Path, cache: Path, steps: int, keep_student: bool = False) -> float:
    """One run of recipes/local.yaml with overrides (skipped if already finished); its wall seconds."""
    if finished(run_dir, steps):
        return 0.0
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = load_recipe(REPO / "recipes" / "local.yaml", [*overrides, f"run.output_dir={run_dir}", "run.resume=never"])
    t0 = time.perf_counter()
    BenchController(recipe, cache, keep_student).run()
    return time.perf_counter() - t0


def usage_error(message: str) -> NoReturn:
    """Bad command-line input: one line on stderr and exit 2 (argparse's code), no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block) and exit 2."""

    def error(self, message: str) -> NoReturn:
        usage_error(message)

    def parse_with_quick(self, presets: dict) -> argparse.Namespace:
        """parse_args(), where ``--quick`` (a store_true option) makes ``presets`` the defaults:
        options given with it win."""
        if self.parse_known_args()[0].quick:
            self.set_defaults(**presets)
        return self.parse_args()


def int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum`` (one-line error otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (one-line error otherwise), e.g. a learning rate."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got '{text}'") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def parse_losses(text: str) -> list[str]:
    """Loss names of a comma-separated --losses value; exits 2 with one line on an unknown name."""
    losses = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in losses if name not in LOSSES]
    if unknown or not losses:
        usage_error(f"--losses: unknown '{unknown[0] if unknown else text}'; expected some of {', '.join(LOSSES)}")
    return losses


#: Arguments every run in one --out folder must share (the warm-up, the held-out prompts and the
#: cached teacher answers, the compared stage's length): losses and seeds may be added later.
SHARED_SETTINGS = ("eval_size", "warmup_steps", "steps", "eval_every", "new_tokens", "eval_new_tokens")


def check_settings(out: Path, args: argparse.Namespace) -> None:
    """Refuse (exit 2) an --out folder whose runs were made with other settings: finished runs in
    it are reused and unfinished ones deleted, so mixing settings would silently mix results."""
    path = out / "settings.json"
    mine = {name: getattr(args, name) for name in SHARED_SETTINGS}
    if path.exists():
        theirs = json.loads(path.read_text())
        diff = [name for name in SHARED_SETTINGS if name in theirs and theirs[name] != mine[name]]
        if diff:
            name = diff[0]
            usage_error(f"--out {out} holds runs made with --{name.replace('_', '-')} {theirs[name]} (now {mine[name]}); "
                        "use the same settings or another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=1) + "\n")


def common_overrides(eval_size: int, new_tokens: int, eval_new_tokens: int) -> list[str]:
    """Overrides every run of a comparison shares: the held-out prompts and the response lengths."""
    return [f"data.eval_size={eval_size}", "data.split_seed=0", f"batch.max_new_tokens={new_tokens}",
            f"run.eval_max_new_tokens={eval_new_tokens}"]


def warm_up(warm_dir: Path, common: list[str], cache: Path, steps: int, source: str, lr: float) -> tuple[float, dict]:
    """The shared warm-up every compared run starts from: ``steps`` FKL steps on teacher
    responses (``source``: a YAML source mapping), seed 0. Returns (wall seconds, its last evaluation)."""
    stage = f"stages=[{{name: warmup, steps: {steps}, sources: [{source}], loss: {{name: fkl}}, lr: {lr}}}]"
    seconds = run([*common, "run.seed=0", stage], warm_dir, cache, steps, keep_student=True)
    print(f"warm-up: {steps} steps in {seconds:.0f} s", flush=True)
    return seconds, read_metrics(warm_dir / "metrics.jsonl", kind="eval")[-1]


#: The demo's stage 1 (recipes/local.yaml), the warm-up every comparison shares.
WARMUP_SOURCE, WARMUP_LR = "{kind: teacher, greedy: true, cache: 256}", 3.0e-4
#: The compared stage's default length and evaluation cadence, here and in claim_staleness.py
#: (whose k = 0 runs are these): 24 runs of 8 steps with one evaluation fit the 60-minute budget
#: on 2 cores; a mid-run evaluation costs ~40 s a run (--eval-every 4: ~16 min more).
STEPS, EVAL_EVERY = 8, 8


def compared_run(out: Path, common: list[str], cache: Path, name: str, seed: int, steps: int, eval_every: int,
                 extra: tuple[str, ...] = (), tag: str = "") -> tuple[Path, float]:
    """One compared stage of loss ``name`` from the shared warm-up in ``out/warmup``: (run folder, wall seconds).

    ``extra`` overrides make a variant (e.g. stale weights) kept under ``runs/NAME/TAG/seedS``;
    without them the run is the plain comparison, which the claim benches reuse."""
    loss, sources, mode = LOSSES[name]
    stage = json.dumps([{"name": name, "steps": steps, "sources": sources, "source_mode": mode, "loss": loss}])
    run_dir = out / "runs" / name / tag / f"seed{seed}" if tag else out / "runs" / name / f"seed{seed}"
    wall = run([*common, f"run.seed={seed}", f"student_model.path={out / 'warmup' / 'final'}",
                "student_model.num_layers=0", f"run.eval_every={eval_every}", f"stages={stage}", *extra],
               run_dir, cache, steps)
    return run_dir, wall


def collect(out: Path, losses: list[str], seeds: list[int], warm: dict) -> dict:
    """{loss: {step: {metric: [value per seed]}}}; step 0 is the shared warm-up's evaluation."""
    curves: dict = {}
    for name in losses:
        per_step: dict = {0: {m: [warm.get(f"eval/{m}")] * len(seeds) for m in METRICS}}
        for seed in seeds:
            for record in read_metrics(out / "runs" / name / f"seed{seed}" / "metrics.jsonl", kind="eval"):
                if record["step"] == 0:
                    continue
                slot = per_step.setdefault(record["step"], {m: [] for m in METRICS})
                for m in METRICS:
                    value = record.get(f"eval/{m}")
                    slot[m].append(float(value) if value is not None else float("nan"))
        curves[name] = per_step
    return curves


def table(curves: dict, losses: list[str], seeds: list[int], warm: dict, teacher_accuracy: Optional[float]) -> str:
    last = {name: max(curves[name]) for name in losses}
    stats = {name: {m: mean_ci(curves[name][last[name]][m]) for m in METRICS} for name in losses}
    head = "| loss | " + " | ".join(f"{t} {'↑' if up else '↓'}" for t, up in METRICS.values()) + " |"
    lines = [head, "|" + " --- |" * (len(METRICS) + 1)]
    lines.append("| (shared warm-up, step 0) | " + " | ".join(f"{warm.get(f'eval/{m}', float('nan')):.3f}"
                                                            for m in METRICS) + " |")
    winners = {}
    for m, (_, up) in METRICS.items():
        ranked = sorted((s[m][0], name) for name, s in stats.items() if math.isfinite(s[m][0]))
        if up:
            ranked.reverse()
        winners[m] = ranked
    for name in losses:
        cells = []
        for m in METRICS:
            mean, half = stats[name][m]
            text = f"{mean:.3f} ± {half:.3f}"
            sole = len(winners[m]) < 2 or winners[m][0][0] != winners[m][1][0]
            cells.append(f"**{text}**" if winners[m] and winners[m][0][1] == name and sole else text)
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Mean ± 95% CI over {len(seeds)} seeds ({', '.join(map(str, seeds))}) at the last step; "
                 f"teacher accuracy on the same prompts: {teacher_accuracy:.3f}." if teacher_accuracy is not None else "")
    lines.append("")
    lines.append("Winner per metric (best mean; 'separated' when its interval does not overlap the runner-up's):")
    lines.append("")
    for m, ranked in winners.items():
        if len(ranked) < 2:
            continue
        (best, who), (second, runner) = ranked[0], ranked[1]
        if best == second:
            tied = [LABELS[n] for v, n in ranked if v == best]
            lines.append(f"- {METRICS[m][0]}: tie at {best:.3f} ({', '.join(tied)})")
            continue
        hb, hs = stats[who][m][1], stats[runner][m][1]
        separated = abs(best - second) > hb + hs
        csd = [(v, n) for v, n in ranked if n.startswith("csd")]
        note = ""
        if csd and not who.startswith("csd"):
            v, n = csd[0]
            note = f"; best CSD: {LABELS[n]} {v:.3f}"
        lines.append(f"- {METRICS[m][0]}: **{LABELS[who]}** {best:.3f} vs {LABELS[runner]} {second:.3f} "
                     f"({'separated' if separated else 'not separated'}){note}")
    return "\n".join(lines)


def plot(curves: dict, losses: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (m, (title, up)) in zip(axes.flat, METRICS.items()):
        for name in losses:
            steps = sorted(curves[name])
            stats = [mean_ci(curves[name][s][m]) for s in steps]
            mean = [s[0] for s in stats]
            lo = [s[0] - s[1] for s in stats]
            hi = [s[0] + s[1] for s in stats]
            (line,) = ax.plot(steps, mean, marker="o", label=LABELS[name])
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_title(f"{title} {'↑' if up else '↓'}")
        ax.set_xlabel("compared-stage step")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke check: 2 losses, 2 seeds, 8 prompts, 2 steps "
                        "(options given with it take precedence)")
    parser.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated from {', '.join(LOSSES)}")
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds per loss (>= 3 for the default set)")
    parser.add_argument("--eval-size", type=positive_int, default=64, help="held-out prompts")
    parser.add_argument("--warmup-steps", type=positive_int, default=30, help="shared SeqKD warm-up steps (the demo's stage 1)")
    parser.add_argument("--steps", type=positive_int, default=STEPS, help="steps of the compared stage")
    parser.add_argument("--eval-every", type=positive_int, default=EVAL_EVERY, help="evaluation cadence in the compared stage")
    parser.add_argument("--new-tokens", type=positive_int, default=32, help="response length in training")
    parser.add_argument("--eval-new-tokens", type=positive_int, default=64, help="response length in evaluation")
    parser.add_argument("--out", default="runs/quality", help="output folder (finished runs in it are reused)")
    args = parser.parse_with_quick(dict(losses="rkl,csd_ts", seeds=2, eval_size=8, warmup_steps=2, steps=2, eval_every=1,
                                        new_tokens=16, eval_new_tokens=16, out="runs/quality_quick"))
    losses = parse_losses(args.losses)
    seeds = list(range(args.seeds))
    out = Path(args.out).resolve()
    check_settings(out, args)
    cache = out / "teacher_greedy.pt"
    common = common_overrides(args.eval_size, args.new_tokens, args.eval_new_tokens)

    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    t_start = time.perf_counter()
    warm_dir = out / "warmup"
    t_warm, warm = warm_up(warm_dir, common, cache, args.warmup_steps, WARMUP_SOURCE, WARMUP_LR)

    walls = []
    for name in losses:
        for seed in seeds:
            _, wall = compared_run(out, common, cache, name, seed, args.steps, args.eval_every)
            walls.append(wall)
            print(f"{name} seed {seed}: {wall:.0f} s", flush=True)
    ray.shutdown()

    curves = collect(out, losses, seeds, warm)
    text = table(curves, losses, seeds, warm, warm.get("eval/teacher_accuracy"))
    (out / "quality.md").write_text(text + "\n")
    (out / "quality.json").write_text(json.dumps({"args": vars(args), "warmup": warm, "curves": curves}, indent=1))
    plot(curves, losses, out / "quality.png")
    print(text)
    ran = [w for w in walls if w > 0]
    total = time.perf_counter() - t_start
    print(f"\nwall time {total:.0f} s (warm-up {t_warm:.0f} s, {len(ran)} compared runs, "
          f"{(sum(ran) / len(ran)) if ran else 0:.0f} s each); wrote {out}/quality.md, quality.png, quality.json")


if __name__ == "__main__":
    main()
