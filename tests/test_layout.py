"""The package layout: no import cycles (function-level imports included), and runs made before the
layout change still resume (the ``log_dir`` fingerprint is byte-identical)."""

from __future__ import annotations

import ast
import collections
import shutil
from pathlib import Path

import dspy

from programs.math import MathCoT
from trprompt_dspy import TRPromptOptimizer
from trprompt_dspy.testing import (
    FakePromptModel,
    addition_examples,
    instruction_following_responder,
    scripted_lm,
)

PACKAGE = Path(__file__).resolve().parent.parent / "trprompt_dspy"
BEFORE = Path(__file__).resolve().parent / "data" / "run_before_layout"
#: The fixture run's metric was a module-level lambda: its fingerprint name is "<lambda>".
METRIC = lambda ex, p, trace=None: float(p.answer == ex.answer)  # noqa: E731


def _module_names() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        if "vllm_cpu_site" in rel.parts:  # loaded into the vLLM process by PYTHONPATH, not imported here
            continue
        name = ".".join(rel.parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (top level or inside functions)."""
    mods = _module_names()
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted.

    Example:
        >>> find_cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}})
        [['a', 'b']]
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_find_cycles_sees_a_function_level_cycle(tmp_path):
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert find_cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_the_package_has_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (function-level imports count): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_a_run_made_before_the_layout_change_resumes_without_new_work(tmp_path):
    log_dir = tmp_path / "run"
    shutil.copytree(BEFORE, log_dir)
    for f in log_dir.rglob("*.json"):  # the saved adapter paths were relative to the repository root
        f.write_text(f.read_text().replace("tests/data/run_before_layout", str(log_dir)))
    dspy.configure(lm=scripted_lm(instruction_following_responder("state the sum"), "target"))
    pm = FakePromptModel(template="Add the numbers carefully for {predictor}, then state the sum.")
    opt = TRPromptOptimizer(metric=METRIC, prompt_model=pm, log_dir=log_dir, display_progress=False, num_iterations=1, queries_per_iteration=2,
                            prompts_per_query=1, textgrad_steps=0, textgrad_batch_size=2, val_size=2,
                            significance_level=None,  # 2 / 0 on 2 examples can pass no sign test; this is about resume
                            # the recipe and trainer settings that run was made with
                            textual_rewards="critique", abstain=False, sft={"max_length": 512, "group_by_length": False,
                                                                            "gradient_checkpointing": False})
    compiled = opt.compile(MathCoT(), trainset=addition_examples(6), valset=addition_examples(2, start=40))
    assert (log_dir / "run.json").read_bytes() == (BEFORE / "run.json").read_bytes()  # fingerprint unchanged
    assert pm.train_calls == [] and not [c for c in pm.calls if c.temperature > 0]  # nothing was redone
    assert compiled.detailed_results.selected == 0 and compiled.detailed_results.best_score == 1.0


def test_old_import_paths_still_work_with_a_deprecation_warning():
    import importlib
    import sys
    import warnings

    from trprompt_dspy._moved import MOVED

    assert "trprompt_dspy.loop" not in MOVED  # now the package of the loop's steps
    for old, new in [("trprompt_dspy.metrics", "trprompt_dspy.tasks.metrics"),
                     ("trprompt_dspy.prompt_model.fake", "trprompt_dspy.backends.prompt_model.fake"),
                     ("trprompt_dspy.artifact", "trprompt_dspy.compiled.artifact")]:
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert module is importlib.import_module(new), old  # the same module object: one class per name
        assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), old
    for old, new in MOVED.items():  # every alias points at a module that exists
        assert importlib.util.find_spec(new) is not None, (old, new)
