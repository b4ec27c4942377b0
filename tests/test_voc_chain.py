"""The chain in the paper's VOC profile: QAPE -> text features -> stage 0 -> RITC (QA-CLIMS and CLIMS) -> CAMs ->
CAM mIoU, through the functions behind the CLI's subcommands (and the CLI itself for some stages); then, from the
QA-CLIMS network, IR labels -> IRN -> pseudo masks (scored on VOC train) -> DeepLabV2-ResNet-101 (scored on VOC val).

The default test runs it on the fixture VOC tree with random-weight models of the real kinds (a BLIP VQA model saved
as a transformers folder, an open_clip ViT saved as a checkpoint file plus an OV-Seg-layout mask checkpoint, a
torchvision ResNet); the `data` test runs the same chain on real VOC with CLIP ViT-L/14 (OpenAI) and BLIP
(Salesforce/blip-vqa-capfilt-large) from the settings file, on a few images.
"""
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from transformers import BertTokenizerFast, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

import qaclims.answers as answers_module
from qaclims.answers import answer_split, answers_dir, load_answers, read_records, text_feature_cache
from qaclims.classes import VOC_CLASSES
from qaclims.cli import main
from qaclims.eval_cams import evaluate_cams, metrics_dir
from qaclims.make_cams import load_cam_file, make_cams
from qaclims.pipeline import pseudo_mask_stages, segmenter_stage
from qaclims.profiles import profile_dataset
from qaclims.qape import BG_QUESTIONS, FG_QUESTIONS
from qaclims.runs import read_json
from qaclims.segment import load_segmenter
from qaclims.settings import load_settings
from qaclims.train_cam import load_cam_net, train_cam
from qaclims.train_irn import load_label_map
from qaclims.train_ritc import ritc_config, texts_digest, train_ritc
from qaclims.vlm import OVSEG_CLIP_PREFIX, MaskPromptViT, TextFeatureCache, from_settings, mask_prompted_from

REPO = Path(__file__).resolve().parents[1]
CLIP_MODEL = "ViT-S-32-alt"  # a small open_clip ViT (224 x 224, patch 32): the ViT-L/14 code path at a CPU's cost
QUESTION_WORDS = ("what kind type of is in the photo this also called usually another word name for above under "
                  "behind around next to left right side scene environment place").split()
ANSWER_WORDS = "a an the water sky road grass table room street field tree sea rails wall floor".split()
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
         + sorted(set(QUESTION_WORDS + ANSWER_WORDS + [w for name in VOC_CLASSES for w in name.split()]))
         + ["?", "[DEC]", "[ENC]"])


# ----- random-weight models of the real kinds, written where the settings point

def write_blip_folder(folder: Path, seed: int = 0) -> Path:
    """A random BLIP VQA model and its BlipProcessor (BERT WordPiece tokenizer over a tiny vocabulary), saved as a
    transformers folder: what `[models] vqa_model` names. Its vision tower takes 480 x 480 images (patch 32)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder.parent / "blip-vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast(str(vocab_file), bos_token="[DEC]", additional_special_tokens=["[ENC]"])
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(vocab_size=len(VOCAB), bos_token_id=VOCAB.index("[DEC]"), pad_token_id=0, sep_token_id=3,
                eos_token_id=3, encoder_hidden_size=32, **small)
    torch.manual_seed(seed)
    model = BlipForQuestionAnswering(BlipConfig(vision_config=dict(image_size=480, patch_size=32, **small),
                                                text_config=text)).eval()
    model.save_pretrained(folder)
    BlipProcessor(BlipImageProcessor(), tokenizer).save_pretrained(folder)
    return folder


def write_clip_files(folder: Path, seed: int = 0) -> tuple:
    """(plain, mask): a random `CLIP_MODEL` checkpoint file (`[models] clip_pretrained`) and the same CLIP with a
    random mask embedding in OV-Seg's checkpoint layout (`[models] clip_mask_checkpoint`)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    source = open_clip.create_model(CLIP_MODEL, pretrained=None, quick_gelu=True).eval()
    plain = folder / "clip-vit-s-32.pt"
    torch.save(source.state_dict(), plain)
    source.visual = mask_prompted_from(source.visual)
    with torch.no_grad():
        source.visual.mask_embedding.normal_(0.0, 0.5)
    mask = folder / "ovseg-vit-s-32.pth"
    torch.save({"model": {OVSEG_CLIP_PREFIX + k: v for k, v in source.state_dict().items()}, "iteration": 1}, mask)
    return plain, mask


