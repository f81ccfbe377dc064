"""The documentation's Python examples run, so they cannot rot.

Every fenced ```` ```python ```` block of ``docs/*.md`` and ``README.md`` is executed in page order, all
blocks of one page sharing one namespace (later blocks use names defined by earlier ones), in a fresh
temporary working directory, with network connections refused. A block is skipped only when the line
right before its fence is ``<!-- docs-test: skip — <reason> -->`` (for code that needs a server, real
models or credentials); the reason is required and skips are kept few.

The API reference is checked too: every public name in ``trprompt_dspy.__all__`` has a
``::: module.Name`` entry in ``docs/api.md`` and a docstring with an ``Example`` section.
"""

from __future__ import annotations

import importlib
import inspect
import re
import socket
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PAGES = [*sorted(DOCS.glob("*.md")), REPO / "README.md"]

_FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)```(?:python|py)\s*$")
_FENCE_ANY = re.compile(r"^[ \t]*```")
_SKIP = re.compile(r"^\s*<!--\s*docs-test:\s*skip\s*[\u2014\u2013:-]+\s*(?P<reason>.*?)\s*-->\s*$")
MAX_SKIPPED = 8  # across all pages; each skip needs a reason


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    code: str
    skip_reason: str | None


def extract_blocks(page: Path) -> list[Block]:
    """The ```python blocks of a Markdown page, with their skip markers."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    last_text = ""  # the last non-blank line before the current one
    while i < len(lines):
        line = lines[i]
        m = _FENCE_OPEN.match(line)
        if m is None:
            if _FENCE_ANY.match(line):  # another language: skip its body so its text is not parsed
                j = i + 1
                while j < len(lines) and not _FENCE_ANY.match(lines[j]):
                    j += 1
                i = j + 1
                last_text = ""
                continue
            if line.strip():
                last_text = line
            i += 1
            continue
        indent, start = m.group("indent"), i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i >= len(lines):
            raise AssertionError(f"{page.name}:{start + 1}: unclosed ```python block")
        skip = _SKIP.match(last_text)
        blocks.append(Block(page, start + 1, textwrap.dedent("\n".join(body)) + "\n",
                            skip.group("reason") if skip else None))
        last_text = ""
        i += 1
    return blocks


@pytest.fixture
def offline(monkeypatch):
    """Refuse every outgoing network connection (the examples must run offline)."""

    def refuse(self, address, *args, **kwargs):  # noqa: ANN001
        if isinstance(address, tuple):
            raise OSError(f"docs examples must run offline; a snippet tried to connect to {address!r}")
        return original(self, address, *args, **kwargs)  # AF_UNIX sockets (local IPC) are fine

    original = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def run_blocks(blocks: list[Block], name: str) -> None:
    """Execute ``blocks`` in order in one namespace; raise ``AssertionError`` naming the failing block."""
    namespace: dict[str, object] = {"__name__": f"docs_{name.replace('-', '_')}"}
    for block in blocks:
        try:
            where = str(block.page.relative_to(REPO))
        except ValueError:
            where = block.page.name
        where = f"{where}:{block.line}"
        try:
            exec(compile(block.code, where, "exec"), namespace)  # noqa: S102 - our own documentation
        except Exception:
            raise AssertionError(f"The Python example at {where} raised:\n{traceback.format_exc()}") from None


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: None) -> None:
    blocks = [b for b in extract_blocks(page) if b.skip_reason is None]
    if not blocks:
        pytest.skip(f"{page.name} has no runnable Python examples")
    monkeypatch.chdir(tmp_path)
    try:
        run_blocks(blocks, page.stem)
    except AssertionError as exc:
        pytest.fail(str(exc), pytrace=False)


def test_a_raising_or_online_example_fails(tmp_path: Path, offline: None) -> None:
    page = tmp_path / "bad.md"
    page.write_text("```python\nx = 1\n```\n\n```python\nassert x == 2, 'x is not 2'\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match=r"(?s)bad.md:5 raised:.*x is not 2"):
        run_blocks(extract_blocks(page), "bad")
    page.write_text("```python\nimport socket\nsocket.create_connection(('192.0.2.1', 80), timeout=1)\n```\n",
                    encoding="utf-8")
    with pytest.raises(AssertionError, match="must run offline"):
        run_blocks(extract_blocks(page), "online")


def test_skipped_examples_are_few_and_give_a_reason() -> None:
    skipped = [b for page in PAGES for b in extract_blocks(page) if b.skip_reason is not None]
    for b in skipped:
        assert b.skip_reason.strip(), f"{b.page.name}:{b.line}: a docs-test skip marker needs a reason"
    assert len(skipped) <= MAX_SKIPPED, (
        f"{len(skipped)} documentation examples are skipped (limit {MAX_SKIPPED}): "
        + ", ".join(f"{b.page.name}:{b.line}" for b in skipped))


def test_extract_blocks_honours_skip_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("Intro\n\n```python\nx = 1\n```\n\n<!-- docs-test: skip — needs a server -->\n"
                    "```python\nraise SystemExit\n```\n\n```bash\n<!-- docs-test: skip — no -->\n```\n"
                    "- item\n\n    ```python\n    y = x + 1\n    ```\n", encoding="utf-8")
    blocks = extract_blocks(page)
    assert [(b.line, b.skip_reason) for b in blocks] == [(3, None), (8, "needs a server"), (17, None)]
    assert blocks[2].code == "y = x + 1\n"


def _public_names() -> list[tuple[str, str]]:
    import trprompt_dspy

    exports = trprompt_dspy._EXPORTS
    return [(name, exports[name]) for name in trprompt_dspy.__all__ if name in exports]


def test_api_reference_lists_every_public_symbol() -> None:
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    directives = set(re.findall(r"^:::\s*([\w.]+)\s*$", api, flags=re.M))
    import trprompt_dspy

    missing = []
    for name, module in _public_names():
        obj = getattr(trprompt_dspy, name)
        defined_in = getattr(inspect.getmodule(obj), "__name__", module) if not isinstance(obj, str) else module
        if not {f"{module}.{name}", f"{defined_in}.{name}"} & directives:
            missing.append(f"{defined_in}.{name}")
    assert not missing, f"docs/api.md has no '::: <module>.<name>' entry for: {missing}"
    for target in directives:  # every directive points at something that exists
        module, _, attr = target.rpartition(".")
        try:
            importlib.import_module(target)
        except ImportError:
            assert hasattr(importlib.import_module(module), attr), f"docs/api.md: {target} does not exist"


def test_every_public_symbol_has_an_example() -> None:
    import trprompt_dspy

    lacking = []
    for name, _ in _public_names():
        obj = getattr(trprompt_dspy, name)
        if isinstance(obj, (str, int, float)):  # constants are documented where they are defined
            continue
        doc = inspect.getdoc(obj) or ""
        if not re.search(r"^\s*Examples?:", doc, flags=re.M):
            lacking.append(name)
    assert not lacking, f"public symbols whose docstring has no 'Example:' section: {lacking}"
