"""SynthWorld text: oracle answers follow the scene graph, the error knob, determinism, region captions and visibility."""
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qaclims.qape import BG_QUESTIONS, FG_QUESTIONS, QUESTION_GROUPS, pair_prompts, questions_for
from qaclims.synth import BODY_STYLES, CLASS_NAMES, CLASS_SPECS, SCENE_NAMES, THINGS, SynthDataset, SynthWorld, \
    WorldConfig, region_masks
from qaclims.synth_text import (ANSWER_KINDS, QUESTIONS, OracleVQA, VQAAnswerer, answer_vocabulary, image_caption,
                                object_phrase, oracle_answers, parse_question, region_caption, true_answer,
                                wrong_answers)


@lru_cache(maxsize=None)
def world(**kwargs) -> SynthWorld:
    return SynthWorld(WorldConfig(**kwargs))


def pairs(n=40, split="train", **kwargs):
    "(sample, object index, object) for the objects of the first n samples."
    w = world(**kwargs)
    for i in range(n):
        s = w.sample(split, i)
        for j, o in enumerate(s.graph["objects"]):
            yield s, j, o


def test_questions_are_qapes():
    assert QUESTIONS == FG_QUESTIONS + BG_QUESTIONS and len(ANSWER_KINDS) == 16
    assert all(q in QUESTIONS for group in QUESTION_GROUPS.values() for q in group)


def test_answers_match_the_graph():
    for s, j, o in pairs(60):
        g = s.graph
        answers = oracle_answers(g, o["class"])
        assert answers[0] == answers[1] == answers[3] == o["subtype"]
        assert answers[2] == answers[5] == o["aliases"][0] and answers[4] == o["aliases"][1]
        assert answers[13:] == [g["scene"]] * 3
        relations = {r["relation"]: r["thing"] for r in g["relations"] if r["object"] == j}
        for k, relation in enumerate(("above", "under", "behind", "around", "next to", "left", "right")):
            if relation in relations:
                assert answers[6 + k] == relations[relation]
            else:  # the fallback: around, else the largest thing
                assert answers[6 + k] == relations.get("around", max(g["things"], key=lambda t: t["area"])["name"])


def test_surroundings_name_the_typical_context():
    hits = total = 0
    for s, j, o in pairs(100, p_context=1.0):
        total += 1
        hits += o["context"] in oracle_answers(s.graph, o["class"])[6:13]
    assert hits / total > 0.9
    for s, j, o in pairs(60, p_context=0.0):
        assert CLASS_SPECS[CLASS_NAMES.index(o["class"])].context not in oracle_answers(s.graph, o["class"])[6:13]


def test_error_rate_zero_is_exact_and_one_is_all_wrong():
    for s, j, o in pairs(40):
        exact = oracle_answers(s.graph, o["class"], error_rate=0.0, seed=1)
        wrong = oracle_answers(s.graph, o["class"], error_rate=1.0, seed=1)
        assert exact == oracle_answers(s.graph, o["class"])
        assert all(a != b for a, b in zip(exact, wrong))
        spec = CLASS_SPECS[CLASS_NAMES.index(o["class"])]
        own_class = {w for st_ in spec.subtypes for w in (st_.name,) + st_.aliases}
        assert set(wrong[:6]) <= own_class - {o["subtype"], *o["aliases"]}  # another subtype of the same class
        assert set(wrong[6:13]) <= set(THINGS) and set(wrong[13:]) <= set(SCENE_NAMES)


def test_wrong_answers_are_deterministic_and_nested():
    g_list = [(s.graph, o["class"]) for s, j, o in pairs(30)]
    for g, c in g_list:
        assert oracle_answers(g, c, 0.4, seed=2) == oracle_answers(g, c, 0.4, seed=2)
        exact, low, high = (oracle_answers(g, c, r, seed=2) for r in (0.0, 0.3, 0.7))
        assert all(h != e for lo, h, e in zip(low, high, exact) if lo != e)  # wrong at 0.3 -> wrong at 0.7
    rates = [np.mean([a != b for g, c in g_list for a, b in zip(oracle_answers(g, c, 0.3, seed=s),
                                                                  oracle_answers(g, c))]) for s in range(3)]
    assert all(0.2 < r < 0.4 for r in rates)
    assert oracle_answers(*g_list[0], 0.5, seed=0) != oracle_answers(*g_list[0], 0.5, seed=1) or \
        oracle_answers(*g_list[1], 0.5, seed=0) != oracle_answers(*g_list[1], 0.5, seed=1)


