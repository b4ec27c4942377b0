"""Run-directory helpers: digests, manifests, and a training loop killed with SIGKILL then resumed."""
import os
import signal
import subprocess
import sys
import textwrap

import torch

from qaclims.runs import Checkpointer, digest, manifest, stage_dir
from qaclims.settings import load_settings

LOOP = textwrap.dedent("""
    import sys, time, torch
    from qaclims.runs import Checkpointer, seed_everything
    folder, steps, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    seed_everything(0)
    model = torch.nn.Linear(16, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    checkpoints = Checkpointer(folder)
    state = checkpoints.load()
    start = 0
    if state is not None:
        model.load_state_dict(state["model"]); optimizer.load_state_dict(state["optimizer"]); start = state["step"]
    for step in range(start, steps):
        loss = model(torch.randn(32, 16)).pow(2).mean()
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        checkpoints.save(step + 1, model=model.state_dict(), optimizer=optimizer.state_dict())
        print(step + 1, flush=True)
        time.sleep(pause)
    torch.save(model.state_dict(), folder + "/final.pt")
    checkpoints.finish({"steps": steps})
""")


def run_loop(folder, steps=30, pause=0.0):
    return subprocess.run([sys.executable, "-c", LOOP, str(folder), str(steps), str(pause)],
                          capture_output=True, text=True, timeout=120)


def test_killed_loop_resumes_to_the_same_weights(tmp_path):
    straight = tmp_path / "straight"
    assert run_loop(straight).returncode == 0
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", LOOP, str(killed), "30", "0.05"], stdout=subprocess.PIPE, text=True)
    for line in process.stdout:  # wait until a few steps are checkpointed, then kill hard
        if int(line) >= 5:
            os.kill(process.pid, signal.SIGKILL)
            break
    process.wait()
    assert not Checkpointer(killed).done()
    assert 5 <= torch.load(killed / "last.pt", weights_only=False)["step"] < 30
    assert run_loop(killed).returncode == 0
    a = torch.load(straight / "final.pt")
    b = torch.load(killed / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_dir_and_manifest(tmp_path):
    settings = load_settings(overrides={"data.run_dir": str(tmp_path)})
    key = digest({"stage": "clip", "seed": 0})
    folder = stage_dir(settings, "clip", key)
    assert folder == tmp_path / "clip" / key and folder.is_dir()
    record = manifest(settings, "clip", seed=0, inputs={"world": "abc"}, steps=10)
    assert record["seed"] == 0 and record["settings"]["data"]["run_dir"] == str(tmp_path)
    assert record["steps"] == 10 and record["commit"]