# ----- the chain

def run_cli(capsys, *args) -> list:
    "Run `qaclims ARGS` in this process; its stdout lines (the exit code must be 0)."
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.strip().splitlines()


def run_chain(capsys, settings_file: Path, sets: list, stage0: dict, ritc: dict, eval_split: str = "train",
              clims_sets: tuple = ()) -> dict:
    """Every CAM stage once, as `qaclims` runs them; returns what each made.

    QAPE and the text features via `qaclims qape` (CLI), stage 0 and RITC via `train_cam` / `train_ritc` (the
    functions behind `train-cam` / `train-ritc`, with small configs the CLI does not expose), the QA-CLIMS CAMs
    via `qaclims make-cams` / `eval-cams`, the baseline's and CLIMS's via `make_cams` / `evaluate_cams`.
    clims_sets: extra overrides for the CLIMS run (e.g. no mask checkpoint).
    """
    settings = load_settings(settings_file, sets)
    options = ["--settings", settings_file] + [a for s in sets for a in ("--set", s)]
    lines = run_cli(capsys, "qape", *options, "--split", "train_aug", "--no-progress")
    out = {"settings": settings, "options": options,
           "answers": Path(lines[0].removeprefix("answers: ")), "text_features": Path(lines[1].removeprefix("text features: "))}
    out["stage0"] = train_cam(settings, seed=0, progress=False, **stage0)
    out["qaclims"] = train_ritc(settings, seed=0, method="qaclims", cam_checkpoint=out["stage0"], progress=False, **ritc)
    clims_settings = settings.with_overrides(list(clims_sets))
    out["clims_settings"] = clims_settings
    out["clims"] = train_ritc(clims_settings, seed=0, method="clims", cam_checkpoint=out["stage0"], progress=False, **ritc)
    cams_options = ["--split", eval_split, "--no-progress"]
    out["cams"], out["metrics"] = {}, {}
    lines = run_cli(capsys, "make-cams", *options, "--checkpoint", out["qaclims"], *cams_options)
    out["cams"]["qaclims"] = Path(lines[-1])
    lines = run_cli(capsys, "eval-cams", *options, "--checkpoint", out["qaclims"], *cams_options)
    out["metrics"]["qaclims"] = read_json(Path(lines[-1]))
    for name in ("stage0", "clims"):
        out["cams"][name] = make_cams(settings, out[name], eval_split, progress=False)
        out["metrics"][name] = evaluate_cams(settings, out["cams"][name], eval_split)
    return out


def check_manifest(folder: Path, stage: str, split: str | None, profile: str = "voc") -> dict:
    "The stage manifest in `folder`, checked to say what made it: stage, seed, commit, settings, split."
    record = read_json(folder / "manifest.json")
    assert record["stage"] == stage and record["seed"] == 0 and record["commit"]
    assert record["settings"]["study"]["profile"] == profile
    if split is not None:
        assert record["split"] == split
    return record


def check_chain(out: dict, eval_split: str) -> None:
    "What every run of the chain must show, whatever the models."
    settings = out["settings"]
    answers = check_manifest(out["answers"], "answers", "train_aug")
    train_aug = profile_dataset(settings, "train_aug")
    assert answers["images"] == len(train_aug) and answers["answerer"]["name"] == "blip"
    records = read_records(out["answers"])
    pairs = sum(len(train_aug.labels(i)) for i in range(len(train_aug)))
    assert len(records) == pairs * (len(FG_QUESTIONS) + len(BG_QUESTIONS))
    assert {r["class"] for r in records} <= set(VOC_CLASSES) and all(isinstance(r["answer"], str) for r in records)
    check_manifest(out["text_features"].parent, "text_features", "train_aug")
    stage0 = check_manifest(out["stage0"].parent, "cam", "train_aug")
    assert load_cam_net(out["stage0"]).num_classes == 20 and np.isfinite(stage0["final_loss"])
    for method in ("qaclims", "clims"):
        record = check_manifest(out[method].parent, "ritc", "train_aug")
        assert record["method"] == method and record["inputs"]["cam_checkpoint"] == str(out["stage0"])
        assert all(np.isfinite(v) for k, v in record["final_losses"].items() if k not in ("pairs", "skipped"))
    for name, cams in out["cams"].items():
        cams_record = check_manifest(cams, "cams", eval_split)
        metrics = out["metrics"][name]
        assert metrics["split"] == eval_split and metrics["seed"] == 0 and metrics["commit"]
        assert metrics["settings"]["study"]["profile"] == "voc" and metrics["images"] == cams_record["images"]
        assert metrics["class_names"] == ["background"] + list(VOC_CLASSES) and len(metrics["per_class"][0]) == 21
        assert 0.0 <= metrics["miou_at_reference"] <= 1.0 and len(metrics["per_class_at_reference"]) == 21
        assert (metrics_dir(settings, cams) / "sweep.csv").is_file()
    for index, sample in enumerate(profile_dataset(settings, eval_split)):
        if index == out["metrics"]["qaclims"]["images"]:
            break
        record = load_cam_file(out["cams"]["qaclims"] / f"{sample['id']}.npz", size=sample["mask"].shape)
        assert record["keys"].tolist() == sample["labels"].tolist()


