"""Stage 2 (qaclims.train_ritc): the batched step against a loop over pairs, CLIMS sharing everything but the
losses and texts, pairs without background answers, a SIGKILLed run resumed to the same weights, torchrun
with 2 CPU processes, and a missing stage-0 checkpoint."""
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from qaclims.camnet import CamNet
from qaclims.losses import brc_loss, frc_loss
from qaclims.profiles import profile_dataset
from qaclims.qape import PairPrompts
from qaclims.runs import read_json
from qaclims.settings import load_settings
from qaclims.synth_clip import build_synth_clip, synth_clip_tokenizer
from qaclims.train_cam import load_cam_net, save_cam_net
from qaclims.train_ritc import (ClimsTexts, PairTextTable, TrainingCams, clims_background_prompts, encode_views,
                                oracle_pair_texts, positive_pairs, region_views, ritc_config, ritc_step, texts_digest,
                                train_ritc)
from qaclims.transforms import normalize_image
from qaclims.vlm import TextFeatureCache
from killing import kill_at_step, last_step, pausing_script, run_to_end, same_weights

TINY_SETTINGS = {"synth.image_size": 48, "synth.train_size": 16, "synth.val_size": 8, "study.num_workers": 0}
# 48-pixel crops, the tiny CLIP's input size; 16 images in batches of 4: 4 steps per epoch, 12 in all
TINY_CONFIG = dict(crop_size=48, long_side=(40, 56), clip_size=48, train_images=None, val_images=4, epochs=3,
                   batch_size=4, checkpoint_every=1)


def tiny_settings(run_dir):
    return load_settings(overrides={"data.run_dir": str(run_dir), **TINY_SETTINGS})


def tiny_clip():
    torch.manual_seed(0)
    model = build_synth_clip("synth-vit-tiny", 48).eval().requires_grad_(False)
    return model, synth_clip_tokenizer(model)


def stage0_file(path):
    "A stage-0 checkpoint with seeded random weights (a ResNet-18 at stride 32: cheap, and the loop does not care)."
    torch.manual_seed(1)
    return save_cam_net(path, CamNet(8, "resnet18", 32, bn="train"), seed=0)


@pytest.fixture(scope="module")
def batch():
    "A batch of 4 SynthWorld images with a random stride-8 CamNet, the tiny CLIP and the oracle texts."
    settings = tiny_settings("unused")
    dataset = profile_dataset(settings, "train")
    items = [dataset[i] for i in range(4)]
    images = torch.stack([torch.from_numpy(normalize_image(s["image"]).transpose(2, 0, 1).copy()) for s in items])
    labels = torch.stack([torch.as_tensor(s["label_vector"]) for s in items])
    torch.manual_seed(2)
    net = CamNet(8, "resnet18", 8, bn="train")
    model, tokenizer = tiny_clip()
    cache = TextFeatureCache(model, tokenizer)
    texts = oracle_pair_texts(dataset, count=4)
    return dict(settings=settings, dataset=dataset, images=images, labels=labels, ids=[s["id"] for s in items],
                net=net, clip=model, cache=cache, texts=texts,
                config=ritc_config(settings, **{k: v for k, v in TINY_CONFIG.items() if k != "checkpoint_every"}))


def test_batched_step_equals_a_loop_over_pairs(batch):
    b = batch
    table = PairTextTable(b["texts"], b["cache"], b["dataset"].class_names)
    terms = ritc_step(TrainingCams(b["net"]), b["clip"], b["images"], b["labels"], b["ids"], table, b["config"])
    assert terms["pairs"] >= 4
    with torch.no_grad():
        cams = TrainingCams(b["net"])(b["images"])
        frc = brc = 0.0
        for n, k in zip(*positive_pairs(b["labels"])):  # one pair at a time: one CLIP call per image
            views = region_views(cams, b["images"], n[None], k[None], 48)
            f, g = encode_views(b["clip"], views)
            prompts = b["texts"][(b["ids"][n], b["dataset"].class_names[k])]
            label, answers, bg = b["cache"]([prompts.label]), b["cache"](prompts.fg), b["cache"](prompts.bg)
            t_fg = 0.5 * label + 0.5 * answers.mean(0, keepdim=True)
            frc += float(frc_loss(f, t_fg, bg[None]).sum())
            brc += float(brc_loss(g, t_fg, bg[None]).sum())
    assert terms["frc"].item() == pytest.approx(frc, rel=1e-5)
    assert terms["brc"].item() == pytest.approx(brc, rel=1e-5)
    assert terms["total"].item() == pytest.approx(10 * frc + 8 * brc + 0.2 * float(cams.mean()), rel=1e-5)



