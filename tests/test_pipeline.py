"""The whole chain on a tiny SynthWorld (qaclims.pipeline.run_refinement_pipeline): CAMs -> IR labels -> IRN -> pseudo
masks (scored on val, made for the training images) -> segmenter (scored on test); a second call does no work; CAM
files of another image size and a missing CRF library are clear errors. Then the CLI's `refine`, `segment` and
`pipeline --refine` (run in this process) on the same run directory: they find that chain done, or do only what
their options add."""
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from qaclims.cli import main
from qaclims.make_cams import load_cam_file, make_cams
from qaclims.pipeline import REFINEMENT_STAGES, run_refinement_pipeline
from qaclims.profiles import profile_dataset
from qaclims.pseudo_masks import make_pseudo_masks
from qaclims.refine import MissingDependencyError
from qaclims.runs import read_json
from qaclims.segment import load_segmenter, masks_stage0_checkpoint, stage0_checkpoint
from qaclims.settings import load_settings
from qaclims.train_irn import make_ir_labels

# 16 training, 8 validation and 8 test images of 48 pixels; the profile's CAM recipe (3 steps here), a few steps of
# the rest. The CLI tests pass the same sizes and options, so that they find this chain done.
TINY_SETTINGS = {"synth.train_size": 16, "synth.val_size": 8, "synth.image_size": 48, "study.num_workers": 0}
TINY_IRN = {"epochs": 1, "batch_size": 8, "crop_size": 48}
TINY_SEGMENT = {"iterations": 4, "batch_size": 4, "crop_size": 48, "checkpoint_every": 2}


def tiny_settings(run_dir):
    return load_settings(overrides={"data.run_dir": str(run_dir), **TINY_SETTINGS})


def stage_files(run_dir) -> dict:
    "Every file of the run directory but the CAM and pseudo-mask scores (recomputed on every call: cheap)."
    return {p: p.stat().st_mtime_ns for p in Path(run_dir).rglob("*") if p.is_file() and "metrics" not in p.parts}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    "The baseline's whole chain on the tiny world: (settings, result)."
    settings = tiny_settings(tmp_path_factory.mktemp("runs"))
    result = run_refinement_pipeline(settings, "cam", progress=False, irn_overrides=TINY_IRN,
                                     segment_overrides=TINY_SEGMENT)
    return settings, result


def test_chain_from_cams_to_the_segmenter(chain, capsys):
    settings, result = chain
    assert set(REFINEMENT_STAGES) <= set(result["seconds"]) and {"train_cam", "make_cams"} <= set(result["seconds"])
    assert result["pseudo_split"] == result["split"] == "val" and result["seg_split"] == "test"
    assert 0 <= result["pseudo_miou"] <= 100 and 0 <= result["seg_miou"] <= 100 and result["seg_miou_crf"] is None
    val, train = profile_dataset(settings, "val"), profile_dataset(settings, "train")
    # pseudo masks of the scored split, from the same CAMs as the CAM score, with their metrics
    masks = read_json(Path(result["pseudo_masks_dir"]) / "manifest.json")
    assert masks["split"] == "val" and masks["inputs"]["cams_dir"] == result["cams_dir"]
    assert {p.stem for p in Path(result["pseudo_masks_dir"]).glob("*.png")} == set(val.ids)
    scores = read_json(Path(settings.data.run_dir) / "metrics" / f"pseudo_masks-{Path(result['pseudo_masks_dir']).name}"
                       / "metrics.json")
    assert scores["split"] == "val" and round(100 * scores["miou"], 2) == result["pseudo_miou"]
    # the IRN learnt from the training images' CAMs; the segmenter from their pseudo masks, starting at stage 0
    assert read_json(Path(result["train_cams_dir"]) / "manifest.json")["split"] == "train"
    assert read_json(Path(result["ir_labels_dir"]) / "manifest.json")["inputs"]["cams_dir"] == result["train_cams_dir"]
    assert read_json(Path(result["irn_checkpoint"]).parent / "manifest.json")["inputs"]["ir_labels_dir"] == result["ir_labels_dir"]
    train_masks = read_json(Path(result["train_masks_dir"]) / "manifest.json")
    assert train_masks["split"] == "train" and train_masks["inputs"]["irn_checkpoint"] == result["irn_checkpoint"]
    assert {p.stem for p in Path(result["train_masks_dir"]).glob("*.png")} == set(train.ids)
    segment = read_json(Path(result["segmenter_checkpoint"]).parent / "manifest.json")
    assert segment["inputs"]["masks_dir"] == result["train_masks_dir"] and segment["images"] == 16
    assert segment["inputs"]["cam_checkpoint"] == result["checkpoint"]  # the baseline is its own stage 0
    assert masks_stage0_checkpoint(result["train_masks_dir"]) == Path(result["checkpoint"])
    net, meta = load_segmenter(result["segmenter_checkpoint"])
    assert net.num_classes == 9 and meta["config"]["iterations"] == 4 and meta["config"]["init"] == "cam"
    seg = read_json(result["seg_metrics_file"])
    assert seg["split"] == "test" and seg["images"] == 8 and round(100 * seg["miou"], 2) == result["seg_miou"]

    # a second call finds every stage done: nothing is written, the same scores come back
    before = stage_files(settings.data.run_dir)
    capsys.readouterr()
    again = run_refinement_pipeline(settings, "cam", progress=False, irn_overrides=TINY_IRN,
                                    segment_overrides=TINY_SEGMENT)
    out = capsys.readouterr().out
    assert stage_files(settings.data.run_dir) == before
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in result.items() if k != "seconds"}
    for stage in ("train_cam", "make_cams", "make_ir_labels", "train_irn", "make_pseudo_masks", "train_segmenter"):
        assert f"{stage}: " in out and "nothing to do" in out, stage