# ----- default run: the fixture VOC tree and random-weight models

@pytest.fixture(scope="module")
def fixture_chain(tmp_path_factory):
    "A study folder: the fixture VOC tree, the random models and a settings.ini that names them with relative paths."
    from qaclims.fixtures import make_voc_tree
    root = tmp_path_factory.mktemp("study")
    tree = make_voc_tree(root / "data")
    write_blip_folder(root / "weights" / "blip-vqa")
    write_clip_files(root / "weights")
    settings_file = root / "settings.ini"
    settings_file.write_text(
        "[data]\nrun_dir = runs\nvoc_root = data/VOC2012\nsbd_root = data/SBD\n"
        f"[models]\nclip_model = {CLIP_MODEL}\nclip_pretrained = weights/clip-vit-s-32.pt\n"
        "clip_mask_checkpoint = weights/ovseg-vit-s-32.pth\nvqa_model = weights/blip-vqa\nbackbone_weights = none\n"
        "[study]\nprofile = synth\ndevice = cpu\nnum_workers = 2\n")
    assert Path(tree["voc_root"]) == root / "data" / "VOC2012"
    return {"root": root, "settings_file": settings_file, "tree": tree,
            "sets": ["study.profile=voc", "study.num_workers=0"]}


STAGE0 = dict(arch="resnet18", output_stride=32, epochs=1, batch_size=4, long_side=(48, 80), crop_size=64)
RITC = dict(epochs=1, batch_size=2, train_images=4, val_images=2, long_side=(48, 80), crop_size=64, clip_size=224)


