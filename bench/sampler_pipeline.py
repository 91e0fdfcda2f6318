"""Sampler backend and dtype inside the whole pipeline, side by side (issue 13, part 3).

The vs_trl shape (SmolLM2-135M-Instruct teacher -> 8-layer student, GSM8K train prompts, batch 4,
64 new tokens, loss `rkl`, sync mode, one trainer rank, every role with 2 threads on this 2-core
machine) run through the Controller once per variant:

    hf-fp32    transformers generate(), fp32 sampler and teacher (the previous default)
    hf-bf16    transformers generate(), bf16 sampler and teacher (student_model/teacher_model.dtype)
    vllm-fp32  vLLM CPU engine as sampler, fp32; HF teacher fp32
    vllm-bf16  vLLM CPU engine as sampler, bf16; HF teacher bf16

The trainer keeps fp32 master weights and fp32 compute in every variant. Per phase (seconds per
step, the first --skip steps dropped): sample (the sampler's own time), score (the teacher's),
trainer forward+backward, weight sync (trainer -> sampler), step wall time, and the threads each
actor ended up with (actors.json). Each variant can run in its own invocation (a few minutes
each); results accumulate in --json and the last invocation prints the table:

    python bench/sampler_pipeline.py --variants hf-fp32,hf-bf16 --json runs/sampler_pipeline.json
    python bench/sampler_pipeline.py --variants vllm-fp32,vllm-bf16 --json runs/sampler_pipeline.json

Ends with `<variant>/hf-fp32 step time ratio: X.XXX` per variant measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `python bench/sampler_pipeline.py` uses this checkout

import ray  # noqa: E402

from csd_ray.config import load_recipe  # noqa: E402
from csd_ray.controller import Controller  # noqa: E402
from csd_ray.metrics import read_metrics  # noqa: E402

GSM8K = HERE.parent.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
VARIANTS = {"hf-fp32": ("hf", "float32"), "hf-bf16": ("hf", "bfloat16"),
            "vllm-fp32": ("vllm", "float32"), "vllm-bf16": ("vllm", "bfloat16")}
PHASES = ("time_sample", "time_score", "time_trainer_forward_backward", "time_sync", "step_time")
RECIPE = """
run: {{name: sampler_{name}, output_dir: {out}, steps: {steps}, seed: 0, mode: sync, overlap_offpolicy: false,
       plot: false}}
teacher_model: {{path: smollm2-135m-instruct, dtype: {dtype}}}
student_model: {{path: smollm2-135m-instruct, num_layers: 8, dtype: {dtype}}}
data: {{source: {prompts}, prompt_field: question, answer_field: answer, eval_size: 0, max_prompt_tokens: 512,
        num_examples: {examples}}}
batch: {{prompts_per_step: {batch}, max_new_tokens: {new_tokens}}}
sampler: {{backend: {backend}, placement: {{num_cpus: 0.5, threads: 2}}}}
teacher: {{payload: hidden, placement: {{num_cpus: 0.5, threads: 2}}}}
trainer: {{num_ranks: 1, placement: {{num_cpus: 1, threads: 2}}, lr: 5.0e-5, warmup_steps: 0, grad_clip: 1.0,
          loss: {{name: rkl}}}}
"""


def run_variant(name: str, args, out: Path) -> dict:
    backend, dtype = VARIANTS[name]
    recipe_path = out / f"{name}.yaml"
    recipe_path.write_text(RECIPE.format(name=name, out=out / name, steps=args.steps, dtype=dtype, prompts=GSM8K,
                                         examples=args.steps * args.batch + 8, batch=args.batch,
                                         new_tokens=args.new_tokens, backend=backend))
    Controller(load_recipe(recipe_path), log=lambda m: None).run()
    records = [r for r in read_metrics(out / name / "metrics.jsonl") if r.get("kind", "train") == "train"]
    timed = records[args.skip:]
    actors = json.loads((out / name / "actors.json").read_text())
    return {"phases": {p: statistics.mean(r[p] for r in timed) for p in PHASES},
            "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["step_time"] for r in timed),
            "steps": len(timed), "threads": _threads(actors)}


def _threads(actors: dict) -> dict:
    """role -> torch intra-op threads of its first actor (actors.json)."""
    return {role: entries[0].get("threads") for role, entries in actors.items() if entries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=6, help="steps per variant")
    parser.add_argument("--skip", type=int, default=1, help="first steps dropped (warm-up)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", default="", help="accumulate results here (one variant per invocation)")
    args = parser.parse_args()
    names = [v for v in args.variants.split(",") if v]
    if set(names) - set(VARIANTS):
        parser.error(f"unknown --variants {sorted(set(names) - set(VARIANTS))}; choose from {','.join(VARIANTS)}")
    if args.skip >= args.steps:
        parser.error("--skip must be < --steps")
    if not GSM8K.exists():
        sys.exit(f"GSM8K not found at {GSM8K}")
    store = Path(args.json) if args.json else None
    results = json.loads(store.read_text()) if store and store.exists() else {}
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"{name} ...", file=sys.stderr, flush=True)
            results[name] = run_variant(name, args, Path(tmp))
            if store:
                store.parent.mkdir(parents=True, exist_ok=True)
                store.write_text(json.dumps(results, indent=1))
    ray.shutdown()

    print(f"\nSmolLM2-135M-Instruct -> 8-layer student, GSM8K, batch {args.batch} x {args.new_tokens} new tokens, "
          f"loss rkl, sync, fp32 trainer; {args.steps} steps, first {args.skip} dropped; {os.cpu_count()} CPUs")
    print(f"{'':11s}" + "".join(f"{p.removeprefix('time_').replace('trainer_forward_backward', 'fwd+bwd'):>11s}"
                                for p in PHASES) + f"{'tok/s':>8s}  threads")
    for name in VARIANTS:
        if name in results:
            r = results[name]
            print(f"{name:11s}" + "".join(f"{r['phases'][p]:11.3f}" for p in PHASES) + f"{r['tokens_per_s']:8.1f}  "
                  + " ".join(f"{k}={v}" for k, v in sorted(r["threads"].items())))
    if "hf-fp32" in results:
        base = results["hf-fp32"]["phases"]["step_time"]
        for name in VARIANTS:
            if name in results and name != "hf-fp32":
                print(f"{name}/hf-fp32 step time ratio: {results[name]['phases']['step_time'] / base:.3f}")


if __name__ == "__main__":
    sys.exit(main())