def _resized_cam_file(path: Path, size: int) -> None:
    "Rewrite the CAM file at `path` as if made for images of `size` x `size` pixels."
    record = load_cam_file(path)
    k = len(record["keys"])
    np.savez_compressed(path, keys=record["keys"], cam=np.zeros((k, -(-size // 4), -(-size // 4)), np.float16),
                        high_res=np.zeros((k, size, size), np.float16))


def test_cam_files_of_another_image_size_are_clear_errors(chain, tmp_path):
    settings, result = chain
    for name in ("train_cams_dir", "cams_dir"):
        broken = Path(settings.data.run_dir) / "cams" / f"resized-{name}"  # another folder: another content key
        shutil.copytree(result[name], broken)
        first = sorted(broken.glob("*.npz"))[0]
        _resized_cam_file(first, 64)
        with pytest.raises(ValueError, match="another dataset or image size") as error:
            if name == "train_cams_dir":
                make_ir_labels(settings, broken, progress=False)
            else:
                make_pseudo_masks(settings, result["irn_checkpoint"], broken, progress=False)
        assert first.name in str(error.value) and "(64, 64)" in str(error.value) and "(48, 48)" in str(error.value)


def test_missing_crf_library_stops_before_any_work(tmp_path, monkeypatch):
    "Without pydensecrf2 (simulated: its modules blocked) the chain stops at once and says how to install it."
    for name in ("pydensecrf", "pydensecrf.densecrf"):
        monkeypatch.setitem(sys.modules, name, None)
    settings = tiny_settings(tmp_path / "runs")
    with pytest.raises(MissingDependencyError, match="stage 5.*pip install pydensecrf2"):
        run_refinement_pipeline(settings, "cam", progress=False, irn_overrides=TINY_IRN, segment_overrides=TINY_SEGMENT)
    assert not stage_files(tmp_path / "runs")  # not even stage 0 ran


def test_stage0_checkpoint_needs_a_manifest(chain, tmp_path):
    settings, result = chain
    assert stage0_checkpoint(result["checkpoint"]) == Path(result["checkpoint"])
    (tmp_path / "final.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        stage0_checkpoint(tmp_path / "final.pt")
    (tmp_path / "manifest.json").write_text('{"stage": "irn"}')
    with pytest.raises(ValueError, match="not a train_cam or train_ritc manifest"):
        stage0_checkpoint(tmp_path / "final.pt")


# ----- the CLI on the same run directory

def cli(capsys, settings, *args) -> tuple:
    "(exit code, stdout lines, stderr) of `qaclims ARGS` on the tiny world of `settings`, run in this process."
    sets = [f"data.run_dir={settings.data.run_dir}"] + [f"{k}={v}" for k, v in TINY_SETTINGS.items()]
    capsys.readouterr()
    code = main([str(a) for a in args] + [a for s in sets for a in ("--set", s)])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err


def scores(lines: list) -> list:
    "The score lines of the output (the stages also print what they found done)."
    return [line for line in lines if line.startswith("cam seed 0: ")]


def seconds(lines: list) -> str:
    return next(line for line in lines if line.startswith("seconds: "))


CHAIN = ["--method", "cam", "--no-progress", "--irn-set", "epochs=1", "--irn-set", "batch_size=8",
         "--irn-set", "crop_size=48"]
SEGMENT = ["--segment-set", "iterations=4", "--segment-set", "batch_size=4", "--segment-set", "crop_size=48",
           "--segment-set", "checkpoint_every=2"]


def test_cli_finds_the_chain_done_and_prints_its_scores(chain, capsys):
    settings, result = chain
    before = stage_files(settings.data.run_dir)
    cam_line = f"cam seed 0: CAM mIoU {result['cam_miou']:.2f} at 0.15"
    pseudo_line = (f"cam seed 0: pseudo-mask mIoU {result['pseudo_miou']:.2f} on val (IR labels 0.3 / 0.1, "
                   f"pseudo-mask background 0.2)")
    seg_line = f"cam seed 0: segmenter mIoU {result['seg_miou']:.2f} on test"
    code, lines, err = cli(capsys, settings, "refine", *CHAIN)
    assert code == 0, err
    assert scores(lines)[0].startswith(cam_line) and scores(lines)[1:] == [pseudo_line]
    assert lines[-2:] == [f"pseudo masks (val): {result['pseudo_masks_dir']}",
                          f"pseudo masks (training images): {result['train_masks_dir']}"]
    for command in (["segment"], ["pipeline", "--refine"]):
        code, lines, err = cli(capsys, settings, *command, *CHAIN, *SEGMENT)
        assert code == 0, err
        assert scores(lines)[0].startswith(cam_line) and scores(lines)[1:] == [pseudo_line, seg_line]
        assert lines[-1] == result["seg_metrics_file"]
    assert stage_files(settings.data.run_dir) == before  # no work: every stage was done


def test_cli_segment_trains_only_the_segmenter(chain, capsys):
    settings, result = chain
    before = stage_files(settings.data.run_dir)
    code, lines, err = cli(capsys, settings, "segment", *CHAIN, *SEGMENT[:-2], "--segment-set", "iterations=1", "--crf")
    assert code == 0, err
    assert scores(lines)[2].startswith("cam seed 0: segmenter mIoU") and scores(lines)[2].endswith("with the CRF")
    new = set(stage_files(settings.data.run_dir)) - set(before)
    checkpoint = Path(read_json(lines[-1])["checkpoint"])
    assert checkpoint != Path(result["segmenter_checkpoint"]) and read_json(lines[-1])["crf"] is False
    assert new and all(p.relative_to(settings.data.run_dir).parts[0] == "segment" for p in new)
    assert len(list(checkpoint.parent.glob("eval-test-crf-*/metrics.json"))) == 1


def test_cli_refine_with_fewer_images_from_a_given_network(chain, capsys):
    settings, result = chain
    code, lines, err = cli(capsys, settings, "refine", *CHAIN, "--images", "8", "--checkpoint", result["checkpoint"])
    assert code == 0, err
    assert "train_cam" not in seconds(lines) and "make_cams_train" in seconds(lines)  # a given network: no stage 0-2
    train_masks = Path(lines[-1].split(": ", 1)[1])
    assert train_masks != Path(result["train_masks_dir"]) and len(list(train_masks.glob("*.png"))) == 8
    assert read_json(train_masks / "manifest.json")["images"] == 8


def test_cli_refine_with_calibrated_thresholds(chain, capsys):
    settings, result = chain
    best = result["best_threshold"]
    code, lines, err = cli(capsys, settings, "refine", *CHAIN, "--calibrate-thresholds")
    assert code == 0, err
    rw_bg = round(min(0.2 * best / 0.15, 0.95), 4)
    assert scores(lines)[1].endswith(f"(IR labels 0.3 / 0.1, pseudo-mask background {rw_bg:.3g})"), lines
    train_masks = Path(lines[-1].split(": ", 1)[1])
    assert read_json(train_masks / "manifest.json")["bg_threshold"] == rw_bg
    if best != 0.15:
        assert train_masks != Path(result["train_masks_dir"])


def test_cli_errors_are_clear(chain, capsys, monkeypatch):
    settings, _ = chain
    code, _, err = cli(capsys, settings, "refine", *CHAIN, "--irn-set", "learning_rate=0.1")
    assert code == 2 and "unknown IrnTrainConfig field(s) learning_rate" in err
    code, _, err = cli(capsys, settings, "pipeline", "--method", "cam", "--crf")
    assert code == 2 and "--crf belong(s) to stages 5-6: add --refine" in err
    code, _, err = cli(capsys, settings, "pipeline", "--method", "cam", "--calibrate-thresholds")
    assert code == 2 and "--calibrate-thresholds belong(s) to stages 5-6: add --refine" in err
    for name in ("pydensecrf", "pydensecrf.densecrf"):
        monkeypatch.setitem(sys.modules, name, None)
    for command in ("refine", "segment"):
        code, lines, err = cli(capsys, settings, command, *CHAIN)
        assert code == 2 and not lines and "pip install pydensecrf2" in err and "Traceback" not in err


def test_channels_last_runs_every_network_of_the_chain(chain, tmp_path):
    """[study] channels_last = true: the CAMs of the chain's network equal the default layout's up to rounding, and
    the whole chain (every network NHWC) runs. Trained networks are not compared: float32 gradients of these small
    networks differ from float64 ones by several percent in either layout, so a few steps already part them."""
    settings, result = chain
    fast = load_settings(overrides={"data.run_dir": str(tmp_path), **TINY_SETTINGS, "study.channels_last": "true"})
    cams = make_cams(fast, result["checkpoint"], "val", progress=False)
    for image_id in profile_dataset(settings, "val").ids:
        plain = load_cam_file(Path(result["cams_dir"]) / f"{image_id}.npz")
        nhwc = load_cam_file(Path(cams) / f"{image_id}.npz")
        assert np.array_equal(plain["keys"], nhwc["keys"])
        assert np.allclose(plain["high_res"], nhwc["high_res"], atol=2e-3), image_id  # float16 files
    again = run_refinement_pipeline(fast, "cam", progress=False, irn_overrides=TINY_IRN, segment_overrides=TINY_SEGMENT)
    assert set(again["seconds"]) == set(result["seconds"])
    assert again["pseudo_miou"] is not None and again["seg_miou"] is not None
