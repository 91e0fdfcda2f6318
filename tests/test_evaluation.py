"""Held-out metrics on hand-made texts: ROUGE-L from rouge-score, teacher vs student answers (issue 12)."""

import math

import pytest

from csd_ray.evaluation import answer_metrics, closing_table, display_prompt, final_answer, rouge_l
import random

import torch
from rouge_score import rouge_scorer

from csd_ray.data import extract_number
from csd_ray.evaluation import distinct_n, mean_nll, response_tokens, sample_stats
from csd_ray.rollout import rollout_from_tokens


def test_rouge_l_ignores_case_and_punctuation_like_rouge_score():
    # The hand-rolled whitespace version scored these 0: "42." and "42" are different tokens there.
    assert rouge_l("42.", "42") == 1.0
    assert rouge_l("The answer is 42.", "the answer is 42") == 1.0


def test_rouge_l_matches_the_library_value_on_a_known_pair():
    # Stemmed tokens: candidate [the, cat, are, run, fast], reference [the, cat, ran, quickli].
    # LCS = 2 ("the cat"): precision 2/5, recall 2/4, F1 = 2·0.4·0.5 / 0.9 = 4/9.
    assert rouge_l("The cats are running fast", "the cat ran quickly") == pytest.approx(4 / 9)
    # Stemming is what makes "cats"/"cat" match: without it the LCS would be 1 ("the").
    assert rouge_l("cats", "cat") == 1.0
    assert rouge_l("", "the cat") == 0.0


def test_final_answer_is_the_last_number_else_the_text():
    assert final_answer("3 + 4 = 7.") == "7"
    assert final_answer("  To   add  ") == "To add"
    assert final_answer("   ") is None


def test_answer_metrics_on_hand_made_responses():
    references = ["5", "6", "7", None]
    teacher = ["2 + 3 = 5.", "The answer is 6", "3 + 4 = 8", "hello"]
    student = ["5", "To add 22.", "8", "hello"]
    m = answer_metrics(references, student, teacher)
    assert m["accuracy"] == pytest.approx(1 / 3)          # only prompt 0 of the 3 with a reference
    assert m["teacher_accuracy"] == pytest.approx(2 / 3)  # prompts 0 and 1
    # Same final answer as the teacher on prompts 0 ("5"), 2 ("8", both wrong) and 3 (text "hello").
    assert m["teacher_agreement"] == pytest.approx(3 / 4)
    assert m["distinct_answers"] == 4 and m["distinct_answer_share"] == 1.0
    assert m["teacher_distinct_answer_share"] == 1.0


def test_a_collapsed_student_shows_one_distinct_answer():
    m = answer_metrics(["1", "2", "3"], ["To add 22."] * 3, ["1", "2", "3"])
    assert m["distinct_answers"] == 1 and m["distinct_answer_share"] == pytest.approx(1 / 3)
    assert m["accuracy"] == 0 and m["teacher_accuracy"] == 1 and m["teacher_agreement"] == 0


def test_empty_responses_never_agree_and_no_references_give_nan():
    m = answer_metrics([None, None], ["", ""], ["", ""])
    assert m["teacher_agreement"] == 0 and m["distinct_answers"] == 0
    assert math.isnan(m["accuracy"]) and math.isnan(m["teacher_accuracy"])
    with pytest.raises(ValueError, match="2 references, 1 student"):
        answer_metrics([None, None], [""], ["", ""])


def test_closing_table_puts_teacher_beside_student_with_the_gap_and_answers():
    before = {"teacher_nll": 12.0, "accuracy": 0.0, "distinct_answer_share": 0.1, "teacher_accuracy": 0.5}
    after = {"teacher_nll": 7.5, "accuracy": 0.25, "teacher_accuracy": 0.5, "teacher_agreement": 0.375,
             "distinct_answer_share": 0.75, "teacher_distinct_answer_share": 1.0}
    text = closing_table(before, after, [("What is 2 + 3?", "2 + 3 = 5.", "5")])
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "before", "after", "teacher"]
    assert "accuracy 0.000 0.250 0.500".split() == next(line for line in lines if line.startswith("accuracy")).split()
    assert "distinct_answer_share 0.100 0.750 1.000".split() == next(
        line for line in lines if line.startswith("distinct_answer_share")).split()
    assert next(line for line in lines if line.startswith("teacher_nll")).split() == ["teacher_nll", "12.000", "7.500", "-"]
    assert "50% of the teacher's" in text and "agreement with the teacher 0.375" in text
    assert [c.strip() for c in lines[-1].split("|")] == ["What is 2 + 3?", "2 + 3 = 5.", "5"]


