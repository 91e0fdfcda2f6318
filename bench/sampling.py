"""Sampling and scoring in bf16 vs fp32 on this CPU, side by side in one run (issue 13, part 3).

SmolLM2-135M-Instruct (teacher, 30 layers) and its 8-layer student, GSM8K test questions:
* sampling: transformers ``generate()`` through csd_ray's generation contract (``hf_generate``,
  recorded log-probs on, as the sampler runs it), fp32 vs bf16 weights;
* scoring: the teacher's forward over prompt + response into the ``hidden`` payload (what
  ``HFTeacher.score`` does), fp32 vs bf16;
* optionally (``--vllm``) the vLLM CPU engine's decode of the student, fp32 vs bf16, each engine
  in its own child process (one in-process engine per process).

Variants are interleaved (fp32, bf16, fp32, ...) and the median of ``--repeats`` is reported.
Accuracy, because sampled log-probs feed the losses (importance ratios, evaluation NLLs):
* max / mean |bf16 recorded log-prob − fp32 log-prob of the same token|, the fp32 model scoring
  the bf16 model's samples; the same for fp32 samples gives the noise floor of incremental
  (KV-cache) vs full-sequence computation;
* for the teacher's payload: max / mean |log-prob from bf16 hidden + bf16 lm_head (upcast per
  chunk, as the trainer does) − fp32| over the response tokens.

    python bench/sampling.py [--batch 4] [--new-tokens 64] [--repeats 3] [--threads 2] [--vllm]

Ends with one `bf16/fp32 time ratio` line per measured operation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `python bench/sampling.py` from anywhere uses this checkout

from csd_ray.config import DataConfig, ModelConfig  # noqa: E402
from csd_ray.data import load_prompts  # noqa: E402
from csd_ray.generation import SamplingSpec, adopt  # noqa: E402
from csd_ray.models import load_model, load_tokenizer  # noqa: E402
from csd_ray.rollout import Rollout  # noqa: E402
from csd_ray.workers.hf_generate import forward_hidden, hf_generate, response_logprobs  # noqa: E402

GSM8K = HERE.parent.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
TEACHER = ModelConfig(path="smollm2-135m-instruct")
STUDENT = ModelConfig(path="smollm2-135m-instruct", num_layers=8)
DTYPES = ("float32", "bfloat16")


def prompts(tokenizer, n: int) -> list[list[int]]:
    data = load_prompts(DataConfig(source=str(GSM8K), eval_size=0, max_prompt_tokens=256), tokenizer)
    return [ex.prompt_ids for ex in data.train[:n]]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


@torch.no_grad()
def teacher_payload(model, rollout: Rollout) -> torch.Tensor:
    """The 'hidden' payload, as HFTeacher.score makes it: [N, d] at the loss rows."""
    return forward_hidden(model, rollout)[:, :-1][rollout.target_mask()].contiguous()


@torch.no_grad()
def payload_logprobs(hidden: torch.Tensor, lm_head: torch.Tensor, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Log-probs of ``tokens`` from a hidden payload, in fp32 (the trainer upcasts per chunk)."""
    logits = (hidden.float() @ lm_head.float().T)[:, :vocab]
    return torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)


def logprob_gap(recorded: torch.Tensor, reference: torch.Tensor, rollout: Rollout) -> tuple[float, float]:
    """(max, mean) |recorded − reference| over the response tokens."""
    diff = (recorded - reference)[rollout.response_mask].abs()
    return float(diff.max()), float(diff.mean())


def vllm_child(dtype: str, batch: int, new_tokens: int, repeats: int, threads: int) -> None:
    """Child process: a vLLM CPU engine of the student in ``dtype``; prints one json line."""
    from csd_ray.workers.vllm_backend import make_llm, vllm_generate
    from csd_ray.generation import token_rules
    from csd_ray.models import model_folder
    from transformers import AutoConfig

    tokenizer = load_tokenizer(STUDENT)
    folder = model_folder(STUDENT, tokenizer)
    (llm, start) = timed(lambda: make_llm(folder, dtype, 0, 512, 0.5))
    rules = token_rules(tokenizer, folder)
    vocab = AutoConfig.from_pretrained(folder).vocab_size
    batch_prompts = prompts(tokenizer, batch)
    times = []
    for r in range(repeats + 1):  # the first call warms the engine up
        rollout, seconds = timed(lambda: vllm_generate(llm, rules, vocab, batch_prompts,
                                                        SamplingSpec(new_tokens, seed=r), 0))
        times.append(seconds)
    print(json.dumps({"start": start, "warmup": times[0], "median": statistics.median(times[1:]),
                      "tokens": rollout.num_tokens()}))


