"""Held-out evaluation: judge a student on fidelity, coverage and diversity together.

Fidelity alone is gamed by degenerate output (a collapsed student repeating one token gets a low
teacher NLL), so every evaluation reports:

* ``teacher_nll``: teacher NLL per token of the student's samples (fidelity; lower is better);
* ``student_nll_on_teacher``: student NLL per token of the teacher's greedy responses (coverage);
* ``accuracy``: exact match of the student's greedy answer, where answers exist;
* ``rouge_l``: ROUGE-L F1 of the student's greedy response against the teacher's;
* ``distinct2``: distinct bigrams / all bigrams over the student's samples (diversity);
* ``eos_rate``: share of student samples that end with EOS; ``mean_len``: their mean length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import ray
import torch

from csd_ray.data import EncodedExample, extract_number
from csd_ray.rollout import Rollout

EVAL_KEYS = ("teacher_nll", "student_nll_on_teacher", "accuracy", "rouge_l", "distinct2", "eos_rate", "mean_len")


def response_tokens(rollout: Rollout) -> list[list[int]]:
    return [rollout.input_ids[b, rollout.response_mask[b]].tolist() for b in range(rollout.num_sequences)]


def mean_nll(logprobs: torch.Tensor, rollout: Rollout) -> float:
    return float(-logprobs[rollout.response_mask].mean()) if rollout.num_tokens() else float("nan")


def distinct_n(sequences: list[list[int]], n: int = 2) -> float:
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sample_stats(sample_tokens: list[list[int]], stop_ids) -> dict[str, float]:
    """distinct-2 (stop ids left out), share of samples ending with a stop id (an int or the
    generation contract's set), and mean length of sampled responses."""
    stops = {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
    n = max(1, len(sample_tokens))
    return {
        "distinct2": distinct_n([[t for t in s if t not in stops] for s in sample_tokens]),
        "eos_rate": sum(bool(s) and s[-1] in stops for s in sample_tokens) / n,
        "mean_len": sum(map(len, sample_tokens)) / n,
    }


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on whitespace tokens (longest common subsequence)."""
    a, b = candidate.split(), reference.split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


class Evaluator:
    def __init__(self, examples: list[EncodedExample], sampler, teacher, tokenizer, run_dir: Path,
                 max_new_tokens: int, seed: int, samples_to_write: int = 8, stop_ids=None) -> None:
        self.examples, self.sampler, self.teacher, self.tokenizer = examples, sampler, teacher, tokenizer
        self.run_dir, self.max_new_tokens, self.seed = run_dir, max_new_tokens, seed
        self.samples_to_write = samples_to_write
        self.stop_ids = tuple(stop_ids) if stop_ids else (tokenizer.eos_token_id,)
        self.prompts = [e.prompt_ids for e in examples]
        self.indices = [e.index for e in examples]
        self._teacher_greedy: Optional[Rollout] = None

    def teacher_greedy(self) -> Rollout:
        if self._teacher_greedy is None:  # the teacher does not change: once per run
            self._teacher_greedy = ray.get(
                self.teacher.generate.remote(self.prompts, self.indices, self.max_new_tokens, self.seed, True)
            )
        return self._teacher_greedy

    def run(self, step: int) -> dict[str, float]:
        teacher_greedy = self.teacher_greedy()
        sample_ref = self.sampler.generate.remote(self.prompts, self.indices, self.max_new_tokens, self.seed + 1)
        greedy_ref = self.sampler.generate.remote(self.prompts, self.indices, self.max_new_tokens, self.seed, True)
        coverage_ref = self.sampler.token_logprobs.remote(teacher_greedy)
        fidelity_ref = self.teacher.token_logprobs.remote(sample_ref)
        samples, greedy = ray.get([sample_ref, greedy_ref])
        fidelity, coverage = ray.get([fidelity_ref, coverage_ref])

        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        sample_tokens = response_tokens(samples)
        greedy_text = [decode(t) for t in response_tokens(greedy)]
        teacher_text = [decode(t) for t in response_tokens(teacher_greedy)]
        answers = [(e.answer, extract_number(text)) for e, text in zip(self.examples, greedy_text) if e.answer is not None]
        metrics = {
            "teacher_nll": mean_nll(fidelity, samples),
            "student_nll_on_teacher": mean_nll(coverage, teacher_greedy),
            "accuracy": sum(a == b for a, b in answers) / len(answers) if answers else float("nan"),
            "rouge_l": sum(rouge_l(g, t) for g, t in zip(greedy_text, teacher_text)) / max(1, len(greedy_text)),
            **sample_stats(sample_tokens, self.stop_ids),
        }
        self._write_samples(step, [decode(t) for t in sample_tokens], greedy_text, teacher_text)
        return metrics

    def _write_samples(self, step: int, sampled: list[str], greedy: list[str], teacher: list[str]) -> None:
        folder = self.run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"step_{step:06d}.jsonl", "w") as f:
            for e, s, g, t in list(zip(self.examples, sampled, greedy, teacher))[: self.samples_to_write]:
                record = {"prompt": e.prompt_text, "answer": e.answer, "student_sample": s, "student_greedy": g,
                          "teacher_greedy": t}
                f.write(json.dumps(record) + "\n")


def format_eval(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {metrics[k]:.3f}" for k in EVAL_KEYS if k in metrics)