def test_max_normalised_training_cams_reach_the_network(batch):
    "cam_activation='max_norm': the losses see ReLU CAMs divided by their peaks, and their gradient reaches the net."
    b = batch
    table = PairTextTable(b["texts"], b["cache"], b["dataset"].class_names)
    config = replace(b["config"], cam_activation="max_norm")
    cam_model = TrainingCams(b["net"], config.cam_activation)
    terms = ritc_step(cam_model, b["clip"], b["images"], b["labels"], b["ids"], table, config)
    with torch.no_grad():
        cams = cam_model(b["images"])
    assert torch.allclose(cams.amax(dim=(2, 3)), torch.ones(cams.shape[:2]), atol=1e-3)
    reference = ritc_step(TrainingCams(b["net"]), b["clip"], b["images"], b["labels"], b["ids"], table, b["config"])
    assert torch.isfinite(terms["total"]) and terms["frc"].item() != pytest.approx(reference["frc"].item())
    b["net"].zero_grad()
    terms["total"].backward()
    assert float(b["net"].classifier.weight.grad.abs().sum()) > 0
    b["net"].zero_grad()

def test_pair_without_background_answers_counts_zero(batch):
    b = batch
    names = b["dataset"].class_names
    n, k = positive_pairs(b["labels"])
    lonely = (b["ids"][int(n[0])], names[int(k[0])])
    texts = dict(b["texts"])
    texts[lonely] = texts[lonely]._replace(bg=[])
    assert texts[lonely].skipped
    full = ritc_step(TrainingCams(b["net"]), b["clip"], b["images"], b["labels"], b["ids"],
                     PairTextTable(b["texts"], b["cache"], names), b["config"])
    cut = ritc_step(TrainingCams(b["net"]), b["clip"], b["images"], b["labels"], b["ids"],
                    PairTextTable(texts, b["cache"], names), b["config"])
    assert cut["skipped"] == 1 and full["skipped"] == 0
    # the skipped pair's own loss is 0: the other pairs' sum stays; check it against the per-pair losses
    table = PairTextTable(texts, b["cache"], names)
    t_fg, t_bg, valid = table.lookup([b["ids"][i] for i in n.tolist()], k.tolist())
    with torch.no_grad():
        f, _ = encode_views(b["clip"], region_views(TrainingCams(b["net"])(b["images"]), b["images"], n, k, 48))
    per_pair = frc_loss(f, t_fg, t_bg, valid)
    assert not valid[0].any() and float(per_pair[0]) == 0.0 and (per_pair[1:] > 0).all()
    assert cut["frc"].item() == pytest.approx(per_pair.sum().item(), rel=1e-5)
    cut["total"].backward()  # the graph is intact
    b["net"].zero_grad(set_to_none=True)


def test_clims_shares_everything_but_losses_and_texts(batch):
    b = batch
    names = b["dataset"].class_names
    qa = PairTextTable(b["texts"], b["cache"], names)
    clims = ClimsTexts(b["cache"], names, clims_background_prompts("synth"))
    assert clims.fixed.shape[0] == 4 and clims.labels.shape[0] == 8
    grads = {}
    for method, texts in (("qaclims", qa), ("clims", clims)):
        config = replace(b["config"], method=method, losses=("reg",))  # only the shared term counts
        terms = ritc_step(TrainingCams(b["net"]), b["clip"], b["images"], b["labels"], b["ids"], texts, config)
        terms["total"].backward()
        grads[method] = [p.grad.clone() for p in b["net"].parameters() if p.grad is not None]
        b["net"].zero_grad(set_to_none=True)
        assert terms["pairs"] == len(positive_pairs(b["labels"])[0])
    assert all(torch.equal(x, y) for x, y in zip(grads["qaclims"], grads["clims"]))
    full = ritc_step(TrainingCams(b["net"]), b["clip"], b["images"], b["labels"], b["ids"], clims,
                     replace(b["config"], method="clims"))
    assert set(full) >= {"otm", "btm", "cbs", "reg", "total"} and full["total"].requires_grad
    with pytest.raises(TypeError, match="ClimsTexts"):
        ritc_step(TrainingCams(b["net"]), b["clip"], b["images"], b["labels"], b["ids"], qa,
                  replace(b["config"], method="clims"))


def test_question_groups_are_a_training_argument(batch):
    b = batch
    only = oracle_pair_texts(b["dataset"], groups=("aliases", "surroundings"), count=4)
    assert only.keys() == b["texts"].keys() and texts_digest(only) != texts_digest(b["texts"])
    assert all(len(p.fg) == 4 for p in only.values())
    with pytest.raises(ValueError, match="no background group"):
        ritc_config(b["settings"], groups=("aliases", "fine_grained"))


def test_bad_input(tmp_path):
    settings = tiny_settings(tmp_path)
    model, tokenizer = tiny_clip()
    with pytest.raises(FileNotFoundError, match=r"qaclims train-cam --seed 3"):
        train_ritc(settings, seed=3, progress=False, clip=(model, tokenizer), **TINY_CONFIG)
    start = stage0_file(tmp_path / "stage0.pt")
    with pytest.raises(ValueError, match="clip_size"):
        train_ritc(settings, progress=False, clip=(model, tokenizer), cam_checkpoint=start, **{**TINY_CONFIG, "clip_size": 96})
    with pytest.raises(ValueError, match="method"):
        train_ritc(settings, method="clip", progress=False)
    with pytest.raises(ValueError, match="unknown RitcConfig field"):
        ritc_config(settings, learning_rate=1.0)
    with pytest.raises(KeyError, match="qape"):
        PairTextTable({("x", 0): PairPrompts("a photo of boat.", [], ["a photo of sea."])},
                      TextFeatureCache(model, tokenizer), profile_dataset(settings, "train").class_names).lookup(["y"], [0])


