"""Run reports: a Markdown page and PNG plots for a baseline-vs-compiled comparison.

``trprompt demo`` writes ``runs/<timestamp>/report.md`` with this module; it works on any results
dictionary of the same shape, so a user's own runs can be reported the same way.

The report leads with the compile's decision (:func:`~trprompt_dspy.apps.decision.decision_summary`: what
``compile`` returned, the validation counts behind it, what the trained iteration writes, what to try
next), then the held-out comparison, the failed program runs by phase and kind, timings and the compile's
iterations. When ``compile`` returned the student, the example instructions are the ones the rejected
iteration wrote on the validation questions, labelled as such.

The plots (matplotlib, from the ``bench`` extra; skipped with a warning when it is missing):

* ``validation.png``: validation score of the baseline and of every iteration (and the mean score of the
  iteration's sampled rollouts), the selected iteration marked;
* ``scores.png``: held-out outcomes before/after compiling (correct / wrong / error) and the paired
  transitions (fixed, broken, both right, both wrong);
* ``instruction_length.png``: length in words of the instructions the prompt model wrote, per iteration's
  rollouts and on the held-out queries.

Example:
    >>> rows_b = [{"correct": True}, {"correct": False}, {"correct": False}]
    >>> rows_c = [{"correct": True}, {"correct": True}, {"correct": False}]
    >>> paired_outcomes(rows_b, rows_c)
    {'both_right': 1, 'fixed': 1, 'broken': 0, 'both_wrong': 1}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trprompt_dspy.results import STUDENT

logger = logging.getLogger(__name__)

__all__ = ["paired_outcomes", "mcnemar_p", "rollout_instruction_lengths", "write_plots", "render_report"]


def paired_outcomes(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Count per-example transitions between two evaluations of the same examples (same order).

    Raises:
        ValueError: The two evaluations cover a different number of examples.
    """
    if len(before) != len(after):
        raise ValueError(f"paired_outcomes needs the same examples in both runs; got {len(before)} and "
                         f"{len(after)} rows. Evaluate both programs on the same list.")
    out = {"both_right": 0, "fixed": 0, "broken": 0, "both_wrong": 0}
    for b, a in zip(before, after, strict=True):
        key = {(True, True): "both_right", (False, True): "fixed", (True, False): "broken",
               (False, False): "both_wrong"}[(bool(b["correct"]), bool(a["correct"]))]
        out[key] += 1
    return out


