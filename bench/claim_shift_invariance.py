"""Claim: CSD is invariant to per-position shifts of the teacher's logits; DLD (logit MSE) is not.

Real models: teacher SmolLM2-135M-Instruct, student = 8 of its 30 layers (as in the demo). The
teacher answers arithmetic prompts greedily; its logits at the response positions are given to
the loss in three forms:

  raw     the teacher's logits
  logp    log-softmax of them (what a vLLM teacher sends)
  shift   raw + a random per-position constant, N(0, 10²) (any shift-only change of the signal)

Part 1, loss level: value and gradient w.r.t. the student's logits under each form, relative to
`raw`. Part 2, training level: the student trains --steps Adam steps on the same batch with each
(loss, form); then the held-out KL(teacher || student) per token on other prompts is compared.

    python bench/claim_shift_invariance.py [--train 8] [--eval 8] [--steps 10] [--lr 1e-4]

Ends with a verdict line per loss: CSD should be unchanged (same gradients, same trained
student); DLD should degrade under `shift` (and change under `logp`).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from csd_ray.config import DataConfig, ModelConfig  # noqa: E402
from csd_ray.data import load_prompts  # noqa: E402
from csd_ray.generation import SamplingSpec, token_rules  # noqa: E402
from csd_ray.losses import get_loss  # noqa: E402
from csd_ray.models import load_model, load_tokenizer, position_ids  # noqa: E402
from csd_ray.workers.hf_generate import hf_generate  # noqa: E402
from quality import Parser, int_at_least, positive_float, usage_error  # noqa: E402  (same folder)

LOSSES = {"csd_ss": ("csd", {"weights": ["student", "student"]}), "csd_ts": ("csd", {"weights": ["teacher", "student"]}),
          "dld": ("dld", {})}
SHIFTS = ("shift1", "shift2", "shift3")  # three draws of the random shift
FORMS = ("raw", "logp") + SHIFTS


def rows_logits(model, rollout) -> torch.Tensor:
    """Logits at the loss rows ``[N, V]`` (positions whose next token is a response token)."""
    out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                position_ids=position_ids(rollout.attention_mask), use_cache=False)
    return out.logits[:, :-1][rollout.target_mask()]


def teacher_forms(t: torch.Tensor) -> dict[str, torch.Tensor]:
    forms = {"raw": t, "logp": torch.log_softmax(t, -1)}
    for i, name in enumerate(SHIFTS, start=1):
        g = torch.Generator().manual_seed(i)
        forms[name] = t + 10.0 * torch.randn(t.shape[0], 1, generator=g, dtype=t.dtype)
    return forms


def kl_teacher_student(t: torch.Tensor, z: torch.Tensor) -> float:
    log_p, log_q = torch.log_softmax(t, -1), torch.log_softmax(z, -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


#: Arithmetic prompts the claim benches split into training and held-out ones.
PROMPTS = 200


def claim_arguments(description: str, steps: int, train_help: str = "training prompts (one batch)"):
    """The claim benches' command line, checked before any model loads: bad values get one line
    and exit 2."""
    parser = Parser(description=description)
    parser.add_argument("--train", type=int_at_least(1), default=8, help=train_help)
    parser.add_argument("--eval", type=int_at_least(1), default=8, help="held-out prompts")
    parser.add_argument("--steps", type=int_at_least(1), default=steps, help="Adam steps per loss (and form)")
    parser.add_argument("--lr", type=positive_float, default=1e-4)
    parser.add_argument("--new-tokens", type=int_at_least(1), default=24)
    args = parser.parse_args()
    if args.train + args.eval > PROMPTS:
        usage_error(f"--train + --eval: expected at most {PROMPTS} prompts (the arithmetic set), got "
                    f"{args.train} + {args.eval}")
    return args


def smollm2_setup(eval_size: int):
    """(tokenizer, SmolLM2 teacher, its 8-layer student, arithmetic prompts): what the claim benches share."""
    tok = load_tokenizer(ModelConfig(path="smollm2-135m-instruct"))
    teacher = load_model(ModelConfig(path="smollm2-135m-instruct"), tok).eval()
    student0 = load_model(ModelConfig(path="smollm2-135m-instruct", num_layers=8), tok, dtype="float32")
    return tok, teacher, student0, load_prompts(DataConfig(num_examples=PROMPTS, eval_size=eval_size, split_seed=0), tok)


def sample(model, tok, prompt_ids: list[list[int]], new_tokens: int, seed: int, greedy: bool = False):
    """Responses under the generation contract (temperature 1, no truncation)."""
    return hf_generate(model, prompt_ids, SamplingSpec(new_tokens, seed=seed, greedy=greedy), token_rules(tok))


def main() -> None:
    args = claim_arguments(__doc__.split("\n\n")[0], steps=10)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tok, teacher, student0, prompts = smollm2_setup(args.eval)
    vocab = len(tok)

    def answers(examples):
        rollout = sample(teacher, tok, [e.prompt_ids for e in examples], args.new_tokens, seed=0, greedy=True)
        with torch.no_grad():
            return rollout, rows_logits(teacher, rollout)[:, :vocab].float()

    train, t_train = answers(prompts.train[: args.train])
    held, t_held = answers(prompts.eval)
    print(f"setup {time.perf_counter() - t0:.0f} s: {t_train.shape[0]} training rows, {t_held.shape[0]} held-out rows, V={vocab}")

    # Part 1: the loss itself.
    with torch.no_grad():
        z = rows_logits(student0, train)[:, :vocab].double()
    forms = teacher_forms(t_train.double())
    mask = torch.ones(z.shape[0], dtype=torch.bool)
    print("\npart 1, loss level: relative change vs the raw-logit teacher")
    print(f"{'loss':8s}{'form':>7s}{'value':>14s}{'|Δvalue|/value':>16s}{'|Δgrad|/|grad|':>16s}")
    level1: dict = {}
    for name, (loss_name, params) in LOSSES.items():
        loss = get_loss(loss_name, **params)
        results = {}
        for form, t in forms.items():
            zz = z.clone().requires_grad_(True)
            value, _ = loss(zz, t, mask)
            (grad,) = torch.autograd.grad(value, zz)
            results[form] = (value.item(), grad)
        v0, g0 = results["raw"]
        for form, (v, g) in results.items():
            dv, dg = abs(v - v0) / abs(v0), float((g - g0).norm() / g0.norm())
            level1[(name, form)] = (dv, dg)
            print(f"{name:8s}{form:>7s}{v:14.6g}{dv:16.2e}{dg:16.2e}")

    # Part 2: a short training run per (loss, form), all from the same student.
    print(f"\npart 2, training level: {args.steps} Adam steps (lr {args.lr}), then held-out KL(teacher||student) per token")
    with torch.no_grad():
        kl0 = kl_teacher_student(t_held, rows_logits(student0, held)[:, :vocab].float())
    print(f"before training: {kl0:.4f}")
    forms = teacher_forms(t_train)
    level2: dict = {}
    for name, (loss_name, params) in LOSSES.items():
        loss = get_loss(loss_name, vocab_size=vocab, **params)
        for form, t in forms.items():
            student = copy.deepcopy(student0).train()
            opt = torch.optim.Adam(student.parameters(), lr=args.lr)
            for _ in range(args.steps):
                value, _ = loss(rows_logits(student, train), t, torch.ones(t.shape[0], dtype=torch.bool))
                opt.zero_grad()
                value.backward()
                opt.step()
            with torch.no_grad():
                level2[(name, form)] = kl_teacher_student(t_held, rows_logits(student.eval(), held)[:, :vocab].float())
            print(f"{name:8s}{form:>7s}  held-out KL {level2[(name, form)]:.4f}", flush=True)

    print("\nverdict (held-out KL relative spread across forms; CSD passes if < 0.1%, as fp32 Adam noise)")
    spreads = {}
    for name in LOSSES:
        grad_change = max(level1[(name, f)][1] for f in FORMS[1:])
        kl = {f: level2[(name, f)] for f in FORMS}
        spreads[name] = max(abs(kl[f] - kl["raw"]) for f in FORMS[1:]) / kl["raw"]
        shift_mean = sum(kl[f] for f in SHIFTS) / len(SHIFTS)
        print(f"{name}: max relative gradient change {grad_change:.1e}; held-out KL raw {kl['raw']:.4f}, logp "
              f"{kl['logp']:.4f}, shifted {', '.join(f'{kl[f]:.4f}' for f in SHIFTS)} (mean {shift_mean:.4f}); "
              f"relative spread {spreads[name]:.1e} -> {'UNCHANGED' if spreads[name] < 1e-3 and grad_change < 1e-6 else 'CHANGED'}")
    csd_ok = all(spreads[n] < 1e-3 and max(level1[(n, f)][1] for f in FORMS[1:]) < 1e-6 for n in ("csd_ss", "csd_ts"))
    dld = {f: level2[("dld", f)] for f in FORMS}
    dld_shift = sum(dld[f] for f in SHIFTS) / len(SHIFTS)
    print(f"claim 1, CSD's result is unchanged by the teacher's form: {'HELD' if csd_ok else 'NOT HELD'}")
    print(f"claim 2, DLD's result changes with it: {'HELD' if spreads['dld'] > 1e-2 else 'NOT HELD'} "
          f"(held-out KL moves by up to {spreads['dld']:.0%})")
    print(f"claim 3, DLD degrades under a random per-position shift: {'HELD' if dld_shift > dld['raw'] * 1.01 else 'NOT HELD'} "
          f"(mean held-out KL over {len(SHIFTS)} shifts {dld_shift:.4f} vs raw logits {dld['raw']:.4f}; log-probs {dld['logp']:.4f})")
    print(f"wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