@settings(max_examples=30, deadline=None)
@given(index=st.integers(0, 10**5), rate=st.floats(0, 1), seed=st.integers(0, 100), data=st.data())
def test_oracle_batched_equals_one_by_one(index, rate, seed, data):
    s = world(seed=0).sample("val", index)
    labels = [o["class"] for o in s.graph["objects"]]
    label = data.draw(st.sampled_from(labels))
    asked = data.draw(st.lists(st.sampled_from(questions_for(label)), min_size=1, max_size=8))
    vqa = OracleVQA(error_rate=rate, seed=seed)
    batched = vqa.answer([{"image": s.image, "graph": s.graph}, s], [asked, asked[::-1]])
    assert batched[0] == [vqa.answer([s], [[q]])[0][0] for q in asked] == batched[1][::-1]
    for q, a in zip(asked, batched[0]):
        k, name = parse_question(q)
        assert name == label and (a == true_answer(s.graph, label, ANSWER_KINDS[k])
                                  or a in wrong_answers(s.graph, label, ANSWER_KINDS[k]))


def test_oracle_interface_and_errors():
    vqa = OracleVQA()
    assert isinstance(vqa, VQAAnswerer)
    ds = SynthDataset(world(seed=0), "train", 4)
    items = [ds[i] for i in range(4)]
    questions = [questions_for(CLASS_NAMES[it["labels"][0]]) for it in items]
    answers = vqa.answer(items, questions)
    assert [len(a) for a in answers] == [16] * 4 and all(isinstance(x, str) for a in answers for x in a)
    with pytest.raises(ValueError, match="question lists"):
        vqa.answer(items, questions[:2])
    with pytest.raises(ValueError, match="not in this image"):
        vqa.answer(items[:1], [["What kind of sofa is in the photo?"]])
    with pytest.raises(ValueError, match="QAPE"):
        vqa.answer(items[:1], [["Is there a boat?"]])
    with pytest.raises(TypeError):
        vqa.answer(items[:1], ["What kind of boat is in the photo?"])
    for bad in (-0.1, 1.1, "high"):
        with pytest.raises(ValueError):
            OracleVQA(error_rate=bad)


def test_answers_feed_qape():
    for s, j, o in pairs(20):
        answers = oracle_answers(s.graph, o["class"])
        p = pair_prompts(answers[:6], answers[6:], o["class"])
        assert p.fg[0] == f"a photo of {o['subtype']} {o['class']}." and not p.skipped


def test_region_captions_respect_visibility():
    for s, j, o in pairs(50):
        m = region_masks(s, o["class_id"])
        mine = s.object_map == j + 1
        part, body = mine & s.part_map, mine & ~s.part_map
        sub, cls, shape = object_phrase(o), object_phrase(o, "class"), BODY_STYLES[o["body"]][2]
        assert region_caption(s, mine).startswith(f"a photo of {sub}")
        part_only = region_caption(s, part)
        assert cls in part_only and o["subtype"] not in part_only
        if o["body_area"] >= 20:
            body_only = region_caption(s, body)
            assert shape in body_only and o["class"] not in body_only and o["subtype"] not in body_only
            # the part and a quarter of the body: the class, not the subtype
            ys, xs = np.nonzero(body)
            few = part.copy()
            few[ys[: len(ys) // 4], xs[: len(xs) // 4]] = True
            assert cls in region_caption(s, few) and o["subtype"] not in region_caption(s, few)
        # a region of context only names the context, never the object
        if m["context"].any() and m["context"].sum() >= 4:
            ctx = region_caption(s, m["context"])
            assert o["context"] in ctx and o["subtype"] not in ctx and o["class"] not in ctx.replace(o["context"], "")


def test_region_caption_things_and_errors():
    s = world(seed=0).sample("train", 5)
    whole = np.ones(s.mask.shape, bool)
    caption = region_caption(s, whole)
    assert all(object_phrase(o) in caption for o in s.graph["objects"])
    big = [t["name"] for t in s.graph["things"] if t["area"] >= 0.15 * s.mask.size]
    assert big and all(t in caption for t in big)
    assert region_caption(s, whole.astype(np.float32)) == caption
    with pytest.raises(ValueError, match="empty"):
        region_caption(s, ~whole)
    with pytest.raises(ValueError, match="shape"):
        region_caption(s, whole[:10])
    with pytest.raises(TypeError):
        region_caption(s.graph, whole)


def test_image_captions():
    for s, j, o in pairs(20):
        caption = image_caption(s.graph)
        assert caption.startswith("a photo of ") and o["subtype"] in caption and s.graph["scene"] in caption
        varied = image_caption(s.graph, np.random.default_rng(j))
        assert any(w in varied for w in [o["subtype"], *o["aliases"]])
    with pytest.raises(ValueError):
        object_phrase(o, "kind")


def test_answer_vocabulary_covers_every_answer():
    vocab = set(answer_vocabulary(world(seed=0)))
    for s, j, o in pairs(30):
        assert set(oracle_answers(s.graph, o["class"], 0.6, seed=j)) <= vocab
