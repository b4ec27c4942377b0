"""Stage 5a/5b (qaclims.train_irn): IR labels of a tiny SynthWorld split, IRN training killed with SIGKILL and resumed
to the same weights, the content-keyed cache, torchrun with 2 CPU processes, and bad input."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from qaclims.camnet import CamNet
from qaclims.make_cams import load_cam_file, make_cams
from qaclims.profiles import profile_dataset
from qaclims.refine import ir_labels
from qaclims.runs import read_json
from qaclims.settings import load_settings
from qaclims.train_cam import save_cam_net
from qaclims.train_irn import (IrLabelSet, IrnTrainView, irn_key, irn_train_config, load_irn_net, load_label_map,
                               make_ir_labels, save_irn_net, train_irn)
from qaclims.irn import Irn
from killing import kill_at_step, last_step, one_thread, pausing_script, run_to_end, same_weights

TINY_SETTINGS = {"synth.image_size": 48, "synth.train_size": 16, "synth.val_size": 8, "study.num_workers": 0}
# 4 steps per epoch, 12 in all, on 48-pixel crops (12 x 12 at stride 4) with radius 3; output stride 32 (as the CAM
# network of the fixture) keeps the steps cheap (the loop does not depend on it)
TINY_CONFIG = dict(epochs=3, batch_size=4, checkpoint_every=1, crop_size=48, radius=3, output_stride=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "Settings of a tiny world, a random-weight CAM checkpoint, its CAMs of the training split and their IR labels."
    run_dir = tmp_path_factory.mktemp("runs")
    settings = load_settings(overrides={"data.run_dir": str(run_dir), **TINY_SETTINGS})
    torch.manual_seed(0)
    checkpoint = save_cam_net(run_dir / "random.pt", CamNet(8, "resnet18", 32, bn="train"), seed=0)
    cams_dir = make_cams(settings, checkpoint, "train", scales=(1.0,), progress=False)
    return settings, checkpoint, cams_dir, make_ir_labels(settings, cams_dir, progress=False)


# train_irn on the tiny config, in a process that the test can kill mid-run: RUN RUN_DIR IR_LABELS_DIR
RUN = pausing_script("""
    from qaclims.settings import load_settings
    from qaclims.train_irn import train_irn
    settings = load_settings(overrides={"data.run_dir": ARGS[0], **%r})
    print(f"final {train_irn(settings, ARGS[1], seed=3, progress=False, **%r)}", flush=True)
