"""Lazy imports of heavy optional dependencies, with install hints.

``import trprompt_dspy`` stays light: torch, transformers, peft, trl and textgrad are only imported
when a feature that needs them runs. :func:`require` turns a missing package into an ``ImportError``
that names the extra to install.

Example:
    >>> from trprompt_dspy._lazy import require
    >>> json = require("json", extra="core")
    >>> json.dumps([1])
    '[1]'
"""

from __future__ import annotations

import importlib
import os
import tempfile
from types import ModuleType

__all__ = ["require", "import_textgrad"]

_EXTRA_HINTS = {
    "train": "pip install 'trprompt-dspy[train]' -c constraints/cpu.txt   (drop -c on GPU machines)",
    "bench": "pip install 'trprompt-dspy[bench]'",
    "docs": "pip install 'trprompt-dspy[docs]'",
    "core": "pip install trprompt-dspy",
}


def require(module: str, *, extra: str) -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` that says how to install it.

    Args:
        module: Dotted module name, e.g. ``"peft"``.
        extra: The ``trprompt-dspy`` extra that provides it (``"train"``, ``"bench"``, ``"docs"``).

    Returns:
        The imported module.

    Raises:
        ImportError: The module is not installed; the message carries the install command.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = _EXTRA_HINTS.get(extra, f"pip install 'trprompt-dspy[{extra}]'")
        raise ImportError(
            f"trprompt_dspy needs the optional dependency '{module.split('.')[0]}' for this feature "
            f"(extra '{extra}'), but importing it failed: {exc}. Install it with: {hint}"
        ) from exc


def import_textgrad() -> ModuleType:
    """Import ``textgrad`` without its import-time side effects.

    ``import textgrad`` creates ``./logs/`` in the current directory (a JSON-lines log file per import),
    sets its logger to INFO, and imports litellm, which tries to fetch a cost map over the network. This
    sets ``TEXTGRAD_LOG_DIR`` to a temporary folder (unless the user set it) and
    ``LITELLM_LOCAL_MODEL_COST_MAP=True`` before the first import, and afterwards sets the ``textgrad``
    logger to WARNING unless the user chose a level
    (:func:`~trprompt_dspy.runtime.log_noise.quiet_textgrad`; ``logging.getLogger("textgrad").setLevel(logging.INFO)``
    shows its records again).

    Returns:
        The ``textgrad`` module.
    """
    import logging
    import sys

    from trprompt_dspy.runtime.log_noise import TEXTGRAD_LOGGER, quiet_textgrad

    if "TEXTGRAD_LOG_DIR" not in os.environ:
        os.environ["TEXTGRAD_LOG_DIR"] = os.path.join(tempfile.gettempdir(), "trprompt_dspy_textgrad_logs") + os.sep
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    fresh = "textgrad" not in sys.modules
    level_before_import = logging.getLogger(TEXTGRAD_LOGGER).level
    tg = require("textgrad", extra="core")
    quiet_textgrad(level_before_import if fresh else None)
    return tg