# train_ritc on the tiny config, in a process that the test can kill mid-run: RUN RUN_DIR STAGE0_CHECKPOINT METHOD
RUN = pausing_script("""
    from qaclims.settings import load_settings
    from qaclims.synth_clip import build_synth_clip, synth_clip_tokenizer
    from qaclims.train_ritc import train_ritc
    torch.manual_seed(0)
    model = build_synth_clip("synth-vit-tiny", 48).eval().requires_grad_(False)
    settings = load_settings(overrides={"data.run_dir": ARGS[0], **%r})
    path = train_ritc(settings, seed=3, method=ARGS[2], progress=False, clip=(model, synth_clip_tokenizer(model)),
                      cam_checkpoint=ARGS[1], **%r)
    print(f"final {path}", flush=True)
""" % (TINY_SETTINGS, TINY_CONFIG))


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    start = stage0_file(tmp_path / "stage0.pt")
    straight = run_to_end(RUN, tmp_path / "straight", start, "qaclims")
    kill_at_step(RUN, tmp_path / "killed", start, "qaclims", step=6)  # step 6 is in the middle of the second epoch
    assert 6 <= last_step(next((tmp_path / "killed" / "ritc").iterdir())) < 12
    resumed = run_to_end(RUN, tmp_path / "killed", start, "qaclims")
    assert resumed.parent.name == straight.parent.name  # same content key
    assert same_weights(straight, resumed)
    assert read_json(straight.parent / "losses.json") == read_json(resumed.parent / "losses.json")
    assert not (resumed.parent / "last.pt").exists()
    record = read_json(resumed.parent / "manifest.json")
    assert record["seed"] == 3 and record["steps"] == 12 and record["method"] == "qaclims"
    net = load_cam_net(resumed)  # what make_cams reads
    assert net.num_classes == 8 and net.output_stride == 32


DDP = textwrap.dedent("""
    import os, sys, torch
    from qaclims.settings import load_settings
    from qaclims.synth_clip import build_synth_clip, synth_clip_tokenizer
    from qaclims.train_ritc import train_ritc
    run_dir, start = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = build_synth_clip("synth-vit-tiny", 48).eval().requires_grad_(False)
    settings = load_settings(overrides={"data.run_dir": run_dir, **%r})
    config = {**%r, "epochs": 2, "checkpoint_every": 2}
    path = train_ritc(settings, seed=0, progress=False, clip=(model, synth_clip_tokenizer(model)), cam_checkpoint=start,
                      **config)
    # one file per rank: the two processes share stdout, where their lines could interleave
    with open(f"{run_dir}.rank{os.environ['RANK']}", "w") as out:
        out.write(f"final {path}\\n")
""" % (TINY_SETTINGS, TINY_CONFIG))


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="torchrun not installed")
def test_torchrun_two_cpu_processes(tmp_path):
    start = stage0_file(tmp_path / "stage0.pt")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    script = tmp_path / "ddp.py"
    script.write_text(DDP)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "runs"),
                           str(start)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    finals = {Path(Path(f"{tmp_path / 'runs'}.rank{rank}").read_text().split(" ", 1)[1].strip()) for rank in (0, 1)}
    assert len(finals) == 1, done.stderr[-2000:]  # both ranks agree
    final = finals.pop()
    record = read_json(final.parent / "manifest.json")
    assert record["world_size"] == 2 and record["steps"] == 8  # 16 images, global batch 4, 2 epochs
    history = read_json(final.parent / "losses.json")
    assert [row["step"] for row in history] == list(range(1, 9)) and all(np.isfinite(row["total"]) for row in history)
    assert load_cam_net(final).num_classes == 8


def test_default_texts_come_from_the_qape_stage_when_it_ran(tmp_path):
    "Without pair_texts, training reads the QAPE answers of the training split (same prompts as the oracle's)."
    from qaclims.answers import answer_split
    from qaclims.train_ritc import default_pair_texts
    settings = tiny_settings(tmp_path)
    dataset, config = profile_dataset(settings, "train"), ritc_config(settings)
    in_memory = default_pair_texts(settings, dataset, config)  # no answers yet: the oracle's, computed here
    answer_split(settings, "train", progress=False)
    stored = default_pair_texts(settings, dataset, config)
    names = dataset.class_names if hasattr(dataset, "class_names") else dataset.world.classes
    assert {(i, names[k]) for i, k in stored} == set(in_memory)
    assert all(stored[i, k] == in_memory[i, names[k]] for i, k in stored)
