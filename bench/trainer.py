"""Trainer throughput: packed vs padded sequences, token-budget micro-batches, activation checkpointing, bf16.

One real trainer rank (FSDP2, world size 1, gloo) of the SmolLM2-135M-Instruct 8-layer student
runs the forward/backward of a step (CSD (S,S), `hidden` teacher payload) on one batch: GSM8K
test questions in the chat template, responses of the length spread of on-policy samples (many
short, a few at the cap: exponential lengths with mean cap/3, cut at the cap; random token ids,
which cost the same as real ones). Variants run interleaved, repeat by repeat, in one process;
bf16 needs its own rank (FSDP2's mixed precision is fixed when the model is sharded), measured
right after the fp32 rank on the same batch. Prints response tokens/s per variant and its ratio
to the padded fp32 trainer.

    python bench/trainer.py [--sequences 16] [--cap 256] [--seed 0] [--repeats 3] [--budget 1024]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from pathlib import Path

import torch

from csd_ray.config import DataConfig, recipe_from_dict
from csd_ray.data import load_prompts
from csd_ray.models import load_tokenizer
from csd_ray.rollout import TeacherOutput, rollout_from_tokens, row_offsets

HERE = Path(__file__).resolve().parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(args, tokenizer):
    data = load_prompts(DataConfig(source=args.gsm8k, eval_size=0, max_prompt_tokens=512), tokenizer)
    prompts = [e.prompt_ids for e in data.train[: args.sequences]]
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.empty(args.sequences).exponential_(3.0 / args.cap, generator=g).ceil().clamp(1, args.cap).long()
    responses = [torch.randint(3, len(tokenizer), (int(n),), generator=g).tolist() for n in lengths]
    rollout = rollout_from_tokens(prompts, responses, pad_id=tokenizer.pad_token_id or 0)
    rows = int(rollout.target_mask().sum())
    teacher = TeacherOutput("hidden", {"hidden": torch.randn(rows, 576, generator=g)}, row_offsets(rollout.target_mask()))
    return rollout, teacher, lengths


def _rank(dtype: str, args):
    from csd_ray.workers.trainer import TrainerRank

    recipe = recipe_from_dict({
        "student_model": {"path": "smollm2-135m-instruct", "num_layers": 8},
        "teacher_model": {"path": "smollm2-135m-instruct"},
        "trainer": {"num_ranks": 1, "param_dtype": dtype, "placement": {"num_cpus": args.threads},
                    "loss": {"name": "csd", "params": {"weights": ["student", "student"]}}},
        "run": {"steps": 1},
    })
    rank = TrainerRank(recipe, 0, 1)
    rank.init_group("127.0.0.1", _port())
    head = rank.module.model.get_output_embeddings().weight
    head = head.full_tensor() if hasattr(head, "full_tensor") else head
    rank.set_teacher_lm_head((head.detach() + 0.02 * torch.randn(head.shape), {}))
    return rank


def _configure(rank, packing: bool, budget: int, checkpointing: bool) -> None:
    rank.module.packing = packing
    rank.recipe.trainer.packing = packing
    rank.recipe.trainer.micro_batch_tokens = budget
    model = rank.module.model
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _time(rank, variant, rollout, teacher) -> tuple[float, float]:
    _configure(rank, *variant)
    t0 = time.perf_counter()
    loss = float(rank.accumulate_gradients([(rollout, teacher)], float(rollout.num_tokens())))
    seconds = time.perf_counter() - t0
    rank.optimizer.zero_grad(set_to_none=True)
    return seconds, loss


def _measure(rank, variants: dict, rollout, teacher, repeats: int) -> dict:
    times: dict = {name: [] for name in variants}
    losses: dict = {}
    for name, variant in variants.items():  # warm-up (first calls allocate)
        losses[name] = _time(rank, variant, rollout, teacher)[1]
    for _ in range(repeats):
        for name, variant in variants.items():
            times[name].append(_time(rank, variant, rollout, teacher)[0])
    return {name: (statistics.median(t), losses[name]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--cap", type=int, default=256, help="response length cap (max_new_tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=1024, help="trainer.micro_batch_tokens of the budget rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gsm8k", default=str(HERE.parent.parent / "shared" / "data" / "gsm8k" / "test.jsonl"))
    args = parser.parse_args()

    tokenizer = load_tokenizer(recipe_from_dict({"run": {"steps": 1}, "student_model": {"path": "smollm2-135m-instruct"}}
                                                ).student_model)
    rollout, teacher, lengths = _batch(args, tokenizer)
    real = int(rollout.attention_mask.sum())
    padded = rollout.input_ids.numel()
    n = rollout.num_tokens()
    print(f"seed {args.seed}: {args.sequences} GSM8K prompts ({int(rollout.attention_mask.sum() - n)} prompt tokens), "
          f"responses of {n} tokens: lengths min {int(lengths.min())} median {int(lengths.median())} "
          f"max {int(lengths.max())}, {int((lengths == args.cap).sum())} at the cap {args.cap}")
    print(f"forward tokens: packed {real}, padded {padded} ({padded / real:.2f}x); {args.threads} threads, "
          f"{args.repeats} interleaved repeats after a warm-up, median")

    fp32 = {  # name: (packing, micro_batch_tokens, activation checkpointing)
        "padded": (False, 0, False),
        "packed": (True, 0, False),
        f"packed, micro_batch_tokens={args.budget}": (True, args.budget, False),
        "packed + activation checkpointing": (True, 0, True),
        "padded + activation checkpointing": (False, 0, True),
    }
    rank = _rank("float32", args)
    results = {f"fp32 {k}": v for k, v in _measure(rank, fp32, rollout, teacher, args.repeats).items()}
    rank.shutdown()
    bf16 = {"padded": (False, 0, False), "packed": (True, 0, False)}
    rank = _rank("bfloat16", args)
    results.update({f"bf16 {k}": v for k, v in _measure(rank, bf16, rollout, teacher, args.repeats).items()})
    rank.shutdown()

    base, base_loss = results["fp32 padded"]
    print(f"\n| trainer (one rank, fwd + bwd of {args.sequences} sequences) | time | response tokens/s | vs padded fp32 | loss |")
    print("| --- | --- | --- | --- | --- |")
    for name, (seconds, loss) in results.items():
        print(f"| {name} | {seconds:.2f} s | {n / seconds:.0f} | {base / seconds:.2f}x | {loss:.6f} |")
    packed = results["fp32 packed"][0]
    print(f"\npacked/padded tokens-per-second ratio (fp32): {base / packed:.2f}")
    print(f"packed/padded tokens-per-second ratio (bf16): {results['bf16 padded'][0] / results['bf16 packed'][0]:.2f}")
    print(f"max |loss - padded fp32 loss| / loss: fp32 variants "
          f"{max(abs(v[1] - base_loss) for k, v in results.items() if k.startswith('fp32')) / base_loss:.1e}, "
          f"bf16 {max(abs(v[1] - base_loss) for k, v in results.items() if k.startswith('bf16')) / base_loss:.1e}")


if __name__ == "__main__":
    main()