def test_voc_chain_on_the_fixture_tree(fixture_chain, capsys, monkeypatch):
    study = fixture_chain
    out = run_chain(capsys, study["settings_file"], study["sets"], STAGE0, RITC, eval_split="train",
                    clims_sets=("models.clip_mask_checkpoint=",))
    study["out"] = out  # for the refinement test below
    check_chain(out, "train")
    settings = out["settings"]
    assert settings.study.profile == "voc" and out["answers"] == answers_dir(settings, "train_aug")
    assert out["answers"].parent.parent == study["root"] / "runs"  # run_dir relative to the settings file

    # stage 1: the BLIP folder answered every question; the text features hold every prompt, made by that CLIP
    answers = read_json(out["answers"] / "manifest.json")
    assert answers["answerer"]["model"] == str((study["root"] / "weights" / "blip-vqa").resolve())
    clip, tokenizer = from_settings(settings)
    assert isinstance(clip.visual, MaskPromptViT) and tuple(clip.visual.image_size) == (224, 224)
    cache = TextFeatureCache(clip, tokenizer, out["text_features"])  # refuses a file made by another text encoder
    prompts = load_answers(out["answers"], "train_aug")
    wanted = {t for p in prompts.values() for t in (p.label, *p.fg, *p.bg)}
    assert wanted <= set(cache.texts) and cache.features.shape[1] == clip.visual.output_dim
    assert {f"a photo of {name}." for name in VOC_CLASSES} <= set(cache.texts)

    # stage 2: the QAPE answers (all of train_aug, every group) and the stage's text features fed QA-CLIMS
    qa = read_json(out["qaclims"].parent / "manifest.json")
    config = ritc_config(settings, method="qaclims", **RITC)
    assert qa["inputs"]["texts"] == texts_digest(load_answers(out["answers"], "train_aug", groups=config.groups))
    assert qa["inputs"]["text_features"] == str(out["text_features"])
    assert qa["config"]["clip_size"] == 224 and qa["steps"] == 2  # 4 images, batch 2
    assert qa["settings"]["models"]["clip_mask_checkpoint"].endswith("ovseg-vit-s-32.pth")
    assert qa["final_losses"]["pairs"] > 0 and set(qa["final_losses"]) >= {"frc", "brc", "reg", "total"}
    clims = read_json(out["clims"].parent / "manifest.json")
    assert clims["settings"]["models"]["clip_mask_checkpoint"] == "" and clims["inputs"]["clip"] != qa["inputs"]["clip"]
    assert set(clims["final_losses"]) >= {"otm", "btm", "cbs", "reg"} and "text_features" not in clims["inputs"]
    weights = {m: load_cam_net(out[m]).state_dict() for m in ("stage0", "qaclims", "clims")}
    changed = lambda a, b: any(not torch.equal(weights[a][k], weights[b][k]) for k in weights[a])
    assert changed("stage0", "qaclims") and changed("stage0", "clims") and changed("qaclims", "clims")

    # stages 3-4: the CLI made and scored the QA-CLIMS CAMs of the run's checkpoint; VOC train has 5 images here
    assert out["metrics"]["qaclims"]["images"] == len(profile_dataset(settings, "train")) == 5
    assert out["metrics"]["qaclims"]["checkpoint"] == str(out["qaclims"])

    # a second run of every stage finds its artifacts and does nothing
    def snapshot():
        return {p: p.stat().st_mtime_ns for p in (study["root"] / "runs").rglob("*")
                if p.is_file() and "metrics" not in p.parts}

    before = snapshot()
    monkeypatch.setattr(answers_module, "answerer_from_settings",
                        lambda *args, **kwargs: pytest.fail("the finished QAPE stage loaded its VQA model again"))
    options = out["options"]
    lines = run_cli(capsys, "qape", *options, "--split", "train_aug", "--no-progress")
    assert lines == [f"answers: {out['answers']}", f"text features: {out['text_features']}"]
    assert answer_split(settings, "train_aug", progress=False) == out["answers"]
    assert text_feature_cache(settings, "train_aug") == out["text_features"]
    assert train_cam(settings, seed=0, progress=False, **STAGE0) == out["stage0"]
    assert "nothing to do" in capsys.readouterr().out
    assert train_ritc(settings, seed=0, method="qaclims", cam_checkpoint=out["stage0"], progress=False, **RITC) == out["qaclims"]
    assert train_ritc(out["clims_settings"], seed=0, method="clims", cam_checkpoint=out["stage0"], progress=False,
                      **RITC) == out["clims"]
    assert capsys.readouterr().out.count("nothing to do") == 2
    for name in ("stage0", "qaclims", "clims"):
        assert make_cams(settings, out[name], "train", progress=False) == out["cams"][name]
    assert capsys.readouterr().out.count("nothing to do") == 3
    lines = run_cli(capsys, "make-cams", *options, "--checkpoint", out["qaclims"], "--split", "train", "--no-progress")
    assert "nothing to do" in lines[0] and Path(lines[-1]) == out["cams"]["qaclims"]
    assert snapshot() == before
    again = evaluate_cams(settings, out["cams"]["clims"], "train")  # scoring is cheap: it runs again, same numbers
    assert again["miou"] == out["metrics"]["clims"]["miou"]
    assert np.array_equal(again["per_class"], out["metrics"]["clims"]["per_class"], equal_nan=True)  # NaN: absent classes


# stages 5-6 on VOC-sized images with small random networks: a ResNet-18 IRN, the paper's DeepLabV2-ResNet-101
IRN = dict(arch="resnet18", output_stride=32, epochs=1, batch_size=2, crop_size=64, radius=5)
SEGMENT = dict(iterations=1, batch_size=2, iter_size=1, crop_size=65, msc_scales=(), test_scales=(1.0,), checkpoint_every=1)


