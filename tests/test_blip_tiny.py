"""blip-tiny: tokenizer, training that resumes after SIGKILL to the same weights, the content cache, the committed model."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qaclims.blip_tiny import (META_FILE, blip_tiny_key, build_blip_tiny, build_tokenizer, committed_blip_tiny_dir,
                               encode_examples, load_blip_tiny, qa_examples, read_blip_tiny, train_blip_tiny,
                               vqa_loss, vqa_quality_report)
from qaclims.qape import QUESTION_GROUPS
from qaclims.runs import Checkpointer, read_json
from qaclims.settings import load_settings
from qaclims.synth import SynthWorld, WorldConfig
from qaclims.profiles import synth_world_config
from qaclims.synth_text import QUESTIONS, OracleVQA, answer_vocabulary

TEST_CONFIG = "blip-tiny-test"


@pytest.fixture(autouse=True)
def one_thread():
    "One torch thread: these models are tiny, and two threads on a busy 2-core machine are many times slower."
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    return SynthWorld(WorldConfig())


def settings_in(folder, **overrides):
    return load_settings(overrides={"data.run_dir": str(folder), **overrides})


@pytest.mark.parametrize("num_classes", [8, 12])
def test_tokenizer_round_trips_every_answer(num_classes):
    world = SynthWorld(WorldConfig(num_classes=num_classes))
    tokenizer = build_tokenizer(world)
    for answer in answer_vocabulary(world) + list(world.classes):
        ids = tokenizer(answer).input_ids
        assert tokenizer.unk_token_id not in ids, answer
        assert tokenizer.decode(ids, skip_special_tokens=True) == answer
    for question in QUESTIONS:
        assert tokenizer.unk_token_id not in tokenizer(question.format(world.classes[-1])).input_ids


def test_tokenizer_and_processor_survive_save_and_load(world, tmp_path):
    from transformers import BlipProcessor
    from qaclims.blip_tiny import blip_processor
    tokenizer = build_tokenizer(world)
    blip_processor(tokenizer, 96).save_pretrained(tmp_path)
    loaded = BlipProcessor.from_pretrained(tmp_path)
    texts = ["What is another word for this bottle?", "passenger plane", "living room"]
    assert loaded.tokenizer(texts).input_ids == tokenizer(texts).input_ids
    assert loaded.tokenizer.convert_tokens_to_ids("[ENC]") == tokenizer.convert_tokens_to_ids("[ENC]")
    assert loaded.image_processor.size == {"height": 96, "width": 96}


def test_a_tiny_config_learns(world):
    tokenizer = build_tokenizer(world)
    torch.manual_seed(0)
    model = build_blip_tiny(TEST_CONFIG, tokenizer)
    batch = encode_examples(qa_examples(world, "pretrain", range(4)), tokenizer, 96)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = vqa_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0] and losses[-1] < min(losses[:3]), losses


LOOP = textwrap.dedent("""
    import sys, time
    import qaclims.blip_tiny as module
    from qaclims.settings import load_settings
    loss = module.vqa_loss
    module.vqa_loss = lambda model, batch: (time.sleep(0.3), loss(model, batch))[1]  # slow, same arithmetic
    settings = load_settings(overrides={"data.run_dir": sys.argv[1]})
    module.train_blip_tiny(settings, seed=0, progress=False, config="blip-tiny-test")
