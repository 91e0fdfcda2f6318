"""csd_ray vs TRL's GKDTrainer, side by side in one run (issue 7).

Same teacher (SmolLM2-135M-Instruct) and student (8 of its 30 layers, one saved folder both
load), the same GSM8K prompts, optimizer steps, batch size, response length, learning rate and
optimizer (AdamW, constant lr, grad clip 1.0), fp32. TRL runs on-policy GKD (lmbda=1) with
beta=1 (reverse KL); csd_ray runs on-policy with loss `rkl` (like for like), then `csd` (T,S).
Each run does --warmup steps first, which are not timed. Both students are then judged by the
same code on held-out GSM8K test questions: fidelity (teacher NLL of student samples), coverage
(student NLL of the teacher's greedy answers) and diversity (distinct-2).

TRL is a benchmark-only dependency (never installed by CI):

    pip install trl==1.16.0
    python bench/vs_trl.py [--steps 30] [--warmup 2] [--batch 4] [--new-tokens 64] [--lr 5e-5]

Ends with `csd_ray/trl tokens-per-second ratio: X.XXX` (csd_ray with `rkl` over TRL with its
defaults); the lines above it compare each csd_ray loss with both TRL variants.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402
import torch  # noqa: E402

from csd_ray.config import ModelConfig, load_recipe  # noqa: E402
from csd_ray.controller import Controller  # noqa: E402
from csd_ray.data import encode_prompt  # noqa: E402
from csd_ray.evaluation import mean_nll, response_tokens, sample_stats  # noqa: E402
from csd_ray.metrics import read_metrics  # noqa: E402
from csd_ray.models import load_tokenizer, model_folder  # noqa: E402
from csd_ray.workers.hf_generate import hf_generate, response_logprobs  # noqa: E402
from csd_ray.generation import SamplingSpec, token_rules  # noqa: E402

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
TEACHER = ModelConfig(path="smollm2-135m-instruct")
STUDENT = ModelConfig(path="smollm2-135m-instruct", num_layers=8)


def write_prompts(out: Path, n_train: int, n_eval: int) -> tuple[Path, list[str]]:
    """The first n_train GSM8K train questions as a jsonl (both systems read it), n_eval test questions."""
    read = lambda name: [json.loads(line) for line in open(GSM8K / name)]  # noqa: E731
    train = read("train.jsonl")[:n_train]
    path = out / "prompts.jsonl"
    with open(path, "w") as f:
        for r in train:
            # messages for TRL's ChatML collator (it drops the last message to form the prompt)
            messages = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
            f.write(json.dumps({"question": r["question"], "answer": r["answer"], "messages": messages}) + "\n")
    return path, [r["question"] for r in read("test.jsonl")[:n_eval]]


# --- held-out quality, the same code for both students ------------------------------------------

@torch.no_grad()
def evaluate(student, teacher, tokenizer, prompts: list[list[int]], new_tokens: int, teacher_greedy) -> dict:
    rules = token_rules(tokenizer)
    samples = hf_generate(student, prompts, SamplingSpec(new_tokens, seed=1234), rules)
    return {
        "teacher_nll": mean_nll(response_logprobs(teacher, samples, rules.vocab_size), samples),
        "student_nll_on_teacher": mean_nll(response_logprobs(student, teacher_greedy, rules.vocab_size), teacher_greedy),
        **sample_stats(response_tokens(samples), rules.stop_ids),
    }


# --- TRL ------------------------------------------------------------------------------------------

def run_trl(args, prompts_path: Path, student_dir: str, teacher_dir: str, tokenizer, out: Path,
            kv_cache: bool) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class CountingGKDTrainer(GKDTrainer):
        """Counts the generated tokens each step trains on (labels != -100 after on-policy generation)."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.generated_tokens.append(int((inputs["labels"] != -100).sum()))
            return loss

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())

    config = GKDConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        lmbda=1.0, beta=1.0, temperature=1.0, max_new_tokens=args.new_tokens, seed=args.seed, use_cpu=True,
        bf16=False, fp16=False, logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
        disable_tqdm=True,
        # TRL's default turns gradient checkpointing on, and with it off goes generate()'s KV cache
        # (GKDTrainer passes use_cache=not gradient_checkpointing): 'trl' keeps the default, 'trl-kv' turns it off.
        gradient_checkpointing=not kv_cache,
    )
    clock = StepClock()
    trainer = CountingGKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32),
        args=config, train_dataset=load_dataset("json", data_files=str(prompts_path), split="train"),
        processing_class=tokenizer, callbacks=[clock],
    )
    # This TRL version divides the loss by the token count of the dataset's answers (0 for
    # prompt-only data: NaN at step 2), not of the generated responses; without loss kwargs the
    # loss is a mean over generated tokens, as csd_ray's is.
    trainer.model_accepts_loss_kwargs = False
    trainer.generated_tokens = []
    trainer.train()
    return {"model": trainer.model.eval(), "seconds": clock.ends[-1] - clock.ends[args.warmup - 1],
            "generated_tokens": sum(trainer.generated_tokens[args.warmup:])}


