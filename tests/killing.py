"""Kill-and-resume helpers for the training stages' tests: a stage runs in a fresh Python process whose checkpoints
print their step and pause, so that a test can SIGKILL it part-way, then run it again and compare with a straight run."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

_PAUSING_CHECKPOINTS = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from qaclims.runs import Checkpointer
    PAUSE, ARGS = float(sys.argv[1]), sys.argv[2:]
    _save = Checkpointer.save
    def _pausing_save(self, step, **state):
        path = _save(self, step, **state)
        print(step, flush=True)
        time.sleep(PAUSE)
        return path
    Checkpointer.save = _pausing_save
""")


def pausing_script(body: str) -> str:
    """A script (for `python -c`) run as `SCRIPT PAUSE ARG...`: one torch thread, every checkpoint prints its step and
    sleeps PAUSE seconds, then `body`, which reads its arguments from `ARGS` and prints 'final <path>' at the end."""
    return _PAUSING_CHECKPOINTS + textwrap.dedent(body)


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


def run_to_end(script: str, *args, timeout: int = 300) -> Path:
    "Run `script` with no pause to the end; the path it printed after 'final '."
    done = subprocess.run([sys.executable, "-c", script, "0", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    return Path(done.stdout.strip().splitlines()[-1].split(" ", 1)[1])


def kill_at_step(script: str, *args, step: int, pause: float = 0.3) -> None:
    "Run `script`, pausing `pause` s at each checkpoint, and SIGKILL it once it has saved `step`."
    process = subprocess.Popen([sys.executable, "-c", script, str(pause), *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=_env())
    for line in process.stdout:
        if line.strip().isdigit() and int(line) >= step:
            os.kill(process.pid, signal.SIGKILL)
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"the run ended on its own (exit {process.returncode}) before step {step}"


def one_thread(fn, *args, **kwargs):
    "fn(*args, **kwargs) with one torch thread, as in the killed process, so that weights compare bit for bit."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def same_weights(first: Path, second: Path) -> bool:
    "Whether two checkpoints hold bit-identical 'model' state dicts."
    a, b = torch.load(first, weights_only=True)["model"], torch.load(second, weights_only=True)["model"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def last_step(folder: Path) -> int:
    "The step of the unfinished run's last checkpoint in `folder` (which has no final checkpoint yet)."
    assert not (folder / "done.json").exists() and not (folder / "final.pt").exists()
    return int(torch.load(folder / "last.pt", weights_only=False)["step"])