""")


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    straight = train_blip_tiny(settings_in(tmp_path / "straight"), seed=0, progress=False, config=TEST_CONFIG)
    killed_dir = tmp_path / "killed"
    key = blip_tiny_key(settings_in(killed_dir), 0, None, TEST_CONFIG)
    checkpoint = killed_dir / "blip_tiny" / key / "checkpoint" / "last.pt"
    process = subprocess.Popen([sys.executable, "-c", LOOP, str(killed_dir)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and not checkpoint.exists():
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)  # right after the first checkpoint (step 3 of 12)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not Checkpointer(checkpoint.parent).done() and checkpoint.exists()
    resumed = train_blip_tiny(settings_in(killed_dir), seed=0, progress=False, config=TEST_CONFIG)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(straight / META_FILE)["losses"] == read_json(resumed / META_FILE)["losses"]


def test_cache_hit_trains_nothing(tmp_path, monkeypatch):
    settings = settings_in(tmp_path)
    path = train_blip_tiny(settings, seed=0, progress=False, config=TEST_CONFIG)
    import qaclims.blip_tiny as module
    monkeypatch.setattr(module, "vqa_loss", lambda *args, **kwargs: pytest.fail("trained on a cache hit"))
    assert train_blip_tiny(settings, seed=0, progress=False, config=TEST_CONFIG) == path
    answerer = load_blip_tiny(settings, seed=0, config=TEST_CONFIG, weights_dir=tmp_path / "nothing here")
    assert answerer.image_size == 96
    assert blip_tiny_key(settings, 1, None, TEST_CONFIG) != blip_tiny_key(settings, 0, None, TEST_CONFIG)
    assert blip_tiny_key(settings_in(tmp_path, **{"synth.p_context": "0.5"}), 0, None, TEST_CONFIG) != \
        blip_tiny_key(settings, 0, None, TEST_CONFIG)


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="patch grid"):
        blip_tiny_key(settings_in(tmp_path, **{"synth.image_size": "104"}))
    with pytest.raises(ValueError, match="unknown blip-tiny config"):
        blip_tiny_key(settings_in(tmp_path), config="blip-huge")
    with pytest.raises(ValueError, match="seed"):
        blip_tiny_key(settings_in(tmp_path), seed=-1)


def test_quality_report_of_the_oracle(world):
    exact = vqa_quality_report(OracleVQA(0.0), world, n=6)
    assert list(exact.group) == list(QUESTION_GROUPS) and (exact.accuracy == 1.0).all()
    noisy = vqa_quality_report(OracleVQA(0.5, seed=3), world, n=30)
    assert ((noisy.accuracy > 0.3) & (noisy.accuracy < 0.7)).all()


@pytest.fixture(scope="module")
def committed():
    folder = committed_blip_tiny_dir()
    if not (folder / META_FILE).is_file():
        pytest.skip("no committed blip-tiny weights in this checkout")
    return folder, read_json(folder / META_FILE)


def test_committed_weights_are_small_fp16_and_match_the_default_settings(committed):
    folder, meta = committed
    assert (folder / "model.safetensors").stat().st_size <= 8e6
    assert all(t.dtype == torch.float16 for t in load_file(folder / "model.safetensors").values())
    settings = load_settings(overrides={"data.run_dir": "unused"})
    assert meta["key"] == blip_tiny_key(settings, meta["seed"], meta["steps"], meta["config"])
    assert {"command", "seed", "quality", "train_seconds"} <= set(meta)


def test_committed_model_answers_as_recorded(committed):
    folder, meta = committed
    answerer = read_blip_tiny(folder)
    world = SynthWorld(synth_world_config(load_settings(overrides={"data.run_dir": "unused"})))
    report = vqa_quality_report(answerer, world, n=meta["quick_check"]["images"])
    recorded = [row["correct"] for row in meta["quick_check"]["rows"]]
    assert np.abs(report.correct.to_numpy() - np.array(recorded)).max() <= 1, (report, recorded)


def test_batched_answers_equal_one_by_one(committed, world):
    folder, _ = committed
    answerer = read_blip_tiny(folder, image_batch_size=3)
    items = [dict(image=s.image, graph=s.graph) for s in (world.sample("test", i) for i in range(4))]
    asked = [[q.format(sorted({o["class"] for o in it["graph"]["objects"]})[0]) for q in QUESTIONS[k::4]]
             for k, it in enumerate(items)]
    batched = answerer.answer(items, asked)
    assert batched == [[answerer.answer([it], [[q]])[0][0] for q in qs] for it, qs in zip(items, asked)]


@pytest.mark.slow
def test_retraining_from_scratch_reproduces_the_committed_model(tmp_path):
    """The recipe, rerun from scratch, gives the committed model's quality (within a point per group).

    The issue's goal (>= 85% exact match in every group, <= 8 min) is not met by this recipe: see the
    notebook 13_blip_tiny, which shows the committed model's numbers against it.
    """
    settings = settings_in(tmp_path)
    path = train_blip_tiny(settings, seed=0, progress=False)
    meta = read_json(path / META_FILE)
    committed = read_json(committed_blip_tiny_dir() / META_FILE)
    assert meta["key"] == committed["key"]
    assert meta["train_seconds"] <= 15 * 60, meta["train_seconds"]
    for row, recorded in zip(meta["quality"], committed["quality"]):
        assert row["group"] == recorded["group"] and abs(row["accuracy"] - recorded["accuracy"]) <= 0.01, (row, recorded)
