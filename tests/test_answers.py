"""Stage 1 (qaclims.answers): batched QAPE equals one question at a time, resume after SIGKILL, torchrun shards,
the text feature cache, and clear errors on bad input."""
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from qaclims import answers as stage
from qaclims.answers import (ANSWERS_FILE, answer_split, answers_dir, ask_images, load_answers,
                             mask_question_padding, oracle_key, pair_texts, present_classes, prompts_for_image, read_records,
                             record_line, text_feature_cache)
from qaclims.blip_tiny import build_blip_tiny, build_tokenizer
from qaclims.cli import SUBCOMMANDS, build_parser
from qaclims.profiles import profile_dataset, synth_world
from qaclims.qape import QUESTION_GROUPS, pair_prompts, questions_for
from qaclims.runs import read_json
from qaclims.settings import load_settings
from qaclims.synth_clip import build_synth_clip, synth_clip_tokenizer
from qaclims.synth_text import OracleVQA
from qaclims.vlm import TextFeatureCache
from qaclims.vqa import BlipVQA

TINY = {"synth.train_size": 6, "synth.val_size": 3, "study.num_workers": 0, "models.synth_vqa_error_rate": 0.25}


def tiny_settings(run_dir, **more):
    return load_settings(overrides={"data.run_dir": str(run_dir), **TINY, **more})


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return tiny_settings(tmp_path_factory.mktemp("runs"))


def one_by_one(answerer, items, class_names):
    "The reference's way: one answer call per question."
    return [answerer.answer([item], [[q]])[0][0]
            for item in items for k in present_classes(item) for q in questions_for(class_names[k])]


def test_batched_equals_one_by_one_oracle(settings):
    dataset = profile_dataset(settings, "train")
    items = [dataset[i] for i in range(4)]
    oracle = OracleVQA(0.3, seed=4)
    records = ask_images(oracle, items, dataset.class_names)
    assert [r["answer"] for r in records] == one_by_one(oracle, items, dataset.class_names)
    assert [(r["id"], r["k"], r["q"]) for r in records] == [
        (item["id"], k, q) for item in items for k in present_classes(item) for q in range(16)]


def random_blip(settings, std=0.2, seed=3):
    "A tiny BlipVQA with random weights, drawn wide enough that its answers depend on the question and image."
    tokenizer = build_tokenizer(synth_world(settings))
    torch.manual_seed(seed)
    model = build_blip_tiny("blip-tiny-test", tokenizer, 96)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.ndim >= 2:
                weight.normal_(0.0, std)
    return BlipVQA(model, tokenizer, image_size=96, num_beams=2, max_length=6, image_batch_size=2)


def test_batched_equals_one_by_one_blip(settings):
    vqa = random_blip(settings)
    mask_question_padding(vqa.model)
    dataset = profile_dataset(settings, "train")
    items = [dataset[i] for i in range(3)]
    batched = [r["answer"] for r in ask_images(vqa, items, dataset.class_names)]
    assert batched == one_by_one(vqa, items, dataset.class_names)
    assert len(set(batched)) > len(batched) // 4  # the answers do depend on the questions


def test_answer_split_masks_blip_padding(tmp_path):
    settings = tiny_settings(tmp_path, **{"synth.train_size": 2})
    vqa = random_blip(settings)
    folder = answer_split(settings, "train", vqa, progress=False)
    hooked = [m for name, m in vqa.model.named_modules() if name.endswith("crossattention.self")]
    assert hooked and all(m._qaclims_mask_hook for m in hooked)
    assert mask_question_padding(vqa.model) is vqa.model  # idempotent
    assert all(len(m._forward_pre_hooks) == 1 for m in hooked)
    assert read_json(folder / "manifest.json")["answerer"]["name"] == "blip"


