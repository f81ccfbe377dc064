"""Aggregate the comparison's per-cell records into summary rows, significance tests, a table and a plot.

A *cell* is one (dataset, optimizer, seed) run: a dict with ``dataset``, ``optimizer``, ``seed``,
``status`` (``"ok"``/``"failed"``/``"skipped"``), ``accuracy``, ``budget_calls`` (compile calls counted
against the budget), ``compile``/``eval`` counters and ``per_example`` outcomes (``{"idx", "correct"}``).

Example:
    >>> cells = [dict(dataset="gsm8k", optimizer=o, seed=s, status="ok", accuracy=a, budget_calls=c,
    ...               compile={"wall_s": 1.0, "calls": {"total": {"input_tokens": 5, "output_tokens": 2}}},
    ...               eval={"wall_s": 2.0}, plan={"predicted_calls": c},
    ...               per_example=[{"idx": i, "correct": x} for i, x in enumerate(ex)])
    ...          for o, c, runs in (("zeroshot", 0, [[1, 0, 0, 0], [1, 0, 0, 0]]),
    ...                             ("trprompt", 40, [[1, 1, 0, 1], [1, 1, 1, 0]]))
    ...          for s, ex in enumerate(runs) for a in [sum(ex) / len(ex)]]
    >>> rows = summarize(cells)
    >>> [(r["optimizer"], r["accuracy_mean"], r["seeds"]) for r in rows]
    [('zeroshot', 0.25, 2), ('trprompt', 0.75, 2)]
    >>> sig = significance(cells, seed=0)["gsm8k"]
    >>> sig["other"], sig["mcnemar"]["b"], sig["mcnemar"]["c"]
    ('zeroshot', 4, 0)
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._contenders import CONTENDERS, LABELS
from trprompt_dspy.apps.stats import discordant_counts, mcnemar_exact, mean_std, paired_bootstrap, wilson

logger = logging.getLogger(__name__)

__all__ = ["summarize", "significance", "pairwise_tests", "markdown_report", "plot_accuracy_vs_calls"]


def _order(name: str) -> int:
    return CONTENDERS.index(name) if name in CONTENDERS else len(CONTENDERS)


def _ok(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in cells if c.get("status") == "ok"]


_CAPPED = re.compile(r"over the cap of (\d+)")


def summarize(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, optimizer): accuracy mean/std over seeds, mean calls, tokens and wall times."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        groups[(c["dataset"], c["optimizer"])].append(c)
    rows = []
    for (dataset, opt), group in sorted(groups.items(), key=lambda kv: (kv[0][0], _order(kv[0][1]))):
        ok = sorted(_ok(group), key=lambda c: c["seed"])
        row: dict[str, Any] = {"dataset": dataset, "optimizer": opt, "label": LABELS.get(opt, opt), "seeds": len(ok),
                               "failed": [{"seed": c["seed"], "status": c.get("status"), "error": c.get("error")}
                                          for c in group if c.get("status") != "ok"]}
        caps = sorted({m.group(1) for c in ok if (m := _CAPPED.search(c.get("plan", {}).get("note") or ""))}, key=int)
        if caps:  # the preset was over --cap-calls / --cap-calls-for and was sized down: say so in every table
            row["label"] += f" (capped at {'/'.join(caps)} calls)"
        if ok:
            acc_mean, acc_std = mean_std([c["accuracy"] for c in ok])
            calls_mean, calls_std = mean_std([c.get("budget_calls") or 0 for c in ok], digits=1)
            tok = [c["compile"]["calls"]["total"] for c in ok]
            predicted = [c.get("plan", {}).get("predicted_calls") for c in ok]
            row.update(
                accuracy_mean=acc_mean, accuracy_std=acc_std, accuracy_per_seed=[c["accuracy"] for c in ok],
                calls_mean=calls_mean, calls_std=calls_std,
                program_calls_mean=mean_std([c["compile"]["calls"].get("target", {}).get("calls", 0) for c in ok],
                                            digits=1)[0],
                aux_calls_mean=mean_std([c["compile"]["calls"].get("aux", {}).get("calls", 0) for c in ok], digits=1)[0],
                predicted_calls=predicted[0] if len(set(map(str, predicted))) == 1 else predicted,
                input_tokens_mean=mean_std([t["input_tokens"] for t in tok], digits=0)[0],
                output_tokens_mean=mean_std([t["output_tokens"] for t in tok], digits=0)[0],
                compile_wall_s_mean=mean_std([c["compile"]["wall_s"] for c in ok], digits=1)[0],
                eval_wall_s_mean=mean_std([c["eval"]["wall_s"] for c in ok], digits=1)[0],
                test_size=len(ok[0].get("per_example", [])),
            )
            row.update(_extra_fields(ok))
        rows.append(row)
    return rows


def _per_question(ok: list[dict[str, Any]], phase: str, key: str) -> float | None:
    """Mean over seeds of ``phase``'s counted target-LM ``key`` (calls or tokens) per evaluated question."""
    vals = []
    for c in ok:
        n = c.get(phase, {}).get("n") or len(c.get("per_example", [])) or 0
        if not n:
            return None
        vals.append(c.get(phase, {}).get("calls", {}).get("total", {}).get(key, 0) / n)
    return round(sum(vals) / len(vals), 1) if vals else None


