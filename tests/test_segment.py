"""Stage 6 (qaclims.segment): the named segmenters with random weights, a tiny SynthWorld run killed with SIGKILL
and resumed to the same weights, the content-keyed cache, the stage-0 trunk, evaluation (with CRF, and without the
CRF library), torchrun with 2 CPU processes, and bad input."""
import csv
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings as hsettings, strategies as st
from PIL import Image

from qaclims.camnet import CamNet
from qaclims.evaluate import iou
from qaclims.profiles import profile_dataset
from qaclims.runs import read_json
from qaclims.refine import MissingDependencyError, crf_labels, require_crf
from qaclims.segment import (SEGMENTERS, PseudoMaskDataset, build_segmenter, evaluate_segmenter, ground_truth_masks,
                             load_segmenter, pixel_loss, predict_logits, resize_labels, segment_config, segment_confusion,
                             train_segmenter)
from qaclims.settings import load_settings
from qaclims.train_cam import cam_checkpoint_path, save_cam_net
from qaclims.weights import MissingWeightsError
from killing import kill_at_step, last_step, one_thread, pausing_script, same_weights

# 6 training images of 48 pixels: 3 batches of 2 per epoch, so with 2 batches per update updates 2 and 4 straddle
# epochs; 4 updates in all, with multi-scale supervision at 0.5; random trunks (the synth recipe starts from stage 0)
TINY_SETTINGS = {"synth.image_size": 48, "synth.train_size": 6, "synth.val_size": 4, "study.num_workers": 0}
TINY_CONFIG = dict(iterations=4, batch_size=2, iter_size=2, crop_size=48, msc_scales=(0.5,), checkpoint_every=1,
                   init="none")
SHORT = dict(iterations=3, batch_size=2, crop_size=48, init="none")  # the shared finished run

# train_segmenter on the tiny config, in a process that the test can kill mid-run: RUN RUN_DIR MASKS_DIR
RUN = pausing_script("""
    from qaclims.segment import train_segmenter
    from qaclims.settings import load_settings
    settings = load_settings(overrides={"data.run_dir": ARGS[0], **%r})
    print(f"final {train_segmenter(settings, ARGS[1], seed=3, progress=False, **%r)}", flush=True)
""" % (TINY_SETTINGS, TINY_CONFIG))


def tiny_settings(run_dir):
    return load_settings(overrides={"data.run_dir": str(run_dir), **TINY_SETTINGS})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "A tiny finished run: (settings, masks folder, checkpoint)."
    settings = tiny_settings(tmp_path_factory.mktemp("segment"))
    masks = ground_truth_masks(settings, "train")
    checkpoint = train_segmenter(settings, masks, seed=0, progress=False, **SHORT)
    return settings, masks, checkpoint


