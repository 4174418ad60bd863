"""Importing the repository's scripts (benchmarks/, examples/) as modules in tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script(relative: str, name: str, mp: pytest.MonkeyPatch) -> ModuleType:
    """The script at ``ROOT / relative`` imported as module ``name``, registered in ``sys.modules`` through ``mp``.

    The registration (dataclasses resolve annotations through it) is undone when ``mp`` is.
    """
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    mp.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module