def test_voc_refinement_on_the_fixture_tree(fixture_chain, capsys):
    "IR labels, IRN and pseudo masks of train_aug from the QA-CLIMS network; pseudo masks scored on VOC train, the segmenter on val."
    study = fixture_chain
    out = study.get("out") or run_chain(capsys, study["settings_file"], study["sets"], STAGE0, RITC, eval_split="train",
                                        clims_sets=("models.clip_mask_checkpoint=",))
    settings = out["settings"]
    cams = out["cams"]["qaclims"]  # of VOC train, as the papers score CAMs and pseudo masks
    refined = pseudo_mask_stages(settings, out["qaclims"], cams, seed=0, progress=False, irn_overrides=IRN)
    segmented = segmenter_stage(settings, refined["train_masks_dir"], seed=0, progress=False, segment_overrides=SEGMENT)
    train_aug, train, val = (profile_dataset(settings, split) for split in ("train_aug", "train", "val"))
    assert refined["pseudo_split"] == "train" and 0 <= refined["pseudo_miou"] <= 100
    assert {p.stem for p in Path(refined["pseudo_masks_dir"]).glob("*.png")} == set(train.ids)
    assert {p.stem for p in Path(refined["train_masks_dir"]).glob("*.png")} == set(train_aug.ids)
    for folder, split in ((refined["ir_labels_dir"], "train_aug"), (refined["train_masks_dir"], "train_aug"),
                          (refined["pseudo_masks_dir"], "train")):
        assert read_json(Path(folder) / "manifest.json")["split"] == split
    for sample in train_aug:  # VOC images keep their own sizes through every stage (the size is checked)
        load_label_map(Path(refined["train_masks_dir"]) / f"{sample['id']}.png", sample["image"].shape[:2])
    net, meta = load_segmenter(segmented["segmenter_checkpoint"])
    assert net.name == "deeplabv2-resnet101" and net.num_classes == 21 and net.bn == "frozen"
    assert meta["class_names"] == ["background"] + list(VOC_CLASSES)
    metrics = read_json(segmented["seg_metrics_file"])
    assert segmented["seg_split"] == "val" and metrics["images"] == len(val) and len(metrics["per_class"]) == 21
    record = check_manifest(Path(segmented["segmenter_checkpoint"]).parent, "segment", None)
    assert record["inputs"]["masks_dir"] == refined["train_masks_dir"] and record["images"] == len(train_aug)

    # `qaclims segment` with the same options finds everything done and prints the same scores
    options = [*out["options"], "--method", "qaclims", "--split", "train", "--checkpoint", out["qaclims"], "--no-progress",
               *[a for k, v in IRN.items() for a in ("--irn-set", f"{k}={v}")],
               *[a for k, v in SEGMENT.items() for a in ("--segment-set", f"{k}={v}")]]
    lines = run_cli(capsys, "segment", *options)
    assert (f"qaclims seed 0: pseudo-mask mIoU {refined['pseudo_miou']:.2f} on train (IR labels 0.3 / 0.1, "
            f"pseudo-mask background 0.2)") in lines
    assert f"qaclims seed 0: segmenter mIoU {segmented['seg_miou']:.2f} on val" in lines
    assert lines[-1] == segmented["seg_metrics_file"]
    assert sum("nothing to do" in line for line in lines) >= 5  # CAMs (2), IR labels, IRN, pseudo masks (2), segmenter


def test_cli_errors_on_voc_name_the_missing_stage(fixture_chain, capsys, tmp_path):
    "On the voc profile, a stage whose input is missing says which command makes it (no traceback)."
    options = ["--settings", fixture_chain["settings_file"], "--set", f"data.run_dir={tmp_path / 'empty'}",
               *[a for s in fixture_chain["sets"] for a in ("--set", s)]]
    capsys.readouterr()
    assert main([str(a) for a in ["make-cams", *options, "--no-progress"]]) == 2
    assert "run `qaclims train-cam --seed 0` first" in capsys.readouterr().err
    assert main([str(a) for a in ["train-ritc", *options, "--no-progress"]]) == 2
    assert "train-cam" in capsys.readouterr().err
    settings = load_settings(fixture_chain["settings_file"], fixture_chain["sets"] + [f"data.run_dir={tmp_path / 'empty'}"])
    with pytest.raises(FileNotFoundError, match="qaclims qape --split train_aug"):
        train_ritc(settings, seed=0, method="qaclims", cam_checkpoint=_random_stage0(settings, tmp_path), progress=False,
                   **RITC)


