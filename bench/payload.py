"""Teacher-signal payloads: bytes per token, and how close top-k CSD gets to the exact gradient.

On real outputs (SmolLM2-135M-Instruct teacher, its 8-layer student, GSM8K test questions with
the teacher's greedy answers), for each response token:
* bytes moved teacher -> trainer for the `logits`, `topk` (k=64) and `hidden` payloads;
* cosine similarity between the CSD (S,S) and (T,S) gradients w.r.t. the student logits from a
  top-k payload (k in 16, 64, 256; teacher top-k merged with the student's top-k) and the exact
  full-vocabulary gradient.

    python bench/payload.py [--prompts 8] [--gsm8k ../shared/data/gsm8k/test.jsonl]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from csd_ray.config import DataConfig, ModelConfig
from csd_ray.data import load_prompts
from csd_ray.generation import SamplingSpec, token_rules
from csd_ray.losses import DenseTeacher, HiddenTeacher, get_loss, topk_from_logits
from csd_ray.models import load_model, load_tokenizer
from csd_ray.workers.hf_generate import forward_hidden, hf_generate

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--gsm8k", default=str(HERE.parent.parent / "shared" / "data" / "gsm8k" / "test.jsonl"))
    args = parser.parse_args()
    teacher_cfg = ModelConfig(path="smollm2-135m-instruct")
    student_cfg = ModelConfig(path="smollm2-135m-instruct", num_layers=8)
    tokenizer = load_tokenizer(teacher_cfg)
    teacher, student = load_model(teacher_cfg, tokenizer), load_model(student_cfg, tokenizer)
    data = load_prompts(DataConfig(source=args.gsm8k, eval_size=0, max_prompt_tokens=256), tokenizer)
    prompts = [e.prompt_ids for e in data.train[: args.prompts]]
    rollout = hf_generate(teacher, prompts, SamplingSpec(args.new_tokens, greedy=True), token_rules(tokenizer))
    with torch.no_grad():
        rows = rollout.target_mask()
        t_hidden = forward_hidden(teacher, rollout)[:, :-1][rows]
        s_hidden = forward_hidden(student, rollout)[:, :-1][rows]
        head_t, head_s = teacher.get_output_embeddings().weight, student.get_output_embeddings().weight
        t_logits, s_logits = t_hidden @ head_t.t(), s_hidden @ head_s.t()
    n, vocab = t_logits.shape
    print(f"{n} response tokens of {len(prompts)} GSM8K answers; V={vocab}, d={t_hidden.shape[1]}")
    print("\nbytes per token, teacher -> trainer:")
    dense = DenseTeacher(t_logits)
    topk64 = topk_from_logits(t_logits, 64)
    hidden = HiddenTeacher(t_hidden, head_t)
    for name, payload in (("logits (fp32)", dense), ("topk k=64 (int64 ids + fp32)", topk64), ("hidden (fp32)", hidden)):
        print(f"  {name:32s} {payload.bytes_per_token():>8d}")
    print("  (ids as int32 and log-probs as bf16 would make top-k 6 B per entry; the hidden payload also needs the"
          " teacher's lm_head on the trainer once)")

    mask = torch.ones(n, dtype=torch.bool)
    print("\ncosine(top-k CSD gradient, exact gradient) w.r.t. student logits, mean over tokens:")
    for weights in (("student", "student"), ("teacher", "student")):
        loss = get_loss("csd", weights=weights, vocab_size=len(tokenizer))
        z = s_logits.clone().requires_grad_(True)
        (exact,) = torch.autograd.grad(loss(z, dense, mask)[0], z)
        for k in (16, 64, 256):
            payload = topk_from_logits(t_logits, k, extra_ids=s_logits.topk(k, -1).indices)
            z = s_logits.clone().requires_grad_(True)
            (approx,) = torch.autograd.grad(loss(z, payload, mask)[0], z)
            cos = torch.nn.functional.cosine_similarity(approx, exact, dim=-1).mean().item()
            print(f"  csd {weights!s:24s} k={k:<4d} cosine {cos:.3f}")


if __name__ == "__main__":
    main()
