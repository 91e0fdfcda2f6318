"""csd_ray vs TRL's DistillationTrainer and GKDTrainer, side by side (issues 7 and 13).

Same teacher (SmolLM2-135M-Instruct) and student (8 of its 30 layers, one saved folder both
load), the same GSM8K prompts, optimizer steps, batch size, response length, learning rate and
optimizer (AdamW, constant lr, grad clip 1.0), fp32 training, on-policy. TRL runs at its best CPU
settings: the KV cache on during generation (gradient_checkpointing=False) and the same dtype:

    trl-distill  DistillationTrainer (TRL 1.16: on-policy, chunked JSD from hidden states), beta=1
                 (reverse KL), bf16=False
    trl-kv       GKDTrainer, lmbda=1 (on-policy), beta=1 (reverse KL), gradient_checkpointing=False
    trl          GKDTrainer at its defaults (gradient checkpointing on: generate() without a KV cache)
    rkl, csd     csd_ray, loss `rkl` (like for like) and `csd` (T,S); fp32 sampler and teacher
    rkl-bf16, csd-bf16   the same with bf16 sampler and teacher weights (trainer still fp32)
    rkl-vllm, csd-vllm   the same with the vLLM CPU sampler

Each run does --warmup steps first, which are not timed. Every student is then judged by the
same code on held-out GSM8K test questions: fidelity (teacher NLL of student samples), coverage
(student NLL of the teacher's greedy answers) and diversity (distinct-2).

TRL is a benchmark-only dependency (never installed by CI):

    pip install trl==1.16.0
    python bench/vs_trl.py [--steps 30] [--warmup 2] [--batch 4] [--new-tokens 64] [--lr 5e-5]
    # in pieces (one system per invocation; results accumulate in the json, the last prints all):
    python bench/vs_trl.py --quick --systems trl-distill --json runs/vs_trl.json
    python bench/vs_trl.py --quick --systems rkl --json runs/vs_trl.json   # ...

Prints one `<csd_ray system>/<TRL system> tokens-per-second ratio` line per pair, and ends with
`csd_ray/best-trl tokens-per-second ratio: X.XXX` (fastest csd_ray `rkl` system over the fastest
TRL system measured). Each system's step is profiled: TRL's generation, loss forward (student,
teacher, divergence) and the rest (backward, optimizer); csd_ray's phases.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/vs_trl.py` uses this checkout

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
            # ... and the conversational prompt DistillationTrainer reads (it applies the chat template)
            prompt = [{"role": "user", "content": r["question"]}]
            f.write(json.dumps({"question": r["question"], "answer": r["answer"], "messages": messages,
                                "prompt": prompt}) + "\n")
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

class StepTimer:
    """Seconds spent in named parts of each TRL step (wrapped methods), summed per step."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0
        return timed


