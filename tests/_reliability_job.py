"""A pre-warmed process that forks small compiles which SIGKILL themselves at chosen points.

Used by ``test_reliability_kill.py``. Importing dspy + textgrad takes seconds, so this process imports
everything once and then, for each JSON command read from stdin, forks a child that runs one compile.
A command's ``kill`` is ``"<event>:<n>"``: the child sends itself SIGKILL (no cleanup, no ``finally``) at
the ``n``-th occurrence of the event:

* ``target`` / ``reward`` / ``textgrad`` — inside an LM call of that role (rollouts, validation, TextGrad);
* ``append`` — half-way through appending a rollout line to ``rollouts.partial.jsonl`` (a torn line);
* ``train`` — inside the prompt model's fine-tune, with a half-written adapter folder;
* ``publish`` — inside an atomic checkpoint write: the temporary file is complete, not yet renamed;
* ``torn`` — writing a checkpoint file as a non-atomic file system would: half of it lands in the final
  file, then the process dies (the resumed run must detect and ignore it).

The parent answers each command with one JSON line: ``{"signal": <int or null>, "code": <int or null>}``.
The child writes its result (event counts, prompt-model sampling calls, final stats) to ``result``.

Usage: python -m tests._reliability_job   (then one JSON command per stdin line)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
from collections import Counter
from pathlib import Path

import dspy

from programs.math import MathCoT
from tests.fakes import ScriptedEngine, arithmetic_responder
from trprompt_dspy import TRPromptOptimizer
from trprompt_dspy._lazy import import_textgrad
from trprompt_dspy.backends.prompt_model.fake import FakePromptModel
from trprompt_dspy.runtime.checkpoint import RunDirectory

BUDGET = dict(num_iterations=2, queries_per_iteration=3, prompts_per_query=2, textgrad_steps=1,
              textgrad_batch_size=2, val_size=2)
TEMPLATE = "Add the numbers carefully for {predictor}, then state the sum."


def run_job(log_dir: str, kill: str | None, result: str) -> None:
    counts: Counter[str] = Counter()
    kind, n = (kill.split(":")[0], int(kill.split(":")[1])) if kill else (None, 0)

    def hit(event: str) -> bool:
        counts[event] += 1
        return event == kind and counts[event] == n

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def responder(role: str):
        def fn(system: str, user: str) -> str:
            if hit(role):
                die()
            return arithmetic_responder(system, user)
        return fn

    def lm(role: str) -> dspy.LM:
        return dspy.LM(f"local/{role}", engine=ScriptedEngine(responder(role)), cache=False, num_retries=0)

    original_append = RunDirectory.append_jsonl

    def append(self: RunDirectory, path: str | Path, record: dict) -> None:
        if hit("append"):
            line = json.dumps(record)
            with open(path, "a", encoding="utf-8") as f:
                f.write(line[: len(line) // 2])
                f.flush()
                os.fsync(f.fileno())
            die()
        original_append(self, path, record)

    RunDirectory.append_jsonl = append  # type: ignore[method-assign]
    original_replace = os.replace

    def replace(src, dst, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        target = Path(dst)
        if str(target).startswith(log_dir):
            if hit("publish"):
                die()
            if target.suffix in (".json", ".jsonl") and Path(src).is_file() and hit("torn"):
                data = Path(src).read_bytes()
                target.write_bytes(data[: len(data) // 2])
                die()
        return original_replace(src, dst, *args, **kwargs)

    os.replace = replace

    class KillablePromptModel(FakePromptModel):
        def train(self, examples, *, output_dir, **kwargs):  # noqa: ANN001, ANN003
            if hit("train"):
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                (Path(output_dir) / "adapter_config.json").write_text('{"fake_prompt_mo')
                die()
            return super().train(examples, output_dir=output_dir, **kwargs)

    dspy.configure(lm=lm("target"))
    pm = KillablePromptModel(template=TEMPLATE)
    data = [dspy.Example(question=f"What is {i} + {i + 1}?", answer=str(2 * i + 1)).with_inputs("question")
            for i in range(10)]
    opt = TRPromptOptimizer(metric=lambda ex, pred, trace=None: float(pred.answer == ex.answer), prompt_model=pm,
                            reward_lm=lm("reward"), textgrad_lm=lm("textgrad"), log_dir=log_dir,
                            display_progress=False, retry_backoff=0.0, min_improvement=None, **BUDGET)
    compiled = opt.compile(MathCoT(), trainset=data[:8], valset=data[8:])
    res = compiled.detailed_results
    Path(result).write_text(json.dumps({
        "counts": dict(counts), "sampled": sum(1 for c in pm.calls if c.temperature > 0),
        "trained": len(pm.train_calls), "iterations": len(res.iterations), "best_score": res.best_score,
        "t_star": compiled.cot.predict.optimal_reward,
    }))


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    import_textgrad()  # warm every heavy import before forking
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                run_job(cmd["log_dir"], cmd.get("kill"), cmd["result"])
            except BaseException:
                Path(cmd["result"] + ".err").write_text(traceback.format_exc())
                code = 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        answer = {"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                  "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
