"""Stage 3 (qaclims.make_cams): multi-scale CAMs of a tiny SynthWorld split, float16 storage, resume after SIGKILL."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from qaclims.camnet import CamNet
from qaclims.eval_cams import cam_samples, score_cams
from qaclims.make_cams import (bytes_per_image, cams_for_image, load_cam_file, make_cams, multiscale_cams,
                               save_cam_file, strided_size)
from qaclims.settings import load_settings
from qaclims.profiles import profile_dataset
from qaclims.train_cam import load_cam_net, save_cam_net
from qaclims.transforms import inference_views

TINY_SETTINGS = {"synth.image_size": 48, "synth.val_size": 6, "study.num_workers": 0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Settings of a tiny world and a random-weight ResNet-18 checkpoint (output stride 32: cheap, and the image size
    is then not a multiple of the stride, which exercises the reference's upsample-then-crop)."""
    run_dir = tmp_path_factory.mktemp("runs")
    settings = load_settings(overrides={"data.run_dir": str(run_dir), **TINY_SETTINGS})
    torch.manual_seed(0)
    checkpoint = save_cam_net(run_dir / "random.pt", CamNet(8, "resnet18", 32, bn="train"), seed=5)
    return settings, checkpoint


def test_cam_files_hold_the_reference_recipe(tiny):
    settings, checkpoint = tiny
    folder = make_cams(settings, checkpoint, "val", progress=False, batch_size=3)
    dataset = profile_dataset(settings, "val")
    net = load_cam_net(checkpoint)
    for index in range(len(dataset)):
        sample = dataset[index]
        record = load_cam_file(folder / f"{sample['id']}.npz", size=(48, 48))
        assert record["keys"].tolist() == sample["labels"].tolist()
        assert record["cam"].shape == (len(sample["labels"]), *strided_size(48, 48)) == (len(sample["labels"]), 12, 12)
        # one image alone, float32, straight from the network: equal up to float16 rounding
        views = [v[None] for v in inference_views({"image": sample["image"]})["views"]]
        strided, high_res = multiscale_cams(net, views, (48, 48))
        expected = cams_for_image(strided[0], high_res[0], sample["labels"])
        assert np.abs(record["high_res"] - expected["high_res"]).max() <= 2.5e-4  # half a float16 step below 1
        assert np.abs(record["cam"] - expected["cam"]).max() <= 2.5e-4
        assert np.allclose(record["high_res"].max(axis=(1, 2)), 1, atol=1e-3)
    assert {p.name for p in folder.iterdir()} == {f"{i}.npz" for i in dataset.ids} | {"manifest.json", "done.json"}


def test_float16_storage_round_trip_and_miou(tiny, tmp_path):
    settings, checkpoint = tiny
    folder16 = make_cams(settings, checkpoint, "val", progress=False)
    folder32 = make_cams(settings, checkpoint, "val", progress=False, dtype=np.float32)
    assert folder16 != folder32
    dataset = profile_dataset(settings, "val")
    for name in dataset.ids:
        a, b = load_cam_file(folder16 / f"{name}.npz"), load_cam_file(folder32 / f"{name}.npz")
        assert np.array_equal(a["high_res"], b["high_res"].astype(np.float16).astype(np.float32))
    names = dataset.class_names
    m16 = np.array(score_cams(cam_samples(folder16, dataset), names)["miou"])
    m32 = np.array(score_cams(cam_samples(folder32, dataset), names)["miou"])
    assert np.abs(m16 - m32).max() < 5e-3
    sizes = bytes_per_image(load_cam_file(folder32 / f"{dataset.ids[0]}.npz"))
    assert sizes["float16 .npz"] < sizes["float32 .npy dict"]
    # file round trip: values exactly representable in float16 come back unchanged
    exact = {"keys": np.array([2]), "cam": np.full((1, 3, 3), 0.5, np.float32), "high_res": np.linspace(0, 1, 9, dtype=np.float32).reshape(1, 3, 3)}
    back = load_cam_file(save_cam_file(tmp_path / "x.npz", exact))
    assert np.array_equal(back["high_res"], exact["high_res"]) and back["keys"].tolist() == [2]


# make_cams on the tiny world; every file written prints its name and pauses, so the test can kill it mid-run
RUN = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from qaclims import make_cams as stage
    from qaclims.settings import load_settings
    run_dir, checkpoint, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
    save = stage.save_cam_file
    def slow_save(path, cams, dtype):
        out = save(path, cams, dtype)
        print(f"saved {path.name}", flush=True)
        time.sleep(pause)
        return out
    stage.save_cam_file = slow_save
    settings = load_settings(overrides={"data.run_dir": run_dir, **%r})
    print(f"folder {stage.make_cams(settings, checkpoint, 'val', progress=False, batch_size=1)}", flush=True)
""" % TINY_SETTINGS)


def run_make_cams(run_dir, checkpoint, pause=0.0):
    done = subprocess.run([sys.executable, "-c", RUN, str(run_dir), str(checkpoint), str(pause)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_killed_inference_resumes_without_partial_files(tiny, tmp_path):
    _, checkpoint = tiny
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess, so that the CAMs are bit for bit comparable
    try:
        straight_dir = make_cams(load_settings(overrides={"data.run_dir": str(tmp_path / "straight"), **TINY_SETTINGS}),
                                 checkpoint, "val", progress=False, batch_size=1)
    finally:
        torch.set_num_threads(threads)
    process = subprocess.Popen([sys.executable, "-c", RUN, str(tmp_path / "killed"), str(checkpoint), "0.3"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    saved = 0
    for line in process.stdout:
        saved += line.startswith("saved")
        if saved == 3:
            os.kill(process.pid, signal.SIGKILL)
            break
    process.wait()
    killed_dir = tmp_path / "killed" / "cams" / straight_dir.name
    files = sorted(killed_dir.glob("*.npz"))
    assert 3 <= len(files) < 6 and not (killed_dir / "done.json").exists()
    for path in files:  # every file present is complete
        load_cam_file(path)
    resumed = run_make_cams(tmp_path / "killed", checkpoint)
    assert resumed.count("saved") == 6 - len(files)  # only the missing images were made
    assert not list(killed_dir.glob(".*.tmp")) and (killed_dir / "done.json").exists()
    for path in straight_dir.glob("*.npz"):
        a, b = load_cam_file(path), load_cam_file(killed_dir / path.name)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_bad_input(tiny, tmp_path):
    settings, checkpoint = tiny
    with pytest.raises(FileNotFoundError, match="train-cam"):
        make_cams(settings, tmp_path / "missing.pt", "val", progress=False)
    with pytest.raises(FileNotFoundError, match="make-cams"):
        load_cam_file(tmp_path / "nothing.npz")
    with pytest.raises(ValueError, match="class ids"):
        cams_for_image(torch.zeros(8, 2, 2), torch.zeros(8, 4, 4), [9])