@pytest.mark.parametrize("name", list(SEGMENTERS))
def test_named_segmenters_with_random_weights(name, tmp_path):
    net = build_segmenter(name, 21).eval()
    with torch.no_grad():
        logits = net(torch.randn(1, 3, 65, 65))
    assert logits.shape == (1, 21, 9, 9)  # output stride 8, rounded up
    trunk, weights, others = net.param_groups()
    assert weights and others and all(p.ndim > 1 for p in weights) and all(p.ndim <= 1 for p in others)
    frozen = SEGMENTERS[name].bn == "frozen"
    assert all(p.requires_grad != frozen for m in net.resnet.modules() if isinstance(m, torch.nn.BatchNorm2d)
               for p in m.parameters())
    # the real-weight path: a torchvision ResNet state dict (random here) loads into the trunk
    resnet = getattr(torchvision.models, SEGMENTERS[name].arch)(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet.pth")
    loaded = build_segmenter(name, 21, pretrained=tmp_path / "resnet.pth")
    assert torch.equal(loaded.resnet.layer4[0].conv2.weight, resnet.layer4[0].conv2.weight)
    assert torch.equal(loaded.resnet.bn1.running_var, resnet.bn1.running_var)


def test_deeplabv2_is_dilated_at_stride_8():
    net = build_segmenter("deeplabv2-resnet101", 21)
    assert [net.resnet.layer3[i].conv2.dilation for i in (0, 22)] == [(2, 2), (2, 2)]
    assert net.resnet.layer4[2].conv2.dilation == (4, 4) and net.resnet.layer4[0].conv2.stride == (1, 1)
    assert [b.dilation for b in net.classifier.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]


def test_imagenet_weights_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("QACLIMS_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-torch-home")
    with pytest.raises(MissingWeightsError, match="ImageNet weights for resnet18"):
        build_segmenter("synth", 9, pretrained="imagenet")


@pytest.mark.data
def test_imagenet_weights_load_into_deeplabv2():
    from qaclims.camnet import imagenet_state_dict
    net = build_segmenter("deeplabv2-resnet101", 21, pretrained="imagenet")
    reference = imagenet_state_dict("resnet101")
    assert torch.equal(net.resnet.layer3[5].conv2.weight, reference["layer3.5.conv2.weight"])


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    masks = ground_truth_masks(tiny_settings(tmp_path / "masks"), "train")
    straight = one_thread(train_segmenter, tiny_settings(tmp_path / "straight"), masks, seed=3, progress=False,
                          **TINY_CONFIG)
    kill_at_step(RUN, tmp_path / "killed", masks, step=2)  # update 2 ends in the middle of the second epoch
    assert 2 <= last_step(next((tmp_path / "killed" / "segment").iterdir())) < 4
    resumed = one_thread(train_segmenter, tiny_settings(tmp_path / "killed"), masks, seed=3, progress=False,
                         **TINY_CONFIG)  # here, from the dead process's checkpoint
    assert resumed.parent.name == straight.parent.name  # same content key
    assert same_weights(straight, resumed)
    record = read_json(resumed.parent / "manifest.json")
    assert record["seed"] == 3 and record["steps"] == 4 and record["config"]["iter_size"] == 2


def test_finished_run_is_cached_and_keyed_by_content(trained, capsys):
    settings, masks, checkpoint = trained
    stamp = checkpoint.stat().st_mtime_ns
    capsys.readouterr()
    again = train_segmenter(settings, masks, seed=0, progress=False, **SHORT)
    assert again == checkpoint and checkpoint.stat().st_mtime_ns == stamp and "nothing to do" in capsys.readouterr().out
    net, meta = load_segmenter(checkpoint)
    assert net.name == "synth" and net.num_classes == 9 and not net.training and meta["seed"] == 0
    fewer = ground_truth_masks(settings, "train", limit=4)  # another mask folder, another run
    other = train_segmenter(settings, fewer, seed=0, progress=False, **dict(SHORT, iterations=1, train_images=4))
    assert other.parent != checkpoint.parent and read_json(other.parent / "done.json")["images"] == 4


def test_cam_init_starts_from_the_stage0_checkpoint(trained, tmp_path):
    settings, masks, _ = trained
    assert segment_config(settings).init == "cam"  # the synth recipe
    with pytest.raises(FileNotFoundError, match="train_cam"):
        train_segmenter(settings, masks, progress=False, **dict(SHORT, init="cam"))
    nudge = dict(SHORT, iterations=1, init="cam", lr=1e-7)  # one tiny SGD step: the trunk stays where it started
    cam = CamNet(8, "resnet18", output_stride=8, bn="train")
    save_cam_net(cam_checkpoint_path(settings, 0), cam)  # a stand-in stage-0 checkpoint where the profile puts it
    checkpoint = train_segmenter(settings, masks, progress=False, **nudge)
    net, meta = load_segmenter(checkpoint)
    assert meta["config"]["init"] == "cam"
    assert torch.allclose(net.resnet.layer4[1].conv2.weight, cam.resnet.layer4[1].conv2.weight, atol=1e-4)
    other = CamNet(8, "resnet18", output_stride=8, bn="train")  # another stage 0, passed explicitly: another run
    save_cam_net(tmp_path / "stage0.pt", other)
    explicit = train_segmenter(settings, masks, progress=False, cam_checkpoint=tmp_path / "stage0.pt", **nudge)
    assert explicit.parent != checkpoint.parent
    assert read_json(explicit.parent / "manifest.json")["inputs"]["cam_checkpoint"] == str(tmp_path / "stage0.pt")
    net, _ = load_segmenter(explicit)
    assert torch.allclose(net.resnet.layer4[1].conv2.weight, other.resnet.layer4[1].conv2.weight, atol=1e-4)


def test_evaluation_writes_metrics_and_is_cached(trained):
    settings, _, checkpoint = trained
    metrics = evaluate_segmenter(settings, checkpoint, progress=False)
    assert metrics["split"] == "test" and metrics["images"] == 4 and metrics["seed"] == 0
    net, meta = load_segmenter(checkpoint)
    config = meta["config"]
    conf = segment_confusion(net, profile_dataset(settings, "test"), range(4), config["test_scales"], config["test_flip"],
                             config["fuse"])
    assert np.array_equal(conf, np.array(metrics["confusion"])) and np.isclose(iou(conf)[1], metrics["miou"])
    folder = next(checkpoint.parent.glob("eval-test-*"))
    with open(folder / "per_class.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9 and rows[0]["class"] == "background" and rows[0]["split"] == "test" and rows[0]["seed"] == "0"
    assert read_json(folder / "manifest.json")["inputs"]["checkpoint"] == str(checkpoint)
    stamp = (folder / "metrics.json").stat().st_mtime_ns
    assert evaluate_segmenter(settings, checkpoint, progress=False)["miou"] == metrics["miou"]
    assert (folder / "metrics.json").stat().st_mtime_ns == stamp  # complete: read back
    assert metrics["metrics_file"] == str(folder / "metrics.json")
    with_crf = evaluate_segmenter(settings, checkpoint, crf=True, limit=2, progress=False)
    assert with_crf["crf"] and with_crf["images"] == 2 and 0.0 <= with_crf["miou"] <= 1.0
    assert next(checkpoint.parent.glob("eval-test-crf-*")).is_dir()


def test_missing_crf_library_is_a_clear_error(trained, monkeypatch):
    "Without pydensecrf2 (simulated: its modules blocked), the CRF evaluation stops at once with the install command."
    settings, _, checkpoint = trained
    for name in ("pydensecrf", "pydensecrf.densecrf"):
        monkeypatch.setitem(sys.modules, name, None)
    before = set(checkpoint.parent.iterdir())
    with pytest.raises(MissingDependencyError, match="pip install pydensecrf2"):
        evaluate_segmenter(settings, checkpoint, crf=True, limit=1, progress=False)
    with pytest.raises(ImportError, match="IR labels.*pip install pydensecrf2"):
        require_crf("IR labels")
    image, labels = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int64)
    with pytest.raises(MissingDependencyError, match="crf_labels.*pip install pydensecrf2"):
        crf_labels(image, labels, 2)
    assert set(checkpoint.parent.iterdir()) == before  # nothing started
    assert evaluate_segmenter(settings, checkpoint, limit=1, progress=False)["images"] == 1  # without the CRF: fine


def test_bad_input(trained, tmp_path):
    settings, masks, checkpoint = trained
    train = profile_dataset(settings, "train")
    with pytest.raises(FileNotFoundError, match="not found.*make_pseudo_masks"):
        train_segmenter(settings, tmp_path / "nowhere", progress=False)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(masks, incomplete)
    (incomplete / "done.json").unlink()
    with pytest.raises(FileNotFoundError, match="no done.json"):
        PseudoMaskDataset(train, incomplete)
    (incomplete / "done.json").write_text("{}")
    (incomplete / f"{train.ids[3]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=f"{train.ids[3]}.png"):
        train_segmenter(settings, incomplete, progress=False)
    with pytest.raises(ValueError, match="unknown SegmentConfig field"):
        segment_config(settings, lr_mult=3)
    with pytest.raises(ValueError, match="SegmentConfig.model"):
        segment_config(settings, model="unet")
    with pytest.raises(ValueError, match="no full batch"):
        train_segmenter(settings, masks, progress=False, **dict(SHORT, batch_size=64))
    with pytest.raises(FileNotFoundError, match="train_segmenter"):
        load_segmenter(tmp_path / "missing.pt")
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        evaluate_segmenter(settings, tmp_path / "other.pt", progress=False)
    with pytest.raises(ValueError, match="another dataset"):
        evaluate_segmenter(settings.with_overrides({"synth.num_classes": 3}), checkpoint, progress=False)


@hsettings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 60), st.integers(1, 60), st.integers(0, 2**31 - 1))
def test_resize_labels_is_pil_nearest(height, width, out_h, out_w, seed):
    masks = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (2, height, width))).long()
    expected = np.stack([np.asarray(Image.fromarray(m.numpy().astype(np.uint8)).resize((out_w, out_h), Image.NEAREST))
                         for m in masks])
    assert np.array_equal(resize_labels(masks, (out_h, out_w)).numpy(), expected)


