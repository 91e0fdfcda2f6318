"""Held-out evaluation: judge a student on fidelity, coverage and diversity together.

Fidelity alone is gamed by degenerate output (a collapsed student repeating one token gets a low
teacher NLL), so every evaluation reports:

* ``teacher_nll``: teacher NLL per token of the student's samples (fidelity; lower is better);
* ``student_nll_on_teacher``: student NLL per token of the teacher's greedy responses (coverage);
* ``accuracy``: exact match of the student's greedy answer, where answers exist;
  ``teacher_accuracy``: the same for the teacher's greedy answer, on the same prompts, so a low
  student accuracy can be read against what the teacher itself manages;
* ``teacher_agreement``: share of prompts where the student's final answer (last number, else
  the whole stripped response) equals the teacher's;
* ``distinct_answers`` / ``distinct_answer_share``: how many different final answers the
  student's greedy responses give (count, and count / prompts); a collapsed student answers
  the same thing everywhere. ``teacher_distinct_answer_share`` is the teacher's, for scale;
* ``rouge_l``: ROUGE-L F1 of the student's greedy response against the teacher's, from
  ``rouge-score`` with its stemmer (the implementation MiniLLM, DistiLLM and the CSD paper use);
* ``distinct2``: distinct bigrams / all bigrams over the student's samples (diversity);
* ``self_bleu``: mean BLEU (``sacrebleu``, in [0, 1]) of each student sample against all the other
  samples of the held-out set; high when the student says the same thing to every prompt;
* ``eos_rate``: share of student samples that end with EOS; ``mean_len``: their mean length.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import ray
import torch

from csd_ray.data import EncodedExample, extract_number
from csd_ray.rollout import Rollout

EVAL_KEYS = ("teacher_nll", "student_nll_on_teacher", "accuracy", "teacher_accuracy", "teacher_agreement",
             "distinct_answers", "distinct_answer_share", "teacher_distinct_answer_share", "rouge_l", "distinct2",
             "self_bleu", "eos_rate", "mean_len")
#: Keys with a teacher-side counterpart: (student key, teacher key) for the closing table.
TEACHER_PAIRS = {"accuracy": "teacher_accuracy", "distinct_answer_share": "teacher_distinct_answer_share"}


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


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1] from ``rouge-score`` (lower-cased, punctuation dropped, Porter-stemmed)."""
    return float(_rouge_scorer().score(reference, candidate)["rougeL"].fmeasure)


def self_bleu(texts: Sequence[str]) -> float:
    """Mean sentence BLEU in [0, 1] of each text against all the others (Zhu et al. 2018's Self-BLEU).

    sacrebleu's sentence BLEU (13a tokenisation, exponential smoothing); empty texts score 0 and
    still serve as (empty) references. NaN for fewer than two texts."""
    import sacrebleu

    if len(texts) < 2:
        return float("nan")
    scores = [sacrebleu.sentence_bleu(t, [r for j, r in enumerate(texts) if j != i]).score for i, t in enumerate(texts)]
    return sum(scores) / len(scores) / 100.0


def final_answer(text: str) -> Optional[str]:
    """What a response answers: its last number (GSM8K convention), else the stripped text; None if empty."""
    number = extract_number(text)
    if number is not None:
        return number
    text = " ".join(text.split())
    return text or None


def answer_metrics(references: Sequence[Optional[str]], student: Sequence[str], teacher: Sequence[str]) -> dict[str, float]:
    """Accuracy of student and teacher, their agreement, and answer diversity, on the same prompts.

    ``references[i]`` is prompt i's exact answer (None where the data has none); ``student[i]`` and
    ``teacher[i]`` are the greedy response texts. Accuracies are over prompts with a reference
    (NaN when none has one); agreement and distinct answers over all prompts. An empty response
    has no answer: it never agrees and is not counted as a distinct answer.
    """
    if not (len(references) == len(student) == len(teacher)):
        raise ValueError(f"answer_metrics: {len(references)} references, {len(student)} student and "
                         f"{len(teacher)} teacher responses; expected equal counts")
    n = max(1, len(student))
    s_ans, t_ans = [final_answer(x) for x in student], [final_answer(x) for x in teacher]
    scored = [i for i, r in enumerate(references) if r is not None]

    def accuracy(texts: Sequence[str]) -> float:
        # Numbers only: a reference is a number, so a text-only answer never matches it.
        return sum(extract_number(texts[i]) == references[i] for i in scored) / len(scored) if scored else float("nan")

    s_distinct = len({a for a in s_ans if a is not None})
    return {
        "accuracy": accuracy(student),
        "teacher_accuracy": accuracy(teacher),
        "teacher_agreement": sum(a is not None and a == b for a, b in zip(s_ans, t_ans)) / n,
        "distinct_answers": float(s_distinct),
        "distinct_answer_share": s_distinct / n,
        "teacher_distinct_answer_share": len({a for a in t_ans if a is not None}) / n,
    }


_MARKER_RE = re.compile(r"<\|[^|]*\|>|<[a-z_]*>|</[a-z_]*>")
_ROLES = {"system", "user", "assistant"}


