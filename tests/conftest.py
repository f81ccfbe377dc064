"""Shared test fixtures: isolated DSPy settings and cache, offline environment, shared-data lookup."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dspy  # noqa: E402
from dspy.dsp.utils.settings import DEFAULT_CONFIG  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clear_dspy_settings():
    """Each test starts from DSPy's default settings and an in-memory-only cache."""
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    dspy.configure(**copy.deepcopy(DEFAULT_CONFIG))
    yield
    dspy.configure(**copy.deepcopy(DEFAULT_CONFIG))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The shared data folder (env TRPROMPT_SHARED_DATA or ../shared/data next to the repo); skip if absent."""
    env = os.environ.get("TRPROMPT_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO_ROOT.parent / "shared" / "data", REPO_ROOT / "shared" / "data"]
    for c in candidates:
        if (c / "splits.json").is_file():
            return c
    pytest.skip("shared data folder not found (set TRPROMPT_SHARED_DATA to the folder holding splits.json)")