def mcnemar_p(fixed: int, broken: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pair counts (:func:`~trprompt_dspy.apps.stats.mcnemar_exact`).

    Example:
        >>> round(mcnemar_p(8, 1), 4)
        0.0391
        >>> mcnemar_p(0, 0)
        1.0
    """
    from trprompt_dspy.apps.stats import mcnemar_exact

    return float(mcnemar_exact(fixed, broken)["p_value"])


def _words(text: str | None) -> int:
    return len((text or "").split())


def rollout_instruction_lengths(log_dir: str | Path | None) -> dict[int, list[int]]:
    """Word counts of the sampled instructions per iteration, read from a run's ``log_dir``."""
    lengths: dict[int, list[int]] = {}
    if not log_dir:
        return lengths
    for path in sorted(Path(log_dir).glob("iter_*/rollouts.json")):
        try:
            rows = json.loads(path.read_text())
            k = int(path.parent.name.split("_")[1])
        except (OSError, ValueError):
            logger.warning("Skipping unreadable %s in the report", path)
            continue
        vals = []
        for row in rows:
            for ins in row.get("instructions") or []:
                vals.append(_words(ins.get("instruction") if isinstance(ins, dict) else str(ins)))
        lengths[k] = vals
    return lengths


def write_plots(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the report's PNG plots into ``out_dir``; return the files written ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed, so the report has no plots; pip install 'trprompt-dspy[bench]'")
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    stats = results.get("compile_stats") or {}

    iters = stats.get("iterations") or []
    if iters:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        xs = [-1] + [it["iteration"] for it in iters]
        val = [stats.get("baseline_score")] + [it.get("val_score") for it in iters]
        ax.plot(xs, [float("nan") if v is None else v for v in val], "o-", label="validation score")
        ax.plot([it["iteration"] for it in iters], [it.get("rollout_score") for it in iters], "s--",
                label="rollout score (sampled instructions)")
        chosen = stats.get("selected", stats.get("best_iteration"))
        if isinstance(chosen, int):
            ax.axvline(chosen, color="grey", ls=":", label=f"selected: iteration {chosen}")
        elif chosen == "student":
            ax.axvline(-1, color="grey", ls=":", label="selected: the student")
        ax.set_xticks(xs, ["baseline"] + [str(x) for x in xs[1:]])
        ax.set_xlabel("iteration")
        ax.set_ylabel("mean metric score")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("Validation score per iteration")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "validation.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    base_rows, comp_rows = results.get("baseline_rows") or [], results.get("compiled_rows") or []
    if base_rows:
        fig, axes = plt.subplots(1, 2 if comp_rows else 1, figsize=(8 if comp_rows else 4, 3.6), squeeze=False)
        cats = ["correct", "wrong", "error"]

        def counts(rows: list[dict[str, Any]]) -> list[int]:
            err = sum(1 for r in rows if r.get("answer") is None)
            ok = sum(1 for r in rows if r["correct"])
            return [ok, len(rows) - ok - err, err]

        width = 0.38
        ax = axes[0][0]
        ax.bar([i - width / 2 for i in range(3)], counts(base_rows), width, label="baseline")
        if comp_rows:
            ax.bar([i + width / 2 for i in range(3)], counts(comp_rows), width, label="TRPrompt")
        ax.set_xticks(range(3), cats)
        ax.set_ylabel("held-out examples")
        ax.set_title("Outcomes before / after")
        ax.legend(fontsize=8)
        if comp_rows:
            pairs = paired_outcomes(base_rows, comp_rows)
            ax = axes[0][1]
            ax.bar(list(pairs), list(pairs.values()), color=["tab:green", "tab:blue", "tab:red", "tab:grey"])
            ax.set_title("Paired transitions (baseline -> compiled)")
            ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        written.append(out_dir / "scores.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    lengths = rollout_instruction_lengths(stats.get("log_dir"))
    held = [_words(r.get("instruction")) for r in comp_rows if r.get("instruction")]
    if lengths or held:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        data, labels = [], []
        for k in sorted(lengths):
            if lengths[k]:
                data.append(lengths[k])
                labels.append(f"iter {k} rollouts")
        if held:
            data.append(held)
            labels.append("held-out (compiled)")
        ax.boxplot(data, tick_labels=labels)
        ax.set_ylabel("instruction length (words)")
        ax.set_title("Length of the per-query instructions")
        ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        written.append(out_dir / "instruction_length.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def _fmt_pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}%"


def _decision_lines(results: dict[str, Any]) -> list[str]:
    """The decision summary (``results["decision"]``, else computed from ``compile_stats``) as Markdown."""
    from trprompt_dspy.apps.decision import decision_summary
    from trprompt_dspy.config import DEFAULT_SIGNIFICANCE_LEVEL

    stats = results.get("compile_stats")
    decision = results.get("decision")
    if decision is None and stats:
        decision = decision_summary(stats, target=results.get("target"),
                                    significance_level=results.get("significance_level", DEFAULT_SIGNIFICANCE_LEVEL))
    out: list[str] = []
    for line in decision or ():
        if line.startswith("  - "):
            out.append(line[2:])
        else:
            out += ["", f"**Decision:**{line[len('Decision:'):]}" if line.startswith("Decision:") else line]
    return out


def _failure_lines(results: dict[str, Any]) -> list[str]:
    """One bullet per phase in which program runs failed (held-out evaluations first, then the compile's phases)."""
    from trprompt_dspy.loop.rollouts import describe_failures

    phases = {**(results.get("errors_by_phase") or {}),
              **((results.get("compile_stats") or {}).get("errors_by_phase") or {})}
    if not phases:
        return []
    said = [describe_failures(phase, counts) for phase, counts in phases.items()]
    said = [f"- {s}" for s in said if s]
    return ["", "## Failed program runs", ""] + (said or ["No program run failed."])


def _example_lines(results: dict[str, Any], max_examples: int) -> list[str]:
    """Example instructions: the returned iteration's on held-out questions, or the rejected iteration's on
    validation questions when ``compile`` returned the student (whose rows have no instruction)."""
    from trprompt_dspy.apps.decision import iteration_examples, load_evidence

    stats = results.get("compile_stats") or {}
    comp_rows = results.get("compiled_rows") or []
    if stats and stats.get("selected", STUDENT) == STUDENT:
        ev = load_evidence(stats)
        examples = iteration_examples(ev, max_examples)
        if not examples:
            return []
        k = ev.iteration
        lines = ["", f"## Instructions of the rejected iteration {k} (validation questions)", "",
                 f"Compile returned your program unchanged, so the held-out runs above had no instruction. This is "
                 f"what iteration {k} wrote for validation questions (those it won or lost against your program "
                 "first):", ""]
        for e in examples:
            said = repr(e["instruction"]) if e["instruction"].strip() else "none (your program's own prompt)"
            lines += [f"- **Q:** {e['question'][:220]}", f"  - instruction (rejected): {said}",
                      f"  - your program: {e['student']}; iteration {k}: {e['iteration']}"]
        return lines
    if not comp_rows:
        return []
    lines = ["", "## Example per-query instructions (held-out)", ""]
    for ex in comp_rows[:max_examples]:
        said = repr(ex["instruction"]) if ex.get("instruction") else "none (the program's own prompt)"
        lines += [f"- **Q:** {ex['question'][:220]}", f"  - instruction: {said}",
                  f"  - answer: {ex.get('answer')!r} (gold {ex['gold']}, "
                  f"{'correct' if ex['correct'] else 'wrong'})"]
    return lines


def render_report(results: dict[str, Any], *, plots: Sequence[str | Path] = (), max_examples: int = 6) -> str:
    """Render the Markdown report of a demo-shaped results dict (see ``trprompt_dspy.apps.demo``)."""
    n = results.get("eval_size")
    stats = results.get("compile_stats")
    lines = ["# TRPrompt run report", *_decision_lines(results), "",
             f"Program `{results.get('program')}`, target `{results.get('target')}` "
             f"(backend: {results.get('backend', 'n/a')}), prompt model `{results.get('prompt_model', 'n/a')}`"
             f"{' (single-base: a LoRA adapter on the target weights, one server)' if results.get('single_base') else ''}. "
             f"GSM8K: {results.get('train_size')} training examples, {n} held-out dev examples, "
             f"auto={results.get('auto')!r}, seed {results.get('seed')}.", "",
             "| program | accuracy (held-out) | correct |", "| --- | --- | --- |"]
    base_rows, comp_rows = results.get("baseline_rows") or [], results.get("compiled_rows") or []
    lines.append(f"| zero-shot CoT (baseline) | {_fmt_pct(results.get('baseline_accuracy'))} | "
                 f"{sum(r['correct'] for r in base_rows)}/{len(base_rows)} |")
    if "compiled_accuracy" in results:
        label = "TRPrompt-compiled"
        if stats and stats.get("selected") == STUDENT:
            label += " (compile returned your program unchanged)"
        lines.append(f"| {label} | {_fmt_pct(results.get('compiled_accuracy'))} | "
                     f"{sum(r['correct'] for r in comp_rows)}/{len(comp_rows)} |")
    if base_rows and comp_rows:
        pairs = paired_outcomes(base_rows, comp_rows)
        lines += ["", f"Paired: {pairs['fixed']} fixed, {pairs['broken']} broken, {pairs['both_right']} right "
                      f"in both, {pairs['both_wrong']} wrong in both; exact McNemar p = "
                      f"{mcnemar_p(pairs['fixed'], pairs['broken']):.3f}."]
    lines += _failure_lines(results)
    timings = results.get("timings_s") or {}
    if timings:
        lines += ["", "## Wall time per phase", "", "| phase | seconds |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in timings.items()]
    servers = results.get("servers") or {}
    if servers:
        lines += ["", "Servers: " + "; ".join(f"{k}: {v.get('model')} at {v.get('base_url')}, started in "
                                                 f"{v.get('startup_seconds')} s"
                                                 + (f", {v['dtype']}" if v.get("dtype") else "")
                                                 for k, v in servers.items())]
    cpu = results.get("cpu")
    if cpu:
        lines += ["", f"CPU: {cpu.get('model')}, {cpu.get('cores')} cores, native bf16: {cpu.get('native_bf16')} "
                      f"(flags: {', '.join(cpu.get('flags') or []) or 'none'})."]
    capped = [(label, c) for label, c in (("compile", (results.get("compile_stats") or {}).get("instructions")),
                                          ("held-out eval", results.get("compiled_instructions"))) if c]
    if capped:
        lines += ["", "Instructions that hit the token cap (end mid-sentence): " + "; ".join(
            f"{label} {c['hit_cap']}/{c['instructions']} ({100 * c['hit_cap_rate']:.1f} %, cap "
            f"{c.get('max_instruction_tokens')} tokens)" for label, c in capped) + "."]
    if stats:
        lines += ["", "## Compile", "",
                  f"Validation ({stats.get('val_size', '?')} examples): student {stats.get('baseline_score')}, best "
                  f"iteration {stats.get('best_iteration')} {stats.get('best_score')}; returned: "
                  f"{stats.get('selected', stats.get('best_iteration'))}.",
                  f"LM calls per role: {stats.get('lm_calls')}; failures: {stats.get('failures') or 'none'}.", ""]
        lines += ["| iteration | rollout score | validation | SFT examples | SFT steps | t* accepted | seconds |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for it in stats.get("iterations") or []:
            secs = ", ".join(f"{k} {v:.0f}" for k, v in (it.get("seconds") or {}).items())
            lines.append(f"| {it['iteration']} | {it['rollout_score']:.3f} | {it.get('val_score')} | "
                         f"{it['num_sft_examples']} | {it['sft_steps']} | {it['t_star_accepted']} | {secs} |")
        lines += ["", f"Optimal textual reward t* at the end: {stats['t_star_history'][-1]!r}"]
    for p in plots:
        name = Path(p).name
        lines += ["", f"![{Path(p).stem}]({name})"]
    lines += _example_lines(results, max_examples)
    return "\n".join(lines) + "\n"
