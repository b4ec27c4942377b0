"""The study: one row of every experiment notebook through papermill at smoke size, the spec, aggregation, skip on
rerun, failed / missing / half-written rows reported while the rest completes, kernel-start retries, the CLI; and
(flagged `data`) the main table in the voc profile on the fixture VOC tree with random-weight models."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qaclims.cli import main
from qaclims.experiment import METRICS_FILE, resolve_scale
from qaclims.results import MAIN_COLUMNS, collect_rows, mean_std, summarize, write_results
from qaclims.rows import STATUS_FILE, Row, row_folder, row_request, row_state, run_row, run_rows, stand_in_notebook
from qaclims.runs import write_json
from qaclims.settings import load_settings
from qaclims.study import load_spec, plan_rows, run_study, stage0_group

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "nbs" / "experiments"

# One row of every experiment notebook, each turning its own knob, at smoke size (the notebooks' default scale is
# 'smoke'; the spec's scale only has to name one). Five rows run at seed 0 and four at seed 1; --jobs 2 runs two at
# a time.
SMOKE_SPEC = """
notebooks: {notebooks}
seeds: [0, 1]
scales:
  default: {{settings: {{synth.train_size: 24, synth.val_size: 8, synth.image_size: 48, study.num_workers: 0}},
             cam: {{epochs: 1, batch_size: 8, long_side: [40, 56], crop_size: 48}},
             ritc: {{epochs: 1, batch_size: 4, train_images: 8, long_side: [40, 56], crop_size: 48, clip_size: 48}},
             clip: random-tiny, run_dir: temporary}}
tables:
  main: {{notebook: main.ipynb, rows: {{cam: {{method: cam, refine: false, seeds: [0]}}}}}}
  losses: {{notebook: losses.ipynb, rows: {{frc+brc: {{losses: [frc, brc], seeds: [1]}}}}}}
  questions: {{notebook: questions.ipynb, rows: {{bg-only: {{groups: [surroundings, scene], seeds: [0]}}}}}}
  fat: {{notebook: fat.ipynb, rows: {{no-fat: {{fat: false, seeds: [1]}}}}}}
  mask_prompt: {{notebook: mask_prompt.ipynb, rows: {{plain: {{mask_prompt: false, seeds: [0]}}}}}}
  temperature: {{notebook: temperature.ipynb, rows: {{tau-0.35: {{tau: 0.35, seeds: [1]}}}}}}
  vqa_quality: {{notebook: vqa_quality.ipynb, rows: {{oracle-0.3: {{error_rate: 0.3, seeds: [0]}}}}}}
  context: {{notebook: context.ipynb, rows: {{clims-p0.5: {{method: clims, p_context: 0.5, seeds: [1]}}}}}}
  recipe: {{notebook: recipe.ipynb, rows: {{max-norm: {{label_weight: 0.0, losses: [frc, brc], cam_activation: max_norm,
                                                        seeds: [0]}}}}}}
