"""Claim: CSD (S,S) at τ=1 trains like reverse KL (mode seeking); (T,S) keeps the teacher's diversity.

Real models, as in the demo: teacher SmolLM2-135M-Instruct, student = 8 of its 30 layers. The
teacher samples two responses (τ=1) per training prompt; the student trains --steps Adam steps on
them with each loss, all from the same initial weights. Then, on held-out prompts' teacher
samples: the student's entropy per token against the teacher's, KL(teacher||student) (coverage)
and KL(student||teacher) (mode seeking); and the student's own samples' distinct-2 and Self-BLEU.

    python bench/claim_mode_seeking.py [--train 8] [--eval 8] [--steps 20] [--lr 1e-4]

Verdicts: (S,S) trains like RKL when both end at the same held-out numbers (its logit gradient
is RKL's exactly); (T,S) keeps diversity when its entropy stays nearer the teacher's than
(S,S)'s does and its samples are more diverse (distinct-2).
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

from claim_shift_invariance import claim_arguments, rows_logits, sample, smollm2_setup  # noqa: E402  (same folder)

from csd_ray.evaluation import distinct_n, response_tokens, self_bleu  # noqa: E402
from csd_ray.losses import get_loss  # noqa: E402

LOSSES = {"fkl": ("fkl", {}), "rkl": ("rkl", {}), "csd_ss": ("csd", {"weights": ["student", "student"]}),
          "csd_ts": ("csd", {"weights": ["teacher", "student"]})}


def distribution_stats(t: torch.Tensor, z: torch.Tensor) -> dict[str, float]:
    log_p, log_q = torch.log_softmax(t, -1), torch.log_softmax(z, -1)
    p, q = log_p.exp(), log_q.exp()
    return {"H_student": float(-(q * log_q).sum(-1).mean()), "H_teacher": float(-(p * log_p).sum(-1).mean()),
            "KL_pq": float((p * (log_p - log_q)).sum(-1).mean()), "KL_qp": float((q * (log_q - log_p)).sum(-1).mean())}


def main() -> None:
    args = claim_arguments(__doc__.split("\n\n")[0], steps=20, train_help="training prompts (two teacher samples each, one batch)")
    t0 = time.perf_counter()
    tok, teacher, student0, prompts = smollm2_setup(args.eval)
    vocab = len(tok)

    def generate(model, examples, copies, seed):
        return sample(model, tok, [e.prompt_ids for e in examples for _ in range(copies)], args.new_tokens, seed)

    train = generate(teacher, prompts.train[: args.train], 2, seed=0)
    held = generate(teacher, prompts.eval, 2, seed=1)
    with torch.no_grad():
        t_train = rows_logits(teacher, train)[:, :vocab].float()
        t_held = rows_logits(teacher, held)[:, :vocab].float()
    print(f"setup {time.perf_counter() - t0:.0f} s: {t_train.shape[0]} training rows, {t_held.shape[0]} held-out rows")

    def judge(model) -> dict[str, float]:
        with torch.no_grad():
            stats = distribution_stats(t_held, rows_logits(model, held)[:, :vocab].float())
            samples = generate(model, prompts.eval, 2, seed=2)
        tokens = [[x for x in s if x != tok.eos_token_id] for s in response_tokens(samples)]
        texts = [tok.decode(s, skip_special_tokens=True) for s in tokens]
        return {**stats, "distinct2": distinct_n(tokens), "self_bleu": self_bleu(texts)}

    results = {"(before)": judge(student0.eval())}
    mask = torch.ones(t_train.shape[0], dtype=torch.bool)
    for name, (loss_name, params) in LOSSES.items():
        loss = get_loss(loss_name, vocab_size=vocab, **params)
        student = copy.deepcopy(student0).train()
        opt = torch.optim.Adam(student.parameters(), lr=args.lr)
        for _ in range(args.steps):
            value, _ = loss(rows_logits(student, train), t_train, mask)
            opt.zero_grad()
            value.backward()
            opt.step()
        results[name] = judge(student.eval())
        print(f"{name} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    keys = ["H_student", "KL_pq", "KL_qp", "distinct2", "self_bleu"]
    print(f"\nheld-out (teacher entropy per token {results['(before)']['H_teacher']:.3f}); {args.steps} steps, lr {args.lr}")
    print(f"| loss | {' | '.join(keys)} |\n|{' --- |' * (len(keys) + 1)}")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")

    ss, rkl, ts = results["csd_ss"], results["rkl"], results["csd_ts"]
    h_t = results["(before)"]["H_teacher"]
    same = all(abs(ss[k] - rkl[k]) <= 1e-3 * max(1.0, abs(rkl[k])) for k in ("H_student", "KL_pq", "KL_qp"))
    print("\nverdict")
    print(f"claim 1, CSD (S,S) at τ=1 trains like RKL: {'HELD' if same else 'NOT HELD'} (held-out KL(p||q) "
          f"{ss['KL_pq']:.4f} vs {rkl['KL_pq']:.4f}, entropy {ss['H_student']:.4f} vs {rkl['H_student']:.4f})")
    nearer = abs(ts["H_student"] - h_t) < abs(ss["H_student"] - h_t)
    more_diverse = ts["distinct2"] > ss["distinct2"]
    print(f"claim 2, CSD (T,S) keeps the teacher's diversity where (S,S) collapses: "
          f"{'HELD' if nearer and more_diverse else 'NOT HELD'} (entropy per token: teacher {h_t:.3f}, (T,S) "
          f"{ts['H_student']:.3f}, (S,S) {ss['H_student']:.3f}; sample distinct-2 (T,S) {ts['distinct2']:.3f} vs "
          f"(S,S) {ss['distinct2']:.3f}; Self-BLEU {ts['self_bleu']:.3f} vs {ss['self_bleu']:.3f}; "
          f"coverage KL(p||q) {ts['KL_pq']:.3f} vs {ss['KL_pq']:.3f})")
    print(f"wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