@hsettings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.booleans())
def test_balanced_loss_is_the_mean_of_the_two_means(seed, balanced):
    rng = np.random.default_rng(seed)
    targets = torch.from_numpy(rng.choice([0, 1, 2, 255], size=(2, 5, 6))).long()
    logits = torch.from_numpy(rng.normal(size=(2, 3, 5, 6))).float()
    per_pixel = F.cross_entropy(logits, targets, ignore_index=255, reduction="none")
    groups = [targets == 0, (targets != 0) & (targets != 255)] if balanced else [targets != 255]
    means = [per_pixel[g].mean() for g in groups if g.any()]
    expected = torch.stack(means).mean() if means else torch.tensor(0.0)
    assert torch.allclose(pixel_loss(logits, targets, balanced), expected, atol=1e-6)


def test_predict_logits_shapes_and_single_scale():
    net = build_segmenter("synth", 4).eval()
    images = torch.randn(2, 3, 37, 50)
    assert predict_logits(net, images, (1.0, 0.5, 0.75), flip=True).shape == (2, 4, 37, 50)
    with torch.no_grad():
        direct = F.interpolate(net(images), size=(37, 50), mode="bilinear", align_corners=False)
    assert torch.allclose(predict_logits(net, images, (1.0,), fuse="mean"), direct)