def _extra_fields(ok: list[dict[str, Any]]) -> dict[str, Any]:
    """Fields added to a summary row (the earlier ones keep their names): CI, dev score, cost per question.

    ``accuracy_ci95`` is Wilson's interval over every test answer of every seed; ``*_per_question`` are the
    compiled program's target-LM calls and tokens per test question, plus (``prompt_model_*``) the
    instructions and tokens of TRPrompt's prompt model, which is served outside the call counter.
    """
    k = sum(int(bool(e["correct"])) for c in ok for e in c.get("per_example", []))
    n = sum(len(c.get("per_example", [])) for c in ok)
    out: dict[str, Any] = {"accuracy_ci95": [round(x, 4) for x in wilson(k, n)] if n else None}
    devs = [c["dev"]["accuracy"] for c in ok if isinstance(c.get("dev"), dict)]
    out["dev_accuracy_mean"] = round(sum(devs) / len(devs), 4) if devs and len(devs) == len(ok) else None
    out["eval_calls_per_question"] = _per_question(ok, "eval", "calls")
    out["eval_input_tokens_per_question"] = _per_question(ok, "eval", "input_tokens")
    out["eval_output_tokens_per_question"] = _per_question(ok, "eval", "output_tokens")
    pms = [c.get("eval", {}).get("prompt_model") for c in ok]
    if all(isinstance(p, dict) for p in pms):
        n_eval = [c["eval"].get("n") or len(c["per_example"]) for c in ok]
        out["prompt_model_instructions_per_question"] = round(
            sum(p.get("instructions", 0) / m for p, m in zip(pms, n_eval, strict=True)) / len(ok), 2)
        out["prompt_model_tokens_per_question"] = round(
            sum((p.get("prompt_tokens", 0) + p.get("completion_tokens", 0)) / m
                for p, m in zip(pms, n_eval, strict=True)) / len(ok), 1)
    stats = [c.get("optimizer_stats") for c in ok]
    if stats and all(isinstance(st, dict) and "selected" in st for st in stats):
        # what TRPrompt's compile returned (the student or an iteration) and the valset scores behind it, per seed
        out["selection"] = [{k: st.get(k) for k in ("selected", "baseline_score", "best_score", "best_iteration",
                                                    "selection_p_value", "val_size")} for st in stats]
    runs = [c.get("compile", {}).get("attempts") for c in ok]
    if any(runs):  # a TRPrompt compile killed and continued with --resume (benchmarks/_attempts.py)
        out["compile_attempts"] = [r or [] for r in runs]
    bases = sorted({c["stacked_on"]["optimizer"] for c in ok if isinstance(c.get("stacked_on"), dict)})
    if bases:
        out["stacked_on"] = bases[0] if len(bases) == 1 else bases
        out["label"] = f"TRPrompt on {', '.join(LABELS.get(b, b) for b in bases)}"
    return out


def _mcnemar_pair(groups: dict[str, list[dict[str, Any]]], a: str, b: str) -> dict[str, Any] | None:
    """Exact McNemar of contender ``a`` against ``b`` over the seeds both finished (``None``: none)."""
    seeds = sorted({c["seed"] for c in groups[a]} & {c["seed"] for c in groups[b]})
    if not seeds:
        return None
    only_a, only_b = discordant_counts(_outcome_rows(groups[a], seeds), _outcome_rows(groups[b], seeds))
    return {"other": b, "seeds": seeds, "b": only_a, "c": only_b, "p_value": mcnemar_exact(only_a, only_b)["p_value"]}


