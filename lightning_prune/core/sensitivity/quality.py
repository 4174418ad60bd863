"""Levels files: the per-layer levels a sweep suggests, as YAML or JSON, for a criterion's level.

A file holds the criterion's name and its levels under the criterion's name for them::

    criterion: std
    quality: {conv1: 0.5, fc1: 1.5}

Files written before criteria had names (``quality: {...}`` alone, or ``criterion: fraction`` with
``amount: {...}``) read the same way.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "QUALITY_SUFFIXES",
    "criterion_path",
    "criterion_yaml",
    "load_quality",
    "quality_suffix",
    "write_quality_file",
    "yaml_text",
]

QUALITY_SUFFIXES: tuple[str, ...] = (".yaml", ".yml", ".json")
"""File types :meth:`SensitivityResult.write_quality` and :func:`load_quality` handle."""


def quality_suffix(path: Path, action: str) -> str:
    """The suffix of a quality file to ``action`` (``"read"``, ``"write"``), lower case.

    Raises:
        ValueError: If it is not one of :data:`QUALITY_SUFFIXES` (naming it and the accepted ones).

    Example::

        >>> quality_suffix(Path("levels.YAML"), "read")
        '.yaml'
    """
    suffix = path.suffix.lower()
    if suffix not in QUALITY_SUFFIXES:
        raise ValueError(f"Cannot {action} a quality file {str(path)!r}: suffix must be one of {QUALITY_SUFFIXES}.")
    return suffix


def yaml_text(config: Mapping[str, Any], comment: str) -> str:
    """``config`` as YAML after a ``# comment`` line; a long mapping is written one entry per line.

    Example::

        >>> print(yaml_text({"criterion": "fraction", "amount": {"fc1": 0.9}}, "chosen by hand"), end="")
        # chosen by hand
        criterion: fraction
        amount: {fc1: 0.9}
    """
    import yaml

    lines = [f"# {comment}"]
    for key, value in config.items():
        if not isinstance(value, dict):
            lines.append(yaml.safe_dump({key: value}, sort_keys=False).rstrip("\n"))
            continue
        flow = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=None, width=10**6)
        if len(flow) > 110 or "\n" in flow.rstrip("\n"):
            flow = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False)
        lines.append(flow.rstrip("\n"))
    return "\n".join(lines) + "\n"


def write_quality_file(path: str | Path, config: Mapping[str, Any], comment: str) -> None:
    """Write ``config`` to ``path``: YAML (:func:`yaml_text`) for ``.yaml``/``.yml``, JSON for ``.json``.

    Raises:
        ValueError: On another suffix.

    Example::

        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "q.json"
        >>> write_quality_file(path, {"quality": {"fc1": 1.5}}, "unused in JSON")
        >>> load_quality(path)
        {'quality': {'fc1': 1.5}}
    """
    path = Path(path)
    if quality_suffix(path, "write") == ".json":
        path.write_text(json.dumps(config, indent=2) + "\n")
    else:
        path.write_text(yaml_text(config, comment))


def load_quality(path: str | Path) -> dict[str, Any]:
    """Read a levels file written by :meth:`SensitivityResult.write_quality` (YAML or JSON, by suffix).

    Returns:
        ``{"criterion": name, <level name>: {layer: level}}`` (``"criterion"`` is absent in files of
        Han's rule written before criteria had names): what
        :meth:`~lightning_prune.core.criteria.Criterion.load_levels` reads.

    Raises:
        ValueError: On another suffix, a file that is not one mapping of a criterion name and one set of
            levels, or levels that are not finite numbers ``>= 0``.

    Example::

        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "q.yaml"
        >>> _ = path.write_text("criterion: std" + chr(10) + "quality: {conv1: 0.5, fc1: 1.5}")
        >>> load_quality(path)
        {'criterion': 'std', 'quality': {'conv1': 0.5, 'fc1': 1.5}}
    """
    path = Path(path)
    if quality_suffix(path, "read") == ".json":
        data = json.loads(path.read_text())
    else:
        import yaml

        data = yaml.safe_load(path.read_text())
    levels = [key for key in data if key != "criterion"] if isinstance(data, dict) else []
    if not isinstance(data, dict) or len(levels) != 1 or not isinstance(data.get("criterion", ""), str):
        raise ValueError(
            f"{str(path)!r} must hold one mapping: `criterion` (a name) and one set of levels under the criterion's "
            f"name for them (e.g. `quality`), got {data!r}."
        )
    values = data[levels[0]]
    for layer, value in values.items() if isinstance(values, dict) else [("", values)]:
        ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
        if not ok or value < 0:
            raise ValueError(f"{str(path)!r}: `{levels[0]}[{layer!r}]` must be a finite number >= 0, got {value!r}.")
    return data


def criterion_path(name: str) -> str:
    """The ``class_path`` to write in YAML for the registered criterion ``name``.

    Example::

        >>> criterion_path("fraction")
        'lightning_prune.core.criteria.Fraction'
    """
    from lightning_prune.core import criteria

    cls = criteria.registered_criteria().get(name)
    if cls is None:
        return name
    exported = getattr(criteria, cls.__name__, None) is cls
    return f"lightning_prune.core.criteria.{cls.__name__}" if exported else f"{cls.__module__}.{cls.__qualname__}"


def criterion_yaml(class_path: str, init_args: Mapping[str, Any], comment: str) -> str:
    """A ``criterion:`` block of YAML with ``class_path`` and ``init_args``, after a ``# comment`` line.

    Example::

        >>> print(criterion_yaml("lightning_prune.Std", {"quality": {"fc1": 1.5}}, "by hand"), end="")
        # by hand
        criterion:
          class_path: lightning_prune.Std
          init_args:
            quality: {fc1: 1.5}
    """
    args = yaml_text(init_args, "").splitlines()[1:]
    body = "\n".join("    " + line for line in args)
    return f"# {comment}\ncriterion:\n  class_path: {class_path}\n  init_args:\n{body}\n"
