"""Pruning criteria: the :class:`Criterion` protocol, its registry, and the built-in magnitude rules.

Built-ins: :class:`Std` (``"std"``, Han et al.'s ``quality x std``), :class:`Fraction` (``"fraction"``)
and :class:`Global` (``"global"``). A criterion of your own subclasses :class:`Criterion`; see
:mod:`lightning_prune.core.criteria.base` and ``docs/design.md``.
"""

from lightning_prune.core.criteria.base import (
    Criterion,
    Decision,
    Keeps,
    Levels,
    LevelSpec,
    PruneContext,
    Weights,
    checked_decisions,
    get_criterion,
    register_criterion,
    registered_criteria,
)
from lightning_prune.core.criteria.magnitude import (
    STD_OF,
    Fraction,
    Global,
    Std,
    StdOf,
    floor_mask,
    fraction_mask,
    global_masks,
    std_mask,
    surviving_std,
)

__all__ = [
    "STD_OF",
    "Criterion",
    "Decision",
    "Fraction",
    "Global",
    "Keeps",
    "LevelSpec",
    "Levels",
    "PruneContext",
    "Std",
    "StdOf",
    "Weights",
    "checked_decisions",
    "floor_mask",
    "fraction_mask",
    "get_criterion",
    "global_masks",
    "register_criterion",
    "registered_criteria",
    "std_mask",
    "surviving_std",
]