def run_vllm(dtype: str, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run([sys.executable, __file__, "--vllm-child", dtype, "--batch", str(args.batch),
                          "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                          "--threads", str(args.threads)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"vLLM child ({dtype}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="prompts per generate() call")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--vllm", action="store_true", help="also time the vLLM CPU engine (student decode)")
    parser.add_argument("--vllm-child", choices=DTYPES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.vllm_child:
        return vllm_child(args.vllm_child, args.batch, args.new_tokens, args.repeats, args.threads)
    if not GSM8K.exists():
        sys.exit(f"GSM8K not found at {GSM8K}")

    tokenizer = load_tokenizer(TEACHER)
    batch_prompts = prompts(tokenizer, args.batch)
    models, rules = {}, None
    for role, cfg in (("teacher", TEACHER), ("student", STUDENT)):
        for dtype in DTYPES:
            models[role, dtype] = load_model(cfg, tokenizer, dtype=dtype)
            rules = adopt(models[role, dtype], tokenizer)

    gen_times = {key: [] for key in models}
    score_times = {key: [] for key in models}
    rollouts = {}
    for r in range(args.repeats + 1):  # round 0 warms up (first-call allocations, oneDNN kernels)
        for key, model in models.items():
            rollout, seconds = timed(lambda: hf_generate(model, batch_prompts, SamplingSpec(args.new_tokens, seed=r),
                                                         rules))
            rollouts[key] = rollout
            if r:
                gen_times[key].append((seconds, rollout.num_tokens()))
        reference = rollouts["teacher", "float32"]  # every model scores the same sequences
        for key, model in models.items():
            _, seconds = timed(lambda: teacher_payload(model, reference))
            if r:
                score_times[key].append(seconds)

    # accuracy of bf16 sampling and scoring, against fp32 on the same tokens
    gaps = {}
    for role in ("teacher", "student"):
        fp32 = models[role, "float32"]
        for dtype in DTYPES:
            rollout = rollouts[role, dtype]
            gaps[role, dtype] = logprob_gap(rollout.sampled_logprobs, response_logprobs(fp32, rollout, rules.vocab_size),
                                            rollout)
    reference = rollouts["teacher", "float32"]
    target = reference.target_mask()
    tokens = reference.input_ids[:, 1:][target]
    payload = {}
    for dtype in DTYPES:
        teacher = models["teacher", dtype]
        payload[dtype] = payload_logprobs(teacher_payload(teacher, reference), teacher.get_output_embeddings().weight,
                                          tokens, rules.vocab_size)
    payload_diff = (payload["bfloat16"] - payload["float32"]).abs()

    vllm = {dtype: run_vllm(dtype, args) for dtype in DTYPES} if args.vllm else {}

    print(f"\nSmolLM2-135M-Instruct teacher (30 layers) and 8-layer student; {args.batch} GSM8K test prompts x "
          f"{args.new_tokens} new tokens; torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; "
          f"median of {args.repeats} interleaved calls after a warm-up")
    print(f"{'':22s}{'generate s':>11s}{'tok/s':>8s}{'score s':>9s}{'max|dlogp|':>12s}{'mean|dlogp|':>13s}")
    med = {}
    for key in models:
        g = statistics.median(s for s, _ in gen_times[key])
        tokens_per_call = statistics.mean(n for _, n in gen_times[key])
        s = statistics.median(score_times[key])
        med[key] = (g, tokens_per_call / g, s)
        print(f"{key[0] + ' ' + key[1]:22s}{g:11.3f}{tokens_per_call / g:8.1f}{s:9.3f}{gaps[key][0]:12.2e}"
              f"{gaps[key][1]:13.2e}")
    for dtype, v in vllm.items():
        print(f"{'student vLLM ' + dtype:22s}{v['median']:11.3f}{v['tokens'] / v['median']:8.1f}"
              f"   (engine start {v['start']:.1f} s, first call {v['warmup']:.2f} s)")
    print("(dlogp: recorded sampling log-prob minus the fp32 model's full-sequence log-prob of the same token; "
          "the fp32 rows are the noise floor of KV-cache decoding)")
    print(f"teacher hidden payload bf16 vs fp32, response-token log-probs: max |diff| {float(payload_diff.max()):.3e}, "
          f"mean {float(payload_diff.mean()):.3e} ({payload_diff.numel()} tokens)")
    for role in ("teacher", "student"):
        b, f = med[role, "bfloat16"], med[role, "float32"]
        print(f"{role} generate bf16/fp32 time ratio: {b[0] / f[0]:.3f}")
        print(f"{role} score bf16/fp32 time ratio: {b[2] / f[2]:.3f}")
    if vllm:
        print(f"student vLLM generate bf16/fp32 time ratio: {vllm['bfloat16']['median'] / vllm['float32']['median']:.3f}")
        hf = med["student", "float32"][0]
        print(f"student vLLM bf16 / HF fp32 generate time ratio: {vllm['bfloat16']['median'] / hf:.3f}")


if __name__ == "__main__":
    sys.exit(main())