def _step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time at the end of every optimizer step, and the profile totals at that moment."""

        def __init__(self, timer: StepTimer):
            self.timer, self.ends, self.profile = timer, [], []

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())
            self.profile.append(dict(self.timer.totals))

    return StepClock


def _trl_result(args, trainer, clock, tokens: list[int]) -> dict:
    """Timed window = after the last warm-up step to the last step; profile per timed step."""
    first, last = args.warmup - 1, len(clock.ends) - 1
    seconds = clock.ends[last] - clock.ends[first]
    steps = last - first
    parts = {k: (clock.profile[last].get(k, 0.0) - clock.profile[first].get(k, 0.0)) / steps
             for k in clock.profile[last]}
    parts["backward+optimizer+other"] = seconds / steps - sum(parts.values())
    return {"model": trainer.model.eval(), "seconds": seconds, "steps": steps,
            "generated_tokens": sum(tokens[args.warmup:]), "phases": parts}


def run_trl(args, prompts_path: Path, student_dir: str, teacher_dir: str, tokenizer, out: Path,
            kv_cache: bool) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    timer = StepTimer()

    class ProfiledGKDTrainer(GKDTrainer):
        """Counts the generated tokens each step trains on (labels != -100 after on-policy generation)
        and times generation and the loss forward (student + teacher forward, generalized JSD)."""

        generate_on_policy_outputs = staticmethod(timer.wrap("generate", GKDTrainer.generate_on_policy_outputs))

        def compute_loss(self, *a, **kw):
            return timer.wrap("loss forward (student+teacher+JSD)", super().compute_loss)(*a, **kw)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.generated_tokens.append(int((inputs["labels"] != -100).sum()))
            return loss

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
    clock = _step_clock()(timer)
    trainer = ProfiledGKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32),
        # GKD's ChatML collator reads "messages" and would take a "prompt" column for a string
        args=config, train_dataset=load_dataset("json", data_files=str(prompts_path), split="train").remove_columns(
            ["prompt"]),
        processing_class=tokenizer, callbacks=[clock],
    )
    # This TRL version divides the loss by the token count of the dataset's answers (0 for
    # prompt-only data: NaN at step 2), not of the generated responses; without loss kwargs the
    # loss is a mean over generated tokens, as csd_ray's is.
    trainer.model_accepts_loss_kwargs = False
    trainer.generated_tokens = []
    trainer.train()
    return _trl_result(args, trainer, clock, trainer.generated_tokens)


def run_trl_distill(args, prompts_path: Path, student_dir: str, teacher_dir: str, tokenizer, out: Path) -> dict:
    """TRL 1.16's DistillationTrainer at its best CPU settings: KV cache on (no gradient
    checkpointing, which this config turns on by default), fp32 (its default is bf16=True)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM
    from trl import DistillationConfig, DistillationTrainer

    timer = StepTimer()

    class ProfiledDistillationTrainer(DistillationTrainer):
        """Counts the completion tokens each step trains on; times generation and the loss forward."""

        def _generate_single_turn(self, *a, **kw):
            return timer.wrap("generate", super()._generate_single_turn)(*a, **kw)

        def _generate_and_score_completions(self, inputs):
            batch = super()._generate_and_score_completions(inputs)
            self.generated_tokens.append(int(batch["completion_mask"].sum()))
            return batch

        def _compute_loss(self, *a, **kw):
            return timer.wrap("loss forward (student+teacher+chunked JSD)", super()._compute_loss)(*a, **kw)

    config = DistillationConfig(
        output_dir=str(out / "trl_distill"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=1.0,
        temperature=1.0, max_completion_length=args.new_tokens, seed=args.seed, use_cpu=True, bf16=False,
        fp16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[],
        dataloader_num_workers=0, disable_tqdm=True,
    )
    clock = _step_clock()(timer)
    dataset = load_dataset("json", data_files=str(prompts_path), split="train")
    trainer = ProfiledDistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32),
        args=config, train_dataset=dataset.select_columns(["prompt"]), processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.generated_tokens = []
    trainer.train()
    return _trl_result(args, trainer, clock, trainer.generated_tokens)


# --- csd_ray --------------------------------------------------------------------------------------