# --- csd_ray --------------------------------------------------------------------------------------

RECIPE = """
run: {{name: vs_trl_{name}, output_dir: {out}, steps: {steps}, seed: {seed}, mode: sync, overlap_offpolicy: false}}
teacher_model: {{path: smollm2-135m-instruct}}
student_model: {{path: {student}}}
data: {{source: {prompts}, prompt_field: question, answer_field: answer, eval_size: 0, max_prompt_tokens: 512,
        num_examples: 100000}}
batch: {{prompts_per_step: {batch}, max_new_tokens: {new_tokens}}}
sampler: {{backend: {backend}, placement: {{num_cpus: 0.5, threads: 2}}}}
teacher: {{payload: hidden, placement: {{num_cpus: 0.5, threads: 2}}}}
trainer:
  num_ranks: 1
  placement: {{num_cpus: 1, threads: 2}}
  lr: {lr}
  warmup_steps: 0
  grad_clip: 1.0
  loss: {loss}
"""
LOSSES = {"rkl": "{name: rkl}", "csd": "{name: csd, params: {weights: [teacher, student]}}"}
# name -> (loss, sampler backend); all on-policy and sync: sample, score, train, sync weights in turn
CSD_RAY_SYSTEMS = {"rkl": ("rkl", "hf"), "rkl-vllm": ("rkl", "vllm"), "csd": ("csd", "hf"),
                   "csd-vllm": ("csd", "vllm")}
PHASES = ("time_sample", "time_score", "time_trainer_forward_backward", "time_sync")


