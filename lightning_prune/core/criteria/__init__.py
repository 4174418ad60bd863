"""Pruning criteria: the :class:`Criterion` protocol, its registry, and the built-in magnitude rules.

Built-ins, by family:

- magnitude (:mod:`~lightning_prune.core.criteria.magnitude`): :class:`Std` (``"std"``, Han et al.'s
  ``quality x std``), :class:`Fraction` (``"fraction"``) and :class:`Global` (``"global"``);
- structured (:mod:`~lightning_prune.core.criteria.structured`): whole neurons and filters by their norm,
  :class:`StructuredStd` (``"structured_std"``), :class:`StructuredFraction` (``"structured_fraction"``)
  and :class:`StructuredGlobal` (``"structured_global"``);
- semi-structured (:mod:`~lightning_prune.core.criteria.nm`): :class:`NM` (``"nm"``, 2:4 by default).

A criterion of your own subclasses :class:`Criterion`; see :mod:`lightning_prune.core.criteria.base`
and ``docs/design.md``.
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
from lightning_prune.core.criteria.nm import NM, nm_counts, nm_groups, nm_mask
from lightning_prune.core.criteria.structured import (
    NORMS,
    Norm,
    StructuredCriterion,
    StructuredFraction,
    StructuredGlobal,
    StructuredStd,
    unit_sizes,
)

__all__ = [
    "NM",
    "NORMS",
    "STD_OF",
    "Criterion",
    "Decision",
    "Fraction",
    "Global",
    "Keeps",
    "LevelSpec",
    "Levels",
    "Norm",
    "PruneContext",
    "Std",
    "StdOf",
    "StructuredCriterion",
    "StructuredFraction",
    "StructuredGlobal",
    "StructuredStd",
    "Weights",
    "checked_decisions",
    "floor_mask",
    "fraction_mask",
    "get_criterion",
    "global_masks",
    "nm_counts",
    "nm_groups",
    "nm_mask",
    "register_criterion",
    "registered_criteria",
    "std_mask",
    "surviving_std",
    "unit_sizes",
]