def test_records_and_prompts(settings):
    folder = answer_split(settings, "train", progress=False, images_per_call=4)
    assert answer_split(settings, "train", progress=False) == folder  # cached
    assert folder == answers_dir(settings, "train")
    records = read_records(folder)
    dataset = profile_dataset(settings, "train")
    assert [r["id"] for r in records] == [dataset[i]["id"] for i in range(len(dataset))
                                          for _ in range(16 * len(present_classes(dataset[i])))]
    for r in records:
        assert r["question"] == stage.QUESTIONS[r["q"]].format(r["class"]) and r["class"] == dataset.class_names[r["k"]]
        assert r["drop"] == (r["q"] >= 6 and r["text"] == r["class"])
    prompts = load_answers(settings, "train")
    item = dataset[0]
    pairs = prompts_for_image(prompts, item["id"], present_classes(item))
    for pair, k in zip(pairs, present_classes(item)):
        mine = [r["answer"] for r in records if r["id"] == item["id"] and r["k"] == k]
        assert pair == pair_prompts(mine[:6], mine[6:], dataset.class_names[k])
    # question groups: aliases only keeps the 4 alias answers and no background prompt
    alias = load_answers(folder, groups=("aliases",))
    assert all(len(p.fg) == 4 and p.bg == [] for p in alias.values())
    scene = load_answers(folder, groups=("scene",))
    assert all(p.fg == [] and len(p.bg) <= len(QUESTION_GROUPS["scene"]) for p in scene.values())


# answer_split on the tiny world, one image per call; the third write is cut in the middle and the process killed
RUN = textwrap.dedent("""
    import os, signal, sys
    from qaclims import answers as stage
    from qaclims.settings import load_settings
    run_dir, kill_at = sys.argv[1], int(sys.argv[2])
    calls = []
    append = stage.append_lines
    def dying_append(handle, lines):
        calls.append(1)
        if len(calls) == kill_at:
            text = "".join(lines)
            handle.write(text[:len(text) // 2 + 7])
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        append(handle, lines)
    stage.append_lines = dying_append
    settings = load_settings(overrides={"data.run_dir": run_dir, **%r})
    print(stage.answer_split(settings, "train", images_per_call=1, progress=False), flush=True)
""" % TINY)