"""


def toy_notebook(path, body: str, parameters: str = "value = 1.0\nmethod = 'cam'"):
    "A stand-in experiment notebook (a parameters cell with the study's parameters, then `body`)."
    return stand_in_notebook(path, body, parameters)


WRITES = ("import json, pathlib\nscores = {k: value + seed for k in ('cam_miou', 'cam_miou_best', 'best_threshold')}\n"
          "pathlib.Path(out_dir, 'metrics.json').write_text(json.dumps({'seed': seed, 'method': method, **scores, "
          "'pseudo_miou': None, 'seg_miou': None, 'seconds': {'total': 0.1}}))")


def _smoke_study(folder, tables=None):
    "The smoke study (SMOKE_SPEC, or only `tables` of it) run with --jobs 2, then a second time, which does nothing."
    spec_path = folder / "study.yaml"
    spec_path.write_text(SMOKE_SPEC.format(notebooks=EXPERIMENTS))
    spec = load_spec(spec_path)
    results = folder / "results"
    first = run_study(load_settings(), spec, tables=tables, jobs=2, results_dir=results, figures_dir=folder / "figures",
                      log=lambda line: None)
    lines = []
    second = run_study(load_settings(), spec, tables=tables, jobs=2, results_dir=results, figures=False,
                       log=lines.append)
    return {"spec": spec, "results": results, "figures": folder / "figures", "first": first, "second": second,
            "second_log": lines}


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    "One row of every experiment notebook at smoke size (five at seed 0, four at seed 1), run with --jobs 2."
    return _smoke_study(tmp_path_factory.mktemp("smoke"))


def test_every_experiment_notebook_runs_under_papermill(smoke_study):
    "One row of every experiment notebook, each turning its own knob."
    first, results = smoke_study["first"], smoke_study["results"]
    assert first["problems"] == [] and first["ran"] == 9
    assert set(smoke_study["spec"]["tables"]) == {p.stem for p in EXPERIMENTS.glob("*.ipynb")}, \
        "every experiment notebook has a smoke row"
    rows = pd.read_csv(results / "rows.csv")
    assert (rows["state"] == "done").all() and len(rows) == 9
    for _, row in rows.iterrows():
        metrics = json.loads((results / row["metrics"]).read_text())
        assert metrics["table"] == row["table"] and metrics["seed"] == row["seed"] and metrics["split"] == "val"
        assert metrics["commit"] and metrics["settings"]["synth"]["image_size"] == 48
        assert 0 <= metrics["cam_miou"] <= metrics["cam_miou_best"] <= 100
        assert (results / row["notebook"]).is_file() and (results / row["metrics"]).with_name("metrics.csv").is_file()
        output = json.loads((results / row["notebook"]).read_text())
        assert any(c.get("metadata", {}).get("tags") == ["injected-parameters"] for c in output["cells"])
        folder = (results / row["metrics"]).parent  # committed with the study: no path names the checkout
        assert not [f.name for f in folder.iterdir() if str(ROOT) in f.read_text(errors="replace")]
    knobs = {r["table"]: json.loads((results / r["metrics"]).read_text()) for _, r in rows.iterrows()}
    assert knobs["fat"]["ritc_overrides"] == {"fat": False, "alpha": 0.1}
    assert knobs["losses"]["ritc_overrides"] == {"losses": ["frc", "brc"]}
    assert knobs["mask_prompt"]["ritc_overrides"] == {"mask_prompt": False}
    assert knobs["temperature"]["ritc_overrides"] == {"tau": 0.35}
    assert knobs["context"]["settings"]["synth"]["p_context"] == 0.5 and knobs["context"]["method"] == "clims"
    assert knobs["vqa_quality"]["settings"]["models"]["synth_vqa_error_rate"] == 0.3
    assert knobs["questions"]["ritc_overrides"] == {"groups": ["surroundings", "scene"]}
    assert knobs["recipe"]["ritc_overrides"] == {"label_weight": 0.0, "losses": ["frc", "brc"],
                                                 "cam_activation": "max_norm"}
    assert knobs["main"]["method"] == "cam" and knobs["main"]["refinement"].startswith("not asked")
    for table in smoke_study["spec"]["tables"]:
        assert (results / f"{table}.csv").is_file() and (results / f"{table}.md").is_file()


def test_smoke_study_tables_and_report(smoke_study):
    results = smoke_study["results"]
    main_csv = pd.read_csv(results / "main.csv")
    assert list(main_csv.columns) == list(MAIN_COLUMNS) and main_csv["method"].tolist() == ["cam"]
    assert main_csv[["pseudo_miou", "seg_miou"]].isna().all().all()
    report = (results / "REPORT.md").read_text()
    for table in smoke_study["spec"]["tables"]:
        assert f"runs/{table}/" in report
    assert "None: every row that ran finished" in report and "Not run yet" not in report


def test_smoke_study_figures(smoke_study):
    "The figures a smoke study can draw (its main table has one method at one seed, and no QA-CLIMS row)."
    made = {p.name for p in smoke_study["figures"].glob("*.png")}
    assert {"main.png", "ablations.png", "threshold_curves.png", "vqa_quality.png", "context_strength.png",
            "cam_overlays.png"} <= made
    report = (smoke_study["results"] / "REPORT.md").read_text()
    assert "## Figures" in report and "cam_overlays.png" in report


def test_rerun_does_nothing(smoke_study):
    second = smoke_study["second"]
    assert second["ran"] == 0 and second["skipped"] == 9 and second["problems"] == []
    assert any("nothing to do" in line for line in smoke_study["second_log"])


def _fake_row(results, table, name, seed, score, method="qaclims"):
    row = Row(table, name, seed, Path(f"{table}.ipynb"), {}, name, None)
    folder = row_folder(results, row)
    write_json(folder / METRICS_FILE, {"seed": seed, "method": method, "cam_miou": score, "cam_miou_best": score + 1,
                                       "best_threshold": 0.25, "pseudo_miou": score + 5, "seg_miou": None,
                                       "seconds": {"total": 1.0}})
    return row


def test_aggregation_mean_std_and_main_csv(tmp_path):
    rows = [_fake_row(tmp_path, "main", m, s, base + s, m) for m, base in (("qaclims", 40.0), ("cam", 30.0))
            for s in (0, 1, 2)]
    rows += [_fake_row(tmp_path, "fat", "alpha-0.2", 0, 37.0)]
    long = collect_rows(tmp_path, rows)
    summary = summarize(long).set_index(["table", "row"])
    qa = summary.loc[("main", "qaclims")]
    assert qa["seeds"] == 3 and qa["cam_miou_mean"] == pytest.approx(41.0)
    assert qa["cam_miou_std"] == pytest.approx(np.std([40.0, 41.0, 42.0], ddof=1))
    assert qa["pseudo_miou_mean"] == pytest.approx(46.0) and np.isnan(qa["seg_miou_mean"])
    assert np.isnan(summary.loc[("fat", "alpha-0.2")]["cam_miou_std"])
    written = write_results(tmp_path, {"tables": {"main": {"title": "Main"}, "fat": {"title": "FAT"}}}, long)
    main_csv = pd.read_csv(tmp_path / "main.csv")
    assert list(main_csv.columns) == ["method", "seed", "cam_miou", "cam_miou_best", "best_threshold", "pseudo_miou",
                                      "seg_miou"]
    assert main_csv["method"].tolist() == ["cam"] * 3 + ["qaclims"] * 3 and main_csv["seed"].tolist() == [0, 1, 2] * 2
    md = (tmp_path / "main.md").read_text()
    assert "41.0 ± 1.0" in md and "46.0 ± 1.0" in md and "segmenter" not in md
    assert tmp_path / "fat.md" in written and "| alpha-0.2 | 37.0 |" in (tmp_path / "fat.md").read_text()
    assert mean_std(41.0, np.nan) == "41.0" and mean_std(np.nan, np.nan) == "" and mean_std(0.25, 0.01, 2) == "0.25 ± 0.01"


def test_failed_missing_and_half_written_rows_are_reported_and_the_rest_completes(tmp_path):
    notebooks = tmp_path / "toys"
    notebooks.mkdir()
    toy_notebook(notebooks / "main.ipynb", WRITES)
    toy_notebook(notebooks / "raises.ipynb", "raise RuntimeError('the row broke')")
    toy_notebook(notebooks / "silent.ipynb", "x = value")
    toy_notebook(notebooks / "half.ipynb", "import pathlib\npathlib.Path(out_dir, 'metrics.json').write_text('{\"seed\": 0, \"cam_')")
    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(f"""