def test_display_prompt_strips_the_chat_template():
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "What is 2 + 3? Answer with the number.<|im_end|>\n<|im_start|>assistant\n")
    assert display_prompt(text) == "What is 2 + 3? Answer with the number."


def test_self_bleu_is_one_for_identical_texts_and_zero_for_disjoint_ones():
    from csd_ray.evaluation import self_bleu

    assert self_bleu(["To add 22."] * 4) == pytest.approx(1.0)
    assert self_bleu(["a b c d", "e f g h", "i j k l"]) == 0.0
    assert math.isnan(self_bleu(["only one"]))


def test_self_bleu_is_the_mean_of_sacrebleu_sentence_scores_against_the_others():
    import sacrebleu

    from csd_ray.evaluation import self_bleu

    texts = ["the cat sat on the mat", "the cat sat on a mat", "a dog ran in the park"]
    expected = sum(sacrebleu.sentence_bleu(texts[i], [t for j, t in enumerate(texts) if j != i]).score
                   for i in range(3)) / 300
    assert self_bleu(texts) == pytest.approx(expected)
    assert 0.2 < self_bleu(texts) < 0.6  # partly shared, not identical


def test_split_seed_fixes_the_held_out_prompts_whatever_the_run_seed():
    from csd_ray.config import DataConfig, ModelConfig
    from csd_ray.data import load_prompts
    from csd_ray.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(path="tiny"))
    held_out = lambda cfg, seed: [e.index for e in load_prompts(cfg, tokenizer, seed=seed).eval]  # noqa: E731
    free = DataConfig(num_examples=60, eval_size=8)
    assert held_out(free, 0) != held_out(free, 1)  # by default the run seed moves the split
    fixed = DataConfig(num_examples=60, eval_size=8, split_seed=0)
    assert held_out(fixed, 0) == held_out(fixed, 1) == held_out(fixed, 7) == held_out(free, 0)


def test_rouge_l_matches_the_rouge_score_package():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
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


def test_sample_stats_leave_stop_ids_out_of_distinct2_and_count_stop_endings():
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
    assert sample_stats([[4, 5, 0]], 0) == {"distinct2": 1.0, "eos_rate": 1.0, "mean_len": 3.0}
    assert sample_stats([], 0) == {"distinct2": 0.0, "eos_rate": 0.0, "mean_len": 0.0}


def test_sample_stats_count_every_stop_id_of_the_generation_contract():
    samples = [[5, 6, 0], [5, 6, 9], [7, 8]]  # 0: tokenizer eos, 9: an end-of-turn id from the generation config
    stats = sample_stats(samples, (0, 9))
    assert stats["eos_rate"] == pytest.approx(2 / 3) and stats["distinct2"] == pytest.approx(2 / 3)


def test_evaluator_writes_the_first_samples_of_a_step_and_formats_its_metrics(tmp_path):
    """The samples file of an evaluation (without actors: only the writing and formatting)."""
    import json
    from types import SimpleNamespace

    from csd_ray.data import EncodedExample
    from csd_ray.evaluation import Evaluator, format_eval

    examples = [EncodedExample(i, [1, 2, i + 3], None, str(i), f"prompt {i}") for i in range(3)]
    tokenizer = SimpleNamespace(eos_token_id=7)  # only its end-of-sequence id is read here
    evaluator = Evaluator(examples, None, None, tokenizer, tmp_path, max_new_tokens=8, seed=1, samples_to_write=2)
    assert evaluator.prompts == [[1, 2, 3], [1, 2, 4], [1, 2, 5]] and evaluator.indices == [0, 1, 2]
    assert evaluator.stop_ids == (7,) and evaluator.last_side_by_side == []
    assert Evaluator(examples, None, None, tokenizer, tmp_path, 8, 1, stop_ids=[4, 5]).stop_ids == (4, 5)
    evaluator._write_samples(12, ["s0", "s1", "s2"], ["g0", "g1", "g2"], ["t0", "t1", "t2"])
    lines = (tmp_path / "samples" / "step_000012.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"prompt": f"prompt {i}", "answer": str(i), "student_sample": f"s{i}", "student_greedy": f"g{i}",
         "teacher_greedy": f"t{i}"} for i in range(2)]
    assert format_eval({"rouge_l": 0.25, "teacher_nll": 1.23456, "unknown": 9.0}) == "teacher_nll 1.235  rouge_l 0.250"