def test_answers_are_keyed_by_the_vqa_folder_not_its_spelling(tmp_path):
    "Two studies whose settings both say vqa_model = weights/blip name two models: their answers must not mix."
    from qaclims.answers import answerer_key
    keys = []
    for study in ("a", "b"):
        (tmp_path / study / "weights" / "blip").mkdir(parents=True)
        (tmp_path / study / "settings.ini").write_text("[models]\nvqa_model = weights/blip\n[study]\nprofile = voc\n")
        keys.append(answerer_key(load_settings(tmp_path / study / "settings.ini"))["model"])
    assert keys == [str((tmp_path / s / "weights" / "blip").resolve()) for s in ("a", "b")]
    hub = load_settings(tmp_path / "a" / "settings.ini", ["models.vqa_model=Salesforce/blip-vqa-capfilt-large"])
    assert answerer_key(hub)["model"] == "Salesforce/blip-vqa-capfilt-large"  # a hub id is its own key


def _random_stage0(settings, tmp_path) -> Path:
    "A stage-0 checkpoint with random weights (for error paths that must fail before training)."
    from qaclims.camnet import CamNet
    from qaclims.train_cam import save_cam_net
    return save_cam_net(tmp_path / "random.pt", CamNet(20, "resnet18", 32), seed=0)


# ----- the real setting (flagged data): real VOC, CLIP ViT-L/14 (OpenAI), BLIP VQA CapFilt-L

def limited_voc_view(voc_root: Path, sbd_root, folder: Path, count: int) -> Path:
    """A VOC root in `folder` that shows the first `count` ids of the real train, val and train_aug splits: the
    real image, mask and annotation folders linked, the id lists cut (train_aug from a train_aug.txt)."""
    from qaclims.data import VOCDataset
    view = folder / "VOC2012"
    lists = view / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for entry in voc_root.iterdir():
        if entry.name != "ImageSets":
            (view / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    for split in ("train", "val", "train_aug"):
        ids = VOCDataset(voc_root, split, sbd_root=sbd_root).ids[:count]
        (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return view


@pytest.mark.data
def test_voc_chain_with_the_real_models(tmp_path, capsys):
    """The same chain with the settings file's real data and models (VOC 2012 + SBD, CLIP ViT-L/14 'openai', BLIP
    Salesforce/blip-vqa-capfilt-large, ImageNet ResNet-50) on the first QACLIMS_DATA_IMAGES (default 8) images
    of each split. QACLIMS_SETTINGS names another settings file (e.g. one with study.device = cuda)."""
    settings_file = Path(os.environ.get("QACLIMS_SETTINGS", REPO / "settings.ini")).resolve()
    count = int(os.environ.get("QACLIMS_DATA_IMAGES", "8"))
    base = load_settings(settings_file, ["study.profile=voc"])
    if not Path(base.data.voc_root).is_dir():
        pytest.skip(f"no VOC 2012 at '{base.data.voc_root}' ([data] voc_root of {settings_file})")
    view = limited_voc_view(Path(base.data.voc_root), base.data.sbd_root, tmp_path / "data", count)
    sets = ["study.profile=voc", f"data.run_dir={tmp_path / 'runs'}", f"data.voc_root={view}",
            f"data.sbd_root={tmp_path / 'no-sbd'}", "study.num_workers=0"]
    stage0 = dict(epochs=1, batch_size=4, checkpoint_every=1000)
    ritc = dict(epochs=1, batch_size=2, train_images=4, val_images=count, checkpoint_every=1000)
    out = run_chain(capsys, settings_file, sets, stage0, ritc, eval_split="train")
    check_chain(out, "train")
    settings = out["settings"]
    assert settings.models.clip_model == "ViT-L-14" and settings.models.vqa_model == "Salesforce/blip-vqa-capfilt-large"
    assert read_json(out["qaclims"].parent / "manifest.json")["config"]["clip_size"] == 224
    answers = [r["answer"] for r in read_records(out["answers"])]
    assert sum(bool(a.strip()) for a in answers) > 0.9 * len(answers)  # a real VQA model answers in words
    for method in ("stage0", "qaclims", "clims"):
        print(method, f"CAM mIoU {100 * out['metrics'][method]['miou_at_reference']:.2f} on {count} VOC train images")
