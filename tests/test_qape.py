"""qaclims.qape: questions, lemmatisation and the text rules, against the reference vectors
(tests/reference/qape_text.json, README section 7) and as properties."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qaclims.classes import COCO_CLASSES, VOC_CLASSES, class_aliases
from qaclims.qape import (BG_GROUPS, BG_QUESTIONS, FG_GROUPS, FG_QUESTIONS, QUESTION_GROUPS, TEXT_TEMPLATE,
                          bg_texts, fg_texts, lemmatize, pair_prompts, prompts, questions_for, select_answers,
                          to_prompt, unique_texts)
from refdata import load_reference

REF = load_reference("qape_text.json")


def _records(case, expected_key):
    "(image, label, record, expected) for every pair that a case lists under `expected_key`."
    for image, labels in case[expected_key].items():
        for label, expected in labels.items():
            yield image, label, case["vqa_file"][image][label], expected


# ---- constants --------------------------------------------------------------------------------

def test_questions_and_template_match_reference():
    assert list(FG_QUESTIONS) == REF["QUESTIONS_fg"]
    assert list(BG_QUESTIONS) == REF["QUESTIONS_bg"]
    assert TEXT_TEMPLATE == REF["TEXT_PROMPT"]


def test_question_groups_partition_the_questions():
    assert [q for g in FG_GROUPS for q in QUESTION_GROUPS[g]] == list(FG_QUESTIONS)
    assert [q for g in BG_GROUPS for q in QUESTION_GROUPS[g]] == list(BG_QUESTIONS)
    assert [len(QUESTION_GROUPS[g]) for g in ("fine_grained", "aliases", "surroundings", "scene")] == [2, 4, 7, 3]


def test_questions_for():
    qs = questions_for("dining table")
    assert qs == [q.format("dining table") for q in FG_QUESTIONS + BG_QUESTIONS]
    assert questions_for("cow", ("aliases",)) == [q.format("cow") for q in FG_QUESTIONS[2:]]
    assert questions_for("cow", ("scene", "aliases")) == questions_for("cow", ("aliases", "scene"))
    with pytest.raises(ValueError, match="unknown question groups"):
        questions_for("cow", ("background",))
    with pytest.raises(TypeError):
        questions_for("cow", "scene")
    with pytest.raises(ValueError):
        questions_for("", ("scene",))


# ---- reference vectors ------------------------------------------------------------------------

@pytest.mark.parametrize("case", REF["fg_qa_prompt_cases"], ids=lambda c: c["label"])
def test_fg_qa_prompt_cases(case):
    assert fg_texts(case["answers"], case["label"]) == case["expected"]


@pytest.mark.parametrize("case", REF["fg_preprocess_cases"])
def test_fg_preprocess_cases(case):
    pairs = list(_records(case, "expected_answers_in_selected_question_order"))
    assert pairs
    for image, label, record, expected in pairs:
        asked = [q for q, _ in record["vqa"]]
        texts = fg_texts(select_answers(asked, record["answers"], case["selected_questions"]), label)
        assert texts == expected, (image, label)
        assert unique_texts(texts) == case["expected_cache_keys_in_insertion_order"][image][label], (image, label)


@pytest.mark.parametrize("case", REF["bg_process_vqa_cases"])
def test_bg_process_vqa_cases(case):
    pairs = list(_records(case, "expected_sorted"))
    assert pairs
    for image, label, record, expected in pairs:
        asked = [q for q, _ in record["vqa"]]
        texts = bg_texts(select_answers(asked, record["answers"], case["selected_questions"]), label)
        assert sorted(texts) == expected, (image, label)
        assert len(texts) == len(set(texts))
        assert (len(texts) == 0) == case["expected_answer_feats_is_None"][image][label], (image, label)
        assert sorted(prompts(texts)) == case["expected_prompts_sorted"][image][label], (image, label)


# ---- lemmatisation ----------------------------------------------------------------------------

@pytest.mark.parametrize("word,lemma", [
    ("boats", "boat"), ("buses", "bus"), ("geese", "goose"), ("glasses", "glass"), ("grass", "grass"),
    ("trees", "tree"), ("people", "people"), ("clouds", "cloud"), ("rails", "rail"), ("leaves", "leaf"),
    ("shelves", "shelf"), ("knives", "knife"), ("children", "child"), ("mice", "mouse")])
def test_lemmatize_plurals(word, lemma):
    assert lemmatize(word) == lemma


@pytest.mark.parametrize("word", ["ground", "building", "flying", "standing", "parking", "tv", "bus", "news",
                                  "species", "outdoors", "grass", "us", "1950s", "red", "", "Boats",
                                  "train tracks", "living room"])
def test_lemmatize_leaves_other_words(word):
    assert lemmatize(word) == word


def test_lemmatize_each_word_and_errors():
    assert lemmatize("train tracks", each_word=True) == "train track"
    assert lemmatize("boats", each_word=True) == "boat"
    for bad in (None, 1, ["boats"]):
        with pytest.raises(TypeError):
            lemmatize(bad)


def test_pair_prompts():
    pp = pair_prompts(["jets", "airplane", "aeroplanes"], ["clouds", "sky", "cloud", "aeroplanes"], "aeroplane")
    assert pp.label == "a photo of aeroplane."
    assert pp.fg == ["a photo of jet aeroplane.", "a photo of airplane aeroplane.", "a photo of aeroplane."]
    assert pp.bg == ["a photo of cloud.", "a photo of sky."] and not pp.skipped
    assert pair_prompts(["cat"], ["cats", "cat"], "cat").skipped


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [fg_texts, bg_texts])
def test_text_rules_reject_bad_input(fn):
    with pytest.raises(TypeError):
        fn("jet", "aeroplane")            # a str, not a list of str
    with pytest.raises(TypeError):
        fn(["jet", None], "aeroplane")
    with pytest.raises(TypeError):
        fn(["jet"], 3)
    with pytest.raises(ValueError):
        fn(["jet"], "")
    assert fn([], "aeroplane") == []


def test_select_answers_errors():
    with pytest.raises(ValueError, match="not asked"):
        select_answers(["q1"], ["a"], ["q2"])
    with pytest.raises(ValueError, match="one answer per question"):
        select_answers(["q1", "q2"], ["a"], ["q1"])


def test_prompt_template():
    assert to_prompt("jet aeroplane") == "a photo of jet aeroplane."
    with pytest.raises(TypeError):
        to_prompt(None)
    with pytest.raises(TypeError):
        prompts("sky")


# ---- properties -------------------------------------------------------------------------------

LABELS = st.sampled_from(sorted(set(VOC_CLASSES + COCO_CLASSES)))
WORDS = st.sampled_from(["jet", "table", "plant", "monitor", "tv", "car", "scar", "Cat", "cat", "sky", "water",
                         "dining", "potted", "person", "", " ", "dog", "bus", "business", "grass", "boat"])
ANSWER = st.one_of(st.lists(WORDS, max_size=3).map(" ".join), st.text(max_size=12))
ANSWERS = st.lists(ANSWER, max_size=12)


@settings(max_examples=200, deadline=None)
@given(ANSWERS, LABELS)
def test_fg_texts_properties(answers, label):
    out = fg_texts(answers, label)
    assert len(out) == len(answers)
    names = class_aliases(label)
    for a, o in zip(answers, out):
        assert any(n in o for n in names)                         # every text names the class
        assert o == a if any(n in a for n in names) else o == f"{a} {label}"
        if label in a:
            assert o == a
    assert fg_texts(out, label) == out                            # idempotent


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(ANSWER, LABELS), max_size=15), LABELS)
def test_bg_texts_properties(answers, label):
    out = bg_texts(answers, label)
    assert len(out) == len(set(out))                              # no duplicates
    assert label not in out
    assert set(out) == set(answers) - {label}
    it = iter(answers)
    assert all(any(o == a for a in it) for o in out)              # a subsequence of the input
    assert bg_texts(out, label) == out                            # idempotent
    assert [answers.index(o) for o in out] == sorted(answers.index(o) for o in out)   # first-occurrence order


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=20))
def test_lemmatize_properties(text):
    out = lemmatize(text)
    assert isinstance(out, str)
    if " " in text or not text.islower():
        assert out == text                                        # phrases and non-lower-case kept, as WordNet
    assert len(lemmatize(text, each_word=True).split(" ")) == len(text.split(" "))