notebooks: {notebooks}
seeds: [0]
scales: {{default: {{}}}}
tables:
  main: {{notebook: main.ipynb, rows: {{cam: {{method: cam, value: 30.0}}, qaclims: {{method: qaclims, value: 40.0}}}}}}
  broken: {{notebook: raises.ipynb, rows: {{a: {{}}}}}}
  quiet: {{notebook: silent.ipynb, rows: {{b: {{}}}}}}
  half: {{notebook: half.ipynb, rows: {{c: {{}}}}}}
""")
    results = tmp_path / "results"
    # a row killed half-way earlier: truncated metrics and output notebook in its folder
    stale = row_folder(results, Row("main", "qaclims", 0, notebooks / "main.ipynb", {}, "qaclims", None))
    stale.mkdir(parents=True)
    (stale / METRICS_FILE).write_text('{"seed": 0, "cam_mi')
    (stale / "main.ipynb").write_text('{"cells": [')
    lines = []
    outcome = run_study(load_settings(), load_spec(spec_path), results_dir=results, figures=False, log=lines.append)
    assert any("main/qaclims seed 0: broken" in line and "running it again" in line for line in lines)
    problems = {key: (state, error) for key, state, error in outcome["problems"]}
    assert set(problems) == {"broken/a seed 0", "quiet/b seed 0", "half/c seed 0"}
    assert problems["broken/a seed 0"][0] == "failed" and "RuntimeError: the row broke" in problems["broken/a seed 0"][1]
    assert problems["quiet/b seed 0"][0] == "missing" and "no metrics.json" in problems["quiet/b seed 0"][1]
    assert problems["half/c seed 0"][0] == "broken" and "half-written" in problems["half/c seed 0"][1]
    main_csv = pd.read_csv(results / "main.csv")
    assert main_csv["method"].tolist() == ["cam", "qaclims"] and main_csv["cam_miou"].tolist() == [30.0, 40.0]
    report = (results / "REPORT.md").read_text()
    assert "broken/a seed 0: failed: RuntimeError: the row broke" in report and "quiet/b seed 0: missing" in report
    assert "half/c seed 0: broken" in report
    assert json.loads((row_folder(results, Row("broken", "a", 0, notebooks / "raises.ipynb", {}, "a", None))
                       / STATUS_FILE).read_text())["attempts"] == 1, "an error in a cell is not retried"
    # the next run would run exactly the rows without metrics
    states = {r.key: row_state(row_folder(results, r), row_request(r, resolve_scale({}), {}))
              for r in plan_rows(load_spec(spec_path), seeds=(0,))}
    assert {k: v.split(":")[0] for k, v in states.items()} == {
        "main/cam seed 0": "done", "main/qaclims seed 0": "done", "broken/a seed 0": "missing",
        "quiet/b seed 0": "missing", "half/c seed 0": "broken"}
    # the CLI says so with its exit code, after writing everything
    only_broken = tmp_path / "broken.yaml"
    only_broken.write_text(spec_path.read_text().split("  quiet:")[0])
    assert main(["study", "--spec", str(only_broken), "--results", str(tmp_path / "cli"), "--no-figures"]) == 1
    assert "broken/a seed 0: failed" in (tmp_path / "cli" / "REPORT.md").read_text()


def test_report_records_the_commit_the_rows_ran_at(tmp_path, monkeypatch):
    "The study's own tables modify a checkout they are committed in: the report's commit is read before they are."
    notebooks = tmp_path / "toys"
    notebooks.mkdir()
    toy_notebook(notebooks / "main.ipynb", WRITES)
    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(f"notebooks: {notebooks}\nseeds: [0]\nscales: {{default: {{}}}}\n"
                         "tables:\n  main: {notebook: main.ipynb, rows: {cam: {method: cam}}}\n")
    results = tmp_path / "results"  # as if inside the checkout: once its tables exist, the checkout is modified
    monkeypatch.setattr("qaclims.study.git_commit",
                        lambda: "c0ffee+dirty" if (results / "main.csv").exists() else "c0ffee")
    outcome = run_study(load_settings(), load_spec(spec_path), results_dir=results, figures=False,
                        log=lambda line: None)
    report = outcome["report"].read_text()
    assert "| commit | c0ffee |" in report and "+dirty" not in report


def test_kernel_that_fails_to_start_is_retried(tmp_path, monkeypatch):
    "A kernel whose first start crashes: papermill fails before any cell, the row is retried and then runs."
    kernels = tmp_path / "jupyter" / "kernels" / "flaky"
    kernels.mkdir(parents=True)
    counter = tmp_path / "starts"
    launcher = tmp_path / "flaky.py"
    launcher.write_text(
        "import sys, pathlib\n"
        f"counter = pathlib.Path({str(counter)!r})\n"
        "starts = int(counter.read_text()) + 1 if counter.exists() else 1\n"
        "counter.write_text(str(starts))\n"
        "if starts == 1:\n    sys.exit(3)\n"
        "from ipykernel import kernelapp\nkernelapp.launch_new_instance(argv=sys.argv[1:])\n")
    (kernels / "kernel.json").write_text(json.dumps({"argv": [sys.executable, str(launcher), "-f", "{connection_file}"],
                                                     "display_name": "flaky", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    notebook = toy_notebook(tmp_path / "main.ipynb", WRITES)
    row = Row("main", "cam", 0, notebook, {}, "cam", None)
    folder = row_folder(tmp_path / "results", row)
    status = run_row(row, folder, {"value": 30.0, "out_dir": str(folder)}, {"row": "cam"}, kernel="flaky",
                     start_timeout=30, retries=2)
    assert status["state"] == "done" and status["attempts"] == 2 and counter.read_text() == "2"


def test_the_repository_spec():
    "study.yaml: every notebook and row parameter exists, the scales resolve, the seeds are 0 1 2."
    spec = load_spec(ROOT / "study.yaml")
    assert set(spec["scales"]) >= {"default", "full"} and spec["seeds"] == (0, 1, 2)
    assert {"main", "losses", "questions", "fat", "mask_prompt", "temperature", "vqa_quality", "context"} <= set(spec["tables"])
    rows = plan_rows(spec, profile="synth", seeds=spec["seeds"])
    assert {r.name for r in rows if r.table == "main"} == {"cam", "clims", "qaclims"}
    voc = {r.table for r in plan_rows(spec, profile="voc", seeds=(0,))}
    assert "context" not in voc and "vqa_quality" not in voc and "main" in voc
    assert spec["world_params"] == ("p_context",)
    default = resolve_scale(spec["scales"]["default"])
    assert default["stage0_seed"] == 0 and default["clip"] == "shared" and default["run_dir"] == "settings"
    assert resolve_scale(spec["scales"]["full"])["stage0_seed"] is None  # the paper's protocol: stage 0 per seed
    groups = {stage0_group(r, spec["world_params"], default["stage0_seed"]) for r in rows}
    assert len(groups) == 4, "make study trains one stage-0 network per world (p_context 0.85, 0, 0.5, 1)"


def test_row_folders_are_not_ignored_by_git():
    "results/runs/ (every row's notebook and metrics, which REPORT.md links to) is committed: no .gitignore hides it."
    row_file = "results/runs/main/cam-seed0/metrics.json"
    check = subprocess.run(["git", "check-ignore", "-q", row_file], cwd=ROOT, capture_output=True)
    assert check.returncode == 1, f"{row_file} is ignored by git ({check.returncode}): see .gitignore"
    check = subprocess.run(["git", "check-ignore", "-q", "runs/cam/x/final.pt"], cwd=ROOT, capture_output=True)
    assert check.returncode == 0, "the run directory runs/ must stay ignored"


def test_rows_of_a_group_wait_for_its_first_row():
    "run_rows: two workers; a group's other rows start only after its first one ended, other groups fill in."
    import threading
    import time
    rows = [Row("t", f"r{i}", seed, Path("t.ipynb"), {}, f"r{i}", None) for i in range(3) for seed in (0, 1, 2)]
    events, lock = [], threading.Lock()

    def run(row):
        with lock:
            events.append(("start", row.key))
        time.sleep(0.05)
        with lock:
            events.append(("end", row.key))
        return row.seed

    assert run_rows(rows, run, jobs=2, group_of=lambda row: row.seed) == [r.seed for r in rows]
    order = [key for kind, key in events if kind == "start"]
    assert order[:3] == ["t/r0 seed 0", "t/r0 seed 1", "t/r0 seed 2"], "the groups' first rows go first"
    for row in rows[3:]:
        leader = f"t/r0 seed {row.seed}"
        assert events.index(("end", leader)) < events.index(("start", row.key))


def test_cli_study_help(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    out = capsys.readouterr().out
    for option in ("--profile", "--tables", "--jobs", "--scale"):
        assert option in out


# ----- the voc profile on the fixture VOC tree (flagged `data`: it takes minutes on a CPU)

VOC_SPEC = """
notebooks: {notebooks}
seeds: [0]
scales:
  default: {{settings: {{study.num_workers: 0}},
             cam: {{arch: resnet18, output_stride: 32, epochs: 1, batch_size: 4, long_side: [48, 80], crop_size: 64}},
             ritc: {{epochs: 1, batch_size: 2, train_images: 4, val_images: 2, long_side: [48, 80], crop_size: 64,
                     clip_size: 224}},
             irn: {{arch: resnet18, output_stride: 32, epochs: 1, batch_size: 2, crop_size: 64, radius: 5}},
             segment: {{iterations: 1, batch_size: 2, iter_size: 1, crop_size: 65, msc_scales: [], test_scales: [1.0],
                        checkpoint_every: 1}},
             cam_scales: [1.0], clip: shared}}
