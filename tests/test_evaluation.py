"""The metrics behind the README's results tables, each against an independent computation."""

import random

import pytest
import torch
from rouge_score import rouge_scorer

from csd_ray.data import extract_number
from csd_ray.evaluation import distinct_n, mean_nll, response_tokens, rouge_l, sample_stats
from csd_ray.rollout import rollout_from_tokens


def test_rouge_l_matches_the_rouge_score_package():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rng = random.Random(0)
    words = ["a", "b", "c", "d", "seven", "plus", "is", "12"]
    pairs = [("the answer is 12", "so the answer is 12 ok"), ("x y z", "p q r"), ("a a b", "a b a b")]
    pairs += [(" ".join(rng.choices(words, k=rng.randint(1, 9))), " ".join(rng.choices(words, k=rng.randint(1, 9))))
              for _ in range(40)]
    for candidate, reference in pairs:
        expected = scorer.score(reference, candidate)["rougeL"].fmeasure
        assert rouge_l(candidate, reference) == pytest.approx(expected, abs=1e-12), (candidate, reference)
    assert rouge_l("", "a b") == 0.0 and rouge_l("a b", "") == 0.0


def test_distinct_n_counts_unique_ngrams_over_all_sequences():
    assert distinct_n([[1, 2, 1, 2], [1, 2]]) == pytest.approx(2 / 4)  # bigrams 12 21 12 | 12
    assert distinct_n([[1, 2, 3], [4, 5, 6]]) == 1.0
    assert distinct_n([[7, 7, 7, 7, 7]]) == pytest.approx(1 / 4)
    assert distinct_n([[1], []]) == 0.0
    assert distinct_n([[1, 2, 3, 1, 2, 3]], n=3) == pytest.approx(3 / 4)


def test_sample_stats_leave_eos_out_of_distinct2_and_count_eos_endings():
    eos = 0
    samples = [[5, 6, 0], [5, 6, 7, 8], [9, 0], []]
    stats = sample_stats(samples, eos)
    # distinct-2 over EOS-free sequences [5,6] [5,6,7,8] [9] []: bigrams 56 | 56 67 78 -> 3 distinct of 4.
    assert stats["distinct2"] == pytest.approx(3 / 4)
    assert stats["eos_rate"] == pytest.approx(2 / 4)
    assert stats["mean_len"] == pytest.approx(9 / 4)


def test_mean_nll_averages_over_response_tokens_only():
    rollout = rollout_from_tokens([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    logprobs = torch.full(rollout.input_ids.shape, -100.0)  # prompt and padding: must not count
    logprobs[rollout.response_mask] = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])
    assert mean_nll(logprobs, rollout) == pytest.approx(3.0)
    assert response_tokens(rollout) == [[5, 6], [7, 8, 9]]


@pytest.mark.parametrize("text, number", [
    ("The answer is 42.", "42"), ("3 + 4 = 7", "7"), ("we get 1,234 apples", "1234"), ("#### -5", "-5"),
    ("12 then 13 #### 14", "14"), ("no digits here", None),
])
def test_accuracy_reads_the_last_number_of_an_answer(text, number):
    assert extract_number(text) == number


def test_edge_cases_of_the_metrics():
    empty = rollout_from_tokens([[1]], [[]], pad_id=0)
    assert mean_nll(torch.zeros(empty.input_ids.shape), empty) != mean_nll(torch.zeros(empty.input_ids.shape), empty)
    assert sample_stats([[4, 5, 0]], eos=0) == {"distinct2": 1.0, "eos_rate": 1.0, "mean_len": 3.0}
    assert sample_stats([], eos=0) == {"distinct2": 0.0, "eos_rate": 0.0, "mean_len": 0.0}