RECIPE = """
run: {{name: vs_trl_{name}, output_dir: {out}, steps: {steps}, seed: {seed}, mode: sync, overlap_offpolicy: false,
       export_dtype: float32, plot: false}}
teacher_model: {{path: smollm2-135m-instruct, dtype: {dtype}}}
student_model: {{path: {student}, dtype: {dtype}}}
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
# name -> (loss, sampler backend, sampler/teacher dtype); all on-policy and sync: sample, score, train,
# sync weights in turn; the trainer keeps fp32 weights and computes in fp32 in every one
CSD_RAY_SYSTEMS = {"rkl": ("rkl", "hf", "float32"), "rkl-bf16": ("rkl", "hf", "bfloat16"),
                   "rkl-vllm": ("rkl", "vllm", "float32"), "csd": ("csd", "hf", "float32"),
                   "csd-bf16": ("csd", "hf", "bfloat16"), "csd-vllm": ("csd", "vllm", "float32")}
TRL_SYSTEMS = ("trl-distill", "trl-kv", "trl")
PHASES = ("time_sample", "time_score", "time_trainer_forward_backward", "time_sync")


def run_csd_ray(args, name: str, prompts_path: Path, student_dir: str, out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    loss, backend, dtype = CSD_RAY_SYSTEMS[name]
    run_dir = out / f"csd_ray_{name}"
    recipe_path = out / f"csd_ray_{name}.yaml"
    recipe_path.write_text(RECIPE.format(name=name, loss=LOSSES[loss], backend=backend, dtype=dtype, out=run_dir,
                                         steps=args.warmup + args.steps, seed=args.seed, student=student_dir,
                                         prompts=prompts_path, batch=args.batch, new_tokens=args.new_tokens,
                                         lr=args.lr))
    Controller(load_recipe(recipe_path), log=lambda m: None).run()
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind", "train") == "train"]
    measured = records[args.warmup:]
    seconds = sum(r["step_time"] for r in measured)
    phases = {k.removeprefix("time_"): sum(r[k] for r in measured) / len(measured) for k in PHASES}
    phases["other (driver, transfers)"] = seconds / len(measured) - sum(phases.values())
    return {"model": AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).eval(),
            "seconds": seconds, "steps": len(measured), "generated_tokens": sum(r["tokens"] for r in measured),
            "phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per system (default 30; "
                        "--quick: 8)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps before them (default 2; "
                        "--quick: 1)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--eval", type=int, default=None, help="held-out GSM8K test questions (default 16; "
                        "--quick: 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="8 timed steps after 1 warm-up, 8 held-out questions")
    parser.add_argument("--json", default="", help="accumulate results here: systems measured by earlier "
                        "invocations with the same settings are kept and reported with this one's")
    parser.add_argument("--systems", default="trl-distill,trl-kv,rkl,csd",
                        help=f"comma-separated, from {','.join(TRL_SYSTEMS)},{','.join(CSD_RAY_SYSTEMS)}; "
                        "empty: only report what --json holds")
    args = parser.parse_args()
    quick = {"steps": 8, "warmup": 1, "eval": 8} if args.quick else {"steps": 30, "warmup": 2, "eval": 16}
    for key, value in quick.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the timed window starts at the end of a warm-up step)")
    systems = [name for name in args.systems.split(",") if name]
    unknown = set(systems) - {*TRL_SYSTEMS, *CSD_RAY_SYSTEMS}
    if unknown:
        parser.error(f"unknown --systems {sorted(unknown)}; choose from {','.join(TRL_SYSTEMS)},"
                     f"{','.join(CSD_RAY_SYSTEMS)}")
    settings = {k: getattr(args, k) for k in ("steps", "warmup", "batch", "new_tokens", "lr", "eval", "seed")}
    store = Path(args.json) if args.json else None
    saved = json.loads(store.read_text()) if store and store.exists() else {}
    if saved and saved["settings"] != settings:
        sys.exit(f"{store} holds results for other settings ({saved['settings']}); use another --json")
    results = saved.get("results", {})
    before = saved.get("before")

    def save(before: dict) -> None:
        if store:
            store.parent.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps({"settings": settings, "before": before, "results": results,
                                         "versions": versions()}, indent=1))

    if systems or before is None:
        before = measure(args, systems, results, save)
    report(args, before, results)


def versions() -> dict:
    import transformers

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
            "cpus": os.cpu_count()}


def measure(args, systems: list[str], results: dict, save) -> dict:
    """Run ``systems``, adding each one's result to ``results`` and calling ``save(before)`` as it
    lands; returns the student's quality before training."""
    if any(name in TRL_SYSTEMS for name in systems):
        try:
            import trl  # noqa: F401
        except ImportError:
            sys.exit("bench/vs_trl.py needs TRL: pip install trl==1.16.0 (a benchmark-only dependency)")
    if not GSM8K.exists():
        sys.exit(f"GSM8K not found at {GSM8K}")

    torch.set_num_threads(2)
    tokenizer = load_tokenizer(STUDENT)
    teacher_dir, student_dir = model_folder(TEACHER), model_folder(STUDENT)
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        prompts_path, eval_questions = write_prompts(out, (args.warmup + args.steps) * args.batch, args.eval)
        eval_prompts = [encode_prompt(q, tokenizer)[0] for q in eval_questions]
        teacher_greedy = hf_generate(teacher, eval_prompts, SamplingSpec(args.new_tokens, greedy=True),
                                     token_rules(tokenizer))
        start = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
        before = evaluate(start, teacher, tokenizer, eval_prompts, args.new_tokens, teacher_greedy)
        del start
        save(before)

        def finish(name: str, result: dict) -> None:  # judged and saved at once: a later failure keeps it
            result["quality"] = evaluate(result.pop("model"), teacher, tokenizer, eval_prompts, args.new_tokens,
                                         teacher_greedy)
            result["tok_s"] = result["generated_tokens"] / result["seconds"]
            results[name] = result
            save(before)

        for name in TRL_SYSTEMS:
            if name in systems:
                print(f"TRL {name} ...", file=sys.stderr, flush=True)
                finish(name, run_trl_distill(args, prompts_path, student_dir, teacher_dir, tokenizer, out)
                       if name == "trl-distill" else
                       run_trl(args, prompts_path, student_dir, teacher_dir, tokenizer, out, kv_cache=name == "trl-kv"))
        if any(name in CSD_RAY_SYSTEMS for name in systems):
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
            for name in CSD_RAY_SYSTEMS:
                if name in systems:
                    print(f"csd_ray {name} ...", file=sys.stderr, flush=True)
                    finish(f"csd_ray {name}", run_csd_ray(args, name, prompts_path, student_dir, out))
            ray.shutdown()
    return before


