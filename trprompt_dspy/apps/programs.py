"""DSPy programs named on the command line as ``module:Class`` (the CLI, the demo and the benchmarks).

Example:
    >>> type(load_program(DEFAULT_PROGRAM)).__name__
    'MathCoT'
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__all__ = ["DEFAULT_PROGRAM", "load_program"]

#: The program the CLI, the demo and the benchmarks run unless told otherwise: zero-shot CoT for math.
DEFAULT_PROGRAM = "programs.math:MathCoT"


def load_program(spec: str) -> Any:
    """Instantiate a program from ``"package.module:ClassName"``.

    Example:
        >>> type(load_program("programs.math:MathCoT")).__name__
        'MathCoT'
    """
    if ":" not in spec:
        raise SystemExit(f"--program must look like 'package.module:ClassName'; got {spec!r}.")
    mod_name, cls_name = spec.split(":", 1)
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # allow programs defined in the current folder, like uvicorn's app:app
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"Cannot load program {spec!r}: {exc}. Run from the folder that holds the module.") from exc
    return cls()