def display_prompt(text: str) -> str:
    """The last line of the user's words in a chat-templated prompt (display only: templates vary)."""
    lines = [line.strip() for line in _MARKER_RE.sub("\n", text).splitlines()]
    lines = [line for line in lines if line and line not in _ROLES]
    return lines[-1] if lines else text.strip()


def closing_table(before: dict, after: dict, side_by_side: Sequence[tuple[str, str, str]] = (), width: int = 38) -> str:
    """The run's closing summary: student before/after beside the teacher, the gap, and a few answers.

    ``before``/``after`` are evaluation metric dicts; ``side_by_side`` holds (prompt, teacher,
    student) texts, each cut to ``width`` characters.
    """
    lines = [f"{'metric':30s}{'before':>10s}{'after':>10s}{'teacher':>10s}"]
    for key in EVAL_KEYS:
        if key not in after or key in TEACHER_PAIRS.values():
            continue
        teacher = after.get(TEACHER_PAIRS.get(key, ""), None)
        teacher_text = f"{teacher:10.3f}" if teacher is not None else f"{'-':>10s}"
        lines.append(f"{key:30s}{before.get(key, float('nan')):10.3f}{after[key]:10.3f}{teacher_text}")
    acc, t_acc = after.get("accuracy"), after.get("teacher_accuracy")
    if acc is not None and t_acc is not None and t_acc == t_acc and acc == acc:
        ratio = f"{acc / t_acc:.0%} of the teacher's" if t_acc > 0 else "teacher scores 0"
        lines.append(f"student accuracy {acc:.3f} vs teacher {t_acc:.3f} ({ratio}); "
                     f"agreement with the teacher {after.get('teacher_agreement', float('nan')):.3f}")
    if side_by_side:
        cut = lambda x: " ".join(x.split())[:width]  # noqa: E731
        lines.append("")
        lines.append(f"{'prompt':{width}s} | {'teacher':{width}s} | student")
        lines += [f"{cut(p):{width}s} | {cut(t):{width}s} | {cut(s)}" for p, t, s in side_by_side]
    return "\n".join(lines)


class Evaluator:
    def __init__(self, examples: list[EncodedExample], sampler, teacher, tokenizer, run_dir: Path,
                 max_new_tokens: int, seed: int, samples_to_write: int = 8, stop_ids=None, overlap: bool = True) -> None:
        self.examples, self.sampler, self.teacher, self.tokenizer = examples, sampler, teacher, tokenizer
        self.overlap = overlap
        """Score the student's samples on the teacher while the sampler makes its greedy answers (False:
        one after the other, for roles that share a few CPU cores; ``run.overlap_offpolicy``)."""
        self.run_dir, self.max_new_tokens, self.seed = run_dir, max_new_tokens, seed
        self.samples_to_write = samples_to_write
        self.stop_ids = tuple(stop_ids) if stop_ids else (tokenizer.eos_token_id,)
        self.prompts = [e.prompt_ids for e in examples]
        self.indices = [e.index for e in examples]
        self._teacher_greedy: Optional[Rollout] = None
        self.last_side_by_side: list[tuple[str, str, str]] = []
        """(prompt, teacher greedy, student greedy) texts of the latest evaluation."""

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
        if not self.overlap:  # 2 cores, 2 threads per role: overlapped, 64 prompts took 50 s, serial 41 s
            ray.wait([sample_ref, greedy_ref, coverage_ref], num_returns=3, fetch_local=False)
        fidelity_ref = self.teacher.token_logprobs.remote(sample_ref)
        samples, greedy = ray.get([sample_ref, greedy_ref])
        fidelity, coverage = ray.get([fidelity_ref, coverage_ref])
        return self.score(step, samples, greedy, teacher_greedy, fidelity, coverage)

    def score(self, step: int, samples: Rollout, greedy: Rollout, teacher_greedy: Rollout,
              fidelity: torch.Tensor, coverage: torch.Tensor) -> dict[str, float]:
        """The held-out metrics (module docstring) of one evaluation, from what the actors returned:
        the student's sampled and greedy rollouts and the teacher's greedy one on ``self.examples``;
        ``fidelity`` the teacher's log-probs of ``samples``, ``coverage`` the student's of
        ``teacher_greedy`` (each [batch, sequence], nats). Writes the step's samples file and keeps
        ``last_side_by_side``."""
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        sample_tokens = response_tokens(samples)
        sample_text = [decode(t) for t in sample_tokens]
        greedy_text = [decode(t) for t in response_tokens(greedy)]
        teacher_text = [decode(t) for t in response_tokens(teacher_greedy)]
        metrics = {
            "teacher_nll": mean_nll(fidelity, samples),
            "student_nll_on_teacher": mean_nll(coverage, teacher_greedy),
            **answer_metrics([e.answer for e in self.examples], greedy_text, teacher_text),
            "rouge_l": sum(rouge_l(g, t) for g, t in zip(greedy_text, teacher_text)) / max(1, len(greedy_text)),
            **sample_stats(sample_tokens, self.stop_ids),
            "self_bleu": self_bleu(sample_text),
        }
        self.last_side_by_side = [(display_prompt(e.prompt_text), t, g)
                                  for e, t, g in zip(self.examples, teacher_text, greedy_text)]
        self._write_samples(step, sample_text, greedy_text, teacher_text)
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