tables:
  main:
    notebook: main.ipynb
    rows: {{cam: {{method: cam, refine: false}}, clims: {{method: clims, refine: false}}, qaclims: {{method: qaclims}}}}
  context: {{notebook: context.ipynb, profiles: [synth], rows: {{cam-p0.0: {{method: cam, p_context: 0.0}}}}}}
"""


@pytest.mark.data
def test_voc_profile_study_on_the_fixture_tree(tmp_path, monkeypatch):
    "`qaclims study --profile voc`: the main table on the fixture VOC tree with random-weight models of the real kinds."
    from test_voc_chain import CLIP_MODEL, write_blip_folder, write_clip_files

    from qaclims.fixtures import make_voc_tree
    make_voc_tree(tmp_path / "data")
    write_blip_folder(tmp_path / "weights" / "blip-vqa")
    write_clip_files(tmp_path / "weights")
    (tmp_path / "settings.ini").write_text(
        "[data]\nrun_dir = runs\nvoc_root = data/VOC2012\nsbd_root = data/SBD\n"
        f"[models]\nclip_model = {CLIP_MODEL}\nclip_pretrained = weights/clip-vit-s-32.pt\n"
        "clip_mask_checkpoint = weights/ovseg-vit-s-32.pth\nvqa_model = weights/blip-vqa\nbackbone_weights = none\n"
        "[study]\nprofile = synth\ndevice = cpu\nnum_workers = 0\n")
    (tmp_path / "study.yaml").write_text(VOC_SPEC.format(notebooks=EXPERIMENTS))
    monkeypatch.chdir(tmp_path)
    code = main(["study", "--profile", "voc", "--settings", "settings.ini", "--spec", "study.yaml", "--jobs", "2"])
    assert code == 0, (tmp_path / "results" / "REPORT.md").read_text()
    main_csv = pd.read_csv(tmp_path / "results" / "main.csv")
    assert main_csv["method"].tolist() == ["cam", "clims", "qaclims"] and list(main_csv.columns) == list(MAIN_COLUMNS)
    qaclims = main_csv.set_index("method").loc["qaclims"]
    assert 0 <= qaclims["cam_miou"] <= 100 and 0 <= qaclims["pseudo_miou"] <= 100 and 0 <= qaclims["seg_miou"] <= 100
    rows = pd.read_csv(tmp_path / "results" / "rows.csv")
    assert set(rows["table"]) == {"main"}  # the context table is SynthWorld's only
    for _, row in rows.iterrows():
        metrics = json.loads((tmp_path / "results" / row["metrics"]).read_text())
        assert metrics["settings"]["study"]["profile"] == "voc" and metrics["split"] == "val"
        assert metrics["settings"]["data"]["run_dir"] == str(tmp_path / "runs")
    assert (tmp_path / "figures" / "main.png").is_file()
    assert main(["study", "--profile", "voc", "--settings", "settings.ini", "--spec", "study.yaml"]) == 0
