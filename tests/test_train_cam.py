"""Stage 0 (qaclims.train_cam): a tiny SynthWorld run, killed with SIGKILL and resumed to the same weights,
the content-keyed cache, torchrun with 2 CPU processes, and bad input."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qaclims.runs import read_json
from qaclims.settings import load_settings
from qaclims.dist import DistContext, epoch_batches
from qaclims.train_cam import cam_train_config, load_cam_net, train_cam
from killing import kill_at_step, last_step, one_thread, pausing_script, run_to_end, same_weights

TINY_SETTINGS = {"synth.image_size": 48, "synth.train_size": 16, "synth.val_size": 8, "study.num_workers": 0}
# 4 steps per epoch, 12 in all; output stride 32 keeps the steps cheap (the loop does not depend on it)
TINY_CONFIG = dict(epochs=3, batch_size=4, checkpoint_every=1, output_stride=32)

# train_cam on the tiny config, in a process that the test can kill mid-run: RUN RUN_DIR
RUN = pausing_script("""
    from qaclims.settings import load_settings
    from qaclims.train_cam import train_cam
    settings = load_settings(overrides={"data.run_dir": ARGS[0], **%r})
    print(f"final {train_cam(settings, seed=3, progress=False, **%r)}", flush=True)
""" % (TINY_SETTINGS, TINY_CONFIG))


def tiny_settings(run_dir):
    return load_settings(overrides={"data.run_dir": str(run_dir), **TINY_SETTINGS})


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    straight = one_thread(train_cam, tiny_settings(tmp_path / "straight"), seed=3, progress=False, **TINY_CONFIG)
    kill_at_step(RUN, tmp_path / "killed", step=6)  # step 6 is in the middle of the second epoch
    assert 6 <= last_step(next((tmp_path / "killed" / "cam").iterdir())) < 12
    resumed = run_to_end(RUN, tmp_path / "killed")
    assert resumed.parent.name == straight.parent.name  # same content key
    assert same_weights(straight, resumed)
    assert not (resumed.parent / "last.pt").exists()
    record = read_json(resumed.parent / "manifest.json")
    assert record["seed"] == 3 and record["steps"] == 12 and set(record["val"]) >= {"mAP", "label_accuracy"}


def test_finished_run_is_cached_and_keyed_by_content(tmp_path, capsys):
    settings = tiny_settings(tmp_path)
    first = train_cam(settings, seed=0, progress=False, epochs=1, batch_size=8, output_stride=32)
    stamp = first.stat().st_mtime_ns
    capsys.readouterr()
    again = train_cam(settings, seed=0, progress=False, epochs=1, batch_size=8, output_stride=32)
    assert again == first and first.stat().st_mtime_ns == stamp and "nothing to do" in capsys.readouterr().out
    net = load_cam_net(first)
    assert net.num_classes == 8 and net.output_stride == 32 and not net.training
    other = train_cam(settings.with_overrides({"synth.p_context": 0.0}), seed=0, progress=False, epochs=1, batch_size=8,
                      output_stride=32)
    assert other.parent != first.parent  # another world, another folder


def test_data_order_is_seeded_and_split_by_rank():
    assert epoch_batches(20, 4, seed=0, epoch=2) == epoch_batches(20, 4, seed=0, epoch=2)
    assert epoch_batches(20, 4, seed=0, epoch=2) != epoch_batches(20, 4, seed=0, epoch=3)
    shards = [epoch_batches(20, 4, 0, 1, DistContext(r, 2, r)) for r in range(2)]
    seen = [i for shard in shards for batch in shard for i in batch]
    assert sorted(seen) == list(range(20)) and len(shards[0]) == len(shards[1]) == 5


def test_bad_input(tmp_path):
    settings = tiny_settings(tmp_path)
    with pytest.raises(FileNotFoundError, match="train-cam"):
        load_cam_net(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown CamTrainConfig field"):
        cam_train_config(settings, learning_rate=0.1)
    with pytest.raises(ValueError, match="no full batch"):
        train_cam(settings, progress=False, batch_size=64)
    with pytest.raises(ValueError, match="amp"):
        cam_train_config(settings, amp="fp16")


DDP = textwrap.dedent("""
    import os
    import sys
    from qaclims.make_cams import make_cams
    from qaclims.settings import load_settings
    from qaclims.train_cam import train_cam
    settings = load_settings(overrides={"data.run_dir": sys.argv[1], **%r})
    path = train_cam(settings, seed=0, progress=False, epochs=2, batch_size=4, checkpoint_every=2, output_stride=32)
    cams = make_cams(settings, path, "val", progress=False)
    # one file per rank: the two processes share stdout, where their lines could interleave
    with open(f"{sys.argv[1]}.rank{os.environ['RANK']}", "w") as out:
        out.write(f"final {path}\\ncams {cams}\\n")
""" % TINY_SETTINGS)


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="torchrun not installed")
def test_torchrun_two_cpu_processes(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    script = tmp_path / "ddp.py"
    script.write_text(DDP)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split(" ", 1) for rank in (0, 1)
             for line in Path(f"{tmp_path / 'runs'}.rank{rank}").read_text().splitlines()]
    finals = {Path(v) for k, v in lines if k == "final"}
    cams = {Path(v) for k, v in lines if k == "cams"}
    assert len(finals) == 1 and len(cams) == 1, (done.stdout, done.stderr[-2000:])  # both ranks agree
    final, cams_dir = finals.pop(), cams.pop()
    record = read_json(final.parent / "manifest.json")
    assert record["world_size"] == 2 and record["steps"] == 8  # 16 images, global batch 4, 2 epochs
    assert len(list(cams_dir.glob("*.npz"))) == 8 and (cams_dir / "done.json").exists()
    assert read_json(cams_dir / "manifest.json")["world_size"] == 2
