"""Plain-JSON records: what every checkpoint, result and artifact file holds (never a pickle).

Example:
    >>> json_safe({"a": (1, float("nan"))})
    {'a': [1, 'nan']}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import dspy

__all__ = ["json_safe"]


def json_safe(value: Any) -> Any:
    """Convert ``value`` into plain JSON types (dict/list/str/int/float/bool/None).

    ``dspy.Example``/``Prediction`` become dicts, pydantic models their ``model_dump()``, non-finite
    floats and unknown objects their ``str()``.

    Example:
        >>> json_safe({"a": (1, 2.0), "b": dspy.Prediction(x=1)})
        {'a': [1, 2.0], 'b': {'x': 1}}
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dspy.Example):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        try:
            return json_safe(dump())
        except Exception:  # pragma: no cover - exotic pydantic objects
            pass
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    return str(value)