def run_csd_ray(args, name: str, prompts_path: Path, student_dir: str, out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    loss, backend = CSD_RAY_SYSTEMS[name]
    run_dir = out / f"csd_ray_{name}"
    recipe_path = out / f"csd_ray_{name}.yaml"
    recipe_path.write_text(RECIPE.format(name=name, loss=LOSSES[loss], backend=backend, out=run_dir,
                                         steps=args.warmup + args.steps, seed=args.seed, student=student_dir,
                                         prompts=prompts_path, batch=args.batch, new_tokens=args.new_tokens,
                                         lr=args.lr))
    Controller(load_recipe(recipe_path), log=lambda m: None).run()
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind", "train") == "train"]
    measured = records[args.warmup:]
    return {"model": AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).eval(),
            "seconds": sum(r["step_time"] for r in measured), "generated_tokens": sum(r["tokens"] for r in measured),
            "phases": {k: sum(r[k] for r in measured) / len(measured) for k in PHASES}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per system")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--eval", type=int, default=16, help="held-out GSM8K test questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems", default="trl,trl-kv,rkl,csd",
                        help=f"comma-separated, from trl,trl-kv,{','.join(CSD_RAY_SYSTEMS)}")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the timed window starts at the end of a warm-up step)")
    systems = args.systems.split(",")
    unknown = set(systems) - {"trl", "trl-kv", *CSD_RAY_SYSTEMS}
    if unknown:
        parser.error(f"unknown --systems {sorted(unknown)}; choose from trl,trl-kv,{','.join(CSD_RAY_SYSTEMS)}")
    try:
        import trl
    except ImportError:
        sys.exit("bench/vs_trl.py needs TRL: pip install trl==1.16.0 (a benchmark-only dependency)")
    if not GSM8K.exists():
        sys.exit(f"GSM8K not found at {GSM8K}")

    torch.set_num_threads(2)
    tokenizer = load_tokenizer(STUDENT)
    teacher_dir, student_dir = model_folder(TEACHER), model_folder(STUDENT)
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        prompts_path, eval_questions = write_prompts(out, (args.warmup + args.steps) * args.batch, args.eval)
        eval_prompts = [encode_prompt(q, tokenizer)[0] for q in eval_questions]
        teacher_greedy = hf_generate(teacher, eval_prompts, SamplingSpec(args.new_tokens, greedy=True),
                                     token_rules(tokenizer))
        start = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
        before = evaluate(start, teacher, tokenizer, eval_prompts, args.new_tokens, teacher_greedy)
        del start
        for name in ("trl", "trl-kv"):
            if name in systems:
                print(f"TRL {trl.__version__} GKDTrainer ({name}) ...", file=sys.stderr, flush=True)
                results[name] = run_trl(args, prompts_path, student_dir, teacher_dir, tokenizer, out,
                                        kv_cache=name == "trl-kv")
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        for name in CSD_RAY_SYSTEMS:
            if name in systems:
                print(f"csd_ray {name} ...", file=sys.stderr, flush=True)
                results[f"csd_ray {name}"] = run_csd_ray(args, name, prompts_path, student_dir, out)
        ray.shutdown()
        for result in results.values():
            result["quality"] = evaluate(result.pop("model"), teacher, tokenizer, eval_prompts, args.new_tokens,
                                         teacher_greedy)

    print(f"\nSmolLM2-135M-Instruct -> 8-layer student; GSM8K; batch {args.batch}, {args.new_tokens} new tokens, "
          f"lr {args.lr}, fp32; {args.steps} timed steps after {args.warmup} warm-up; {os.cpu_count()} CPUs; "
          f"held-out: {args.eval} GSM8K test questions")
    header = f"{'':18s}{'s/step':>8s}{'gen tok/s':>11s}{'teacher_nll':>13s}{'stud_nll_T':>12s}{'distinct2':>11s}" \
             f"{'eos':>6s}{'len':>6s}"
    print(header)
    q = before
    print(f"{'(before)':18s}{'':8s}{'':11s}{q['teacher_nll']:13.3f}{q['student_nll_on_teacher']:12.3f}"
          f"{q['distinct2']:11.3f}{q['eos_rate']:6.2f}{q['mean_len']:6.1f}")
    for name, r in results.items():
        q, r["tok_s"] = r["quality"], r["generated_tokens"] / r["seconds"]
        print(f"{name:18s}{r['seconds'] / args.steps:8.2f}{r['tok_s']:11.1f}{q['teacher_nll']:13.3f}"
              f"{q['student_nll_on_teacher']:12.3f}{q['distinct2']:11.3f}{q['eos_rate']:6.2f}{q['mean_len']:6.1f}")
    for name, r in results.items():
        if "phases" in r:
            phases = "  ".join(f"{k.removeprefix('time_')} {v:.2f}s" for k, v in r["phases"].items())
            print(f"{name} per step: {phases}")
    print("TRL adjustments: trainer.model_accepts_loss_kwargs=False (else the loss is divided by a count of "
          "dataset-answer tokens, 0 for prompt-only data); 'trl-kv': gradient_checkpointing=False")
    print("(gen tok/s = generated response tokens trained on per second of wall time over the timed steps; "
          "stud_nll_T = student NLL of the teacher's greedy answers)")
    ours = [name for name in results if name.startswith("csd_ray")]
    for mine in ours:
        for theirs in ("trl-kv", "trl"):
            if theirs in results:
                ratio = results[mine]["tok_s"] / results[theirs]["tok_s"]
                print(f"{mine}/{theirs} tokens-per-second ratio: {ratio:.3f}")
    # The headline: the fastest like-for-like (rkl) csd_ray over TRL as configured in the reference run.
    rkl = [name for name in ours if CSD_RAY_SYSTEMS[name.removeprefix("csd_ray ")][0] == "rkl"]
    if rkl and "trl" in results:
        best = max(results[name]["tok_s"] for name in rkl)
        print(f"csd_ray/trl tokens-per-second ratio: {best / results['trl']['tok_s']:.3f}")


if __name__ == "__main__":
    main()