def test_evaluator_scores_an_evaluation_from_the_rollouts_the_actors_returned(tmp_path):
    """Every metric of `Evaluator.score`, recomputed here from the texts and log-probs by the libraries
    (rouge-score, sacrebleu) and by hand; the samples file and the side-by-side answers."""
    import json

    import sacrebleu

    from csd_ray.config import ModelConfig
    from csd_ray.data import EncodedExample
    from csd_ray.evaluation import Evaluator
    from csd_ray.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(path="tiny"))
    eos = tok.eos_token_id
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    examples = [EncodedExample(i, enc(f"What is {i} + {i}?"), None, str(2 * i), f"What is {i} + {i}?") for i in (1, 2, 3)]
    teacher_text = ["The answer is 2.", "The answer is 4.", "The answer is 6."]
    greedy_text = ["The answer is 2.", "It is 5.", "The answer is 6 apples."]
    sample_text = ["two plus two", "It is 5 maybe", "the answer"]
    prompts = [e.prompt_ids for e in examples]
    # Samples: the first and third end with EOS (counted as length, left out of distinct-2).
    sample_ids = [enc(sample_text[0]) + [eos], enc(sample_text[1]), enc(sample_text[2]) + [eos]]
    samples = rollout_from_tokens(prompts, sample_ids, 0)
    greedy = rollout_from_tokens(prompts, [enc(t) + [eos] for t in greedy_text], 0)
    teacher = rollout_from_tokens(prompts, [enc(t) + [eos] for t in teacher_text], 0)
    gen = torch.Generator().manual_seed(0)
    fidelity = -torch.rand(samples.input_ids.shape, generator=gen) * 4
    coverage = -torch.rand(teacher.input_ids.shape, generator=gen) * 4

    evaluator = Evaluator(examples, None, None, tok, tmp_path, max_new_tokens=16, seed=1, samples_to_write=2)
    got = evaluator.score(3, samples, greedy, teacher, fidelity, coverage)

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    bigrams = [tuple(s[i:i + 2]) for s in ([t for t in ids if t != eos] for ids in sample_ids) for i in range(len(s) - 1)]
    bleu = [sacrebleu.sentence_bleu(t, [r for j, r in enumerate(sample_text) if j != i]).score / 100
            for i, t in enumerate(sample_text)]
    assert got == pytest.approx({
        "teacher_nll": float(-fidelity[samples.response_mask].mean()),
        "student_nll_on_teacher": float(-coverage[teacher.response_mask].mean()),
        "accuracy": 2 / 3, "teacher_accuracy": 1.0, "teacher_agreement": 2 / 3,
        "distinct_answers": 3.0, "distinct_answer_share": 1.0, "teacher_distinct_answer_share": 1.0,
        "rouge_l": sum(scorer.score(t, g)["rougeL"].fmeasure for g, t in zip(greedy_text, teacher_text)) / 3,
        "distinct2": len(set(bigrams)) / len(bigrams), "eos_rate": 2 / 3,
        "mean_len": sum(map(len, sample_ids)) / 3, "self_bleu": sum(bleu) / 3,
    })
    assert evaluator.last_side_by_side == [(e.prompt_text, t, g) for e, t, g in zip(examples, teacher_text, greedy_text)]
    written = [json.loads(line) for line in (tmp_path / "samples" / "step_000003.jsonl").read_text().splitlines()]
    assert written == [{"prompt": e.prompt_text, "answer": e.answer, "student_sample": s, "student_greedy": g,
                        "teacher_greedy": t} for e, s, g, t in list(zip(examples, sample_text, greedy_text, teacher_text))[:2]]
    # One prompt: means over one.
    alone = Evaluator(examples[2:], None, None, tok, tmp_path, max_new_tokens=16, seed=1)
    part = lambda ids: rollout_from_tokens(prompts[2:], ids, 0)  # noqa: E731
    one_samples, one_teacher = part(sample_ids[2:]), part([enc(teacher_text[2]) + [eos]])
    one = alone.score(4, one_samples, part([enc(greedy_text[2]) + [eos]]), one_teacher,
                      torch.full(one_samples.input_ids.shape, -1.0), torch.full(one_teacher.input_ids.shape, -2.0))
    assert (one["teacher_nll"], one["student_nll_on_teacher"]) == (1.0, 2.0)
    assert one["rouge_l"] == pytest.approx(scorer.score(teacher_text[2], greedy_text[2])["rougeL"].fmeasure)
    assert (one["accuracy"], one["teacher_agreement"], one["eos_rate"]) == (1.0, 1.0, 1.0)