def report(args, before: dict, results: dict) -> None:
    print(f"\nSmolLM2-135M-Instruct -> 8-layer student; GSM8K; batch {args.batch}, {args.new_tokens} new tokens, "
          f"lr {args.lr}, fp32 training; {args.steps} timed steps after {args.warmup} warm-up; {os.cpu_count()} CPUs; "
          f"held-out: {args.eval} GSM8K test questions")
    print(f"{'':21s}{'s/step':>8s}{'gen tok/s':>11s}{'teacher_nll':>13s}{'stud_nll_T':>12s}{'distinct2':>11s}"
          f"{'eos':>6s}{'len':>6s}")
    q = before
    print(f"{'(before)':21s}{'':8s}{'':11s}{q['teacher_nll']:13.3f}{q['student_nll_on_teacher']:12.3f}"
          f"{q['distinct2']:11.3f}{q['eos_rate']:6.2f}{q['mean_len']:6.1f}")
    order = [n for n in TRL_SYSTEMS if n in results] + [f"csd_ray {n}" for n in CSD_RAY_SYSTEMS
                                                          if f"csd_ray {n}" in results]
    for name in order:
        r = results[name]
        q = r["quality"]
        print(f"{name:21s}{r['seconds'] / r['steps']:8.2f}{r['tok_s']:11.1f}{q['teacher_nll']:13.3f}"
              f"{q['student_nll_on_teacher']:12.3f}{q['distinct2']:11.3f}{q['eos_rate']:6.2f}{q['mean_len']:6.1f}")
    print("profile (seconds per step):")
    for name in order:
        phases = "  ".join(f"{k} {v:.2f}" for k, v in results[name]["phases"].items())
        print(f"  {name}: {phases}")
    print("TRL settings: fp32 (bf16=False), KV cache on for trl-distill and trl-kv (gradient_checkpointing=False); "
          "GKD: trainer.model_accepts_loss_kwargs=False (else the loss is divided by a count of dataset-answer "
          "tokens, 0 for prompt-only data)")
    print("(gen tok/s = generated response tokens trained on per second of wall time over the timed steps; "
          "stud_nll_T = student NLL of the teacher's greedy answers)")
    ours = [name for name in order if name.startswith("csd_ray")]
    theirs = [name for name in order if name in TRL_SYSTEMS]
    for mine in ours:
        for peer in theirs:
            print(f"{mine}/{peer} tokens-per-second ratio: {results[mine]['tok_s'] / results[peer]['tok_s']:.3f}")
    # The headline: the fastest like-for-like (rkl) csd_ray system over the fastest TRL system measured.
    rkl = [name for name in ours if CSD_RAY_SYSTEMS[name.removeprefix("csd_ray ")][0] == "rkl"]
    if rkl and theirs:
        best_mine = max(rkl, key=lambda n: results[n]["tok_s"])
        best_peer = max(theirs, key=lambda n: results[n]["tok_s"])
        print(f"csd_ray/best-trl tokens-per-second ratio: {results[best_mine]['tok_s'] / results[best_peer]['tok_s']:.3f}"
              f" ({best_mine} over {best_peer})")


if __name__ == "__main__":
    main()
