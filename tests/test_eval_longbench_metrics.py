"""Golden tests for LongBench's metric functions (LongBench/metrics.py), quirks included.

Expected values are worked out by hand in the comments; every case was also run through the
upstream metrics.py (rouge==1.0.1, fuzzywuzzy without python-Levenshtein) with identical results.
"""

from __future__ import annotations

import difflib
import random

import pytest

from pipeline.evaluate import longbench_metrics as m


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("The Eiffel Tower", "eiffel tower", 1.0),  # articles, case
        ("Paris, France.", "Paris", 2 / 3),  # P=1/2 R=1
        ("an apple a day", "the apple", 2 / 3),  # "apple day" vs "apple"
        ("cat cat dog", "cat dog dog", 2 / 3),  # Counter overlap: 1 cat + 1 dog
        ("", "x", 0),
        ("yes", "no", 0),  # no yes/no special case
    ],
)
def test_qa_f1(pred, gold, expected):
    assert m.qa_f1_score(pred, gold) == pytest.approx(expected, abs=1e-12)


def test_f1_returns_int_zero_without_overlap():
    assert m.qa_f1_score("a b", "c") == 0 and isinstance(m.qa_f1_score("a b", "c"), int)


def test_normalize_answer_order():
    # punctuation goes before articles, so "the," loses its comma and is then dropped
    assert m.normalize_answer("The, cat's  A-team") == "cats ateam"


def test_qa_f1_zh():
    # jieba: 北京/是/中国/的/首都/。 ("。" normalises away) vs 首都/是/北京 -> 3 common, P=3/5, R=1
    assert m.qa_f1_zh_score("北京是中国的首都。", "首都是北京") == pytest.approx(0.75)
    # "首都北京" is one jieba word: no overlap at all
    assert m.qa_f1_zh_score("北京是中国的首都。", "首都北京") == 0


def test_rouge_l_is_pltrdy_rouge_summary_level():
    # sentences split on "."; union LCS over unique tokens: {cat,on,the,mat} from sentence 1 and
    # {was} from sentence 2 -> R = 5/5; P = 5/9 unique hypothesis tokens; case-sensitive ("The").
    f = m.rouge_score("The cat sat on the mat. It was happy.", "the cat was on the mat")
    p, r = 5 / 9, 1.0
    assert f == pytest.approx(2 * p * r / (p + r + 1e-8), abs=1e-12)
    assert f == 0.7142857096938776


def test_rouge_quirks_empty_and_very_long():
    assert m.rouge_score("", "the cat") == 0.0  # ValueError("Hypothesis is empty.")
    assert m.rouge_score("...", "the cat") == 0.0  # only dots: empty too
    long = " ".join(f"w{i}" for i in range(1500))
    assert m.rouge_score(long, long) == 0.0  # RecursionError in the LCS reconstruction -> 0
    assert m.rouge_score("the cat the cat", "the cat") == 0.999999995  # unique tokens


def test_rouge_zh():
    # jieba: 会议/讨论/了/预算/问题/。 vs 会议/讨论/预算/。 ; value as upstream computes it
    assert m.rouge_zh_score("会议讨论了预算问题。", "会议讨论预算。") == 0.7999999952000001


def test_classification_skips_element_after_each_removal():
    # all of a, ab, abc are in the prediction; "a" is removed, which skips "ab" (list mutated
    # while iterating), so ["ab", "abc"] remain and the score is 1/2 instead of 1.
    assert m.classification_score("abc", "abc", all_classes=["a", "ab", "abc"]) == 0.5
    classes = ["Description", "Entity", "Human being", "Location", "Numeric value"]
    assert m.classification_score("Location or Human being", "Location", all_classes=classes) == 0.5
    assert m.classification_score("Entity", "Location", all_classes=classes) == 0.0
    assert m.classification_score("Numeric value", "Numeric value", all_classes=classes) == 1.0


@pytest.mark.parametrize(
    "fn, pred, gold, expected",
    [
        (m.retrieval_score, "Paragraph 3", "Paragraph 3", 1.0),
        (m.retrieval_score, "Paragraph 3 and Paragraph 12", "Paragraph 3", 0.5),
        (m.retrieval_score, "Paragraph 30", "Paragraph 3", 0.0),  # whole numbers only
        (m.retrieval_score, "none", "Paragraph 3", 0.0),
        (m.retrieval_zh_score, "段落5", "段落5", 1.0),
        (m.count_score, "There are 12 unique paragraphs out of 30", 12, 0.5),  # int gold
        (m.count_score, "twelve", 12, 0.0),
    ],
)
def test_retrieval_and_count(fn, pred, gold, expected):
    assert fn(pred, gold) == expected


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("\n\n# comment\n    return x\nfoo", "    return x", 1.0),  # comment line skipped
        ("```python\n```", "", 1.0),  # no line qualifies -> "" which equals "" -> 100
        ("```python\n```", "x = 1", 0.0),  # "" vs non-empty -> 0
        ("  \nreturn x", "return x", 0.2),  # whitespace-only line IS chosen: 1 space matches, 2*1/10
        ("abcdefgh", "aZZZZZZZ", 0.12),  # 100*2/16 = 12.5 -> round() -> 12 (banker's rounding)
        ("int a = b // c;\nreturn a;", "return a;", 1.0),  # "//" line skipped
    ],
)
def test_code_sim_line_choice_and_rounding(pred, gold, expected):
    assert m.code_sim_score(pred, gold) == expected


def test_fuzz_ratio_is_fuzzywuzzy_without_levenshtein():
    fuzz = pytest.importorskip("fuzzywuzzy.fuzz")
    if fuzz.SequenceMatcher is not difflib.SequenceMatcher:
        pytest.skip("python-Levenshtein is installed: fuzzywuzzy uses a different matcher")
    rng = random.Random(0)
    for _ in range(500):
        a = "".join(rng.choice("ab cd\n") for _ in range(rng.randint(0, 25)))
        b = "".join(rng.choice("abc dy") for _ in range(rng.randint(0, 25)))
        assert m.fuzz_ratio(a, b) == fuzz.ratio(a, b)


def test_score_example_cuts_first_line_for_few_shot_tasks_only():
    assert m.score_example("triviaqa", "\nEverest\nQuestion: more", ["Everest"], None) == 1.0
    assert m.score_example("narrativeqa", "Everest\nQuestion: more", ["Everest"], None) == pytest.approx(0.5)
    assert m.score_example("narrativeqa", "Paris", ["London", "Paris, France"], None) == pytest.approx(2 / 3)  # max over answers
