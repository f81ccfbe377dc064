"""Kill a compile with SIGKILL mid-run (separate process) and prove that re-running it resumes and finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

TOTAL_ROLLOUTS = 2 * 4 * 2


def _start(log_dir: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tests._compile_job", str(log_dir), str(delay)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"job ended before the kill point: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("kill point never reached")
        time.sleep(0.05)


def _lines(p: Path) -> int:
    return sum(1 for _ in open(p)) if p.exists() else 0


@pytest.mark.parametrize("kill_point", ["during_rollouts", "after_first_fine_tune"])
def test_sigkill_then_resume_completes(tmp_path, kill_point):
    log_dir = tmp_path / "log"
    partial = log_dir / "iter_000" / "rollouts.partial.jsonl"
    proc = _start(log_dir, delay=0.05)
    if kill_point == "during_rollouts":
        _wait_for(lambda: _lines(partial) >= 3, proc)
    else:
        _wait_for(lambda: (log_dir / "iter_000" / "train.json").exists(), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _lines(partial)
    assert done_before >= 3

    proc = _start(log_dir, delay=0.0)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["iterations"] == 2 and result["best_score"] == 1.0
    # finished rollouts were not redone
    assert result["rollouts_run"] <= TOTAL_ROLLOUTS - done_before
    rollouts = json.loads((log_dir / "iter_000" / "rollouts.json").read_text())
    # 4 queries x 2 sampled instructions, plus each query's "no instruction" candidate (sample_index 2)
    assert len(rollouts) == 12 and len({(r["example_index"], r["sample_index"]) for r in rollouts}) == 12
    assert sum(r["sample_index"] < 2 for r in rollouts) == 8
