"""Issue 18 §5: SIGTERM (job schedulers) and Ctrl-C (SIGINT) stop a real training subprocess with one line naming
the epoch and iteration, the epoch last.pth holds and the exact resume command, exit code 143 / 130, last.pth intact;
the printed command resumes the run."""
import os
import re
import shlex
import signal
import subprocess
import sys
import threading

import pytest

from conftest import tiny_train_argv
from utils.checkpoint import read_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"interrupted by (SIGTERM|SIGINT \(Ctrl-C\)) (in epoch (\d+), iteration (\d+)/(\d+)|after epoch (\d+)); "
                  r"last\.pth holds epoch (\d+); resume with: (python train\.py .*)$")


def _train_until_second_epoch(argv, sig, group=False):
    """Start train.py, wait until epoch 1's last.pth is written and epoch 2 has begun, send ``sig`` (``group``: to
    its whole process group, loader workers included, as a job scheduler does); returns (exit code, output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("IRRA_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=group)
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    lines, saved, sent = [], False, False
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Saving checkpoint to" in line and line.rstrip().endswith("last.pth"):
                saved = True
            elif saved and not sent and "Epoch[2] Iteration[" in line:
                if group:
                    os.killpg(proc.pid, sig)  # the new session holds train.py and its loader workers only
                else:
                    proc.send_signal(sig)
                sent = True
        code = proc.wait()
    finally:
        watchdog.cancel()
    assert sent, "".join(lines[-30:])
    return code, "".join(lines)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_training_with_a_resume_line(tiny_cuhk_root, tmp_path, sig, code):
    logs = tmp_path / "logs"
    argv = tiny_train_argv(tiny_cuhk_root, str(logs), "--num_epoch", "30")
    rc, out = _train_until_second_epoch(argv, sig)
    assert rc == code, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    found = [LINE.search(ln) for ln in out.splitlines() if "interrupted by" in ln]
    assert len(found) == 1 and found[0], out[-3000:]
    m = found[0]
    held = int(m.group(7))
    if m.group(3):  # in epoch E, iteration i/n
        assert int(m.group(3)) == held + 1 and 1 <= int(m.group(4)) <= int(m.group(5))
    else:
        assert int(m.group(6)) == held
    (run_dir,) = [p for p in (logs / "CUHK-PEDES").iterdir()]
    last = run_dir / "last.pth"
    assert read_checkpoint(str(last))["epoch"] == held >= 1  # intact, and it holds what the line says
    assert not [p for p in os.listdir(run_dir) if p.endswith(".tmp")]
    cmd = m.group(8)
    assert shlex.split(cmd) == ["python", "train.py", "--config", str(run_dir / "configs.yaml"), "--resume",
                                "--resume_ckpt_file", str(last)]
    if sig == signal.SIGTERM:  # the printed command resumes the run (one more epoch, to keep the test short)
        r = subprocess.run([sys.executable, *shlex.split(cmd)[1:], "--stop_epoch", str(held + 1)], cwd=REPO,
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert f"continuing at epoch {held + 1}" in r.stdout
        assert read_checkpoint(str(last))["epoch"] == held + 1


def test_sigterm_to_the_whole_job_with_loader_workers(tiny_cuhk_root, tmp_path):
    """A scheduler signals every process of the job: the loader workers die too. Still exit 143, one line, no
    traceback, last.pth intact."""
    logs = tmp_path / "logs"
    argv = tiny_train_argv(tiny_cuhk_root, str(logs), "--num_epoch", "30", "--num_workers", "1")
    rc, out = _train_until_second_epoch(argv, signal.SIGTERM, group=True)
    assert rc == 143, out[-3000:]
    assert "Traceback" not in out and out.count("interrupted by SIGTERM") == 1, out[-3000:]
    (run_dir,) = [p for p in (logs / "CUHK-PEDES").iterdir()]
    assert read_checkpoint(str(run_dir / "last.pth"))["epoch"] >= 1