""" % (TINY_SETTINGS, TINY_CONFIG))


def test_ir_labels_are_the_refine_recipe_per_image(tiny):
    settings, _, cams_dir, ir_dir = tiny
    dataset = profile_dataset(settings, "train")
    assert {p.name for p in ir_dir.iterdir()} == {f"{i}.png" for i in dataset.ids} | {"manifest.json", "done.json"}
    for index in (0, 7, 15):
        sample = dataset[index]
        expected = ir_labels(sample["image"], load_cam_file(cams_dir / f"{sample['id']}.npz"))
        assert np.array_equal(load_label_map(ir_dir / f"{sample['id']}.png", (48, 48)), expected)
    record = read_json(ir_dir / "manifest.json")
    assert record["split"] == "train" and record["images"] == 16 and record["fg_threshold"] == 0.3
    assert record["inputs"]["cams_dir"] == str(cams_dir)


def test_training_view_matches_the_reference_augmentation(tiny):
    settings, _, _, ir_dir = tiny
    sample = IrLabelSet(profile_dataset(settings, "train"), ir_dir, 16)[2]
    rng = lambda: np.random.default_rng(7)
    view = IrnTrainView(48)(sample, rng())
    again = IrnTrainView(48)(sample, rng())
    assert torch.equal(view["image"], again["image"]) and torch.equal(view["label_map"], again["label_map"])
    assert view["image"].shape == (3, 48, 48) and view["label_map"].shape == (12, 12)
    assert set(view["label_map"].unique().tolist()) <= set(np.unique(sample["ir_label"]).tolist()) | {255}
    # no rescale and no flip: the labels are the IR labels at every fourth pixel of the crop
    plain = IrnTrainView(48, rescale=(1.0, 1.0), flip=False)(sample, rng())
    assert torch.equal(plain["label_map"], torch.from_numpy(sample["ir_label"][::4, ::4].astype(np.int64)))


def test_killed_training_resumes_to_the_same_weights(tiny, tmp_path):
    settings, _, _, ir_dir = tiny
    straight = one_thread(train_irn, settings.with_overrides({"data.run_dir": str(tmp_path / "straight")}), ir_dir,
                          seed=3, progress=False, **TINY_CONFIG)
    kill_at_step(RUN, tmp_path / "killed", ir_dir, step=6)  # step 6 is in the middle of the second epoch
    assert 6 <= last_step(next((tmp_path / "killed" / "irn").iterdir())) < 12
    resumed = run_to_end(RUN, tmp_path / "killed", ir_dir)
    assert resumed.parent.name == straight.parent.name  # same content key
    assert same_weights(straight, resumed)
    assert not (resumed.parent / "last.pt").exists()
    record = read_json(resumed.parent / "manifest.json")
    assert record["seed"] == 3 and record["steps"] == 12 and set(record["final_loss"]) >= {"loss", "neg", "dp_fg"}


def test_finished_run_is_cached_and_keyed_by_content(tiny, capsys):
    settings, checkpoint, _, ir_dir = tiny
    config = dict(epochs=1, batch_size=8, crop_size=48, radius=3, output_stride=32)
    first = train_irn(settings, ir_dir, seed=0, progress=False, **config)
    stamp = first.stat().st_mtime_ns
    capsys.readouterr()
    assert train_irn(settings, ir_dir, seed=0, progress=False, **config) == first
    assert first.stat().st_mtime_ns == stamp and "nothing to do" in capsys.readouterr().out
    net = load_irn_net(first)
    assert isinstance(net, Irn) and not net.training and net.resnet.arch == "resnet18" and net.resnet.output_stride == 32
    cam = torch.load(checkpoint, weights_only=True)["model"]
    assert all(torch.equal(v, cam[f"resnet.{k}"]) for k, v in net.resnet.state_dict().items())  # the frozen CAM backbone
    backbone = str(checkpoint)
    key = irn_key(ir_dir, irn_train_config(settings, **config), 0, backbone)
    assert key == first.parent.name and irn_key(ir_dir, irn_train_config(settings, **config), 1, backbone) != key
    assert irn_key(ir_dir, irn_train_config(settings, **config, lr=0.01), 0, backbone) != key
    scratch = train_irn(settings, ir_dir, seed=0, progress=False, backbone_weights="none", **config)
    assert scratch.parent != first.parent and read_json(scratch.parent / "manifest.json")["inputs"]["backbone"] == "none"


def test_bad_input(tiny, tmp_path):
    settings, checkpoint, cams_dir, ir_dir = tiny
    unfinished = tmp_path / "cams" / "half"
    unfinished.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="qaclims make-cams"):
        make_ir_labels(settings, unfinished)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_ir_labels(settings, tmp_path / "nothing")
    with pytest.raises(ValueError, match="not 'val'"):
        make_ir_labels(settings, cams_dir, split="val")
    broken = tmp_path / "cams" / "broken"
    shutil.copytree(cams_dir, broken)
    first = sorted(broken.glob("*.npz"))[0]
    record = load_cam_file(first)
    record["high_res"][0, 3, 3] = np.nan
    np.savez_compressed(first, **record)
    with pytest.raises(ValueError, match="NaN") as error:
        make_ir_labels(settings, broken, progress=False)
    assert first.name in str(error.value)
    with pytest.raises(FileNotFoundError, match="qaclims refine"):
        train_irn(settings, unfinished, progress=False)
    with pytest.raises(ValueError, match="unknown IrnTrainConfig field"):
        irn_train_config(settings, learning_rate=0.1)
    with pytest.raises(ValueError, match="too small for radius"):
        irn_train_config(settings, crop_size=32, radius=5)
    with pytest.raises(ValueError, match="no full batch"):
        train_irn(settings, ir_dir, progress=False, batch_size=64, crop_size=48, radius=3, output_stride=32)
    with pytest.raises(FileNotFoundError, match="train it first"):
        load_irn_net(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not an IRN checkpoint"):
        load_irn_net(checkpoint)
    save_irn_net(tmp_path / "irn.pt", Irn("resnet18", 8))
    assert isinstance(load_irn_net(tmp_path / "irn.pt"), Irn)


DDP = textwrap.dedent("""
    import os
    import sys
    from qaclims.settings import load_settings
    from qaclims.train_irn import make_ir_labels, train_irn
    settings = load_settings(overrides={"data.run_dir": sys.argv[1], **%r})
    ir_dir = make_ir_labels(settings, sys.argv[2], progress=False)
    path = train_irn(settings, ir_dir, seed=0, progress=False, epochs=2, batch_size=4, checkpoint_every=2, crop_size=48, radius=3,
                     output_stride=32)
    with open(f"{sys.argv[1]}.rank{os.environ['RANK']}", "w") as out:
        out.write(f"final {path}\\nir {ir_dir}\\n")
""" % TINY_SETTINGS)


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="torchrun not installed")
def test_torchrun_two_cpu_processes(tiny, tmp_path):
    settings, _, cams_dir, ir_dir = tiny
    torchrun = str(Path(sys.executable).parent / "torchrun")
    script = tmp_path / "ddp.py"
    script.write_text(DDP)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "runs"), str(cams_dir)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split(" ", 1) for rank in (0, 1) for line in Path(f"{tmp_path / 'runs'}.rank{rank}").read_text().splitlines()]
    finals, irs = {Path(v) for k, v in lines if k == "final"}, {Path(v) for k, v in lines if k == "ir"}
    assert len(finals) == 1 and len(irs) == 1  # both ranks agree
    final, ddp_ir = finals.pop(), irs.pop()
    assert ddp_ir.name == ir_dir.name  # same content key as one process
    for name in (p.name for p in ir_dir.glob("*.png")):  # the shards together are the one-process labels
        assert np.array_equal(load_label_map(ddp_ir / name), load_label_map(ir_dir / name))
    record = read_json(final.parent / "manifest.json")
    assert record["world_size"] == 2 and record["steps"] == 8  # 16 images, global batch 4, 2 epochs
    assert read_json(ddp_ir / "manifest.json")["world_size"] == 2