def test_closing_table_text_exactly_with_a_teacher_that_scores_zero():
    before = {"teacher_nll": 12.0}
    after = {"teacher_nll": 7.5, "accuracy": 0.0, "teacher_accuracy": 0.0, "distinct_answer_share": 0.5,
             "teacher_distinct_answer_share": 1.0}
    text = closing_table(before, after, [("What is  2 + 3?", "2 + 3\n= 5.", "five")], width=8)
    assert text.splitlines() == [
        f"{'metric':30s}{'before':>10s}{'after':>10s}{'teacher':>10s}",
        f"{'teacher_nll':30s}{12.0:10.3f}{7.5:10.3f}{'-':>10s}",
        f"{'accuracy':30s}{'nan':>10s}{0.0:10.3f}{0.0:10.3f}",  # absent before: NaN, not a crash
        f"{'distinct_answer_share':30s}{'nan':>10s}{0.5:10.3f}{1.0:10.3f}",
        "student accuracy 0.000 vs teacher 0.000 (teacher scores 0); agreement with the teacher nan",
        "",
        "prompt   | teacher  | student",
        "What is  | 2 + 3 =  | five",  # whitespace runs collapsed, then cut to the width
    ]
    assert closing_table({}, {"teacher_nll": 1.0}).splitlines()[1:] == [f"{'teacher_nll':30s}{'nan':>10s}{1.0:10.3f}{'-':>10s}"]
    # Accuracy without the teacher's (data without answers for it): no accuracy line, no crash.
    assert closing_table({}, {"accuracy": 0.5}).splitlines()[1:] == [f"{'accuracy':30s}{'nan':>10s}{0.5:10.3f}{'-':>10s}"]


def test_metrics_of_one_prompt_two_samples_and_no_tokens():
    one = answer_metrics(["4"], ["It is 4."], ["4"])
    assert (one["accuracy"], one["teacher_agreement"], one["distinct_answer_share"]) == (1.0, 1.0, 1.0)
    assert rouge_l("4", "4") == 1.0
    from csd_ray.evaluation import self_bleu

    assert self_bleu(["the cat sat on the mat", "the cat sat on the mat"]) == pytest.approx(1.0)
    assert math.isnan(self_bleu(["only one"]))
    empty = rollout_from_tokens([[1, 2]], [[]], 0)
    assert math.isnan(mean_nll(torch.zeros(empty.input_ids.shape), empty))
    assert display_prompt("  <|im_start|>user<|im_end|>  ") == "<|im_start|>user<|im_end|>"  # nothing else: as is


def test_the_evaluator_writes_eight_samples_by_default(tmp_path):
    import json

    from csd_ray.data import EncodedExample
    from csd_ray.evaluation import Evaluator

    examples = [EncodedExample(i, [1], None, None, f"p{i}") for i in range(10)]
    evaluator = Evaluator(examples, None, None, type("T", (), {"eos_token_id": 0})(), tmp_path / "run", 4, 1)
    evaluator._write_samples(1, ["s"] * 10, ["g"] * 10, ["t"] * 10)  # the run folder is made as needed
    assert len((tmp_path / "run" / "samples" / "step_000001.jsonl").read_text().splitlines()) == 8
    assert [json.loads(line)["prompt"] for line in (tmp_path / "run" / "samples" / "step_000001.jsonl").open()][-1] == "p7"