def run_stage(run_dir, kill_at=0):
    return subprocess.run([sys.executable, "-c", RUN, str(run_dir), str(kill_at)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_resume_after_sigkill_mid_write(tmp_path):
    killed = run_stage(tmp_path / "killed", kill_at=3)
    assert killed.returncode == -9, killed.stderr[-2000:]
    folder = answers_dir(tiny_settings(tmp_path / "killed"), "train")
    shard = folder / "answers-rank0-of-1.jsonl"
    assert not shard.read_text().endswith("\n") and not (folder / "done.json").exists()
    complete, dropped = stage.read_shard(shard)
    ids = {json.loads(line)["id"] for line in shard.read_text().split("\n")[:-1]}
    assert dropped and len(complete) == 2 and len(ids) == 3  # two images written, the third cut short
    assert answer_split(tiny_settings(tmp_path / "killed"), "train", images_per_call=1, progress=False) == folder
    straight = answer_split(tiny_settings(tmp_path / "straight"), "train", images_per_call=3, progress=False)
    merged = (folder / ANSWERS_FILE).read_bytes()
    assert merged == (straight / ANSWERS_FILE).read_bytes()
    keys = [(r["id"], r["k"], r["q"]) for r in map(json.loads, merged.decode().splitlines())]
    assert len(keys) == len(set(keys)) and not list(folder.glob("answers-rank*"))


TORCHRUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch.distributed as dist
    from qaclims.answers import answer_split
    from qaclims.dist import distributed
    from qaclims.settings import load_settings
    run_dir, out = sys.argv[1], Path(sys.argv[2])
    settings = load_settings(overrides={"data.run_dir": run_dir, **%r})
    folder = answer_split(settings, "train", images_per_call=2, progress=False)
    context = distributed("cpu")
    (out / f"rank{context.rank}.txt").write_text(str(folder))
    dist.destroy_process_group()
""" % TINY)


def test_torchrun_two_processes_merge_like_one(tmp_path, settings):
    script = tmp_path / "qape_dist.py"
    script.write_text(TORCHRUN)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "runs"), str(tmp_path)], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    folders = {(tmp_path / f"rank{r}.txt").read_text() for r in range(2)}
    assert len(folders) == 1
    folder = Path(folders.pop())
    assert (folder / ANSWERS_FILE).read_bytes() == (answer_split(settings, "train", progress=False) / ANSWERS_FILE).read_bytes()
    assert json.loads((folder / "manifest.json").read_text())["world_size"] == 2


def test_text_cache_encodes_each_text_once(settings):
    torch.manual_seed(0)
    model = build_synth_clip("synth-vit-tiny", 96)
    tokenizer = synth_clip_tokenizer(model)
    encoded = []
    encode_text = model.encode_text

    def counting(tokens, *args, **kwargs):
        encoded.append(tokens.shape[0])
        return encode_text(tokens, *args, **kwargs)

    model.encode_text = counting
    answer_split(settings, "train", progress=False)
    path = text_feature_cache(settings, "train", clip=(model, tokenizer))
    texts = pair_texts(load_answers(settings, "train"), profile_dataset(settings, "train").class_names)
    assert sum(encoded) == len(texts) == len(set(texts))
    cache = TextFeatureCache(model, tokenizer, path)
    assert sorted(cache.texts) == sorted(texts)
    assert text_feature_cache(settings, "train", clip=(model, tokenizer)) == path and sum(encoded) == len(texts)
    assert torch.equal(cache(texts[:3]), TextFeatureCache(model, tokenizer, path)(texts[:3])) and sum(encoded) == len(texts)


def test_missing_answers_are_a_clear_error(tmp_path):
    fresh = tiny_settings(tmp_path)
    for call in (lambda: load_answers(fresh, "val"), lambda: text_feature_cache(fresh, "val", clip=(None, None)),
                 lambda: read_records(tmp_path / "nowhere")):
        with pytest.raises(FileNotFoundError, match="run `qaclims qape --split"):
            call()


def test_image_without_labels_is_named(settings, monkeypatch):
    dataset = profile_dataset(settings, "train")
    empty = {**dataset[1], "label_vector": np.zeros(dataset.num_classes, np.float32)}

    class Holey(list):
        class_names = dataset.class_names
        ids = [dataset[0]["id"], empty["id"]]

    monkeypatch.setattr(stage, "profile_dataset", lambda settings, split: Holey([dataset[0], empty]))
    with pytest.raises(ValueError, match=f"image '{empty['id']}' has no labels"):
        answer_split(settings, "train", OracleVQA(0.5, 9), progress=False)
    with pytest.raises(ValueError, match="has no labels"):
        prompts_for_image({}, empty["id"], [])


def test_pair_without_background_text_warns_and_keeps_empty_bg(settings, tmp_path):
    folder = answer_split(settings, "train", progress=False)
    records = read_records(folder)
    first = records[0]
    fake = tmp_path / "answers"
    fake.mkdir()
    rows = [{**r, "answer": r["class"] if r["q"] >= 6 else r["answer"]} if (r["id"], r["k"]) == (first["id"], first["k"])
            else r for r in records]
    (fake / ANSWERS_FILE).write_text("".join(record_line(r) for r in rows))
    (fake / "done.json").write_text("{}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prompts = load_answers(fake)
    assert len(caught) == 1 and f"image {first['id']!r}" in str(caught[0].message)
    pair = prompts[(first["id"], first["k"])]
    assert pair.skipped and pair.bg == [] and len(pair.fg) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_answers(fake, groups=("aliases",))  # no background question asked: nothing to warn about


def test_bad_arguments(settings):
    with pytest.raises(ValueError, match="images_per_call"):
        answer_split(settings, "train", images_per_call=0)
    with pytest.raises(TypeError, match="key="):
        answer_split(settings, "train", answerer=object())
    with pytest.raises(ValueError, match="unknown question groups"):
        load_answers(answer_split(settings, "train", progress=False), groups=("colours",))
    with pytest.raises(KeyError, match="no QAPE answers for image 'nope'"):
        prompts_for_image({}, "nope", [1])
    assert oracle_key(0.0, 5) == oracle_key(0.0, 0) != oracle_key(0.1, 5)


def test_cli(settings, capsys):
    parser = build_parser()
    args = parser.parse_args(["qape", "--split", "val", "--no-progress", "--no-text-cache", "--images-per-call", "2"])
    assert SUBCOMMANDS["qape"][2](args, settings) == 0
    assert capsys.readouterr().out.strip() == f"answers: {answers_dir(settings, 'val')}"
    assert parser.parse_args(["qape"]).text_cache is True