def pairwise_tests(cells: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per dataset and contender: exact McNemar against zero-shot and against the best *other* contender.

    The best other is the one with the highest mean test accuracy among the rest (ties to the one listed
    first); only seeds both have finished are paired. Returns
    ``{dataset: {optimizer: {"vs_zeroshot": {...}, "vs_best_other": {...}}}}`` where each test is
    ``{"other", "seeds", "b", "c", "p_value"}`` (``b``: questions only this contender got right).

    Example:
        >>> cells = [dict(dataset="d", optimizer=o, seed=0, status="ok", accuracy=sum(x) / 4,
        ...               per_example=[{"idx": i, "correct": v} for i, v in enumerate(x)])
        ...          for o, x in (("zeroshot", [1, 0, 0, 0]), ("mipro", [1, 1, 0, 0]), ("gepa", [1, 1, 1, 1]))]
        >>> t = pairwise_tests(cells)["d"]
        >>> t["gepa"]["vs_zeroshot"]["b"], t["gepa"]["vs_best_other"]["other"], t["mipro"]["vs_best_other"]["other"]
        (3, 'mipro', 'gepa')
    """
    out: dict[str, dict[str, Any]] = {}
    ok = _ok(cells)
    for dataset in sorted({c["dataset"] for c in ok}):
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for c in ok:
            if c["dataset"] == dataset:
                groups[c["optimizer"]].append(c)
        means = {o: sum(c["accuracy"] for c in g) / len(g) for o, g in groups.items()}

        rows: dict[str, Any] = {}
        for name in sorted(groups, key=_order):
            others = sorted((o for o in groups if o != name), key=_order)
            best = max(others, key=lambda o: means[o]) if others else None
            vs_zs = name != "zeroshot" and "zeroshot" in groups
            rows[name] = {"vs_zeroshot": _mcnemar_pair(groups, name, "zeroshot") if vs_zs else None,
                          "vs_best_other": _mcnemar_pair(groups, name, best) if best else None}
        out[dataset] = rows
    return out


def _predicted(value: Any) -> str:
    """The planner's estimate for the table: one number, a range when seeds differ, or a dash.

    Example:
        >>> _predicted(214), _predicted([231, 229]), _predicted(None)
        ('214', '229–231', '—')
    """
    if value is None:
        return "—"
    if isinstance(value, list):
        nums = [v for v in value if isinstance(v, int | float)]
        return f"{min(nums):.0f}–{max(nums):.0f}" if nums else "—"
    return str(value)


def _outcome_rows(cells: list[dict[str, Any]], seeds: list[int]) -> list[list[int]]:
    by_seed = {c["seed"]: c for c in cells}
    rows = []
    for s in seeds:
        ex = sorted(by_seed[s]["per_example"], key=lambda e: e["idx"])
        rows.append([int(bool(e["correct"])) for e in ex])
    return rows


def significance(cells: Sequence[dict[str, Any]], *, focus: str = "trprompt", iterations: int = 10_000,
                 seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per dataset: ``focus`` against the best other optimizer (highest mean accuracy), paired by seed.

    Returns ``{dataset: {"focus", "other", "seeds", "mcnemar": {...}, "bootstrap": {...}}}``; datasets
    where ``focus`` or every other optimizer lacks finished cells are left out.
    """
    out: dict[str, dict[str, Any]] = {}
    ok = _ok(cells)
    for dataset in sorted({c["dataset"] for c in ok}):
        mine = [c for c in ok if c["dataset"] == dataset and c["optimizer"] == focus]
        if not mine:
            continue
        others: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for c in ok:
            if c["dataset"] == dataset and c["optimizer"] != focus:
                others[c["optimizer"]].append(c)
        best, best_acc = None, -1.0
        for name, group in sorted(others.items(), key=lambda kv: _order(kv[0])):
            acc = sum(c["accuracy"] for c in group) / len(group)
            if acc > best_acc:
                best, best_acc = name, acc
        if best is None:
            continue
        seeds = sorted({c["seed"] for c in mine} & {c["seed"] for c in others[best]})
        if not seeds:
            continue
        a = _outcome_rows(mine, seeds)
        b = _outcome_rows(others[best], seeds)
        only_a, only_b = discordant_counts(a, b)
        out[dataset] = {"focus": focus, "other": best, "seeds": seeds, "mcnemar": mcnemar_exact(only_a, only_b),
                        "bootstrap": paired_bootstrap(a, b, iterations=iterations, seed=seed)}
    return out


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _one_line(text: object, limit: int) -> str:
    """``text`` on one line, at most ``limit`` characters, safe inside a Markdown table cell."""
    return " ".join(str(text).split())[:limit].replace("|", "\\|")


def _p(test: dict[str, Any] | None) -> str:
    if not test:
        return "—"
    return f"{test['p_value']:.3g} ({test['b']}/{test['c']} vs {LABELS.get(test['other'], test['other'])})"


def _selection_words(sel: dict[str, Any]) -> str:
    """One seed's TRPrompt selection in words, e.g. "the student (valset: student 0.360, best iteration 0.400, ...)"."""
    what = "the student" if sel.get("selected") == "student" else f"iteration {sel.get('selected')}"
    p = sel.get("selection_p_value")
    fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    return (f"{what} (valset of {sel.get('val_size')}: student {fmt(sel.get('baseline_score'))}, best iteration "
            f"{fmt(sel.get('best_score'))}" + ("" if p is None else f", sign-test p = {p:.3g}") + ")")


def markdown_report(meta: dict[str, Any], rows: Sequence[dict[str, Any]], sig: dict[str, dict[str, Any]],
                    plot_name: str | None = None, pairwise: dict[str, dict[str, Any]] | None = None) -> str:
    """The Markdown summary: run settings, one table per dataset, the significance tests and the plot."""
    lines = [f"# Optimizer comparison: {meta.get('name', '')}", "",
             f"Program `{meta.get('program')}`, target `{meta.get('target')}`"
             + (f", reflection/proposer model `{meta['aux_model']}`" if meta.get("aux_model") else "")
             + f"; train {meta.get('train_size')} / dev {meta.get('dev_size')} / test {meta.get('test_size')} "
             f"examples; seeds {meta.get('seeds')}; budget: {meta.get('budget_mode')}.", "",
             "Accuracy is on the fixed test indices of `splits.json` (first `test_size`). *Calls* are completions "
             "sent to the target model during compile, counted by a wrapper LM"
             + (" (program calls + optimizer-side calls on the same model)" if meta.get("budget_counts_aux", True)
                else " (program calls only; the optimizer-side model is separate)")
             + "; *predicted* is the planner's estimate for the chosen settings.", ""]
    for dataset in sorted({r["dataset"] for r in rows}):
        lines += [f"## {dataset}", "",
                  "| optimizer | test acc % (mean ± std) | seeds | calls (mean) | predicted | program / aux calls "
                  "| tokens in / out | compile s | eval s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in (r for r in rows if r["dataset"] == dataset):
            if not r["seeds"]:
                why = "; ".join(f"seed {f['seed']}: {f['status']} ({_one_line(f.get('error'), 80)})" for f in r["failed"])
                lines.append(f"| {r['label']} | not finished: {why} | 0 | | | | | | |")
                continue
            lines.append(
                f"| {r['label']} | {_pct(r['accuracy_mean'])} ± {_pct(r['accuracy_std'])} | {r['seeds']} "
                f"| {r['calls_mean']:.0f} | {_predicted(r['predicted_calls'])} "
                f"| {r['program_calls_mean']:.0f} / {r['aux_calls_mean']:.0f} "
                f"| {r['input_tokens_mean']:.0f} / {r['output_tokens_mean']:.0f} "
                f"| {r['compile_wall_s_mean']:.0f} | {r['eval_wall_s_mean']:.0f} |")
        for row in meta.get("pending") or ():
            lines.append(f"| {_one_line(row['label'], 80)} | pending: {_one_line(row['reason'], 160)} | 0 | | | | | | |")
        pw = (pairwise or {}).get(dataset)
        if pw:
            lines += ["", "| optimizer | test acc % | 95 % CI | dev acc % | McNemar p vs zero-shot (only this / only other) "
                          "| McNemar p vs best other | target calls / question | tokens in / out per question "
                          "| prompt-model tokens / question |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for r in (r for r in rows if r["dataset"] == dataset and r["seeds"]):
                ci, t = r.get("accuracy_ci95"), pw.get(r["optimizer"], {})
                pm = r.get("prompt_model_tokens_per_question")
                lines.append(
                    f"| {r['label']} | {_pct(r['accuracy_mean'])} | "
                    + (f"{_pct(ci[0])}–{_pct(ci[1])}" if ci else "—")
                    + f" | {_pct(r.get('dev_accuracy_mean'))} | {_p(t.get('vs_zeroshot'))} | {_p(t.get('vs_best_other'))} "
                    f"| {r.get('eval_calls_per_question') if r.get('eval_calls_per_question') is not None else '—'} "
                    f"| {r.get('eval_input_tokens_per_question') or '—'} / {r.get('eval_output_tokens_per_question') or '—'} "
                    f"| {'—' if pm is None else pm} |")
        for r in (r for r in rows if r["dataset"] == dataset and r.get("selection")):
            lines += ["", f"{r['label']}: compile returned " + "; ".join(_selection_words(x) for x in r["selection"]) + "."]
        for r in (r for r in rows if r["dataset"] == dataset and r.get("compile_attempts")):
            lines += ["", f"{r['label']}: compile killed and continued from its checkpoints (`--resume`); calls and "
                          "compile seconds above add up every attempt: " + "; ".join(
                              ", ".join(f"{a.get('wall_s', 0):.0f} s / {a.get('calls')} calls on {a.get('cpu')}"
                                        for a in seed_runs) for seed_runs in r["compile_attempts"]) + "."]
        s = sig.get(dataset)
        if s:
            bs, mc = s["bootstrap"], s["mcnemar"]
            lines += ["", f"TRPrompt vs {LABELS.get(s['other'], s['other'])} (best other, seeds {s['seeds']}): "
                          f"difference {100 * bs['diff']:+.1f} points, 95 % paired-bootstrap CI "
                          f"[{100 * bs['ci95'][0]:+.1f}, {100 * bs['ci95'][1]:+.1f}], bootstrap p = {bs['p_value']:.3g} "
                          f"({bs['iterations']} resamples, seed {bs['seed']}); exact McNemar p = {mc['p_value']:.3g} "
                          f"(discordant pairs: TRPrompt only {mc['b']}, other only {mc['c']})."]
        lines.append("")
    if plot_name:
        lines += [f"![accuracy vs target-LM calls]({plot_name})", ""]
    lines += [f"Machine: {meta.get('machine', {}).get('summary', '?')}. Wall time of the cells (compile + eval, "
              f"summed): {meta.get('cells_wall_s', 0):.0f} s; this invocation: {meta.get('wall_s', 0):.0f} s.", ""]
    return "\n".join(lines)


def plot_accuracy_vs_calls(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Save a PNG: test accuracy (mean ± std over seeds) against compile calls, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    done = [r for r in rows if r.get("seeds")]
    datasets = sorted({r["dataset"] for r in done}) or ["(no results)"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(max(7.0, 5.5 * len(datasets)), 4.4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for r in (r for r in done if r["dataset"] == dataset):
            x, y = r["calls_mean"], 100 * r["accuracy_mean"]
            marker = "*" if r["optimizer"].startswith("trprompt") else "o"
            ax.errorbar([x], [y], yerr=[100 * r["accuracy_std"]], xerr=[r["calls_std"]], fmt=marker,
                        markersize=12 if marker == "*" else 7, capsize=3, label=r["label"])
        xmax = max([r["calls_mean"] + r["calls_std"] for r in done if r["dataset"] == dataset] or [1.0])
        if xmax > 100:  # zero-call contenders sit at 0, the rest spread over orders of magnitude
            ax.set_xscale("symlog", linthresh=10)
            ax.set_xlim(-1, xmax * 2)
        else:
            ax.set_xlim(-0.05 * max(xmax, 1) - 0.5, xmax * 1.25 + 1)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: "" if v < 0 else f"{v:g}"))
        ax.set_ylim(max(-2.0, ax.get_ylim()[0] - 5), min(105.0, ax.get_ylim()[1] + 5))
        ax.set_xlabel("target-LM calls during compile (counted)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        if any(r["dataset"] == dataset for r in done):  # a legend, not labels: close points would overlap them
            ax.legend(fontsize=7, loc="best", numpoints=1)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
