"""The `qaclims` console script as a user runs it."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=REPO):
    exe = shutil.which("qaclims", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "qaclims.cli"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_help_lists_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "settings" in result.stdout and "bench" in result.stdout


def test_settings_shows_overrides():
    result = run_cli("settings", "--set", "study.device=cuda:1", "--set", "study.seeds=4,5")
    assert result.returncode == 0, result.stderr
    assert "device = cuda:1" in result.stdout and "seeds = 4 5" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["settings", "--set", "study.devise=cuda"], "unknown setting 'study.devise'"),
    (["settings", "--set", "study.num_workers=two"], "expected a number"),
    (["settings", "--settings", "no/such.ini"], "not found"),
])
def test_bad_settings_are_clear_errors(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_reads_settings_file_from_other_folder(tmp_path):
    ini = tmp_path / "study.ini"
    ini.write_text("[study]\nprofile = voc\n[data]\nrun_dir = elsewhere\n")
    result = run_cli("settings", "--settings", str(ini), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "profile = voc" in result.stdout
    assert f"run_dir = {tmp_path.resolve() / 'elsewhere'}" in result.stdout


def test_cam_stages_chain_from_the_shell(tmp_path):
    "train-cam -> make-cams -> eval-cams on a tiny SynthWorld, each reading the previous stage's artifact."
    tiny = ["--set", f"data.run_dir={tmp_path / 'runs'}", "--set", "synth.train_size=32", "--set", "synth.val_size=6",
            "--set", "study.num_workers=0"]
    missing = run_cli("make-cams", "--no-progress", *tiny)
    assert missing.returncode == 2 and "run `qaclims train-cam --seed 0` first" in missing.stderr
    trained = run_cli("train-cam", "--epochs", "1", "--no-progress", *tiny)
    assert trained.returncode == 0, trained.stderr
    checkpoint = Path(trained.stdout.strip().splitlines()[-1])
    assert checkpoint.is_file()
    cams = run_cli("make-cams", "--checkpoint", str(checkpoint), "--no-progress", *tiny)
    assert cams.returncode == 0, cams.stderr
    assert len(list(Path(cams.stdout.strip().splitlines()[-1]).glob("*.npz"))) == 6
    scored = run_cli("eval-cams", "--checkpoint", str(checkpoint), *tiny)
    assert scored.returncode == 0, scored.stderr
    assert "CAM mIoU" in scored.stdout and Path(scored.stdout.strip().splitlines()[-1]).is_file()


def test_pipeline_runs_the_baseline_chain(tmp_path):
    "`qaclims pipeline --method cam`: train-cam, make-cams and eval-cams in one command; the second run redoes nothing."
    tiny = ["--set", f"data.run_dir={tmp_path / 'runs'}", "--set", "synth.train_size=16", "--set", "synth.val_size=4",
            "--set", "study.num_workers=0"]
    first = run_cli("pipeline", "--method", "cam", "--no-progress", *tiny)
    assert first.returncode == 0, first.stderr
    assert "cam seed 0: CAM mIoU" in first.stdout and Path(first.stdout.strip().splitlines()[-1]).is_file()
    assert "train_cam" in first.stdout and "make_cams" in first.stdout
    again = run_cli("pipeline", "--method", "cam", "--no-progress", *tiny)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert again.stdout.strip().splitlines()[-1] == first.stdout.strip().splitlines()[-1]
    wrong = run_cli("pipeline", "--method", "irn", *tiny)
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr
