"""Held-out metrics on hand-made texts: ROUGE-L from rouge-score, teacher vs student answers (issue 12)."""

import math

import pytest

from csd_ray.evaluation import answer_metrics, closing_table, display_prompt, final_answer, rouge_l


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
