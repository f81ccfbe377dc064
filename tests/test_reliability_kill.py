"""Kill a compile with SIGKILL at 12 seeded-random points, resume it, and compare with an uninterrupted run.

Kill points cover LM calls of every role (rollouts, validation, TextGrad), a torn rollout line, the
prompt model's fine-tune, an atomic checkpoint write, and a half-written checkpoint file. After each kill
the same ``log_dir`` is compiled again, which must finish with exactly the reference run's result, redo no
completed rollout, ignore the half-written file and leave no temporary files. See ``_reliability_job.py``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

EVENTS = ("target", "reward", "textgrad", "append", "train", "publish", "torn")
NUM_KILLS = 12
TOTAL_ROLLOUTS = 2 * 3 * 2  # iterations x queries x prompts per query (see _reliability_job.BUDGET)


class Zygote:
    """The pre-warmed job process; ``run`` forks one compile in it and waits for the child."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests._reliability_job"], cwd=REPO_ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)

    def run(self, log_dir: Path, result: Path, kill: str | None = None) -> dict:
        self.proc.stdin.write(json.dumps({"log_dir": str(log_dir), "result": str(result), "kill": kill}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the job process died"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _result(path: Path) -> dict:
    err = Path(str(path) + ".err")
    assert not err.exists(), err.read_text()[-3000:]
    return json.loads(path.read_text())


def _rollouts(log_dir: Path, k: int) -> list[dict]:
    rs = json.loads((log_dir / f"iter_{k:03d}" / "rollouts.json").read_text())
    return [{key: v for key, v in r.items() if key != "seconds"} for r in rs]


def _done_before_resume(log_dir: Path) -> int:
    """Rollouts a resumed run may reuse: whole iterations with rollouts.json, else intact partial lines."""
    done = 0
    for k in range(2):
        d = log_dir / f"iter_{k:03d}"
        try:
            # sampled rollouts only: the "no instruction" candidates (sample_index == prompts per query) are
            # the student's own runs, kept in student_rollouts.jsonl, not sampled
            done += sum(r["sample_index"] < 2 for r in json.loads((d / "rollouts.json").read_text()))
            continue
        except (OSError, ValueError):
            pass
        keys = set()
        if (d / "rollouts.partial.jsonl").exists():
            for line in (d / "rollouts.partial.jsonl").read_text().splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if not r.get("error"):
                    keys.add((r["example_index"], r["sample_index"]))
        done += len(keys)
    return done


def _parse(line: str) -> dict | None:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _kill_points(counts: dict[str, int], rng: random.Random) -> list[tuple[str, int]]:
    kinds = list(EVENTS)
    rng.shuffle(kinds)
    kinds += [rng.choice(EVENTS) for _ in range(NUM_KILLS - len(EVENTS))]
    points: list[tuple[str, int]] = []
    for kind in kinds:
        low = 2 if kind == "torn" else 1  # torn #1 is run.json, the run's identity: corrupt -> refused by design
        options = [(kind, n) for n in range(low, counts[kind] + 1) if (kind, n) not in points]
        points.append(rng.choice(options or [(kind, rng.randint(low, counts[kind]))]))
    return points


def test_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path, zygote):
    ref_dir = tmp_path / "reference"
    status = zygote.run(ref_dir, tmp_path / "reference.json")
    assert status == {"signal": None, "code": 0}
    ref = _result(tmp_path / "reference.json")
    assert ref["iterations"] == 2 and ref["sampled"] == TOTAL_ROLLOUTS and ref["best_score"] == 1.0
    assert all(ref["counts"].get(e, 0) >= 1 for e in EVENTS), ref["counts"]

    points = _kill_points(ref["counts"], random.Random(20261128))
    assert len(points) >= 10 and {k for k, _ in points} == set(EVENTS)
    print("kill points:", points, "events in a full run:", ref["counts"])
    for i, (kind, n) in enumerate(points):
        log_dir = tmp_path / f"run{i}_{kind}_{n}"
        status = zygote.run(log_dir, tmp_path / f"killed{i}.json", kill=f"{kind}:{n}")
        assert status["signal"] == signal.SIGKILL, (kind, n, status)
        done = _done_before_resume(log_dir)

        status = zygote.run(log_dir, tmp_path / f"resumed{i}.json")
        assert status == {"signal": None, "code": 0}, (kind, n, status)
        res = _result(tmp_path / f"resumed{i}.json")
        where = f"kill at {kind}:{n}"
        assert res["iterations"] == 2 and res["best_score"] == ref["best_score"], where
        assert res["t_star"] == ref["t_star"], where
        assert res["sampled"] == TOTAL_ROLLOUTS - done, f"{where}: completed rollouts were redone"
        for k in range(2):
            assert _rollouts(log_dir, k) == _rollouts(ref_dir, k), where
            partial = (log_dir / f"iter_{k:03d}" / "rollouts.partial.jsonl").read_text().splitlines()
            intact = {(r["example_index"], r["sample_index"]) for r in map(_parse, partial) if r}
            assert len(intact) == TOTAL_ROLLOUTS // 2, f"{where}: a rollout line after a torn one was lost"
        state = json.loads((log_dir / "state.json").read_text())
        assert state["best"]["iteration"] == json.loads((ref_dir / "state.json").read_text())["best"]["iteration"]
        leftovers = [p.name for p in log_dir.rglob(".*") if p.name.endswith((".tmp", ".stage"))]
        assert not leftovers, f"{where}: temporary files left behind: {leftovers}"
        for f in log_dir.rglob("*.json"):
            json.loads(f.read_text())  # every checkpoint file is whole again