DDP = textwrap.dedent("""
    import os, sys
    from qaclims.segment import evaluate_segmenter, ground_truth_masks, train_segmenter
    from qaclims.settings import load_settings
    settings = load_settings(overrides={"data.run_dir": sys.argv[1], **%r})
    masks = ground_truth_masks(settings, "train") if os.environ["RANK"] == "0" else None
    import torch.distributed as dist
    dist.init_process_group("gloo")
    holder = [str(masks)]
    dist.broadcast_object_list(holder, 0)
    path = train_segmenter(settings, holder[0], seed=0, progress=False, iterations=2, batch_size=2, crop_size=48,
                           init="none")
    metrics = evaluate_segmenter(settings, path, progress=False)
    with open(f"{sys.argv[1]}.rank{os.environ['RANK']}", "w") as out:
        out.write(f"final {path}\\nmiou {metrics['miou']}\\n")
""" % TINY_SETTINGS)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="torchrun not installed")
def test_torchrun_two_cpu_processes(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    script = tmp_path / "ddp.py"
    script.write_text(DDP)
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split(" ", 1) for rank in (0, 1) for line in Path(f"{tmp_path / 'runs'}.rank{rank}").read_text().splitlines()]
    finals, mious = {v for k, v in lines if k == "final"}, {v for k, v in lines if k == "miou"}
    assert len(finals) == 1 and len(mious) == 1  # both ranks agree
    final = Path(finals.pop())
    assert read_json(final.parent / "manifest.json")["world_size"] == 2
    alone = evaluate_segmenter(tiny_settings(tmp_path / "runs"), final, progress=False, out_dir=tmp_path / "alone")
    assert np.isclose(alone["miou"], float(mious.pop()))  # the sharded confusion sums to the whole
